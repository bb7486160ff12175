"""docs/api.md keeps up with the code: every public name, setting, parameter and code is in it."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
from proc_helpers import ROOT

import trame_async
from trame_async import (
    Client,
    DisconnectReason,
    ErrorCode,
    Kind,
    RemoteClient,
    Server,
    ServerConfig,
)

API = ROOT / "docs" / "api.md"


@pytest.fixture(scope="module")
def api() -> str:
    return API.read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """Return the text under ``heading`` (a markdown heading line) up to the next heading."""
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    following = re.search(r"^#{1,4} ", rest, re.MULTILINE)
    return rest[: following.start()] if following else rest


def table_names(text: str) -> set[str]:
    """Return the names in backquotes in the first cell of the table rows in ``text``.

    ``| `host`, `port` |`` gives ``host`` and ``port``; ``| `send(trame, value)` |`` gives ``send``.
    """
    names: set[str] = set()
    for cell in re.findall(r"^\|([^|\n]+)\|", text, re.MULTILINE):
        names.update(re.findall(r"`(?:await |async for \w+ in )?([A-Za-z_][\w.]*)", cell))
    return names


def public_members(cls: type) -> set[str]:
    names = {n for n in dir(cls) if not n.startswith("_")}
    inherited = set()
    for base in cls.__mro__[1:]:
        if base.__module__ in ("builtins", "asyncio.protocols"):
            inherited |= set(dir(base))
    return names - inherited


@pytest.mark.parametrize("name", trame_async.__all__)
def test_every_public_name_is_documented(api: str, name: str) -> None:
    assert re.search(rf"`{re.escape(name)}\b", api), f"{name} is not in docs/api.md"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ServerConfig)])
def test_every_server_config_field_is_in_the_config_table(api: str, field: str) -> None:
    rows = table_names(section(api, "### `ServerConfig`"))
    assert field in rows, f"ServerConfig.{field} is not in the ServerConfig table of docs/api.md"


def test_server_config_defaults_are_the_documented_ones(api: str) -> None:
    rows = section(api, "### `ServerConfig`")
    for f in dataclasses.fields(ServerConfig):
        row = re.search(rf"^\| `{f.name}` \|[^|]*\| ([^|]*) \|", rows, re.MULTILINE)
        assert row is not None, f.name
        assert f"`{f.default!r}`".replace("'", '"') in row.group(1), (
            f.name,
            f.default,
            row.group(1),
        )


def test_every_limit_says_what_it_protects_against(api: str) -> None:
    limits = section(api, "### Security limits")
    for name in (
        "max_frame_size",
        "handshake_max_frame_size",
        "handshake_timeout",
        "frame_timeout",
        "heartbeat_timeout",
        "max_clients",
        "token",
        "max_queue_bytes",
        "slow_consumer_timeout",
        "drain_timeout",
    ):
        assert f"`{name}`" in limits, name


def test_every_connect_parameter_is_documented(api: str) -> None:
    rows = section(api, "### `connect`")
    documented = table_names(rows)
    for name in inspect.signature(trame_async.connect).parameters:
        assert name in documented, f"connect({name}=...) is not in docs/api.md"


@pytest.mark.parametrize(
    ("cls", "heading"),
    [(Client, "### `Client`"), (Server, "### `Server`"), (RemoteClient, "### `RemoteClient`")],
)
def test_every_public_member_is_documented(api: str, cls: type, heading: str) -> None:
    text = section(api, heading)
    missing = sorted(n for n in public_members(cls) if not re.search(rf"`[^`]*\b{n}\b", text))
    assert not missing, f"{cls.__name__} members missing from docs/api.md: {missing}"


@pytest.mark.parametrize(
    ("enum", "heading"),
    [
        (DisconnectReason, "### `DisconnectReason`"),
        (ErrorCode, "### `ErrorCode`"),
        (Kind, "### `Kind`"),
    ],
)
def test_every_code_is_in_its_table_with_its_value(api: str, enum: type, heading: str) -> None:
    text = section(api, heading)
    for member in enum:  # type: ignore[attr-defined]
        value = f"0x{member.value:02x}" if enum is Kind else str(member.value)
        pattern = rf"^\| `{member.name}` \| `?{value}`? \|"
        assert re.search(pattern, text, re.MULTILINE), f"{enum.__name__}.{member.name} = {value}"


def test_the_exception_tree_is_the_one_of_exceptions_py(api: str) -> None:
    doc = trame_async.exceptions.__doc__
    assert doc is not None
    tree = doc.split(".. code-block:: text", 1)[1].split("\n\n")[1]
    lines = [line[4:] for line in tree.splitlines()]  # the docstring indents it by 4
    assert "\n".join(lines) in api


def test_every_exception_is_in_the_tree_and_the_attribute_table(api: str) -> None:
    text = section(api, "## Exceptions")
    names = [n for n in trame_async.__all__ if n.endswith("Error") or n == "ConnectionClosed"]
    rows = table_names(text)
    for name in names:
        assert issubclass(getattr(trame_async, name), trame_async.TrameError)
        assert name in rows, f"{name} has no row in the exception table"


def test_original_design_calls_are_mapped(api: str) -> None:
    text = section(api, "## From the original design")
    for call in (
        "start_server(ip, port)",
        "get_host_ip()",
        "hub(message, client)",
        "ping(client) -> crashed",
        "multicast(message)",
        "connect(host_ip, port, server_host, server_port)",
        "send(message)",
        "encode(",
        "decode(",
    ):
        assert f"`{call}" in text, call
