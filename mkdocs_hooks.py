"""MkDocs hooks: bring the repository files that live outside docs/ into the site.

docs/*.md are also read on GitHub, where ``../examples/chat.py`` is the right link; in the site that
file does not exist and ``mkdocs build --strict`` fails on the broken link. Rather than change the
pages for the site's sake, the build:

- generates ``examples.md`` (the source of each ``examples/*.py``, one section each) and
  ``changelog.md`` (``CHANGELOG.md`` as it is), as virtual pages: no copy to keep in sync;
- rewrites links to ``../examples/NAME.py`` into links to that page's ``NAME`` section, and links
  to ``../CHANGELOG.md`` into the changelog page.

:class:`ReSTMarkup` is also a griffe extension (mkdocs.yml loads it for mkdocstrings): the docstrings
are Google style but use a few reStructuredText forms that Markdown would show raw.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"

# A Markdown link target that leaves docs/ for examples/NAME.py or CHANGELOG.md.
_OUTSIDE_LINK = re.compile(r"\]\((?P<up>(?:\.\./)+)(?P<target>examples/(?P<name>[\w-]+)\.py|CHANGELOG\.md)\)")


def _examples_page() -> str:
    parts = [
        "# Examples\n\n"
        "The programs in the repository's `examples/` directory, as they are. Each one's docstring "
        "says how to run it; start `trame-serve` first unless it says it starts its own server.\n"
    ]
    for path in sorted(EXAMPLES.glob("*.py")):
        code = path.read_text(encoding="utf-8")
        parts.append(f"\n## `examples/{path.name}` {{#{path.stem}}}\n\n```python\n{code}```\n")
    return "".join(parts)


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    files.append(File.generated(config, "examples.md", content=_examples_page()))
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=changelog))
    return files


def on_page_markdown(markdown: str, page: Page, **kwargs: Any) -> str:
    here = posixpath.dirname(page.file.src_uri)

    def relink(match: re.Match[str]) -> str:
        name = match["name"]
        target = f"examples.md#{name}" if name else "changelog.md"
        return f"]({posixpath.relpath(target, here or '.')})"

    return _OUTSIDE_LINK.sub(relink, markdown)


# :class:`~trame_async.protocol.ClientCore`, :meth:`Client.receive`, ... (a leading ~ shows the
# last name only, as Sphinx does).
_ROLE = re.compile(r":(?:class|meth|attr|func|data|exc|mod|obj):`(?P<tilde>~?)(?P<name>[^`]+)`(?:\\ )?")
_DIRECTIVE = re.compile(r"^[ \t]*\.\. code-block::[^\n]*\n", re.MULTILINE)
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def rest_to_markdown(text: str) -> str:
    """Return ``text`` with Sphinx roles as inline code and ``::`` / code-block markers removed.

    The indented block that follows a ``::`` or a ``.. code-block::`` is already a Markdown code block.
    """

    def code(match: re.Match[str]) -> str:
        name = match["name"]
        return f"`{name.rsplit('.', 1)[-1] if match['tilde'] else name}`"

    text = _ROLE.sub(code, text)
    text = _DIRECTIVE.sub("", text)
    return _LITERAL_MARKER.sub(":", text)


class ReSTMarkup(griffe.Extension):
    """Rewrite each docstring's reStructuredText roles and literal markers for Markdown."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rest_to_markdown(obj.docstring.value)
