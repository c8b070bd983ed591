"""TLS, mutual TLS and bearer tokens against the real server, with the project's clients, its CLI, the batch
job and Triton's own client; and the refusal to listen beyond loopback without authentication. The
certificates are made at run time (tests/pki.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.__main__ import main
from serving.client import AsyncClassifierClient, ClassifierClient, Tls
from serving.client.connection import TOKEN_ENV
from serving.engine.errors import PermissionDenied, Unauthenticated
from serving.server.access import Access, Role, StartRefused, TlsFiles, TokenCheck, check_exposure, is_loopback, read_tokens
from serving.server.app import InferenceServer, ServerOptions
from serving.server.handlers import required_role
from serving.wire.classifier.v1 import classifier_pb2
from serving.wire.inference import grpc_service_pb2
from tests.conftest import running_server
from tests.pki import Pki, make_pki

tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

INFERENCE_TOKEN = "inference-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef0123"
IMAGE = np.zeros((28, 28), np.uint8)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(small_repo, pki):
    with running_server(small_repo, tls=TlsFiles(str(pki.server_cert), str(pki.server_key))) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(small_repo, pki):
    """Mutual TLS and tokens together: the production setting of the README."""
    with running_server(small_repo, tls=TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca)),
                        inference_tokens=(INFERENCE_TOKEN,), admin_tokens=(ADMIN_TOKEN,)) as s:
        yield s


@pytest.fixture(scope="module")
def token_server(small_repo):
    with running_server(small_repo, inference_tokens=(INFERENCE_TOKEN,), admin_tokens=(ADMIN_TOKEN,)) as s:
        yield s


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def triton_input() -> tg.InferInput:
    x = tg.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    return x


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code()


# -- TLS -------------------------------------------------------------------------------------------------------
def test_tls_with_the_projects_clients_and_tritonclient(tls_server, pki):
    tls = Tls.from_files(ca=pki.ca)
    with ClassifierClient(tls_server.address, tls=tls, retries=0) as client:
        assert client.classify([IMAGE])[0]

    async def aio():
        async with AsyncClassifierClient(tls_server.address, tls=tls, retries=0) as client:
            streamed = [r async for r in client.classify_stream([("a", [IMAGE]), ("b", [IMAGE])])]
            return await client.classify([IMAGE]), streamed

    unary, streamed = asyncio.run(aio())
    assert unary[0] and [r.request_id for r in streamed] == ["a", "b"]
    triton = tg.InferenceServerClient(tls_server.address, ssl=True, root_certificates=str(pki.ca))
    try:
        assert triton.infer("fmnist", [triton_input()]).as_numpy("logits").shape == (1, 10)
    finally:
        triton.close()
    with ClassifierClient(tls_server.address, retries=0, timeout_s=5) as plaintext:
        assert code_of(lambda: plaintext.classify([IMAGE])) == grpc.StatusCode.UNAVAILABLE
    with ClassifierClient(tls_server.address, tls=Tls.from_files(ca=pki.stranger_cert), retries=0, timeout_s=5) as c:
        assert code_of(lambda: c.classify([IMAGE])) == grpc.StatusCode.UNAVAILABLE  # a CA that did not sign it


# -- mutual TLS with tokens ------------------------------------------------------------------------------------
def test_mutual_tls_needs_a_certificate_from_the_ca(mtls_server, pki):
    mine = Tls.from_files(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with ClassifierClient(mtls_server.address, tls=mine, token=INFERENCE_TOKEN, retries=0) as client:
        assert client.classify([IMAGE])[0]
    with ClassifierClient(mtls_server.address, tls=mine, token="", retries=0) as client:  # a certificate, no token
        assert code_of(lambda: client.classify([IMAGE])) == grpc.StatusCode.UNAUTHENTICATED
    for tls in (Tls.from_files(ca=pki.ca), Tls.from_files(ca=pki.ca, cert=pki.stranger_cert, key=pki.stranger_key)):
        with ClassifierClient(mtls_server.address, tls=tls, token=INFERENCE_TOKEN, retries=0, timeout_s=5) as client:
            assert code_of(lambda: client.classify([IMAGE])) == grpc.StatusCode.UNAVAILABLE  # refused in the handshake
    triton = tg.InferenceServerClient(mtls_server.address, ssl=True, root_certificates=str(pki.ca),
                                      private_key=str(pki.client_key), certificate_chain=str(pki.client_cert))
    try:
        headers = {"authorization": f"Bearer {INFERENCE_TOKEN}"}
        assert triton.infer("fmnist", [triton_input()], headers=headers).as_numpy("logits").shape == (1, 10)
        with pytest.raises(InferenceServerException) as refused:
            triton.infer("fmnist", [triton_input()])
        assert "UNAUTHENTICATED" in str(refused.value.status())
    finally:
        triton.close()


def test_cli_repository_command_and_batch_job_over_mutual_tls_with_tokens(mtls_server, pki, tmp_path, capsys):
    (tmp_path / "inference.token").write_text(INFERENCE_TOKEN + "\n")
    (tmp_path / "admin.token").write_text(f"# the admin key\n{ADMIN_TOKEN}\n")
    image = tmp_path / "zero.png"
    from PIL import Image
    Image.fromarray(IMAGE).save(image)
    tls = ["--server", mtls_server.address, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]
    inference = tls + ["--token-file", str(tmp_path / "inference.token")]
    admin = tls + ["--token-file", str(tmp_path / "admin.token")]
    assert main(["classify", *inference, "--json", str(image)]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"]
    assert main(["repository", "index", *inference, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["state"] == "READY"
    assert main(["repository", "unload", *inference, "fmnist"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert main(["repository", "load", *admin, "fmnist"]) == 0
    assert main(["classify", *tls, str(image)]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["classify", *tls, "--token-file", str(tmp_path / "missing"), str(image)]) == 2
    assert "--token-file" in capsys.readouterr().err
    images = tmp_path / "set.npz"
    np.savez(images, images=np.zeros((40, 28, 28), np.uint8))
    out = tmp_path / "rows.jsonl"
    assert main(["batch", str(images), *inference, "-o", str(out), "--no-progress", "--batch-size", "16"]) == 0
    assert len(out.read_text().splitlines()) == 40


# -- tokens ----------------------------------------------------------------------------------------------------
def test_tokens_on_both_apis(token_server, monkeypatch):
    address = token_server.address
    with ClassifierClient(address, retries=0) as anonymous:
        assert code_of(lambda: anonymous.classify([IMAGE])) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: anonymous.list_models()) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: list(anonymous.classify_stream([("a", [IMAGE])]))) == grpc.StatusCode.UNAUTHENTICATED
    with ClassifierClient(address, token="not-a-token-of-this-server", retries=0) as stranger:
        assert code_of(lambda: stranger.classify([IMAGE])) == grpc.StatusCode.UNAUTHENTICATED
    for token in (INFERENCE_TOKEN, ADMIN_TOKEN):  # an admin token allows everything an inference token does
        with ClassifierClient(address, token=token, retries=0) as client:
            assert client.classify([IMAGE])[0] and client.list_models() == {"fmnist": [1]}
            assert [r.request_id for r in client.classify_stream([("a", [IMAGE])])] == ["a"]
    monkeypatch.setenv(TOKEN_ENV, INFERENCE_TOKEN)
    with ClassifierClient(address, retries=0) as from_environment:
        assert from_environment.classify([IMAGE])[0]

    triton = tg.InferenceServerClient(address)
    inference, admin = ({"authorization": f"Bearer {t}"} for t in (INFERENCE_TOKEN, ADMIN_TOKEN))
    try:
        for call in (lambda h: triton.infer("fmnist", [triton_input()], headers=h),
                     lambda h: triton.get_model_metadata("fmnist", headers=h),
                     lambda h: triton.get_model_repository_index(headers=h),
                     lambda h: triton.get_inference_statistics("fmnist", headers=h)):
            with pytest.raises(InferenceServerException) as refused:
                call(None)
            assert "UNAUTHENTICATED" in str(refused.value.status())
            call(inference)
            call(admin)
        with pytest.raises(InferenceServerException) as denied:
            triton.unload_model("fmnist", headers=inference)
        assert "PERMISSION_DENIED" in str(denied.value.status()) and "admin token" in denied.value.message()
        triton.unload_model("fmnist", headers=admin)
        triton.load_model("fmnist", headers=admin)
        # The KServe health RPCs stay open, like grpc.health.v1: probes written for Triton need no token.
        assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("fmnist")
    finally:
        triton.close()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        reflected = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert reflected[0].list_services_response.service


def test_every_rpc_has_its_role():
    """Who may call a new RPC is not left to chance: every method of both services is listed here, and an
    unlisted one fails this test until it is placed (a management RPC goes to handlers.ADMIN_METHODS)."""
    inference, admin, open_ = Role.INFERENCE, Role.ADMIN, None
    expected = {
        "classifier.v1.Classifier": {"Classify": inference, "ClassifyStream": inference, "Explain": inference,
                                     "ListModels": inference, "GetModel": inference},
        "inference.GRPCInferenceService": {
            "ServerLive": open_, "ServerReady": open_, "ModelReady": open_,
            "ServerMetadata": inference, "ModelMetadata": inference, "ModelConfig": inference,
            "ModelInfer": inference, "ModelStreamInfer": inference, "ModelStatistics": inference,
            "RepositoryIndex": inference, "RepositoryModelLoad": admin, "RepositoryModelUnload": admin,
            "SystemSharedMemoryStatus": inference, "SystemSharedMemoryRegister": inference,
            "SystemSharedMemoryUnregister": inference, "CudaSharedMemoryStatus": inference,
            "CudaSharedMemoryRegister": inference, "CudaSharedMemoryUnregister": inference,
            "TraceSetting": admin, "LogSettings": admin},
    }
    services = [classifier_pb2.DESCRIPTOR.services_by_name["Classifier"],
                grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
    for service in services:
        methods = {m.name for m in service.methods}
        assert methods == set(expected[service.full_name]), methods ^ set(expected[service.full_name])
        for name in methods:
            assert required_role(f"/{service.full_name}/{name}") == expected[service.full_name][name], name


def test_token_check_is_per_role_and_explains_itself():
    check = TokenCheck([INFERENCE_TOKEN, ADMIN_TOKEN], [ADMIN_TOKEN])  # listed in both: the higher role wins
    bearer = lambda t: [("authorization", f"Bearer {t}")]
    assert check.role_of(bearer(ADMIN_TOKEN)) == Role.ADMIN
    assert check.role_of(bearer(INFERENCE_TOKEN)) == Role.INFERENCE
    assert check.role_of([("authorization", f"bearer  {INFERENCE_TOKEN} ")]) == Role.INFERENCE
    for metadata, fragment in (([], "requires a token"), ([("authorization", INFERENCE_TOKEN)], "Bearer <token>"),
                               (bearer(INFERENCE_TOKEN[:-1]), "not valid")):
        with pytest.raises(Unauthenticated, match=fragment):
            check.role_of(metadata)
    no_certificate = lambda: {}
    with pytest.raises(PermissionDenied, match="admin token"):
        Access(check).check(bearer(INFERENCE_TOKEN), no_certificate, Role.ADMIN, "RepositoryModelLoad")
    with pytest.raises(PermissionDenied, match="--admin-token-file"):  # no admin token at all: management is off
        Access(TokenCheck([INFERENCE_TOKEN])).check(bearer(INFERENCE_TOKEN), no_certificate, Role.ADMIN,
                                                    "RepositoryModelLoad")


def test_token_files_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text(f"# inference keys\n{INFERENCE_TOKEN}\n\n  {ADMIN_TOKEN}  \n")
    monkeypatch.setenv("CNN_SERVING_AUTH_TOKENS", f"{'e' * 20}, {'f' * 20}")
    assert read_tokens(path, "CNN_SERVING_AUTH_TOKENS") == (INFERENCE_TOKEN, ADMIN_TOKEN, "e" * 20, "f" * 20)
    for text, fragment in (("", "holds no token"), ("short\n", "at least 16"), ("with a space inside it\n", "token 1")):
        path.write_text(text)
        with pytest.raises(StartRefused, match=fragment):
            read_tokens(path, "UNSET_VARIABLE")
    with pytest.raises(StartRefused, match="cannot read"):
        read_tokens(tmp_path / "missing", "UNSET_VARIABLE")


# -- secure by default -----------------------------------------------------------------------------------------
def test_loopback_only_without_authentication(small_repo, pki):
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.1", "example.org"]))
    nobody = TokenCheck()
    with pytest.raises(StartRefused, match="--allow-unauthenticated"):
        check_exposure("0.0.0.0", nobody, TlsFiles(), allow_unauthenticated=False)
    with pytest.raises(StartRefused):  # TLS alone encrypts; it does not say who calls
        check_exposure("0.0.0.0", nobody, TlsFiles(str(pki.server_cert), str(pki.server_key)), False)
    check_exposure("0.0.0.0", TokenCheck([INFERENCE_TOKEN]), TlsFiles(), False)
    check_exposure("0.0.0.0", nobody, TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca)), False)
    check_exposure("0.0.0.0", nobody, TlsFiles(), allow_unauthenticated=True)
    # The server refuses before loading a model or opening the port.
    server = InferenceServer(ServerOptions(repository=str(small_repo), host="0.0.0.0", port=0))
    with pytest.raises(StartRefused, match="refusing to listen on 0.0.0.0"):
        asyncio.run(server.start())
    assert server.server is None and not server.repository.all_ready()


def test_serve_command_refuses_in_one_line(small_repo, capsys, tmp_path):
    assert main(["serve", "--model-repository", str(small_repo), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--auth-token-file" in err and "--allow-unauthenticated" in err
    assert main(["serve", "--model-repository", str(small_repo), "--tls-cert", str(tmp_path / "none.crt"),
                 "--tls-key", str(tmp_path / "none.key")]) == 2
    assert "--tls-cert" in capsys.readouterr().err
    half = Path(tmp_path / "server.crt")
    half.write_text("not a certificate")
    assert main(["serve", "--model-repository", str(small_repo), "--tls-cert", str(half), "--tls-key", str(half)]) == 2
    assert "not a PEM file" in capsys.readouterr().err
