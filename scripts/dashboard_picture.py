"""`python scripts/dashboard_picture.py`: the Grafana dashboard's panels, drawn from a real server's /metrics.

Not a Grafana screenshot: the real server (in this process, with its metrics port) takes a changing load
(1 to 32 callers of single-image Classify, and some images that do not decode) while /metrics is scraped
every second; each panel of deploy/grafana/cnn-serving.json is then computed from the scrapes as its query
computes it (rates of counters, histogram quantiles as Prometheus interpolates them, ratios of rates) and
drawn in the dashboard's order. Writes docs/images/dashboard.png.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUT = ROOT / "docs" / "images" / "dashboard.png"
PHASES = [(1, 6), (8, 6), (32, 6), (4, 6)]  # (callers, seconds)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = tuple(sorted(tuple(p.split("=", 1)) for p in labels.rstrip("}").split('",') if p))
        samples[(name, tuple((k, v.strip('"')) for k, v in pairs))] = float(value)
    return samples


def run_load() -> list[tuple[float, dict]]:
    import grpc

    from serving.client import ClassifierClient
    from tests.conftest import export_small, running_server

    repo = Path(tempfile.mkdtemp(prefix="dashboard-"))
    export_small(repo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scrapes = []
    with running_server(repo, metrics_port=port) as server:
        stop = threading.Event()
        active = [0]

        def caller(i: int) -> None:
            rng = np.random.default_rng(i)
            with ClassifierClient(server.address, retries=0) as client:
                while not stop.is_set():
                    if i >= active[0]:
                        time.sleep(0.05)
                        continue
                    try:
                        client.classify([b"not an image"] if rng.random() < 0.03 else
                                        [rng.integers(0, 256, (28, 28), np.uint8)])
                    except grpc.RpcError:
                        pass

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(32)]
        for t in threads:
            t.start()
        started = time.monotonic()
        for callers, seconds in PHASES:
            active[0] = callers
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
                scrapes.append((time.monotonic() - started, parse(text)))
                time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(10)
    return scrapes


def series(scrapes, name: str, group: tuple[str, ...] = ()) -> dict[tuple, list[float]]:
    """Per scrape, the sum of `name` over the samples, grouped by the given labels."""
    out: dict[tuple, list[float]] = defaultdict(lambda: [0.0] * len(scrapes))
    for i, (_, samples) in enumerate(scrapes):
        for (n, labels), v in samples.items():
            if n == name:
                d = dict(labels)
                out[tuple(d.get(g, "") for g in group)][i] += v
    return out


def rate(values: list[float], times: list[float], window: int = 3) -> list[float]:
    return [(values[i] - values[max(0, i - window)]) / max(1e-9, times[i] - times[max(0, i - window)])
            if i else 0.0 for i in range(len(values))]


def quantile(scrapes, name: str, q: float, times: list[float], window: int = 3) -> list[float]:
    """histogram_quantile(q, rate(name_bucket[window])) as Prometheus interpolates it."""
    buckets = series(scrapes, f"{name}_bucket", ("le",))
    bounds = sorted(buckets, key=lambda k: float(k[0]))
    out = []
    for i in range(len(scrapes)):
        j = max(0, i - window)
        counts = [buckets[b][i] - buckets[b][j] for b in bounds]
        total = counts[-1] if counts else 0
        if not i or total <= 0:
            out.append(float("nan"))
            continue
        rank, prev_count, prev_bound = q * total, 0.0, 0.0
        for b, c in zip(bounds, counts):
            bound = float(b[0])
            if c >= rank:
                out.append(prev_bound if np.isinf(bound) else
                           prev_bound + (bound - prev_bound) * (rank - prev_count) / max(1e-12, c - prev_count))
                break
            prev_count, prev_bound = c, bound
    return out


def draw(scrapes) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "cnn-serving.json").read_text())
    t = [s[0] for s in scrapes]
    r = lambda name, group=(): {k: rate(v, t) for k, v in series(scrapes, name, group).items()}  # noqa: E731

    def mean(sum_name: str, count_name: str) -> list[float]:
        s, c = rate(series(scrapes, sum_name)[()], t), rate(series(scrapes, count_name)[()], t)
        return [a / b if b else float("nan") for a, b in zip(s, c)]

    panels = {
        0: {"success": r("inference_request_success_total")[()]},
        1: {"server failures": r("inference_failures_total")[()], "client errors": r("inference_client_errors_total")[()]},
        2: {f"p{int(q * 100)}": [x * 1000 for x in quantile(scrapes, "inference_request_duration_seconds", q, t)]
            for q in (0.5, 0.99)},
        3: {f"p{int(q * 100)}": [x * 1000 for x in quantile(scrapes, "inference_queue_duration_seconds", q, t)]
            for q in (0.5, 0.99)},
        4: {p: [x * 1000 for x in mean(f"inference_compute_{p}_duration_seconds_sum",
                                        f"inference_compute_{p}_duration_seconds_count")]
            for p in ("input", "infer", "output")},
        5: {"images per batch": mean("inference_batch_size_sum", "inference_batch_size_count")},
        6: {f"{m} {c}": v for (m, c), v in r("grpc_requests_total", ("method", "code")).items()},
        7: {m: v for (m,), v in series(scrapes, "grpc_requests_in_flight", ("method",)).items() if any(v)},
        8: {"CPU (cores)": r("process_cpu_seconds_total")[()],
            "RSS (GiB)": [v / 2**30 for v in series(scrapes, "process_resident_memory_bytes")[()]]},
        9: {f"generation {g}": v for (g,), v in r("python_gc_collections_total", ("generation",)).items()},
    }
    units = {2: "ms", 3: "ms", 4: "ms"}
    fig, axes = plt.subplots(5, 2, figsize=(13, 14), sharex=True)
    for i, ax in enumerate(axes.flat):
        panel = dashboard["panels"][i]
        for label, values in panels[i].items():
            ax.plot(t[1:], values[1:], label=label, linewidth=1.4)
        ax.set_title(panel["title"] + (f" ({units[i]})" if i in units else ""), fontsize=10)
        if panels[i]:
            ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds (1, 8, 32 then 4 callers)")
    fig.suptitle("deploy/grafana/cnn-serving.json, its panels computed from a real server's /metrics", fontsize=11)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    draw(run_load())
