"""A terminal chat over a trame_async server, with rooms.

Start a server, then one chat per terminal::

    trame-serve
    python examples/chat.py --name alice
    python examples/chat.py --name bob

Every line typed is multicast as a ``CHT`` trame carrying ``"name: text"``; every line received is
printed as ``[sender] name: text``, where ``sender`` is the client id the server gave the writer.
End of input (Ctrl+D, or the end of a pipe) says goodbye to the server and exits 0.

Rooms are groups of the server (docs/protocol.md, "Groups"). Lines that start with ``/`` are
commands:

``/join ROOM``
    Join the room (with presence: its members' comings and goings are shown). Lines typed then go
    to the room, to its members alone, and arrive as ``#room [sender] name: text``. The last room
    joined is the current one.
``/leave [ROOM]``
    Leave the room (the current one by default); lines go to the room joined before it, or to
    everyone when in no room.
``/rooms``
    List the rooms joined, and say where lines go.

``//text`` sends ``/text``. A chat that never joins a room behaves as a chat without rooms.

Each chat that joins a room multicasts its name there (a ``NAM`` trame), so that the members,
told by a presence event that client 3 joined, can print ``* bob (id 3) joined #lobby`` once the
name arrives (or ``* id 3 joined #lobby`` after a second without one: another program); and each
member answers a presence event with its own name, so that the newcomer can name them too.

When the server goes away (a restart, a network cut), the chat says so and reconnects by itself
(``connect(..., reconnect=...)``), back in its rooms; lines typed meanwhile are not sent (the
client buffers nothing: at-most-once). Only end of input, or a refusal that would happen again
(a wrong token), ends it.

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
import contextlib
import getpass
import os
import sys
import threading

import trame_async

#: A chat line: UTF-8 text of any length (``"<*s"`` with ``str``), registered on every chat client.
#: The server needs no registration: it relays codes it does not know once their frames are checked.
CHT = trame_async.register("CHT", "<*s", str)
#: A chat's name, multicast to a room right after joining it.
NAM = trame_async.register("NAM", "<*s", str)

#: Seconds a join notice waits for the newcomer's name before it is shown without one.
NAME_WAIT = 1.0

HELP = "* commands: /join ROOM, /leave [ROOM], /rooms (//text sends /text)"


def _default_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (containers)
        return f"user{os.getpid()}"


#: On a terminal, what is being typed is kept on its own line under what arrives (readline).
TTY = sys.stdin.isatty() and sys.stdout.isatty()
PROMPT = "> "
#: Set once input() shows its prompt: before that, emit() has no prompt to draw again.
PROMPTING = threading.Event()


def emit(text: str) -> None:
    """Print a line that arrived; on a terminal, above the line being typed, which stays whole."""
    if not TTY:
        print(text, flush=True)
        return
    import readline

    # Clear the prompt line, print the text, then draw the prompt and what was typed again.
    again = f"{PROMPT}{readline.get_line_buffer()}" if PROMPTING.is_set() else ""
    sys.stdout.write(f"\r\x1b[K{text}\n{again}")
    sys.stdout.flush()


def say(text: str) -> None:
    """Print a notice of the chat itself (``* ...``)."""
    emit(f"* {text}")


class AnnouncedBackoff(trame_async.Backoff):
    """The client's reconnect backoff, saying how long it waits before each attempt."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Return the wait before attempt ``attempt`` (0 for the first), and say it."""
        wait = super().delay(attempt, retry_after)
        say(f"reconnecting in {wait:.1f} s (attempt {attempt + 1})")
        return wait


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

    def pump_tty() -> None:
        # readline's input(): line editing, and get_line_buffer() for emit() to redraw.
        import readline  # noqa: F401  (input() uses it once imported)

        while True:
            PROMPTING.set()
            try:
                line = input(PROMPT)
            except (EOFError, OSError):
                break
            put(line)
        put(None)

    threading.Thread(target=pump_tty if TTY else pump, name="stdin", daemon=True).start()
    return lines


def show(message: trame_async.Message) -> str:
    """Render a received message as one line of text."""
    room = f"#{message.group} " if message.group is not None else ""
    if message.trame in (CHT, trame_async.STR):
        return f"{room}[{message.sender}] {message.value}"
    # Another program on the same server may multicast other trames: show them as they are.
    return f"{room}[{message.sender}] <{message.trame}> {message.value!r}"


