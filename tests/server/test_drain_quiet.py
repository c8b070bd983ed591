"""The drain's quiet window: after the last admitted call ends, the port stays open (refusing) for the quiet
time even when nothing has been refused yet. `podman stop` under load (scripts/containers/check.py) showed
why: without it, callers answered just before the close sent their next call at once, the port closed under
it, and gRPC cancelled it (CANCELLED: lost to the caller, who cannot know it never ran)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.server.drain import Admission


def test_quiet_window_counts_from_the_last_admitted_call_without_any_refusal():
    async def drain_then_time_the_quiet_wait() -> float:
        admission = Admission()
        admission.enter()
        admission.close()
        admission.leave()  # the last admitted call ends; no call has been refused
        assert await admission.wait_idle(1.0)
        started = time.monotonic()
        await admission.wait_quiet(quiet_s=0.2, limit_s=1.0)
        return time.monotonic() - started

    assert 0.2 <= asyncio.run(drain_then_time_the_quiet_wait()) < 0.6


def test_a_refusal_during_the_window_extends_it_up_to_the_limit():
    async def time_with_a_refusal() -> float:
        admission = Admission()
        admission.close()
        started = time.monotonic()

        async def late_caller():
            await asyncio.sleep(0.15)
            with pytest.raises(Exception, match="shutting down"):
                admission.enter()

        await asyncio.gather(admission.wait_quiet(quiet_s=0.2, limit_s=1.0), late_caller())
        return time.monotonic() - started

    assert 0.35 <= asyncio.run(time_with_a_refusal()) < 0.8
