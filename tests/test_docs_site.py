"""The docs site builds with ``mkdocs build --strict`` and its reference comes from the docstrings.

The build itself needs the ``docs`` extra (``nox -s docs`` installs it); without it those tests are
skipped. That every module has a reference page is checked from mkdocs.yml alone, so ``nox -s tests``
catches a new module without one.
"""

from __future__ import annotations

import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from proc_helpers import ROOT

import trame_async
from trame_async.client import Client, connect

MKDOCS_YML = ROOT / "mkdocs.yml"
PACKAGE = ROOT / "trame_async"


def reference_pages() -> dict[str, str]:
    """Return ``{module name: page}`` for the reference pages listed in mkdocs.yml's nav."""
    text = MKDOCS_YML.read_text(encoding="utf-8")
    return dict(re.findall(r"^\s*- (\w+): (reference/\w+\.md)$", text, re.MULTILINE))


def public_modules() -> set[str]:
    modules = {
        path.stem
        for path in PACKAGE.glob("*.py")
        if not path.stem.startswith("_")  # __init__ has its own page, __main__ is `python -m`
    }
    # A subpackage has one page, which documents each of its modules.
    return modules | {init.parent.name for init in PACKAGE.glob("*/__init__.py")}


def test_a_subpackage_page_documents_each_of_its_modules() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        package = init.parent.name
        text = (ROOT / "docs" / "reference" / f"{package}.md").read_text(encoding="utf-8")
        for module in init.parent.glob("*.py"):
            if not module.stem.startswith("_"):
                target = f"trame_async.{package}.{module.stem}"
                assert re.search(rf"^::: {re.escape(target)}$", text, re.MULTILINE), target


def test_every_module_has_a_reference_page() -> None:
    pages = reference_pages()
    assert set(pages) == public_modules() | {"trame_async"}, (
        "add docs/reference/<module>.md (with '::: trame_async.<module>') and a nav line in mkdocs.yml"
    )
    for module, page in pages.items():
        target = "trame_async" if module == "trame_async" else f"trame_async.{module}"
        text = (ROOT / "docs" / page).read_text(encoding="utf-8")
        assert re.search(rf"^::: {re.escape(target)}$", text, re.MULTILINE), page


def text_of(page: Path) -> str:
    """Return the visible text of a built HTML page without any whitespace.

    Inline tags (``<code>``) split words from punctuation unpredictably, so texts are compared with
    their whitespace removed.
    """
    raw = page.read_text(encoding="utf-8")
    raw = re.sub(r"<(script|style)\b.*?</\1>", "", raw, flags=re.DOTALL)
    return "".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def plain(docstring_line: str) -> str:
    """Return a docstring line as :func:`text_of` shows it: without roles, backquotes, whitespace."""
    line = re.sub(
        r":\w+:`(~?)([^`]+)`", lambda m: m[2].rsplit(".", 1)[-1] if m[1] else m[2], docstring_line
    )
    return "".join(line.replace("`", "").split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed (nox -s docs)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(MKDOCS_YML),
            "-d",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


def test_reference_pages_hold_the_docstrings(site: Path) -> None:
    client_page = text_of(site / "reference" / "client" / "index.html")
    for method in (Client.join, Client.receive, connect):
        summary = (inspect.getdoc(method) or "").splitlines()[0]
        assert plain(summary) in client_page, summary
    # Each module's page opens with its module docstring.
    for module in public_modules() | {"__init__"}:
        name = "trame_async" if module == "__init__" else module
        page = site / "reference" / name / "index.html"
        module_obj = (
            trame_async if module == "__init__" else sys.modules.get(f"trame_async.{module}")
        )
        if module_obj is None:
            module_obj = __import__(f"trame_async.{module}", fromlist=["_"])
        summary = (inspect.getdoc(module_obj) or "").splitlines()[0]
        assert plain(summary) in text_of(page), (page, summary)


def test_no_restructuredtext_markup_shows(site: Path) -> None:
    for page in (site / "reference").glob("*/index.html"):
        text = text_of(page)
        assert not re.search(r":(class|meth|attr|func|data|exc):", text), page
        assert ".. code-block::" not in text, page


def test_performance_plots_are_in_the_site(site: Path) -> None:
    performance = (site / "performance" / "index.html").read_text(encoding="utf-8")
    for plot in ("perf-fanout.png", "perf-latency.png"):
        assert f'src="../{plot}"' in performance
        assert (site / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_examples_and_changelog_pages(site: Path) -> None:
    examples = text_of(site / "examples" / "index.html")
    for example in (ROOT / "examples").glob("*.py"):
        assert f"examples/{example.name}" in examples
    # The tutorial's link to ../examples/embedded.py (right on GitHub) points into the site.
    tutorial = (site / "tutorial" / "index.html").read_text(encoding="utf-8")
    assert 'href="../examples/#embedded"' in tutorial
    changelog = text_of(site / "changelog" / "index.html")
    assert "Unreleased" in changelog and "0.1.0" in changelog
