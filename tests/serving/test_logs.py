"""The server's log lines: JSON with the trace ids of the call a line is about, no token or image bytes in any
line, LogSettings (admin only) changing the level and format at run time, and one CUDA-unavailable line per
process. The real server runs in this process, so its lines go through the handler set up here."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest

from serving.engine import runtime
from serving.server.logs import CONTROL
from serving.server.tracing import TraceConfig
from serving.wire.classifier.v1 import classifier_pb2 as cpb
from serving.wire.classifier.v1 import classifier_pb2_grpc as cpb_grpc
from tests.conftest import export_small, running_server
from tests.serving.otlp_receiver import OtlpReceiver

tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

USER, ADMIN, WRONG = "user-token-8f3a", "admin-token-77c1", "wrong-token-0d9e"
PIXEL_MARKER = b"PIXELS-THAT-MUST-NOT-BE-LOGGED" * 8


@pytest.fixture
def server_log():
    """The server's own handler, writing into a buffer; the root logger as it was afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    buffer = io.StringIO()
    CONTROL.configure("DEBUG", "json", stream=buffer)
    try:
        yield buffer
    finally:
        for h in root.handlers:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        CONTROL.format = "text"


def test_json_lines_carry_the_call_trace_ids_and_no_token_or_image_bytes(small_repo, server_log):
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with OtlpReceiver() as receiver, running_server(
            small_repo, inference_tokens=(USER,), admin_tokens=(ADMIN,),
            trace=TraceConfig(enabled=True, endpoint=receiver.endpoint)) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = cpb_grpc.ClassifierStub(channel)
            traceparent = ("traceparent", f"00-{trace_id}-{parent}-01")
            with pytest.raises(grpc.RpcError) as refused:  # a wrong token: refused, with an audit line
                stub.Classify(cpb.ClassifyRequest(images=[cpb.Image(encoded=b"x")]), timeout=10,
                              metadata=(traceparent, ("authorization", f"Bearer {WRONG}")))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as bad:  # bytes that are no image: the caller's mistake
                stub.Classify(cpb.ClassifyRequest(images=[cpb.Image(encoded=PIXEL_MARKER)]), timeout=10,
                              metadata=(traceparent, ("authorization", f"Bearer {USER}")))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [json.loads(line) for line in server_log.getvalue().splitlines()]  # every line is one JSON object
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    (audit,) = [line for line in lines if line["message"].startswith("refused Classify")]
    assert audit["trace_id"] == trace_id and len(audit["span_id"]) == 16 and audit["span_id"] != parent
    text = server_log.getvalue()
    for secret in (USER, ADMIN, WRONG, PIXEL_MARKER.decode()[:30]):
        assert secret not in text


def _admin(client, call, *args):
    return call(*args, headers={"authorization": f"Bearer {ADMIN}"}, as_json=True)


def test_log_settings_change_level_and_format_admin_only(small_repo, server_log):
    with running_server(small_repo, inference_tokens=(USER,), admin_tokens=(ADMIN,)) as server:
        client = tg.InferenceServerClient(server.address)
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.get_log_settings(headers={"authorization": f"Bearer {USER}"})
            assert "PERMISSION_DENIED" in str(refused.value.status())
            settings = _admin(client, client.update_log_settings, {"log_verbose_level": 0, "log_info": False,
                                                                   "log_format": "text"})["settings"]
            assert logging.getLogger().level == logging.WARNING and CONTROL.format == "text"
            assert settings["log_info"]["bool_param"] is False and settings["log_warning"]["bool_param"] is True
            assert settings["log_format"]["string_param"] == "text"
            settings = _admin(client, client.update_log_settings, {"log_verbose_level": 1, "log_format": "json"})
            assert logging.getLogger().level == logging.DEBUG and CONTROL.format == "json"
            assert settings["settings"]["log_verbose_level"]["uint32_param"] == 1
            with pytest.raises(InferenceServerException) as log_file:
                _admin(client, client.update_log_settings, {"log_file": "/tmp/server.log"})
            assert "INVALID_ARGUMENT" in str(log_file.value.status())
            # tritonclient's own trace calls reach TraceSetting too (off here: no --trace).
            assert _admin(client, client.get_trace_settings)["settings"]["trace_level"]["value"] == ["OFF"]
        finally:
            client.close()


def test_one_cuda_unavailable_line_per_process_not_per_version(tmp_path, monkeypatch, caplog):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fall back from")
    for version in (1, 2, 3):
        export_small(tmp_path, version=version, seed=version)
    config = tmp_path / "fmnist" / "config.pbtxt"  # serve every version, not only the latest
    config.write_text(config.read_text().replace("latest {\n    num_versions: 1\n  }", "all {\n  }"))
    monkeypatch.setattr(runtime, "_fallback_reported", set())  # as in a fresh process
    with caplog.at_level(logging.INFO), running_server(tmp_path) as server:
        providers = {mv.sessions.provider for mv in server.server.repository.all_ready()}
        assert len(server.server.repository.all_ready()) == 3
    lines = [r for r in caplog.records if "is not usable" in r.getMessage()]
    if providers == {"CUDAExecutionProvider"}:
        assert lines == []  # a machine with a GPU: nothing fell back
    else:
        assert len(lines) == 1 and "every model runs on CPUExecutionProvider" in lines[0].getMessage()
