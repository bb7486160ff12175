"""Shared test settings: both event loops for socket tests, scaled timings."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None

#: One millisecond, scaled by TRAME_TESTS_TIMEOUT_FACTOR on slow machines.
MS = 0.001 * float(os.environ.get("TRAME_TESTS_TIMEOUT_FACTOR", "1"))

# Modules whose async tests run on the stock loop and on uvloop: every module that runs a server
# or a client in the test's own loop. Names are prefixes: "test_server" also covers
# test_server_stats, "test_robust" every test_robust_*.
# Modules that run them in a subprocess (test_cli, test_examples) or a thread (test_fuzz_server)
# pick their loops themselves.
_BOTH_LOOPS = (
    "test_server",
    "test_client",
    "test_heartbeat",
    "test_multicast",
    "test_robust",
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run socket tests on both loops; everything else on the stock loop."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if uvloop is not None and module.startswith(_BOTH_LOOPS):
        factories["uvloop"] = uvloop.new_event_loop
    return factories