class Chat:
    """One chat client: its rooms, the names it learned, and what it prints."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client: trame_async.Client | None = None
        #: Rooms joined, oldest first: lines go to the last one.
        self.rooms: list[str] = []
        #: Names of the clients that announced one in a room we are in, by client id.
        self.names: dict[int, str] = {}
        #: Join notices waiting for the newcomer's name, by (room, client id).
        self.unnamed: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- what the connection reports (plain functions, called in the I/O callback) -------------

    def on_presence(self, event: trame_async.Presence) -> None:
        """Show a member coming or going (``on_presence``: rooms joined with presence)."""
        key = (event.group, event.client_id)
        if event.joined:
            # Wait for its NAM (it follows the presence event); a program that sends none is
            # shown without a name. Tell the newcomer our name too, so it can name us.
            loop = asyncio.get_running_loop()
            self.unnamed[key] = loop.call_later(NAME_WAIT, self._joined, *key)
            task = loop.create_task(self._announce(event.group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if key in self.unnamed:
            self._joined(*key)  # came and went before its name: still say it came
        why = f" ({event.reason})" if event.reason is not None else ""
        say(f"{self._who(event.client_id)} left #{event.group}{why}")

    def on_disconnect(self, err: trame_async.ConnectionClosed) -> None:
        """Say the connection is lost (``on_disconnect``: the client reconnects by itself)."""
        for handle in self.unnamed.values():
            handle.cancel()
        self.unnamed.clear()
        say(f"connection lost ({err.reason}); reconnecting")

    async def on_reconnect(self, client: trame_async.Client) -> None:
        """Say the connection is back, in which rooms (the client joined them again before
        calling this), and tell them our name again: the members see a new client id."""
        self.rooms = [room for room in self.rooms if room in client.groups]
        where = f", back in {self._list(self.rooms)}" if self.rooms else ""
        say(f"reconnected as client {client.id}{where}")
        for room in self.rooms:
            await self._announce(room)

    async def _announce(self, room: str) -> None:
        """Multicast our name to ``room`` (nothing when lost meanwhile, or out of the room)."""
        assert self.client is not None
        with contextlib.suppress(trame_async.ConnectionClosed, trame_async.InvalidStateError):
            await self.client.multicast(NAM, self.name, group=room)

    def received(self, message: trame_async.Message) -> None:
        """Print a received message (a ``NAM`` completes a join notice instead)."""
        if message.trame == NAM and message.group is not None:
            self.names[message.sender] = message.value
            handle = self.unnamed.pop((message.group, message.sender), None)
            if handle is not None:
                handle.cancel()
                say(f"{self._who(message.sender)} joined #{message.group}")
            return
        emit(show(message))

    def _joined(self, room: str, client_id: int) -> None:
        handle = self.unnamed.pop((room, client_id), None)
        if handle is not None:
            handle.cancel()
            say(f"{self._who(client_id)} joined #{room}")

    def _who(self, client_id: int) -> str:
        name = self.names.get(client_id)
        return f"{name} (id {client_id})" if name is not None else f"id {client_id}"

    @staticmethod
    def _list(rooms: list[str]) -> str:
        return ", ".join(f"#{room}" for room in rooms)

    def _where(self) -> str:
        return f"#{self.rooms[-1]}" if self.rooms else "everyone"

    # --- what the user types ---------------------------------------------------------------------

    async def typed(self, line: str) -> None:
        """Handle one line of input: a command, or a line to send."""
        if line.startswith("//"):
            line = line[1:]  # a line that starts with "/", not a command
        elif line.startswith("/"):
            command, _, arg = line[1:].strip().partition(" ")
            room = arg.strip().removeprefix("#")
            if command == "join" and room:
                await self.join(room)
            elif command == "leave" and not (room or self.rooms):
                say("you are in no room; your lines go to everyone")
            elif command == "leave":
                await self.leave(room or self.rooms[-1])
            elif command == "rooms":
                if self.rooms:
                    say(f"rooms: {self._list(self.rooms)}; your lines go to {self._where()}")
                else:
                    say("in no room; your lines go to everyone")
            else:
                say(HELP)
            return
        if not line.strip():
            return
        await self.send(line)

    async def send(self, text: str) -> None:
        """Multicast a line to the current room, or to everyone when in no room."""
        assert self.client is not None
        room = self.rooms[-1] if self.rooms else None
        try:
            await self.client.multicast(CHT, f"{self.name}: {text}", group=room)
        except (trame_async.FrameTooLargeError, trame_async.InvalidStateError) as err:
            print(f"* not sent: {err}", file=sys.stderr, flush=True)
        except trame_async.ConnectionClosed as err:
            if self.client.closed:
                raise  # over for good: the chat ends
            print(f"* not sent: {err}", file=sys.stderr, flush=True)

    async def join(self, room: str) -> None:
        """Join ``room`` with presence, tell its members our name, make it the current room."""
        assert self.client is not None
        try:
            await self.client.join(room, presence=True)
            await self.client.multicast(NAM, self.name, group=room)
        except (ValueError, trame_async.GroupRefused, trame_async.InvalidStateError) as err:
            print(f"* cannot join #{room}: {err}", file=sys.stderr, flush=True)
            return
        except trame_async.ConnectionClosed as err:
            if self.client.closed:
                raise
            print(f"* cannot join #{room} now: {err}", file=sys.stderr, flush=True)
            return
        if room in self.rooms:
            self.rooms.remove(room)
        self.rooms.append(room)
        try:
            others = [f"id {m}" for m in await self.client.members(room) if m != self.client.id]
        except trame_async.TrameError:
            others = ["?"]  # a group too large to list, or the connection just went
        present = f"with {', '.join(others)}" if others else "alone"
        say(f"you joined #{room} ({present}); your lines go to #{room}")

    async def leave(self, room: str) -> None:
        """Leave ``room``; lines go to the room joined before it, or to everyone."""
        assert self.client is not None
        if room not in self.rooms:
            say(f"you are not in #{room}")
            return
        self.rooms.remove(room)
        for key in [k for k in self.unnamed if k[0] == room]:
            self.unnamed.pop(key).cancel()
        try:
            await self.client.leave(room)
        except (trame_async.GroupRefused, trame_async.InvalidStateError):
            pass  # out of it already (the server's doing): the same for the user
        except trame_async.ConnectionClosed:
            if self.client.closed:
                raise
            # Reconnecting: the room is forgotten, and not joined again.
        say(f"you left #{room}; your lines go to {self._where()}")


async def print_messages(client: trame_async.Client, chat: Chat) -> None:
    """Print every message until the connection ends for good (a clean end returns, others
    raise); while the client reconnects, the loop just waits."""
    async for message in client:
        chat.received(message)


async def read_typed(chat: Chat) -> None:
    """Handle every stdin line until end of input."""
    lines = read_lines(asyncio.get_running_loop())
    while (line := await lines.get()) is not None:
        await chat.typed(line)


async def run(args: argparse.Namespace) -> int:
    """Connect, then chat until end of input (0) or until the connection ends for good (1)."""
    chat = Chat(args.name)
    try:
        client = await trame_async.connect(
            args.host,
            args.port,
            token=args.token,
            reconnect=AnnouncedBackoff(),
            on_disconnect=chat.on_disconnect,
            on_reconnect=chat.on_reconnect,
            on_presence=chat.on_presence,
        )
    except (trame_async.ConnectError, trame_async.ConnectionClosed) as err:
        print(f"chat: {err}", file=sys.stderr)
        return 1
    chat.client = client
    async with client:
        say(
            f"connected to {args.host}:{args.port} as client {client.id} "
            f"({args.name}); type lines, /join ROOM, Ctrl+D to leave"
        )
        receiver = asyncio.create_task(print_messages(client, chat))
        sender = asyncio.create_task(read_typed(chat))
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        error = sender.exception() if sender.done() else None
        if sender.done() and not isinstance(error, trame_async.ConnectionClosed):
            receiver.cancel()  # end of input: leave (or a bug in read_typed: show it)
            await asyncio.gather(receiver, return_exceptions=True)
            sender.result()
            say("bye")
            return 0
        # The connection ended for good first (the receiver ended, or a send found it closed).
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        try:
            await receiver
        except trame_async.ConnectionClosed as err:
            print(f"* {err}", file=sys.stderr, flush=True)
            return 1
        # async for ends quietly on a goodbye: still, the chat is over.
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
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
