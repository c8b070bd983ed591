"""The project's commands run as a user runs them: `python -m <module> ...` in a subprocess from the checkout,
a server started as `python -m serving serve`, and the checks of how a user's mistake ends (exit code 2, no
traceback, one `error:` line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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


class ServeProcess:
    """`python -m serving serve` on a free port (and no REST port unless the flags give one), from the
    checkout, its output kept; `address` once it prints SERVING."""

    def __init__(self, repository, *flags: str, env: dict | None = None):
        rest = [] if "--http-port" in flags else ["--http-port", "0"]
        self.proc = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--model-repository", str(repository),
                                      "--port", "0", *rest, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("SERVING"):
                    ready.set()
            ready.set()  # it ended

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or not any(line.startswith("SERVING") for line in self.lines):
            self.proc.kill()
            raise AssertionError("server did not start:\n" + self.log())
        self.address = next(line.split()[1] for line in self.lines if line.startswith("SERVING"))

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        """SIGTERM, then its exit code (killed after 30 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
