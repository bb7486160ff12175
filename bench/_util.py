"""Helpers the benchmark scripts share: server subprocesses, process figures, tables, metadata."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on \[?([^\]\s]+?)\]?:(\d+)")


def python() -> list[str]:
    """The interpreter command for the server and load subprocesses: this Python, as users run it."""
    return [sys.executable]


def start_listening(
    cmd: Sequence[str], *, timeout: float = 20.0, cwd: Path = ROOT
) -> tuple[subprocess.Popen[str], str, int]:
    """Start ``cmd`` and wait for its ``listening on HOST:PORT`` line; stop it on any failure."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, text=True, cwd=cwd)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for _ in range(100):  # a server prints a few lines at most before listening
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if not ready:
                break
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{cmd[1:3]} exited with status {proc.wait(5)} before listening")
            match = _LISTENING.search(line)
            if match:
                return proc, match.group(1), int(match.group(2))
        raise TimeoutError(f"{' '.join(cmd)} did not say 'listening on' within {timeout:g} s")
    except BaseException:
        stop_process(proc)
        raise


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM ``proc``, SIGKILL it if it is still there after ``timeout``; return its status."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return proc.returncode


def peak_rss(pid: int) -> int:
    """Return the peak resident set size (VmHWM) of ``pid`` in bytes, 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as a Markdown table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if n else "-" * (w + 2)
            for w, n in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 10000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def package_dir() -> Path:
    """The trame_async package the benchmarks import (PYTHONPATH can point at another checkout)."""
    import importlib.util

    spec = importlib.util.find_spec("trame_async")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("trame_async is not importable: pip install -e . first")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def source_hash() -> str:
    """Short hash of trame_async/*.py (the imported package), to tell which code was measured."""
    digest = hashlib.sha256()
    for path in sorted(package_dir().glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def finish_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Note in ``meta`` (taken at the start) whether trame_async changed during the run."""
    end = source_hash()
    meta["trame_async_changed_during_run"] = end != meta["trame_async_sha256"]
    if meta["trame_async_changed_during_run"]:
        meta["trame_async_sha256_end"] = end
        print("warning: trame_async/*.py changed during the run", file=sys.stderr)
    return meta


def metadata() -> dict[str, Any]:
    """Describe the machine and the code measured (git HEAD, dirty files, source hash)."""
    import psutil
    import uvloop
    import websockets

    package = package_dir()

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args],
                cwd=package.parent,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "uvloop": uvloop.__version__,
        "websockets": websockets.__version__,
        "git_head": git("rev-parse", "--short", "HEAD"),
        "git_dirty": git("status", "--short", "--", "trame_async").splitlines(),
        "trame_async_path": str(package),
        "trame_async_sha256": source_hash(),
        "argv": sys.argv,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()
