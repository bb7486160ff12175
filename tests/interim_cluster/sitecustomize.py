"""Interim, for tests/test_workers.py only: ``start_server(cluster=...)`` accepted and ignored.

``start_server``'s ``cluster`` parameter is being written on main (issue 11). Until it lands, the
worker processes of ``trame-serve --workers`` get this directory first on ``PYTHONPATH``, so that
their supervision can be tested; the cross-worker relay test is expected to fail meanwhile. Once
``start_server`` has the parameter, this file does nothing and test_workers.py stops using it:
delete it then.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import trame_async.server

_original = trame_async.server.start_server

if "cluster" not in inspect.signature(_original).parameters:

    @functools.wraps(_original)
    async def _start_server(*args: Any, cluster: object = None, **kwargs: Any) -> Any:
        return await _original(*args, **kwargs)

    trame_async.server.start_server = _start_server
