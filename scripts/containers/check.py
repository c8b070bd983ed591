"""The container checks of `make containers`, run with podman on images built by build.sh. Each part exits
non-zero at the first claim that does not hold, and writes its figures to build/containers/<part>.json.

  check.py images                 the CPU image: size, no CUDA libraries, no compilers, no wheels, user 10001
  check.py serving                the CPU image served read-only: HEALTHCHECK, same answers as outside a
                                  container (classify and tritonclient), `podman stop` under load: none lost
  check.py compose                docker-compose.yml with podman-compose: Envoy, two replicas, Prometheus, a
                                  10,000-image batch job exactly once across a replica's restart, toy train
                                  and export served without restart, `down` leaves nothing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's client, whatever the interpreter has installed
OUT = ROOT / "build" / "containers"
CPU_IMAGE = "localhost/cnn-serving:cpu"
# The CPU serving image's budget: 355 MB when measured, of which the project's own code is 2 MB and onnxruntime,
# numpy, grpcio, Pillow, uvloop and aiohttp most of the rest (as resolved at build time).
SIZE_LIMIT_MB = 365
EXAMPLES = sorted((ROOT / "examples" / "images").glob("*.png"))


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(args)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def claim(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        raise SystemExit(f"FAILED: {what}")


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.5):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    claim(False, f"{what} within {timeout_s:g} s")


def save(part: str, figures: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{part}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


def inspect(name: str, fmt: str, kind: str = "container") -> str:
    return sh("podman", kind, "inspect", "--format", fmt, name).stdout.strip()


# ---------------------------------------------------------------------------------------------------- images

def check_images(_args) -> None:
    figures = {}
    for image in ("localhost/cnn-serving:cpu", "localhost/cnn-serving:train", "localhost/cnn-serving:gpu",
                  "localhost/cnn-serving-local/envoy:v1.40.0", "localhost/cnn-serving-local/prometheus:2.42"):
        if sh("podman", "image", "exists", image, check=False).returncode == 0:
            figures[image.removeprefix("localhost/")] = round(int(inspect(image, "{{.Size}}", "image")) / 1e6)
    size = figures["cnn-serving:cpu"]
    claim(size <= SIZE_LIMIT_MB, f"CPU serving image {size} MB <= {SIZE_LIMIT_MB} MB")
    claim(inspect(CPU_IMAGE, "{{.Config.User}}", "image") == "10001", "CPU image runs as user 10001")
    test = json.loads(inspect(CPU_IMAGE, "{{json .Config.Healthcheck.Test}}", "image"))
    claim(test == ["CMD", "grpc-health"], f"HEALTHCHECK is the shell probe, no Python process: {test}")
    probe = """
        set -e
        ! python -c 'import importlib.metadata as m; m.version("onnxruntime-gpu")' 2>/dev/null
        python -c 'import onnxruntime as o; p = o.get_available_providers(); assert "CUDAExecutionProvider" not in p, p'
        test -z "$(find / -xdev \\( -name 'libcu*.so*' -o -name 'libcudnn*' -o -name 'libnv*.so*' \\) -print -quit)"
        for c in gcc cc g++ c++ clang ld as make; do ! command -v $c; done
        test ! -e /wheels
    """
    done = sh("podman", "run", "--rm", "--user", "0", "--entrypoint", "bash", CPU_IMAGE, "-c", probe, check=False)
    claim(done.returncode == 0, "CPU image: CPU onnxruntime only, no CUDA libraries, no compilers, no wheels left "
          + (done.stdout + done.stderr)[-500:])
    history = sh("podman", "history", "--no-trunc", "--format", "{{.CreatedBy}}", CPU_IMAGE).stdout
    copies = [line for line in history.splitlines() if "COPY" in line]
    # Only their hashes are copied (the file that keys the install step's cache): the wheels are bind-mounted.
    claim(not any("/wheels" in line and not line.rstrip().endswith("/tmp/wheels.sha256") for line in copies),
          "no layer copies the wheels (they are bind-mounted for the install step)")
    save("images", {"size_mb": figures})


# --------------------------------------------------------------------------------------------------- serving

def _outside_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--model-repository",
                               str(ROOT / "model_repository"), "--port", str(port), "--metrics-port", "0", "--http-port", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:
        if line.startswith("SERVING"):
            return server
    raise SystemExit("the server outside a container did not start")


def _classify_cli(address: str, token_file: Path | None) -> str:
    args = [sys.executable, "-m", "serving", "classify", "--server", address, *map(str, EXAMPLES)]
    if token_file:
        args += ["--token-file", str(token_file)]
    return sh(*args, cwd=ROOT).stdout


def _triton_logits(address: str, token: str | None, protocol: str = "grpc") -> np.ndarray:
    """The logits of the example images through tritonclient, over gRPC or the REST port (binary tensors)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from PIL import Image
    triton = tg if protocol == "grpc" else th
    pixels = np.stack([np.asarray(Image.open(p).convert("L").resize((28, 28)), np.float32) / 255 for p in EXAMPLES])
    x = triton.InferInput("input", [len(EXAMPLES), 1, 28, 28], "FP32")
    x.set_data_from_numpy(pixels[:, None])
    client = triton.InferenceServerClient(address)
    try:
        headers = {"authorization": f"Bearer {token}"} if token else None
        return client.infer("fashion_mnist", [x], headers=headers).as_numpy("logits")
    finally:
        client.close()


