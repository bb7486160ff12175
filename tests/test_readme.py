"""The README's promises hold: its two commands, its quick start, its option table.

The slow test proves the server command on a fresh machine: a new virtualenv, ``pip install`` of a
clean copy of the repository, then the installed ``trame-serve`` started and stopped with Ctrl+C.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from proc_helpers import ROOT, STEP, Proc, assert_clean_stderr, python, start_trame_serve

from trame_async.cli import build_parser

README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

SERVER_COMMAND = "pip install . && trame-serve"
TEST_COMMAND = "pip install nox && nox -s tests"

#: The port the README's snippets use: trame-serve's default.
README_PORT = 8765
_QUICKSTART_MARK = "<!-- quickstart"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """Return ``(offset, code)`` of every fenced block of ``language`` in ``text``."""
    return [(m.start(), m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def quickstart() -> str:
    """Return the python block that follows the quick start marker."""
    text = readme()
    mark = text.index(_QUICKSTART_MARK)
    blocks = [code for offset, code in code_blocks(text, "python") if offset > mark]
    assert blocks, "no python block after the quick start marker"
    return blocks[0]


# --- the two commands -------------------------------------------------------------------------


def test_readme_gives_both_commands_as_shell_blocks() -> None:
    shell_lines = {
        line.strip() for _, code in code_blocks(readme(), "sh") for line in code.splitlines()
    }
    assert SERVER_COMMAND in shell_lines
    assert TEST_COMMAND in shell_lines


def test_ci_runs_the_readme_test_command_word_for_word() -> None:
    commands = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    assert any(line == TEST_COMMAND or line.startswith(TEST_COMMAND + " ||") for line in commands)


def test_readme_lists_every_trame_serve_option() -> None:
    text = readme()
    options = [
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt not in ("--help", "--version")
    ]
    assert options
    missing = [opt for opt in options if f"`{opt}" not in text]
    assert not missing, f"README's trame-serve table lacks {missing}"


def test_readme_links_the_documentation() -> None:
    text = readme()
    for doc in ("docs/tutorial.md", "docs/api.md", "docs/protocol.md", "docs/performance.md"):
        assert f"]({doc}" in text, doc
        assert (ROOT / doc).is_file(), doc


def test_performance_doc_shows_its_plots() -> None:
    text = (ROOT / "docs" / "performance.md").read_text()
    for image in ("perf-fanout.png", "perf-latency.png"):
        assert f"]({image})" in text, image
        assert (ROOT / "docs" / image).stat().st_size > 10_000, image


def test_readme_python_blocks_compile() -> None:
    blocks = code_blocks(readme(), "python")
    assert len(blocks) >= 3
    for _, code in blocks:
        ast.parse(code)


# --- the quick start and the snippets, run --------------------------------------------------------


def test_quickstart_runs_against_a_server() -> None:
    code = quickstart()
    assert len(code.strip().splitlines()) <= 6, "keep the quick start short"
    assert code.count(str(README_PORT)) == 1, "the quick start names the port once"
    server, host, port = start_trame_serve(None, "--loop", "asyncio")
    try:
        run = python("-c", code.replace(f'"127.0.0.1", {README_PORT}', f'"{host}", {port}'))
        try:
            assert run.wait() == 0, run.describe()
        finally:
            run.stop()
        out = "\n".join(run.out_lines)
        assert "Message(sender=1," in out, run.describe()
        assert "value=Position(x=1.0, y=2.0)" in out, run.describe()
        assert_clean_stderr(run)
    finally:
        server.stop()
    assert server.popen.returncode == 0, server.describe()


def test_readme_registration_snippet_registers_a_namedtuple_trame() -> None:
    (snippet,) = [code for _, code in code_blocks(readme(), "python") if "register(" in code]
    check = """
