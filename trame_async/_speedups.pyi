"""Types of the optional compiled hot loop (trame_async/_speedups.c)."""

from typing import Any

def scan_relays(
    data: bytes,
    pos: int,
    known: dict[Any, Any],
    limit: int,
    out: list[Any],
    group_names: dict[int, str],
    core: Any,
    /,
) -> int: ...
def setup(message: type[Any], relay: Any, group_relay: Any, bad_value: type[Any], /) -> None: ...
