"""Sessions: ``nox -s tests`` (the whole suite), ``lint``, ``typecheck``, ``bench``, ``docs``.

Each session installs what it needs in its own virtualenv; extra arguments after ``--`` go to the
tool (``nox -s tests -- -k heartbeat``).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite (stock asyncio loop and uvloop) on both receive loops.

    Once with the client's compiled hot loop (trame_async/_speedups.c), when the install could
    build it, and once with TRAME_ASYNC_PURE_PYTHON=1, the pure-Python package every install has.
    """
    session.install("-e", ".[test]")
    built = session.run(
        "python",
        "-c",
        "import trame_async.protocol as p; print(int(p.SPEEDUPS))",
        silent=True,
        env={"TRAME_ASYNC_PURE_PYTHON": "0"},
    )
    if isinstance(built, str) and built.strip() == "1":
        session.log("compiled receive loop: the whole suite")
        session.run(
            "pytest",
            *session.posargs,
            env={"TRAME_ASYNC_REQUIRE_SPEEDUPS": "1", "TRAME_ASYNC_PURE_PYTHON": "0"},
        )
    else:
        session.warn("the compiled receive loop was not built (no C compiler?): pure Python only")
    session.log("pure-Python receive loop (TRAME_ASYNC_PURE_PYTHON=1): the whole suite")
    session.run("pytest", *session.posargs, env={"TRAME_ASYNC_PURE_PYTHON": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Run ruff on the package, tests, examples and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Run mypy (strict) on the package."""
    session.install("mypy>=1.10", "-e", ".[uvloop,metrics,top,cluster]")
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks; they print tables (``-- --json out.json`` to save figures)."""
    session.install(
        "-e", ".[uvloop,cluster]", "websockets>=13", "psutil>=5.9", "matplotlib>=3.8"
    )
    session.run("python", "bench/run_all.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs site into ``site/`` with ``mkdocs build --strict`` (any warning fails).

    Arguments after ``--`` replace ``-d site`` (``nox -s docs -- -d /tmp/site``).
    """
    # ruff lays out the reference's long signatures (mkdocstrings uses it when it is installed).
    session.install("-e", ".[docs]", "ruff>=0.6")
    # The Material theme prints a banner about MkDocs 2 on every build; it is not a warning.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    session.run("mkdocs", "build", "--strict", *(session.posargs or ["-d", "site"]), env=env)