import trame_async
assert trame_async.registered()["VEL"][0] == "<ff"
message, fmt = trame_async.encode("VEL", Velocity(1.0, -0.5))
trame, value = trame_async.decode(message)
assert (trame, value, type(value)) == ("VEL", Velocity(1.0, -0.5), Velocity), (trame, value)
print("ok")
"""
    run = python("-c", snippet + check)
    try:
        assert run.wait() == 0, run.describe()
        assert run.out_lines == ["ok"], run.describe()
    finally:
        run.stop()


def test_readme_embedding_snippet_serves_a_client() -> None:
    (snippet,) = [code for _, code in code_blocks(readme(), "python") if "serve(" in code]
    # Port 0, so that it runs beside a trame-serve on 8765 (a reader following the README).
    assert f", {README_PORT}," not in snippet and '"127.0.0.1", 0,' in snippet
    # A 10 ms period keeps it short; a client started from the hook checks the ticks.
    code = snippet.replace("asyncio.sleep(1)", "asyncio.sleep(0.01)")
    code = code.replace("asyncio.run(main())", "")
    code += """
import contextlib
received = []
real_serve = trame_async.serve

@contextlib.asynccontextmanager
async def serve_and_watch(*args, **kwargs):
    async with real_serve(*args, **kwargs) as server:
        client = await trame_async.connect("127.0.0.1", server.port)
        async def watch():
            with contextlib.suppress(trame_async.ConnectionClosed):
                async for message in client:
                    received.append(message)
        task = asyncio.create_task(watch())
        yield server
        await client.close()
        await task

trame_async.serve = serve_and_watch
asyncio.run(main())
assert received, "no tick received"
assert all(m.sender == 0 and m.trame == "INT" for m in received), received
print("ticks", [m.value for m in received])
"""
    assert "sleep(0.01)" in code and ", 0," in code
    run = python("-c", code)
    try:
        assert run.wait() == 0, run.describe()
        assert any(line.startswith("ticks [") for line in run.out_lines), run.describe()
    finally:
        run.stop()


# --- the server command on a fresh machine ------------------------------------------------------

_COPY_IGNORE = shutil.ignore_patterns(
    ".*", "__pycache__", "*.egg-info", "build", "dist", "*.pyc", "bench", "results"
)


def _venv_bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def _setuptools_can_build(venv_python: Path) -> bool:
    """Whether the venv's own setuptools can build this project (PEP 639 license: >= 77)."""
    probe = subprocess.run(
        [str(venv_python), "-c", "import setuptools; print(setuptools.__version__)"],
        capture_output=True,
        text=True,
        timeout=STEP,
        check=False,
    )
    if probe.returncode != 0:
        return False
    major = probe.stdout.strip().split(".")[0]
    return major.isdigit() and int(major) >= 77


@pytest.mark.slow
def test_server_command_works_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    # A clean checkout: no build directory, no egg-info, nothing installed beside it.
    checkout = tmp_path / "trame_async_checkout"
    shutil.copytree(ROOT, checkout, ignore=_COPY_IGNORE)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], check=True, timeout=STEP * 3, capture_output=True
    )
    venv_python = _venv_bin(venv, "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)

    # `pip install .`: with build isolation pip fetches a recent setuptools from PyPI; a venv whose
    # own setuptools is recent enough builds offline.
    no_isolation = ["--no-build-isolation"] if _setuptools_can_build(venv_python) else []
    install = subprocess.run(
        [str(venv_python), "-m", "pip", "install", *no_isolation, "."],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP * 3,
        check=False,
    )
    assert install.returncode == 0, f"pip install . failed:\n{install.stdout}\n{install.stderr}"

    trame_serve = _venv_bin(venv, "trame-serve")
    assert trame_serve.exists(), "pip install . did not install the trame-serve script"
    # Run from elsewhere so that the installed package, not the checkout, is imported.
    server = Proc([trame_serve, "--host", "127.0.0.1", "--port", "0"], cwd=tmp_path, env=env)
    try:
        line = server.wait_line("listening on")
        assert re.fullmatch(r"listening on 127\.0\.0\.1:\d+", line.strip()), line
        server.interrupt()  # Ctrl+C
        assert server.wait() == 0, server.describe()
    finally:
        server.stop()
    assert_clean_stderr(server)
    assert any("server closed" in line for line in server.err_lines), server.describe()
