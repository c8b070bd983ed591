"""The Grafana dashboard and the Prometheus Operator PodMonitor in deploy/, checked against what they point
at: every series a dashboard query names is served by the real server's /metrics, and the PodMonitor
selects the Deployment's pods on a port they expose, where the server listens for scrapers."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from serving.client import ClassifierClient
from serving.server.metrics import TRITON_NAMES
from tests.conftest import running_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "cnn-serving.json"
SERIES = re.compile(r"\b((?:inference|grpc|process|python)_[a-z0-9_]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_dashboard_is_well_formed_and_every_query_names_a_served_series(small_repo):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert dashboard["uid"] and dashboard["title"] and panels
    assert len({p["id"] for p in panels}) == len(panels)  # Grafana keys panels by id
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "version"} <= variables
    queries = [t["expr"] for p in panels for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["gridPos"]["w"] > 0 and p["targets"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    for q in queries:  # every variable a query uses is defined, and brackets balance
        assert set(re.findall(r"\$(\w+)", q)) - {"__rate_interval", "__all"} <= variables, q
        assert q.count("(") == q.count(")") and q.count("{") == q.count("}") and q.count("[") == q.count("]"), q

    port = free_port()
    with running_server(small_repo, metrics_port=port) as server, ClassifierClient(server.address) as client:
        client.classify([np.zeros((28, 28), np.uint8)] * 2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    named = {name for q in queries for name in SERIES.findall(q)}
    assert named and not named - served, f"not served: {sorted(named - served)}"
    # The Triton counterparts are all on the dashboard (as themselves or their histogram's series).
    assert all(any(n.startswith(ours) for n in named) for ours in TRITON_NAMES)


def test_the_podmonitor_selects_the_server_pods_on_their_metrics_port():
    (monitor,) = [d for d in yaml.safe_load_all((DEPLOY / "prometheus" / "podmonitor.yaml").read_text()) if d]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    for manifest in ("server.yaml", "gpu.yaml"):
        docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text()) if d]
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), manifest
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["path"] == "/metrics" and endpoint["port"] in ports
        assert str(ports[endpoint["port"]]) == env["CNN_SERVING_METRICS_PORT"]
        # The metrics port listens beyond loopback, or no scraper on another pod could reach it.
        assert env["CNN_SERVING_METRICS_HOST"] not in ("127.0.0.1", "::1", "localhost"), manifest
        if manifest == "server.yaml":  # the annotations stay, for Prometheus set up without the operator
            assert pod["metadata"]["annotations"]["prometheus.io/port"] == env["CNN_SERVING_METRICS_PORT"]
