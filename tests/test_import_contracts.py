"""The import contracts catch what they exist for: each import below, added to a copy of the tree, breaks
`lint-imports` with the contract that names the rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("serving/engine/execution.py", "from ..client import messages", "The model engine imports no role"),
    ("serving/server/api/kserve/service.py", "from .. import classifier", "no servicer imports another"),
    ("serving/jobs/ray_engine.py", "from ..server import handlers", "The client and batch jobs import no server"),
    ("serving/server/batcher.py", "import numpy", "The dynamic batcher imports neither gRPC nor onnxruntime"),
    ("training/export.py", "from serving.server import app", "Training imports only the neutral modules"),
    ("serving/server/supervisor.py", "from . import app", "The supervisor of `serve --workers N` runs no model"),
])
def test_an_injected_import_breaks_its_contract(tmp_path, module, line, contract):
    for package in ("serving", "training"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # injected\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1, run.stdout
    broken = run.stdout.split("Broken contracts")[-1]
    assert contract in " ".join(broken.split()), run.stdout  # lint-imports wraps long names over lines
