"""A terminal chat over a trame_async server.

Start a server, then one chat per terminal::

    trame-serve
    python examples/chat.py --name alice
    python examples/chat.py --name bob

Every line typed is multicast as a ``CHT`` trame carrying ``"name: text"``; every line received is
printed as ``[sender] name: text``, where ``sender`` is the client id the server gave the writer.
End of input (Ctrl+D, or the end of a pipe) says goodbye to the server and exits 0.

Standard input is read by a daemon thread and handed to the event loop line by line with
``call_soon_threadsafe``. This works the same for a terminal, a pipe or a file (``connect_read_pipe``
does not take regular files, and switches a terminal shared with stdout to non-blocking mode), and,
unlike ``asyncio.to_thread`` whose worker ``asyncio.run`` waits for at exit, it never keeps the
program alive when the server goes away while the thread waits for input.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import getpass
import os
import sys
import threading

import trame_async

#: A chat line: UTF-8 text of any length (``"<*s"`` with ``str``), registered on every chat client.
#: The server needs no registration: it relays codes it does not know once their frames are checked.
CHT = trame_async.register("CHT", "<*s", str)


def _default_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (containers)
        return f"user{os.getpid()}"


def read_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Start a daemon thread feeding stdin's lines into a queue; ``None`` marks end of input."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def put(line: str | None) -> None:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # the loop is closed: the program is leaving
            pass

    def pump() -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside sys.stdin's
        # buffered reader holds its lock, which can abort the interpreter at exit.
        decoder = codecs.getincrementaldecoder(sys.stdin.encoding or "utf-8")("replace")
        pending = ""
        try:
            while chunk := os.read(sys.stdin.fileno(), 65536):
                pending += decoder.decode(chunk)
                *complete, pending = pending.split("\n")
                for line in complete:
                    put(line.removesuffix("\r"))
        except OSError:  # stdin closed under us
            pass
        pending += decoder.decode(b"", final=True)
        if pending:
            put(pending)  # a last line without a newline
        put(None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return lines


def show(message: trame_async.Message) -> str:
    """Render a received message as one line of text."""
    if message.trame in (CHT, trame_async.STR):
        return f"[{message.sender}] {message.value}"
    # Another program on the same server may multicast other trames: show them as they are.
    return f"[{message.sender}] <{message.trame}> {message.value!r}"


async def print_messages(client: trame_async.Client) -> None:
    """Print every message until the connection ends (a clean end returns, others raise)."""
    async for message in client:
        print(show(message), flush=True)


async def send_lines(client: trame_async.Client, name: str) -> None:
    """Multicast every stdin line as ``"name: text"`` until end of input."""
    lines = read_lines(asyncio.get_running_loop())
    while (line := await lines.get()) is not None:
        if not line.strip():
            continue
        try:
            await client.multicast(CHT, f"{name}: {line}")
        except trame_async.FrameTooLargeError as err:
            print(f"* not sent: {err}", file=sys.stderr, flush=True)


async def chat(args: argparse.Namespace) -> int:
    """Connect, then chat until end of input (0) or until the server goes away (1)."""
    try:
        client = await trame_async.connect(args.host, args.port, token=args.token)
    except (trame_async.ConnectError, trame_async.ConnectionClosed) as err:
        print(f"chat: {err}", file=sys.stderr)
        return 1
    async with client:
        print(
            f"* connected to {args.host}:{args.port} as client {client.id} "
            f"({args.name}); type lines, Ctrl+D to leave",
            flush=True,
        )
        receiver = asyncio.create_task(print_messages(client))
        sender = asyncio.create_task(send_lines(client, args.name))
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        error = sender.exception() if sender.done() else None
        if sender.done() and not isinstance(error, trame_async.ConnectionClosed):
            receiver.cancel()  # end of input: leave (or a bug in send_lines: show it)
            await asyncio.gather(receiver, return_exceptions=True)
            sender.result()
            print("* bye", flush=True)
            return 0
        # The connection ended first (the receiver ended, or a send found it closed).
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        try:
            await receiver
        except trame_async.ConnectionClosed as err:
            print(f"* {err}", file=sys.stderr, flush=True)
            return 1
        # async for ends quietly on a goodbye or a server shutdown: still, the chat is over.
        print(f"* the server closed the connection ({client.close_reason})", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run the chat; return the exit status."""
    parser = argparse.ArgumentParser(description="Chat through a trame_async server.")
    parser.add_argument("--host", default="127.0.0.1", help="server address")
    parser.add_argument("--port", type=int, default=8765, help="server port")
    parser.add_argument("--name", default=_default_name(), help="name shown before your lines")
    parser.add_argument(
        "--token",
        default=os.environ.get("TRAME_TOKEN") or None,
        help="the server's token (default: $TRAME_TOKEN)",
    )
    args = parser.parse_args(argv)
    try:
        return asyncio.run(chat(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
