"""Triton's perf_analyzer `-i http` against the REST port, at 1, 8 and 64 concurrent requests: it reads the
model's metadata, configuration and statistics over REST and sends binary tensors. The tool is set up by
bench/perf_analyzer.py (PyPI's wheel and Debian 13's runtime libraries, into the git-ignored .perf_analyzer/);
where that cannot be done, the test is skipped and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serving.repository_format import BUNDLED_REPOSITORY
from tests.conftest import running_server

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def perf_analyzer() -> list[str]:
    import perf_analyzer as pa
    home = ROOT / ".perf_analyzer"
    try:
        return pa.perf_analyzer_command(home, pa.setup(home))
    except (subprocess.CalledProcessError, SystemExit, OSError) as e:
        pytest.skip(f"perf_analyzer could not be set up here ({e}); python bench/perf_analyzer.py --setup-only")


def test_perf_analyzer_over_http_completes_at_1_8_and_64(perf_analyzer):
    import perf_analyzer as pa
    with running_server(BUNDLED_REPOSITORY, http_port=0) as server:
        address = f"127.0.0.1:{server.server.http_port}"
        for concurrency in (1, 8, 64):
            row = pa.run_perf_analyzer(perf_analyzer, address, "fashion_mnist", concurrency, 1.0, 60, protocol="http")
            assert row["infer_per_s"] > 0 and row["p50_ms"] > 0, row
        stats = server.server.metrics.registry
        answered = stats.get_sample_value("http_requests_total", {"method": "ModelInfer", "status": "200"})
        assert answered and answered > 100
        assert not stats.get_sample_value("http_requests_total", {"method": "ModelInfer", "status": "400"})
