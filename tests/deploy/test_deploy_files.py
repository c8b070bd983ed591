"""The deploy files say what works: checks of the fixes that building the images and running the compose
topology called for (scripts/containers/, `make containers`), kept here because they need no container engine.
The images: CPU onnxruntime in the CPU image, CPU torch in the training image, wheels bind-mounted rather than
copied, the base image a build argument, a health check without Python. Compose: Prometheus scrapes addresses
that listen, plaintext gRPC is published on loopback only, training runs stay out of the served repository,
the export has its data. Kubernetes and KServe: pinned images, disjoint Deployment selectors, readiness that
survives a slow answer, a config hash that rolls Envoy, ReadWriteMany storage, Jobs that put a model into the
repository, a GPU runtime, and a model name that works through the InferenceService's name."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving.client import ClassifierClient

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
HEALTH_SCRIPT = DOCKER / "grpc-health.sh"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_defaults(text: str) -> str:
    """Compose's `${VAR:-default}` interpolation as an environment without those variables sees it."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def compose() -> dict:
    return yaml.safe_load(with_defaults((ROOT / "docker-compose.yml").read_text()))


def extra_requirements(extra: str) -> set[str]:
    """Every requirement an extra of the project pulls in, its self-references (cnn-serving[...]) followed."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    seen, todo, found = set(), [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in extras[name]:
            m = re.match(r"cnn-serving\[([^\]]+)\]", req)
            if m:
                todo += [e.strip() for e in m.group(1).split(",")]
            else:
                found.add(req)
    return found


def installed_extra(dockerfile: Path) -> str:
    """The extra the final stage of a Dockerfile installs."""
    text = dockerfile.read_text()
    m = re.search(r'pip install [^\n]*"cnn-serving\[([^\]]+)\]"', text)
    assert m, f"{dockerfile.name} installs no cnn-serving extra"
    extra = m.group(1)
    default = re.search(rf"ARG {extra.strip('$')}=(\S+)", text) if extra.startswith("$") else None
    return default.group(1) if default else extra


def names(requirements: set[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


# ------------------------------------------------------------------------------------------------- images

def test_cpu_image_installs_the_cpu_onnxruntime_and_the_gpu_image_the_cuda_one():
    cpu = names(extra_requirements(installed_extra(DOCKER / "server.Dockerfile")))
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert not {n for n in cpu if n.startswith("nvidia-")}
    gpu = extra_requirements(installed_extra(DOCKER / "server-gpu.Dockerfile"))
    assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]") for r in gpu)


def test_training_image_takes_cpu_torch_by_default_with_a_gpu_variant():
    text = (DOCKER / "train.Dockerfile").read_text()
    assert re.search(r"^ARG TORCH=torch==[\d.]+\+cpu$", text, re.M)
    assert 'ARG TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"' in text
    cpu = names(extra_requirements(installed_extra(DOCKER / "train.Dockerfile")))
    assert {"torch", "onnxruntime"} <= cpu and "onnxruntime-gpu" not in cpu
    # The GPU variant's build arguments, as the file's header gives them, name an extra with CUDA onnxruntime.
    gpu_extra = re.search(r"--build-arg EXTRA=(\S+)", text).group(1)
    assert "onnxruntime-gpu" in names(extra_requirements(gpu_extra))


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_wheels_are_mounted_into_the_install_step_not_copied(dockerfile):
    text = dockerfile.read_text()
    assert not re.search(r"COPY --from=wheels /wheels[/ ]", text)  # a COPY layer keeps the wheels even after `rm`
    assert re.search(r"RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \\\n\s+pip install", text)
    # Their hashes are copied before it: the cache keys that step on them, so new code is never left out.
    assert text.index("COPY --from=wheels /wheels.sha256") < text.index("RUN --mount=type=bind,from=wheels")


@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_base_image_is_a_build_argument_defaulting_to_the_official_slim_image(dockerfile):
    text = dockerfile.read_text()
    assert text.index("ARG BASE=python:3.11-slim") < text.index("FROM ")
    assert re.findall(r"^FROM (\S+)", text, re.M) and all(f == "${BASE}" for f in re.findall(r"^FROM (\S+)", text, re.M))


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "server-gpu.Dockerfile"])
def test_healthcheck_is_the_shell_probe(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    (check,) = re.findall(r"^HEALTHCHECK .*CMD (.+)$", text, re.M)
    assert yaml.safe_load(check) == ["grpc-health"]
    assert f"COPY --chmod=755 deploy/docker/{HEALTH_SCRIPT.name} /usr/local/bin/grpc-health" in text
    script = HEALTH_SCRIPT.read_text()
    assert script.startswith("#!/usr/bin/env bash\n")
    assert not [line for line in script.splitlines() if "python" in line and not line.lstrip().startswith("#")]


def test_health_probe_says_serving_then_draining_then_nothing(small_repo):
    """The HEALTHCHECK script against a real server: 0 while it serves, 1 once it drains (health NOT_SERVING)
    and 1 when nothing listens."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--model-repository", str(small_repo),
                               "--port", str(port), "--http-port", "0", "--metrics-port", "0", "--drain-delay", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = lambda: subprocess.run(["bash", str(HEALTH_SCRIPT), "127.0.0.1", str(port)], capture_output=True,  # noqa: E731
                                   timeout=10).returncode
    try:
        for line in server.stdout:
            if line.startswith("SERVING"):
                break
        assert probe() == 0
        server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 4
        while probe() != 1:  # the drain delay (5 s) leaves the port open, answering NOT_SERVING
            assert time.monotonic() < deadline, "health did not turn NOT_SERVING"
        assert server.poll() is None  # still draining: refused by status, not by a closed port
    finally:
        server.wait(60)
    assert probe() == 1


