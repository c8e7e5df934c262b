"""cachekit's command surface: `nox -l` lists the sessions, `nox -s NAME` runs one.

Sessions that import cachekit install ``torch==2.13.0`` *before* the project: that pin
resolves to a CPU build, after which cachekit's own ``torch>=2.4,<2.14`` is already satisfied.
Installing the project first would let pip choose torch and pull a multi-GB CUDA build.

Arguments after ``--`` go to the tool: ``nox -s tests -- tests/unit -x``.
Reuse environments between runs with ``nox -R`` (skips re-installing).
"""

from __future__ import annotations

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["lint", "tests", "docs_check"]
nox.options.error_on_missing_interpreters = True

TORCH = "torch==2.13.0"


def install_project(session: nox.Session, extras: str = "all") -> None:
    """torch first (CPU build), then the project in editable mode with ``extras``."""
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the default test suite (the README's test command: python -m pytest -q)."""
    install_project(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def tests_slow(session: nox.Session) -> None:
    """Run only the slow tests (pytest -m slow): end-to-end generations, long properties."""
    install_project(session)
    session.run("python", "-m", "pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint with ruff (src, policies, models, tests, docs examples, noxfile)."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "policies", "models", "tests", "docs/examples",
                "noxfile.py", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check src/cachekit with mypy (against the installed torch and attrs)."""
    install_project(session, "test")
    session.install("mypy>=1.10")
    session.run("mypy", "src/cachekit", *session.posargs)


@nox.session
def docs_check(session: nox.Session) -> None:
    """Docs meta-tests: hooks documented and tested, knobs documented, README and CI agree."""
    install_project(session, "test")
    session.run("python", "-m", "pytest", "-q", "tests/unit/test_docs.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Quick benchmark on the bundled model (cachekit bench --quick; the command lands later)."""
    install_project(session)
    has_bench = session.run("python", "-c", "from cachekit.cli import COMMANDS; "
                            "print(any(c.name == 'bench' for c in COMMANDS))", silent=True)
    if "True" not in str(has_bench):
        session.skip("`cachekit bench` does not exist yet (it lands with the benchmark "
                     "harness); nothing to run")
    session.run("cachekit", "bench", "--quick", *session.posargs)
