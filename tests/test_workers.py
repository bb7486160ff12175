"""``trame-serve --workers N`` and ``--cluster`` as a user runs them: real processes and sockets.

The supervisor (``python -m trame_async --workers 2 --port 0``) starts an embedded nats-server and
two workers; its log (stderr, shared with the workers: ``[worker i]`` tags theirs) goes to a file
the tests read. Which worker a client landed on is read from the worker's ``client N connected
from 127.0.0.1:PORT`` line, PORT being the client's own. Every process a test starts, including
the supervisor's children, is stopped by the test (killed if a check failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from helpers import eventually, log_text, read_line, spawn, stop_process, wait_listening
from proc_helpers import ROOT

import trame_async
import trame_async.server
from trame_async import ConnectionClosed, DisconnectReason
from trame_async.cli import main
from trame_async.cluster.embedded import EmbeddedNats
from trame_async.workers import WORKER_ENV

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

MS = 0.001 * float(os.environ.get("TRAME_TESTS_TIMEOUT_FACTOR", "1"))
#: Bound for one step: processes starting, a line appearing, processes ending.
STEP = 20_000 * MS

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
_NATS = re.compile(r"embedded nats-server at nats://127\.0\.0\.1:\d+ \(pid (\d+)\)")


def _env() -> dict[str, str]:
    paths = [str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths)}


@dataclass
class Workers:
    """A running ``trame-serve --workers``: its process, address and log."""

    proc: asyncio.subprocess.Process
    host: str
    port: int
    log: Path
    children: list[psutil.Process] = field(default_factory=list)

    def text(self) -> str:
        return log_text(self.log)

    def worker_pids(self) -> dict[int, int]:
        """The pid of each worker, the last started in its slot."""
        return {int(i): int(pid) for i, pid in _STARTED.findall(self.text())}

    def nats_pid(self) -> int:
        found = _NATS.search(self.text())
        assert found, self.text()
        return int(found.group(1))

    async def worker_of(self, client: trame_async.Client) -> int:
        """Which worker serves ``client``, from that worker's connect line."""
        port = client.local_address[1]
        pattern = re.compile(
            rf"\[worker (\d+)\] trame_async\.server: client \d+ connected from "
            rf"127\.0\.0\.1:{port}\b"
        )
        await eventually(lambda: pattern.search(self.text()), STEP, what=f"connect line of {port}")
        found = pattern.search(self.text())
        assert found is not None
        return int(found.group(1))

    def remember_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            known = {p.pid for p in self.children}
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.pid not in known:
                    self.children.append(child)


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.asynccontextmanager
async def running_workers(tmp_path: Path, *extra: str) -> AsyncIterator[Workers]:
    """Run ``trame-serve --workers 2 --port 0 EXTRA...`` for the block; stop all it started."""
    log = tmp_path / "workers.log"
    with log.open("wb") as log_file:
        proc = await spawn(
            ["-m", "trame_async", "--workers", "2", "--port", "0", *extra],
            stderr=log_file,
            env=_env(),
        )
    workers = Workers(proc, "", 0, log)
    try:
        workers.host, workers.port = await wait_listening(proc, STEP)
        workers.remember_children()
        yield workers
    finally:
        if proc.returncode is None:
            workers.remember_children()
        await stop_process(proc)
        for child in workers.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(workers.children, timeout=STEP)


async def place_clients(workers: Workers) -> dict[int, list[trame_async.Client]]:
    """Connect clients until both workers have one (the kernel spreads them); return them."""
    placed: dict[int, list[trame_async.Client]] = {0: [], 1: []}
    for _ in range(64):  # all on one worker 64 times running: odds of 2**-63
        client = await trame_async.connect(workers.host, workers.port, timeout=STEP)
        placed[await workers.worker_of(client)].append(client)
        if placed[0] and placed[1] and len(placed[0]) + len(placed[1]) >= 4:
            return placed
    raise AssertionError(f"clients never reached both workers:\n{workers.text()}")


async def close_all(placed: dict[int, list[trame_async.Client]]) -> None:
    for clients in placed.values():
        for client in clients:
            await client.close()


# --- supervision ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_workers_share_the_port_and_all_stop_cleanly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    async with running_workers(tmp_path) as workers:
        assert workers.host == "127.0.0.1" and workers.port != 0
        pids = workers.worker_pids()
        assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
        nats = psutil.Process(workers.nats_pid())
        assert nats.name() == "nats-server"
        placed = await place_clients(workers)
        try:
            workers.proc.send_signal(sig)
            assert await asyncio.wait_for(workers.proc.wait(), STEP) == 0, workers.text()
            # The workers shut down gracefully: their clients were told so.
            for clients in placed.values():
                for client in clients:
                    with pytest.raises(ConnectionClosed) as info:
                        await client.receive(timeout=STEP)
                    assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
        finally:
            await close_all(placed)
        rest = (await workers.proc.stdout.read()).decode() if workers.proc.stdout else ""
        assert "listening on" not in rest, "the address is printed once"
        for child in workers.children:
            assert _gone(child), (child, workers.text())
        text = workers.text()
        assert "worker 0 exited with status 0" in text, text
        assert "worker 1 exited with status 0" in text, text
        assert "embedded nats-server stopped" in text, text
        assert "Traceback" not in text, text