# ------------------------------------------------------------------------------------------------ compose

def test_prometheus_scrapes_addresses_that_listen():
    services = compose()["services"]
    aliases = {a for s in services.values() for n in (s.get("networks") or {}).values() if n for a in n.get("aliases", [])}
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    envoy_admin = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())["admin"]["address"]["socket_address"]
    scraped = 0
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services, f"{job['job_name']}: {host} is no compose service"
                if host == "envoy":  # Envoy's stats are on its admin port: it must listen beyond loopback
                    assert int(port) == envoy_admin["port_value"] and envoy_admin["address"] == "0.0.0.0"
                scraped += 1
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                assert name in services or name in aliases
                assert str(sd["port"]) in {str(p) for s in services.values() for p in s.get("expose", [])}
                scraped += 1
    assert scraped >= 2


def test_plaintext_ports_are_published_on_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_training_runs_stay_out_of_the_served_repository_and_export_has_its_data():
    services = compose()["services"]
    served = {v.split(":")[0] for v in services["server"]["volumes"] if v.split(":")[1] == "/models"}
    train = services["train"]
    out_dir = next(a.split("=", 1)[1] for a in train["command"] if a.startswith("out_dir="))
    train_mounts = {v.split(":")[1]: v.split(":")[0] for v in train["volumes"]}
    mount = max((m for m in train_mounts if out_dir.startswith(m + "/")), key=len)
    assert train_mounts[mount] not in served, f"training writes {out_dir} into the served volume"
    export = services["export"]
    command = export["command"]
    export_mounts = {v.split(":")[1]: v.split(":")[0] for v in export["volumes"]}
    assert export_mounts[command[command.index("--repository") + 1]] in served
    assert command[1].startswith(mount + "/") and export_mounts[mount] == train_mounts[mount]  # reads the run
    data = command[command.index("--data-dir") + 1]
    assert export_mounts[data] == train_mounts[data]  # the same data the training read
    assert train["read_only"] and export["read_only"]  # as the Kubernetes Job runs them