def _rest_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


class Load:
    """Callers sending unary Classify calls until stopped, each outcome counted: answered, refused (the server
    said it is shutting down, or nothing listens: never run), or lost (anything else: a call cut after it was
    sent). A refused caller backs off as the project's client does between retries (0.1 s, doubling): a caller
    that resent at once, forever, would keep a draining server's port from ever falling quiet."""

    def __init__(self, address: str, token: str, callers: int = 4):
        from serving.client import ClassifierClient
        self.client = ClassifierClient(address, retries=0, timeout_s=30, token=token)
        self.answered = self.refused = 0
        self.lost: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]

    def _run(self) -> None:
        image = np.zeros((28, 28), np.uint8)
        backoff = 0.0
        while not self.stop.is_set():
            try:
                self.client.classify([image], top_k=1)
                outcome, backoff = "answered", 0.0
            except grpc.RpcError as e:
                details = e.details() or ""
                if e.code() == grpc.StatusCode.UNAVAILABLE and any(
                        s in details for s in ("shutting down", "failed to connect", "Connection refused",
                                               "connections to all backends failing")):
                    outcome = "refused"
                    backoff = min(max(0.1, 2 * backoff), 1.6)
                    time.sleep(backoff)
                else:
                    outcome = f"{e.code().name}: {details}"
            with self.lock:
                if outcome == "answered":
                    self.answered += 1
                elif outcome == "refused":
                    self.refused += 1
                else:
                    self.lost.append(outcome)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        self.client.close()


def check_serving(args) -> None:
    work = OUT / "serving"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    token = os.urandom(16).hex()
    token_file = work / "tokens.txt"
    token_file.write_text(token + "\n")
    token_file.chmod(0o644)  # read by the container's user 10001
    name, port = "cnn-serving-check", args.port
    sh("podman", "rm", "-f", "-t", "0", name, check=False)
    # As the Kubernetes Deployment runs it: read-only root filesystem, a writable /tmp, no capabilities.
    sh("podman", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
       "--security-opt", "no-new-privileges", "-p", f"127.0.0.1:{port}:8001", "-p", f"127.0.0.1:{port + 2}:8000",
       "--stop-timeout", "40",
       "-v", f"{token_file}:/run/secrets/inference_tokens:ro",
       "-e", "CNN_SERVING_AUTH_TOKEN_FILE=/run/secrets/inference_tokens", CPU_IMAGE)
    outside = None
    try:
        claim(inspect(name, "{{.HostConfig.ReadonlyRootfs}}") == "true", "the container's root filesystem is read-only")
        # podman runs HEALTHCHECKs from systemd timers; without systemd, `podman healthcheck run` runs the same
        # command and records the result in the container's health state.
        started = time.monotonic()
        wait_until(lambda: sh("podman", "healthcheck", "run", name, check=False).returncode == 0, 90,
                   "the HEALTHCHECK to pass")
        healthy_s = time.monotonic() - started
        claim(inspect(name, "{{.State.Health.Status}}") == "healthy", "podman reports the container healthy")
        address = f"127.0.0.1:{port}"
        outside_port = args.port + 1
        outside = _outside_server(outside_port)
        inside_text = _classify_cli(address, token_file)
        outside_text = _classify_cli(f"127.0.0.1:{outside_port}", None)
        claim(inside_text == outside_text and len(inside_text.splitlines()) >= len(EXAMPLES),
              f"classify of {len(EXAMPLES)} images: the same answers from the container as outside")
        inside, reference = _triton_logits(address, token), _triton_logits(f"127.0.0.1:{outside_port}", None)
        diff = float(np.abs(inside - reference).max())
        claim(inside.shape == (len(EXAMPLES), 10) and diff <= 1e-4 and
              (inside.argmax(1) == reference.argmax(1)).all(),
              f"tritonclient: the same logits from the container as outside (max difference {diff:.2e})")
        rest = f"127.0.0.1:{port + 2}"
        over_rest = _triton_logits(rest, token, protocol="http")
        rest_diff = float(np.abs(over_rest - reference).max())
        claim(rest_diff <= 1e-4, f"tritonclient.http on the REST port: the same logits (max difference {rest_diff:.2e})")
        refused, page = _rest_status(f"http://{rest}/v2/models/fashion_mnist"), _rest_status(f"http://{rest}/")
        claim(refused == 401 and page == 200, f"REST without a token is refused ({refused}); the page is served ({page})")
        with Load(address, token) as load:
            wait_until(lambda: load.answered >= 200, 60, "200 calls answered under load")
            before = load.answered
            started = time.monotonic()
            sh("podman", "stop", "-t", "40", name)
            stop_s = time.monotonic() - started
        code = int(inspect(name, "{{.State.ExitCode}}"))
        logs = sh("podman", "logs", name).stderr
        claim(load.answered > before, f"calls answered during the drain ({load.answered - before})")
        claim(not load.lost, f"no call lost by `podman stop` under load: {load.lost[:5]}")
        claim(code == 0 and "drained: every accepted call answered" in logs,
              f"the server drained and exited 0 (exit code {code}, {stop_s:.1f} s)")
        save("serving", {"healthy_after_s": round(healthy_s, 1), "answered": load.answered,
                         "refused": load.refused, "lost": len(load.lost), "stop_s": round(stop_s, 1),
                         "exit_code": code, "tritonclient_max_diff": diff, "rest_max_diff": rest_diff})
    finally:
        if outside:
            outside.terminate()
            outside.wait(60)
        sh("podman", "rm", "-f", "-t", "0", name, check=False)


