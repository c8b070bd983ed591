"""The server's event loop: uvloop where installed, asyncio's own on request."""

import asyncio

import pytest

from serving.server.app import event_loop_factory


def test_event_loop_choice():
    uvloop = pytest.importorskip("uvloop")
    for kind, expected in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = event_loop_factory(kind)()
        try:
            assert isinstance(loop, expected)
            assert kind == "asyncio" or not isinstance(loop, asyncio.BaseEventLoop)
        finally:
            loop.close()