def test_compose_names_the_images_users_can_swap_for_local_ones():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${ENVOY_IMAGE:-envoyproxy/envoy:v1.40.0}" in text and "${PROMETHEUS_IMAGE:-prom/prometheus:" in text


# --------------------------------------------------------------------------------------- kubernetes, kserve

def all_images() -> list[tuple[str, str]]:
    found = [(f"compose {n}", s["image"]) for n, s in compose()["services"].items()]
    for path in [*(DEPLOY / "k8s").glob("*.yaml"), *(DEPLOY / "kserve").glob("*.yaml")]:
        found += [(path.name, m) for m in re.findall(r"^\s*image: (\S+)", path.read_text(), re.M)]
    return found


def test_every_image_is_pinned():
    images = all_images()
    assert len(images) >= 10
    for where, image in images:
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and not tag.endswith("-latest"), f"{where}: {image} floats"


def deployments() -> list[dict]:
    return [d for p in (DEPLOY / "k8s").glob("*.yaml") for d in documents(p) if d["kind"] == "Deployment"]


def test_no_deployment_selects_another_deployments_pods():
    found = deployments()
    assert len(found) == 3
    for a in found:
        for b in found:
            if a is not b:
                selector = a["spec"]["selector"]["matchLabels"]
                labels = b["spec"]["template"]["metadata"]["labels"]
                assert not selector.items() <= labels.items(), \
                    f"{a['metadata']['name']} selects the pods of {b['metadata']['name']}"
    # The Service Envoy resolves still takes both kinds of server pods.
    (service,) = [d for d in documents(DEPLOY / "k8s" / "server.yaml") if d["kind"] == "Service"]
    servers = [d for d in found if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "server"]
    assert len(servers) == 2
    assert all(service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in servers)


def test_readiness_survives_a_slow_answer():
    servers = [d for d in deployments() if d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "server"]
    for d in servers:
        (container,) = d["spec"]["template"]["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            p = container[probe]
            assert p["failureThreshold"] >= 3 and p.get("timeoutSeconds", 1) >= 3, f"{d['metadata']['name']} {probe}"


def test_envoy_config_change_rolls_envoy():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert not (kustomization.get("generatorOptions") or {}).get("disableNameSuffixHash")
    generated = {g["name"] for g in kustomization["configMapGenerator"]
                 if not (g.get("options") or {}).get("disableNameSuffixHash")}
    (envoy,) = [d for d in deployments() if d["metadata"]["name"] == "cnn-serving-envoy"]
    referenced = {v["configMap"]["name"] for v in envoy["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    assert referenced and referenced <= generated  # kustomize rewrites these references to the hashed name


def test_model_volume_is_read_write_many_and_a_job_puts_a_model_in_it():
    (pvc,) = documents(DEPLOY / "k8s" / "storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    resources = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    jobs = [d for r in resources for d in documents(DEPLOY / r) if d["kind"] == "Job"]
    writers = [j for j in jobs for v in j["spec"]["template"]["spec"]["volumes"]
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim
               and not v["persistentVolumeClaim"].get("readOnly")]
    assert writers, "`kubectl apply -k deploy/` would give replicas an empty repository"


def test_seed_job_copies_the_bundled_repository_once(tmp_path):
    (job,) = documents(DEPLOY / "k8s" / "seed-job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    bundled, repository = tmp_path / "models", tmp_path / "repository"
    (bundled / "fashion_mnist").mkdir(parents=True)
    (bundled / "fashion_mnist" / "config.pbtxt").write_text('name: "fashion_mnist"\n')
    repository.mkdir()
    local = script.replace("/repository", str(repository)).replace("/models", str(bundled))
    for expected in ("seeded fashion_mnist", "left as it is"):  # a second run leaves the repository alone
        done = subprocess.run(["bash", "-c", local], capture_output=True, text=True)
        assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr
    assert sorted(p.name for p in repository.iterdir()) == ["fashion_mnist"]


def test_train_export_job_keeps_runs_out_of_the_repository_and_mounts_the_data():
    (job,) = documents(DEPLOY / "k8s" / "train-export-job.yaml")
    spec = job["spec"]["template"]["spec"]
    (train,), (export,) = spec["initContainers"], spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = lambda c: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}  # noqa: E731
    out_dir = next(a.split("=", 1)[1] for a in train["args"] if a.startswith("out_dir="))
    assert mounts(train)["/" + out_dir.split("/")[1]] == "runs" and "emptyDir" in volumes["runs"]
    args = export["args"]
    assert volumes[mounts(export)[args[args.index("--repository") + 1]]]["persistentVolumeClaim"]["claimName"] == \
        "cnn-serving-models"
    assert mounts(export)[args[args.index("--data-dir") + 1]] == "data"


def test_kserve_gpu_runtime():
    (runtime,) = documents(DEPLOY / "kserve" / "servingruntime-gpu.yaml")
    (container,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"].startswith("cnn-serving:gpu") and env["CNN_SERVING_DEVICE"] == "cuda"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    (cpu,) = documents(DEPLOY / "kserve" / "servingruntime.yaml")
    assert runtime["metadata"]["name"] != cpu["metadata"]["name"]


def test_kserve_model_answers_to_the_inference_service_name(tmp_path):
    """Exported as the InferenceService's own header says, then served as the ServingRuntime starts the
    server: a call naming the model as the service is named gets an answer, not NOT_FOUND."""
    from tests.conftest import export_small
    (isvc,) = documents(DEPLOY / "kserve" / "inferenceservice.yaml")
    service = isvc["metadata"]["name"]
    header = (DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
    assert f"--name {service} " in header
    repository = tmp_path / "mnt-models"
    export_small(repository, name=service)
    (runtime,) = documents(DEPLOY / "kserve" / "servingruntime.yaml")
    (container,) = runtime["spec"]["containers"]
    token = secrets.token_hex(16)
    (tmp_path / "inference").write_text(token + "\n")
    env = {e["name"]: e["value"] for e in container["env"]}
    port = free_port()
    env.update(CNN_SERVING_MODEL_REPOSITORY=str(repository), CNN_SERVING_PORT=str(port),
               CNN_SERVING_METRICS_PORT="0", CNN_SERVING_HTTP_PORT="0",
               CNN_SERVING_AUTH_TOKEN_FILE=str(tmp_path / "inference"))
    server = subprocess.Popen([sys.executable, *container["command"][1:]], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if line.startswith("SERVING"):
                break
        with ClassifierClient(f"127.0.0.1:{port}", token=token, retries=0) as client:
            assert client.list_models() == {service: [1]}
            assert len(client.classify([np.zeros((28, 28), np.uint8)], model=service, top_k=1)[0]) == 1
    finally:
        server.terminate()
        server.wait(60)


def test_envoy_admin_port_is_reached_by_prometheus_only():
    (policy,) = documents(DEPLOY / "k8s" / "envoy-admin-policy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "envoy"
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert "from" not in rules[8001]  # clients, from anywhere
    assert rules[9901]["from"] and all("podSelector" in f for f in rules[9901]["from"])
    resources = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert "k8s/envoy-admin-policy.yaml" in resources
