"""Shared fixtures: a real model repository made by the real exporter, and the real gRPC server on a free
localhost port, running its own event loop (the one `serve` would choose) in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.server.app import InferenceServer, ServerOptions, event_loop_factory
from training.export import export_to_repository
from training.models import create_model

LABELS = [f"class_{i}" for i in range(10)]

# The suite starts many servers as processes, several at once on 2 cores: each is one process unless its test
# asks for workers (tests/server/test_workers.py), so that the default (`auto`) does not double every start.
os.environ.setdefault("CNN_SERVING_WORKERS", "1")

# The slow tier: modules that start processes of their own (servers, Ray, pip, Envoy, trainings) or run for
# seconds each. `make test-fast` (pytest -m "not slow") leaves them out and runs in under 60 s; `make test` runs
# everything.
SLOW = {
    "bench": "benchmark scripts run end to end against server processes",
    "deploy": "deploy files checked by their own tools; Envoy and rolling restarts run for real",
    "client/test_install.py": "installs the client into a fresh virtualenv",
    "client/test_cli.py": "starts command-line processes",
    "jobs/test_batch.py": "batch jobs over servers in their own processes",
    "jobs/test_batch_cli.py": "batch jobs as processes",
    "jobs/test_ray_engine.py": "Ray",
    "server/test_drain.py": "SIGTERM to server processes under load",
    "server/test_front_door.py": "connection floods and server processes",
    "server/test_http.py": "REST through outside clients in processes of their own, and schemathesis",
    "server/test_http_page.py": "the page in headless Chromium",
    "server/test_http_perf_analyzer.py": "perf_analyzer over REST",
    "server/test_model_range_served.py": "exports and serves every model family",
    "server/test_repository.py": "load and unload cycles, hot reloads",
    "server/test_workers.py": "supervisors and their worker processes",
    "training/test_cli.py": "trainings and exports as processes",
    "training/test_distributed.py": "a two-process training",
    "training/test_gpu_train_script.py": "the GPU script's smoke run",
    "training/test_train_device.py": "short trainings: compile, bf16 autocast, resume",
    "test_import_contracts.py": "lint-imports over copies of the tree",
}


def pytest_collection_modifyitems(config, items) -> None:
    root = Path(__file__).resolve().parent
    for item in items:
        where = Path(item.fspath).resolve().relative_to(root).as_posix()
        if any(where == slow or where.startswith(slow + "/") for slow in SLOW):
            item.add_marker(pytest.mark.slow)


def ramp_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 28x28 ramps of random direction with noise, and random labels: an untrained model gives several
    different answers to them (to noise alone, one)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    ramps = yy * rng.uniform(-9, 9, (n, 1, 1)) + xx * rng.uniform(-9, 9, (n, 1, 1)) + 128
    images = (ramps + rng.uniform(0, 8, (n, 28, 28))).clip(0, 255).astype(np.uint8)
    return images, rng.integers(0, 10, n).astype(np.uint8)


def export_small(repo: Path, name: str = "fmnist", version: int | None = None, seed: int = 0, **kw) -> Path:
    """A small_fmnist with random weights (seeded), exported into `repo` as <name>/<version>."""
    torch.manual_seed(seed)
    model = create_model("small_fmnist", in_channels=1, num_classes=10, input_size=(28, 28))
    return export_to_repository(model, LABELS, repo, name, "small_fmnist", {"test_acc": 0.5}, version, **kw)


class RunningServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.loop = event_loop_factory()()
        self.server = InferenceServer(options)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> RunningServer:
        self._thread.start()
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        return self

    def call(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop from the test thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.server.stop(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def running_server(repository: Path, **options):
    server = RunningServer(ServerOptions(repository=str(repository), port=0, **options)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    export_small(repo)
    return repo


@pytest.fixture(scope="session")
def server(small_repo):
    with running_server(small_repo) as s:
        yield s
