"""Every python snippet of docs/tutorial.md runs against the current code.

Each block is preceded by a marker comment saying how to check it::

    <!-- tutorial: run -->                 a complete program: run it (port 8765 becomes 0)
    <!-- tutorial: needs-server -->        run it against a trame-serve started on a free port
    <!-- tutorial: compile -->             a fragment: compile it only

and optionally ``| expect: TEXT`` (repeatable): each TEXT must appear in the program's output.
The reader leaves trame-serve running on 8765 (section 2), so snippets that run their own server
listen on port 0 and give their clients ``server.port``; those that use trame-serve connect to
``"127.0.0.1", 8765``, which the test points at a trame-serve of its own on a free port.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from proc_helpers import ROOT, STEP, assert_clean_stderr, python, start_trame_serve

TUTORIAL = ROOT / "docs" / "tutorial.md"
PORT = "8765"
_BLOCK = re.compile(
    r"<!--\s*tutorial:\s*(?P<marker>[^>]*?)\s*-->\s*\n```(?P<lang>\w*)\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
_PYTHON_FENCE = re.compile(r"^```python\n", re.MULTILINE)
_KINDS = ("run", "needs-server", "compile")


def snippets() -> list[tuple[int, str, list[str], str]]:
    """Return ``(line, kind, expected outputs, code)`` for every marked block."""
    text = TUTORIAL.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        parts = [p.strip() for p in m.group("marker").split("|")]
        kind, expects = parts[0], [p.removeprefix("expect:").strip() for p in parts[1:]]
        assert kind in _KINDS, f"unknown tutorial marker {kind!r}"
        assert all(p.startswith("expect:") for p in parts[1:]), parts
        line = text.count("\n", 0, m.start("code")) + 1
        out.append((line, kind, expects, m.group("code")))
    return out


SNIPPETS = snippets()


def test_programs_with_their_own_server_leave_8765_to_trame_serve() -> None:
    for line, _, _, code in SNIPPETS:
        own = re.search(r"\b(?:serve|start_server)\(\s*\"[^\"]*\",\s*(\w+)", code)
        assert own is None or own.group(1) == "0", (
            f"docs/tutorial.md line {line}: a server of the program's own listens on port 0: "
            "the reader's trame-serve holds 8765"
        )


def test_every_python_block_is_marked() -> None:
    text = TUTORIAL.read_text(encoding="utf-8")
    assert len(_PYTHON_FENCE.findall(text)) == len(SNIPPETS), (
        "every ```python block of docs/tutorial.md needs a <!-- tutorial: ... --> marker"
    )


@pytest.mark.parametrize(
    ("kind", "expects", "code"),
    [pytest.param(kind, expects, code, id=f"line{line}") for line, kind, expects, code in SNIPPETS],
)
def test_tutorial_snippet(kind: str, expects: list[str], code: str, tmp_path: Path) -> None:
    ast.parse(code)
    if kind == "compile":
        return
    server = None
    if kind == "needs-server":
        server, host, port = start_trame_serve(None, "--loop", "asyncio")
        code = code.replace(f'"127.0.0.1", {PORT}', f'"{host}", {port}')
    else:
        code = code.replace(PORT, "0")
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    try:
        run = python(script, cwd=tmp_path)
        try:
            assert run.wait(STEP) == 0, run.describe()
        finally:
            run.stop()
        output = "\n".join(run.out_lines)
        for text in expects:
            assert text in output, f"{text!r} not in the output\n{run.describe()}"
        assert_clean_stderr(run)
    finally:
        if server is not None:
            server.stop()
    if server is not None:
        assert server.popen.returncode == 0, server.describe()
