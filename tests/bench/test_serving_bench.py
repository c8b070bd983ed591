"""The benchmark end to end at toy size: echo server, in-process runs and the real server, one table."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the harness lives outside the package

from serving_bench import render, run_bench  # noqa: E402


def test_benchmark_prints_one_table_with_every_part(tmp_path):
    args = argparse.Namespace(models="small", concurrency="1,4", batches="1,4", many_images=4, seconds=0.3,
                              device="cpu", tensorrt=False, pytriton_python=None, server_args="",
                              work_dir=str(tmp_path))
    rows = run_bench(args)
    modes = {(r["model"], r["mode"], r["clients"]) for r in rows}
    assert ("echo (transport ceiling)", "single-image", 4) in modes
    assert ("small", "in-process batch 4", 0) in modes
    for batching in ("off", "on"):
        assert ("small", f"single-image, batching {batching}", 4) in modes
    assert ("small", "4-image Explain (CAM)", 4) in modes
    served = [r for r in rows if r["clients"]]
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in served)
    assert all(r["server_cpu_ms"] > 0 for r in served)  # the server's own CPU time was read
    text = render(rows)
    assert text.count("\n| small |") == len(rows) - 2  # one line per row (two echo rows)
    assert "of echo ceiling" in text and "CAM costs" in text
