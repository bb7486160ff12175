"""Child processes that end with their parent: no orphan survives a ``kill -9`` of the supervisor.

On Linux the child asks the kernel for a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
set between ``fork`` and ``exec`` by :func:`die_with_parent`'s ``preexec_fn``, so it also covers
programs that are not Python (``nats-server``). Elsewhere there is no such call; the workers of
``trame-serve --workers`` also watch a pipe from their parent (:mod:`trame_async.workers`), which
works everywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from typing import Final

__all__ = ["die_with_parent"]

#: ``PR_SET_PDEATHSIG`` from ``<linux/prctl.h>``.
_PR_SET_PDEATHSIG: Final = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    None where the platform has no such call (not Linux). The C function is looked up here, in
    the parent: the child, between ``fork`` and ``exec``, only calls it.
    """
    prctl = _load_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork and prctl: the signal would never come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec
