"""``trame-sub`` and ``trame-pub``: a relay from the shell, as ``nats sub`` or ``mosquitto_sub``.

``trame-sub HOST:PORT`` prints every message as it arrives (``--json``: one JSON object per
line) until Ctrl+C; ``trame-pub HOST:PORT CODE VALUE...`` sends one value, or, with ``-``, one per
JSON line of standard input, at most ``--rate`` per second.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import Client, ConnectionClosed, TrameError, connect
from .cli import OneLineErrors
from .client import TOKEN_ENV
from .codec import REGISTRY, Message, Trame

__all__ = ["pub_main", "sub_main"]


def _server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r} (e.g. 127.0.0.1:8765)")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {port!r}") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a TCP port (1 to 65535)")
    return host.strip("[]"), number


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("server", type=_server, metavar="HOST:PORT", help="the trame server")
    p.add_argument("--token", default=None, help=f"shared secret (default: ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="connect timeout")
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="connect over TLS (system CAs)")
    tls.add_argument("--tls-ca", metavar="FILE", help="trust this CA bundle (implies --tls)")
    tls.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    tls.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    tls.add_argument("--server-hostname", metavar="NAME", help="name to check the certificate for")


def _ssl(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ssl.SSLContext | None:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=None)
    try:
        if args.tls_ca:
            ctx.load_verify_locations(args.tls_ca)
        if args.tls_cert:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as err:
        parser.error(f"--tls-ca/--tls-cert: {err}")
    return ctx


async def _open(args: argparse.Namespace, parser: argparse.ArgumentParser, **kw: Any) -> Client:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    return await connect(
        args.server[0],
        args.server[1],
        token=token,
        ssl=_ssl(args, parser),
        server_hostname=args.server_hostname,
        timeout=args.timeout,
        **kw,
    )


# --- trame-sub ---------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _line(message: Message, as_json: bool) -> str:
    trame = message.trame
    code = trame.code if isinstance(trame, Trame) else str(trame)
    if as_json:
        return json.dumps(
            {
                "sender": message.sender,
                "trame": code,
                "value": _jsonable(message.value),
                "group": message.group,
                "time": time.time(),
            }
        )
    where = f" #{message.group}" if message.group is not None else ""
    return f"[{message.sender}]{where} {code} {message.value!r}"


def build_sub_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``trame-sub``."""
    p = OneLineErrors(
        prog="trame-sub",
        description="Print every message a trame_async server relays, until Ctrl+C.",
        epilog=(
            "example: trame-sub 127.0.0.1:8765 --group lobby --json\n"
            '  bytes values print as {"base64": ...}; NamedTuples as objects of their fields'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--group", action="append", default=[], metavar="G", help="join G (repeat)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--echo", action="store_true", help="also this client's own multicasts")
    return p


async def _sub(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        client = await _open(args, parser, echo=args.echo)
    except TrameError as err:
        print(f"trame-sub: {err}", file=sys.stderr)
        return 1
    async with client:
        try:
            for group in args.group:
                await client.join(group)
        except TrameError as err:
            print(f"trame-sub: {err}", file=sys.stderr)
            return 1
        print(
            f"# connected to {args.server[0]}:{args.server[1]} as client {client.id}",
            file=sys.stderr,
            flush=True,
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                receiving = asyncio.create_task(client.receive())
                done, _ = await asyncio.wait(
                    {receiving, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    receiving.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await receiving
                    return 0
                try:
                    message = receiving.result()
                except ConnectionClosed as err:
                    print(f"trame-sub: {err}", file=sys.stderr)
                    return 1
                print(_line(message, args.json), flush=True)
        finally:
            stopping.cancel()


def sub_main(argv: Sequence[str] | None = None) -> int:
    """Run ``trame-sub``; return the exit status."""
    parser = build_sub_parser()
    args = parser.parse_args(argv)
    return asyncio.run(_sub(args, parser))


# --- trame-pub ---------------------------------------------------------------------------------


_ITEM = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdspP])")


def _item_kinds(fmt: str) -> list[str]:
    """The struct item kinds of ``fmt``, one per value item (``4s`` is one, ``2d`` two)."""
    kinds: list[str] = []
    for count, char in _ITEM.findall(fmt.lstrip("<>!=@")):
        if char == "x":
            continue
        kinds.extend([char] if char in "sp" else [char] * int(count or 1))
    return kinds


def _parse_value(trame: Trame, words: list[str]) -> Any:
    """Turn command-line words into a value of ``trame``, one word per item of its format."""
    if trame.variable:
        text = " ".join(words)
        return text if trame.cls is str else text.encode("utf-8")
    kinds = _item_kinds(trame.fmt)
    if len(words) != len(kinds):
        raise ValueError(
            f"trame {trame.code} ({trame.fmt}) takes {len(kinds)} value(s), got {len(words)}"
        )
    items: list[Any] = []
    for kind, word in zip(kinds, words, strict=True):
        if kind == "?":
            items.append(word.lower() in ("1", "true", "yes", "on"))
        elif kind in "efd":
            items.append(float(word))
        elif kind in "spc":
            items.append(word.encode("utf-8"))
        else:
            items.append(int(word, 0))
    return tuple(items) if len(items) > 1 else items[0]


def build_pub_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``trame-pub``."""
    p = OneLineErrors(
        prog="trame-pub",
        description="Send a value to a trame_async server's clients (or JSON lines from stdin).",
        epilog=(
            "examples:\n"
            "  trame-pub 127.0.0.1:8765 POS 1.5 -2\n"
            "  trame-pub 127.0.0.1:8765 STR hello there --group lobby\n"
            "  trame-pub 127.0.0.1:8765 TMP 21.5 --format '<f'\n"
            '  printf \'{"trame": "INT", "value": 1}\\n\' | trame-pub 127.0.0.1:8765 - --rate 10'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument(
        "code", metavar="CODE", help="trame code (INT, FLT, POS, STR...), or - for stdin"
    )
    p.add_argument("values", nargs="*", metavar="VALUE", help="the value's items")
    p.add_argument("--group", metavar="G", help="send to group G (joined first)")
    p.add_argument("--format", metavar="FMT", help="struct format of an unregistered CODE")
    p.add_argument("--rate", type=float, default=None, metavar="N", help="at most N per second")
    return p


def _trame(code: str, fmt: str | None, parser: argparse.ArgumentParser) -> Trame:
    known = REGISTRY.get(code)
    if known is not None:
        return known
    if fmt is None:
        parser.error(f"{code} is not a built-in trame: give its struct format with --format")
    try:
        return REGISTRY.register(code, fmt)
    except TrameError as err:
        parser.error(f"--format {fmt}: {err}")


async def _pub(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.rate is not None and not args.rate > 0:
        parser.error("--rate must be a positive number of messages per second")
    items: list[tuple[Trame, Any]] = []
    if args.code != "-":
        trame = _trame(args.code, args.format, parser)
        try:
            items.append((trame, _parse_value(trame, args.values)))
        except ValueError as err:
            parser.error(str(err))
    try:
        client = await _open(args, parser)
    except TrameError as err:
        print(f"trame-pub: {err}", file=sys.stderr)
        return 1
    async with client:
        try:
            if args.group:
                await client.join(args.group)
            if items:
                for trame, value in items:
                    await client.multicast(trame, value, group=args.group)
                return 0
            return await _pub_lines(client, args, parser)
        except (TrameError, ValueError) as err:
            print(f"trame-pub: {err}", file=sys.stderr)
            return 1


async def _pub_lines(
    client: Client, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    loop = asyncio.get_running_loop()
    period = 1.0 / args.rate if args.rate else 0.0
    next_at = loop.time()
    number = 0
    while line := await asyncio.to_thread(sys.stdin.readline):
        number += 1
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            print(f"trame-pub: line {number}: not JSON ({err})", file=sys.stderr)
            return 1
        if isinstance(entry, dict) and "trame" in entry:
            trame = _trame(str(entry["trame"]), entry.get("format"), parser)
            value = entry.get("value")
            group = entry.get("group", args.group)
        else:
            parser.error('with -, each line is {"trame": CODE, "value": ..., "group": G}')
        if isinstance(value, list):
            value = tuple(value)
        if group is not None and group not in client.groups:
            await client.join(group)
        if period:
            wait = next_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the rate limit: a token bucket of one
            next_at = max(next_at, loop.time() - period) + period
        await client.multicast(trame, value, group=group)
    return 0


def pub_main(argv: Sequence[str] | None = None) -> int:
    """Run ``trame-pub``; return the exit status."""
    parser = build_pub_parser()
    args = parser.parse_args(argv)
    return asyncio.run(_pub(args, parser))


if __name__ == "__main__":  # pragma: no cover - python -m trame_async.pubsub sub|pub ...
    command, *rest = sys.argv[1:] or ["--help"]
    sys.exit(sub_main(rest) if command == "sub" else pub_main(rest))