async def test_a_multicast_reaches_a_client_on_the_other_worker(tmp_path: Path) -> None:
    async with running_workers(tmp_path) as workers:
        placed = await place_clients(workers)
        try:
            sender, receiver = placed[0][0], placed[1][0]
            # Multicast until the other worker relays one: its NATS subscription may still be
            # on its way when the clients connect.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STEP
            got = None
            while got is None:
                assert loop.time() < deadline, f"nothing crossed the workers:\n{workers.text()}"
                await sender.multicast(trame_async.INT, 7)
                with contextlib.suppress(TimeoutError):
                    got = await receiver.receive(timeout=100 * MS)
            assert got.value == 7 and got.sender == sender.id
            assert sender.id != receiver.id, "client ids are unique across the cluster"
        finally:
            await close_all(placed)


async def test_a_killed_worker_is_restarted_and_logged(tmp_path: Path) -> None:
    async with running_workers(tmp_path) as workers:
        old = workers.worker_pids()[1]
        os.kill(old, signal.SIGKILL)
        await eventually(
            lambda: re.search(
                r"WARNING trame_async\.workers: worker 1 was killed by SIGKILL; restarting it in",
                workers.text(),
            ),
            STEP,
            what="the WARNING about worker 1",
        )
        await eventually(
            lambda: workers.worker_pids()[1] != old, STEP, what="worker 1 started again"
        )
        new = workers.worker_pids()[1]
        await eventually(
            lambda: f"worker 1 (pid {new}) listening" in workers.text(), STEP, what="listening"
        )
        workers.remember_children()
        # Both workers serve again.
        placed = await place_clients(workers)
        await close_all(placed)
        workers.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(workers.proc.wait(), STEP) == 0, workers.text()


async def test_workers_and_nats_end_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with running_workers(tmp_path) as workers:
        assert len(workers.children) == 3, workers.children  # two workers, one nats-server
        workers.proc.kill()
        await asyncio.wait_for(workers.proc.wait(), STEP)
        await eventually(
            lambda: all(_gone(child) for child in workers.children),
            STEP,
            what="the workers and nats-server ending with their supervisor",
        )


async def test_a_worker_stops_gracefully_when_its_supervisor_pipe_closes(tmp_path: Path) -> None:
    # The portable lifeline, apart from Linux's PR_SET_PDEATHSIG: a worker started by hand.
    async with EmbeddedNats(log_path=tmp_path / "nats.log") as nats:
        env = {**os.environ, **_env(), WORKER_ENV: "0", "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "trame_async", "--workers", "2", "--port", "0"],
            *["--cluster", nats.url],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        try:
            host, port = await wait_listening(proc, STEP)
            client = await trame_async.connect(host, port, timeout=STEP)
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                assert await asyncio.wait_for(proc.wait(), STEP) == 0
                with pytest.raises(ConnectionClosed) as info:
                    await client.receive(timeout=STEP)
                assert info.value.reason is DisconnectReason.SERVER_SHUTDOWN
            finally:
                await client.close()
        finally:
            await stop_process(proc)


def free_pair() -> int:
    """A port P such that P and P + 1 were both free just now (bounded tries)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            base: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base
    raise AssertionError("no free pair of ports in 100 tries")


async def test_metrics_of_worker_i_are_on_port_plus_i(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    base = free_pair()
    async with running_workers(tmp_path, "--metrics", str(base)) as workers:
        lines = {await read_line(workers.proc, STEP), await read_line(workers.proc, STEP)}
        assert lines == {
            f"metrics on http://127.0.0.1:{base}/metrics",
            f"metrics on http://127.0.0.1:{base + 1}/metrics",
        }, workers.text()


async def test_a_port_in_use_is_refused_like_a_single_process(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "trame_async", "--workers", "2", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=STEP,
            env={**os.environ, **_env()},
        )
    assert result.returncode == 1, result
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [["--cluster", "nats://127.0.0.1:4222"], ["--workers", "2"]],
    ids=["cluster", "workers"],
)
def test_without_the_cluster_extra_the_error_says_what_to_install(options: list[str]) -> None:
    code = (
        "import sys\n"
        "sys.modules['nats'] = None  # as if nats-py were not installed\n"
        "from trame_async.cli import main\n"
        f"sys.exit(main({[*options, '--port', '0']!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=STEP,
        env={**os.environ, **_env()},
    )
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'trame-async[cluster]'" in result.stderr
    assert options[0] in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--workers", "0"], "argument --workers: must be between 1 and 1024, not 0"),
        (["--workers", "two"], "argument --workers: not a whole number: 'two'"),
        (["--node-index", "3"], "--node-index needs --cluster URL (or --workers N)"),
        (["--cluster-name", "eu"], "--cluster-name needs --cluster URL (or --workers N)"),
        (["--cluster", " , "], "argument --cluster: give at least one NATS URL"),
        (["--cluster", "h:4222", "--cluster-heartbeat", "off"], "cannot be 'off'"),
        (["--cluster", "h:4222", "--cluster-name", "a.b"], "--cluster-name 'a.b' must be"),
        (["--cluster", "h:4222", "--node-index", "1024"], "must be between 0 and 1023"),
        (["--workers", "3", "--node-index", "1022"], "worker indexes would pass 1023"),
    ],
)
def test_argument_errors_are_one_clear_line(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(options)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("trame-serve: ") and err.count("\n") == 1, err
    assert message in err, err


def test_workers_without_a_nats_server_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NATS_SERVER_BIN", "/nonexistent/nats-server")
    with pytest.raises(SystemExit) as info:
        main(["--workers", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "runs its own nats-server unless --cluster names one" in err, err
    assert "/nonexistent/nats-server" in err, err
