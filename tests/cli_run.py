"""The project's commands run as a user runs them: `python -m <module> ...` in a subprocess from the checkout,
and the checks of how a user's mistake ends (exit code 2, no traceback, one `error:` line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=environ, cwd=ROOT)


def error_without_traceback(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The stderr of a run that ended with `code` and printed no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a run refused as a user's mistake (exit code 2, no traceback)."""
    lines = error_without_traceback(result).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
