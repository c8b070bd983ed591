"""The workers bench's own arithmetic: the median of its rounds, the ratios against the peer and the echo ceiling
(its measuring is perf_analyzer's and serving_bench's, run by their own tests and by hand)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the harness lives outside the package

from workers_bench import PEERS, _logits_only_copy, _median_rows, render  # noqa: E402

from serving.engine.loading import load_execution  # noqa: E402
from serving.engine.runtime import RuntimeOptions  # noqa: E402
from serving.repository_format import load_spec  # noqa: E402


def _row(server: str, tool: str, clients: int, rate: float) -> dict:
    return {"server": server, "tool": tool, "clients": clients, "infer_per_s": rate, "p50_ms": 1.0, "p99_ms": 2.0,
            "cpu": "", "errors": 0}


def test_rounds_give_their_median_and_the_tables_their_ratios():
    project = "project client, 64 callers / 8 connections"
    rows = [_row("echo (1 process, transport ceiling)", project, 64, r) for r in (3000, 4000, 3500)]
    rows += [_row("workers 2 (auto)", project, 64, r) for r in (2100, 1900, float("nan"))]
    rows += [_row("workers 2 (auto)", "perf_analyzer", 64, r) for r in (2400, 2600, 2500)]
    logits_only, same_outputs = PEERS
    rows += [_row(logits_only, "perf_analyzer", 64, r) for r in (2000, 1000, 2100)]
    rows += [_row(same_outputs, "perf_analyzer", 64, r) for r in (1250, 1250, 1250)]
    medians = {(r["server"], r["tool"]): r for r in _median_rows(rows)}
    assert medians[("echo (1 process, transport ceiling)", project)]["infer_per_s"] == 3500
    assert medians[("workers 2 (auto)", project)]["infer_per_s"] == 1900  # a failed round counts as the lowest
    assert medians[(logits_only, "perf_analyzer")]["rounds"] == "2000 / 1000 / 2100"
    text = render(list(medians.values()), argparse.Namespace(seconds=3.0, rounds=3))
    against_logits, against_same = text.split(f"ours / {logits_only}:")[1].split(f"ours / {same_outputs}:")
    assert "| 64 | 1.25x |" in against_logits  # 2500 against 2000
    assert "| 64 | 2.00x |" in against_same  # 2500 against 1250
    assert "- workers 2 (auto): 1900/s = 0.54" in text  # against the echo's 3500


def test_the_like_for_like_copy_lists_the_logits_alone_and_still_loads(small_repo, tmp_path):
    copy = _logits_only_copy(small_repo / "fmnist", tmp_path / "fmnist")
    spec = load_spec(copy)
    assert not spec.features_output
    loaded = load_execution(spec, 1, RuntimeOptions(device="cpu"), instances=1)
    assert loaded.cam_unsupported_reason  # no features output, so no CAM to compute