# --------------------------------------------------------------------------------------------------- compose

class Compose:
    def __init__(self, project: str, data_dir: str, tool: str):
        self.project, self.tool = project, tool
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": project, "FASHION_MNIST_DIR": data_dir,
                    "ENVOY_IMAGE": "localhost/cnn-serving-local/envoy:v1.40.0",
                    "PROMETHEUS_IMAGE": "localhost/cnn-serving-local/prometheus:2.42"}

    def __call__(self, *args: str, profiles=("cpu",), check: bool = True) -> subprocess.CompletedProcess:
        flags = [f for p in profiles for f in ("--profile", p)]
        return sh(self.tool, *flags, *args, check=check, cwd=ROOT, env=self.env)

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        args = ["podman", "ps", "--format", "{{.Names}}", "--filter", f"label=io.podman.compose.project={self.project}"]
        if service:
            args += ["--filter", f"label=io.podman.compose.service={service}"]
        if all_states:
            args.append("-a")
        return sorted(sh(*args).stdout.split())


def prometheus(query_path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:9091{query_path}", timeout=5) as r:
        return json.load(r)


def targets_up() -> tuple[int, int]:
    active = prometheus("/api/v1/targets?state=active")["data"]["activeTargets"]
    return sum(t["health"] == "up" for t in active), len(active)


def healthy_in_envoy() -> int:
    result = prometheus("/api/v1/query?query=envoy_cluster_membership_healthy")["data"]["result"]
    return sum(int(float(r["value"][1])) for r in result if r["metric"].get("envoy_cluster_name") == "servers")


def check_compose(args) -> None:
    from serving.client import ClassifierClient
    work = OUT / "compose"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    secret = ROOT / "secrets" / "inference_tokens.txt"
    if not secret.exists():  # as the compose file's header says: a user's own token file is kept
        secret.parent.mkdir(exist_ok=True)
        secret.write_text(os.urandom(32).hex() + "\n")
        secret.chmod(0o644)  # mounted as a file, read by the container's user 10001
    token = secret.read_text().split()[0]
    compose = Compose(args.project, args.data_dir, args.podman_compose)
    compose("down", "-v", "--remove-orphans", profiles=("cpu", "train"), check=False)
    figures: dict = {}
    started = time.monotonic()
    try:
        compose("up", "-d", "--scale", "server=2")
        replicas = compose.containers("server")
        claim(len(replicas) == 2 and len(compose.containers()) == 4,
              f"Envoy, Prometheus and two replicas running: {compose.containers()}")
        wait_until(lambda: _try(healthy_in_envoy) == 2, 120, "Envoy's health checks to take in both replicas")
        envoy = "127.0.0.1:8001"
        with ClassifierClient(envoy, token=token, retries=3) as client:
            claim(client.list_models() == {"fashion_mnist": [1]}, "the bundled model is served through Envoy")
        figures["up_s"] = round(time.monotonic() - started, 1)

        # The batch job: the 10,000 test images, through Envoy, while one replica is stopped and started.
        rows = work / "rows.jsonl"
        job_started = time.monotonic()
        job = subprocess.Popen([sys.executable, "-m", "serving", "batch", "--idx-images",
                                f"{args.data_dir}/t10k-images-idx3-ubyte.gz", "--idx-labels",
                                f"{args.data_dir}/t10k-labels-idx1-ubyte.gz", "--server", envoy, "--token-file",
                                str(secret), "-o", str(rows), "--no-progress", "--retries", "5",
                                # One image a request, one in flight: 10,000 requests through Envoy (about 1.5 ms
                                # each on an idle machine) outlast the replica's stop (the 5 s drain delay) and start.
                                "--batch-size", "1", "--window", "1"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with Load(envoy, token, callers=2) as load:
            wait_until(lambda: rows.exists() and len(rows.read_text().splitlines()) >= 200, 300,
                       "the batch job to be under way")
            claim(job.poll() is None, "the job is still running when the replica is stopped")
            written_before = len(rows.read_text().splitlines())
            sh("podman", "stop", "-t", "40", replicas[0])
            stopped_code = int(inspect(replicas[0], "{{.State.ExitCode}}"))
            sh("podman", "start", replicas[0])
            claim(job.poll() is None, "the job is still running when the replica is back")
            wait_until(lambda: _try(healthy_in_envoy) == 2, 120, "the restarted replica back in Envoy's rotation")
        output, _ = job.communicate(timeout=900)
        job_s = time.monotonic() - job_started
        claim(job.returncode == 0, f"the batch job exits 0: {output[-2000:]}")
        lines = [json.loads(line) for line in rows.read_text().splitlines()]
        ids = {r["id"] for r in lines}
        errors = [r for r in lines if "error" in r]
        claim(len(lines) == len(ids) == 10_000 and not errors,
              f"10,000 images exactly once: {len(lines)} rows, {len(ids)} distinct ids, {len(errors)} errors")
        claim(stopped_code == 0, f"the stopped replica drained and exited 0 ({stopped_code})")
        claim(not load.lost, f"no call lost through Envoy while a replica restarted: {load.lost[:5]}")
        figures.update(rows=len(lines), distinct_ids=len(ids), row_errors=len(errors),
                       rows_before_stop=written_before, job_s=round(job_s, 1), unary_calls=load.answered,
                       unary_refused=load.refused, calls_lost=len(load.lost), stopped_replica_exit=stopped_code)

        # Prometheus: every target it lists is up (the restarted replica under its new address).
        up, listed = wait_until(lambda: (lambda u: u if u[0] == u[1] == 3 else None)(_try(targets_up) or (0, 0)),
                                90, "Prometheus to scrape every target it lists (two replicas and Envoy)")
        figures.update(targets_up=up, targets_listed=listed)
        claim(True, f"Prometheus: {up} of {listed} targets up")

        # The train and export jobs at toy size; the running replicas load the new version by polling.
        before = {c: inspect(c, "{{.State.StartedAt}}") for c in compose.containers("server")}
        t0 = time.monotonic()
        compose("run", "--rm", "train", "train", "--config", "configs/small_fmnist.yaml", "data_dir=/data",
                "out_dir=/runs/small_fmnist", "progress=false", "epochs=1", "max_train_samples=2000",
                profiles=("train",))
        compose("run", "--rm", "export", profiles=("train",))
        figures["train_export_s"] = round(time.monotonic() - t0, 1)
        with ClassifierClient(envoy, token=token, retries=3) as client:
            wait_until(lambda: all(client.list_models() == {"fashion_mnist": [2]} for _ in range(6)), 90,
                       "every replica serving the exported version 2")
        after = {c: inspect(c, "{{.State.StartedAt}}") for c in compose.containers("server")}
        claim(before == after, "version 2 served by the running replicas, none restarted")
    finally:
        compose("down", "-v", "--remove-orphans", profiles=("cpu", "train"), check=False)
    left = compose.containers(all_states=True)
    networks = [n for n in sh("podman", "network", "ls", "--format", "{{.Name}}").stdout.split()
                if n.startswith(args.project)]
    volumes = [v for v in sh("podman", "volume", "ls", "--format", "{{.Name}}").stdout.split()
               if v.startswith(args.project)]
    claim(not left and not networks and not volumes, f"`down` leaves nothing: {left} {networks} {volumes}")
    figures["total_s"] = round(time.monotonic() - started, 1)
    save("compose", figures)


def _try(f):
    try:
        return f()
    except Exception:  # noqa: BLE001 - not up yet: the caller polls
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("images")
    serving = sub.add_parser("serving")
    serving.add_argument("--port", type=int, default=18701)
    compose = sub.add_parser("compose")
    compose.add_argument("--project", default="cnnservingcheck")
    compose.add_argument("--data-dir", default=os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    compose.add_argument("--podman-compose", default="podman-compose")
    args = parser.parse_args()
    {"images": check_images, "serving": check_serving, "compose": check_compose}[args.part](args)


if __name__ == "__main__":
    main()
