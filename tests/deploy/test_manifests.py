"""Every deployment file is linted or validated offline (no Docker engine, no cluster): the Dockerfiles by
hadolint, the compose file by its JSON schema, the Kubernetes manifests by kubernetes-validate, the KServe
resources against the kserve package's own model classes, the Envoy config by Envoy itself. Then the server is
started exactly as the compose file and the Kubernetes Deployment start it (their command and environment),
outside any container, and answers a health check and a classification."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving.client import ClassifierClient

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (the dev extra brings it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    done = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_spec():
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_manifests_are_valid():
    import kubernetes_validate
    manifests = sorted((DEPLOY / "k8s").glob("*.yaml"))
    kinds = set()
    for path in manifests:
        for doc in documents(path):
            kubernetes_validate.validate(doc, "1.37.0", strict=True)  # raises on any error
            kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert all((DEPLOY / r).exists() for r in kustomization["resources"])
    assert all((DEPLOY / f).exists() for g in kustomization["configMapGenerator"] for f in g["files"])


def _check_model(value, type_name: str, where: str) -> None:
    """Check `value` against a generated OpenAPI model type of kserve or kubernetes: every key known, every
    nested value of the declared type."""
    import kserve
    import kubernetes.client
    # Both spellings of generated clients: list[X] / dict(str, X) and List[X] / Dict[str, X].
    type_name = re.sub(r"^List\[(.*)\]$", r"list[\1]", type_name.strip())
    type_name = re.sub(r"^Dict\[(.*)\]$", r"dict(\1)", type_name)
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            _check_model(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        inner = type_name[5:-1].split(",", 1)[1].strip()
        for k, v in value.items():
            _check_model(v, inner, f"{where}.{k}")
        return
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in scalars:
        assert isinstance(value, scalars[type_name]), f"{where}: expected {type_name}, got {value!r}"
        return
    model = getattr(kserve, type_name, None) or getattr(kubernetes.client, type_name)
    assert isinstance(value, dict), f"{where}: expected a {type_name} mapping"
    fields = {wire: attr for attr, wire in model.attribute_map.items()}
    unknown = set(value) - set(fields)
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of {type_name}"
    for key, item in value.items():
        _check_model(item, model.openapi_types[fields[key]], f"{where}.{key}")


def validate_kserve(name: str, model: str) -> None:
    (doc,) = documents(DEPLOY / "kserve" / name)
    _check_model(doc, model, name)
    if model == "V1alpha1ServingRuntime":
        assert set(doc["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}


@pytest.mark.parametrize("name, model", [("servingruntime.yaml", "V1alpha1ServingRuntime"),
                                         ("servingruntime-gpu.yaml", "V1alpha1ServingRuntime"),
                                         ("inferenceservice.yaml", "V1beta1InferenceService")])
def test_kserve_resources_match_kserves_own_models(name, model):
    if importlib.util.find_spec("kserve") is None:  # not imported here: see below
        pytest.skip("kserve is not installed (the dev extra brings it)")
    # In a process of its own: kserve and tritonclient both register KServe's protocol messages in protobuf's
    # default pool, and one process cannot hold both.
    done = subprocess.run([sys.executable, "-c", "from tests.deploy.test_manifests import validate_kserve; "
                           f"validate_kserve({name!r}, {model!r})"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_envoy_config_loads_in_envoy():
    done = subprocess.run([tool("envoy"), "--mode", "validate", "-c", str(DEPLOY / "envoy" / "envoy.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_every_serve_flag_has_a_documented_variable():
    import argparse

    from serving.server import cli
    parser = argparse.ArgumentParser()
    cli.serve_arguments(parser)
    readme = (ROOT / "docs" / "deploy.md").read_text()
    for action in cli.serve_flags(parser):
        row = f"| `{action.option_strings[0]}` | `{cli.environment_variable(action)}` |"
        assert row in readme, f"docs/deploy.md's flag table lacks {row}"


def _container_command(kind: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment a container of `kind` (compose, kubernetes) starts the server with."""
    if kind == "compose":
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        service = compose["services"]["server"]
        dockerfile = (ROOT / service["build"]["dockerfile"]).read_text()
        entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
        image_env = dict(re.findall(r"(CNN_SERVING_\w+)=(\S+)", dockerfile))
        return entrypoint, {**image_env, **{k: str(v) for k, v in service["environment"].items()}}
    (deployment, *_) = documents(DEPLOY / "k8s" / "server.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["command"] + container.get("args", []), {e["name"]: e["value"] for e in container["env"]}


@pytest.mark.parametrize("kind", ["compose", "kubernetes"])
def test_the_container_command_serves(kind, small_repo, tmp_path):
    command, env = _container_command(kind)
    assert command[:3] == ["python", "-m", "serving"]
    token = secrets.token_hex(16)
    paths = {"/models": str(small_repo)}  # the mounts, as files of this machine
    for name in ("CNN_SERVING_AUTH_TOKEN_FILE", "CNN_SERVING_ADMIN_TOKEN_FILE"):
        if name in env:
            local = tmp_path / Path(env[name]).name
            local.write_text(token + "\n")
            paths[env[name]] = str(local)
    port = free_port()
    env = {k: paths.get(v, v) for k, v in env.items()}
    env.update(CNN_SERVING_PORT=str(port), CNN_SERVING_METRICS_PORT="0", CNN_SERVING_HTTP_PORT="0")  # no fixed port
    server = subprocess.Popen([sys.executable, *command[1:]], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("SERVING") or len(lines) > 200:
                break
        assert lines and lines[-1].startswith("SERVING"), "".join(lines)
        address = f"127.0.0.1:{port}"
        health = subprocess.run([sys.executable, "-m", "serving", "health", "--server", address],
                                capture_output=True, text=True, timeout=30)
        assert health.returncode == 0 and "SERVING" in health.stdout
        with ClassifierClient(address, token=token) as client:
            assert len(client.classify([np.zeros((28, 28), np.uint8)], top_k=3)[0]) == 3
    finally:
        server.terminate()
        server.wait(60)
    assert server.returncode == 0
