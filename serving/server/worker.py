"""One worker of `serve --workers N` (supervisor.py): `python -m serving.server.worker DIRECTORY INDEX PARENT`.

It serves as `serve` does in one process, with the options the supervisor left in its private DIRECTORY, on the
port the supervisor holds, and prints `SERVING host:port` for it once ready. It exits when its supervisor dies
(the kernel sends it SIGTERM, and it drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from dataclasses import replace

from ..engine.errors import StartRefused
from .app import event_loop_factory, serve
from .logs import CONTROL
from .supervisor import worker_role

_PR_SET_PDEATHSIG = 1


def _end_with(parent: int) -> None:
    """SIGTERM to this process when its parent exits (Linux), and an exit now if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)


def main(argv: list[str]) -> int:
    directory, index, parent = argv[0], int(argv[1]), int(argv[2])
    _end_with(parent)
    launch, role = worker_role(directory, index)
    CONTROL.configure(launch.log_level, launch.log_format)
    options = replace(launch.options, worker=role)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(launch.event_loop)) as runner:
            return runner.run(serve(options))
    except StartRefused as e:
        print(f"error: worker {index}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
