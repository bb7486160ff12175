"""What a new user tripped on (issue 12): each mistake gets a message that says what to do."""

from __future__ import annotations

import pytest

import trame_async
from trame_async import INT, AuthenticationError


@pytest.mark.parametrize("given", [None, "wrong"])
async def test_a_missing_or_wrong_token_says_what_to_do_once(
    given: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRAME_TOKEN", raising=False)
    async with trame_async.serve("127.0.0.1", 0, token="s3cret") as server:
        with pytest.raises(AuthenticationError) as info:
            await trame_async.connect("127.0.0.1", server.port, token=given, timeout=5)
    text = str(info.value)
    assert "token=" in text and "TRAME_TOKEN" in text
    assert text.count("AUTH_FAILED") == 1 and "auth failed" not in text
    assert ("sent none" in text) == (given is None)


async def test_connect_reads_trame_token_when_no_token_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRAME_TOKEN", "s3cret")
    async with (
        trame_async.serve("127.0.0.1", 0, token="s3cret") as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        assert client.connected


async def test_server_multicast_can_be_awaited_like_the_clients() -> None:
    async with (
        trame_async.serve("127.0.0.1", 0) as server,
        trame_async.connect("127.0.0.1", server.port) as client,
    ):
        server.multicast(INT, 1)  # a plain call, as ever
        await server.multicast(INT, 2)  # and awaitable, as client.multicast is
        assert [(await client.receive(timeout=5)).value for _ in range(2)] == [1, 2]
