"""The soak script at toy size: it starts the server, sends every kind of call, stops it with SIGTERM and
finds nothing lost (the long run's figures are in docs/reliability.md)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_script_loses_nothing(small_repo):
    out = subprocess.run([sys.executable, "scripts/soak.py", "--seconds", "3", "--workers", "4", "--model-repository",
                          str(small_repo), "--drain-delay", "0.3"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("sent", "answered", "rejected", "latency", "server RSS"):
        assert re.search(rf"^\s+{line}\s", out.stdout, re.M), out.stdout
    assert re.search(r"^\s+lost\s+0$", out.stdout, re.M) and re.search(r"^\s+wrong\s+0$", out.stdout, re.M)
    assert "code 0" in out.stdout
