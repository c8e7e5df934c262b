"""Meta-tests: the docs say what the code does (datasette-style).

* every hook in :mod:`cachekit.hookspecs` has a docstring with a ``:param`` per argument, is
  documented in ``docs/plugin-hooks.md`` and is exercised by at least one test;
* every knob of every registered policy config (and of the engine and sampler configs) is
  documented; every policy has ``slow`` and ``fast`` presets;
* README: set-up commands pin torch first, ``.ci/run`` runs the README's test command, every
  registered policy is listed, the Python example only uses names that exist;
* ``docs/writing-a-policy.md`` shows the example plugin package file by file, verbatim;
* relative links in README and docs resolve; every nox session has a docstring.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

from cachekit import hookspecs
from cachekit.config import ConfigBase, EngineConfig
from cachekit.plugins import Registry
from cachekit.sampling import SamplerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
EXAMPLE = DOCS / "examples" / "cachekit-example-policy"

HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if callable(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec"))


def _registry() -> Registry:
    return Registry(autoload=True)


def _policies() -> list[str]:
    return _registry().names("policy")


def _hook_args(name: str) -> list[str]:
    return list(inspect.signature(getattr(hookspecs, name)).parameters)


def _md_section(text: str, heading_name: str) -> str:
    """The text under the heading that names ``heading_name`` (up to the next heading of the
    same or a higher level)."""
    m = re.search(rf"^(#+) +`?{re.escape(heading_name)}`? *$", text, re.M)
    assert m, f"no heading for {heading_name!r}"
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


# -- hooks ------------------------------------------------------------------------------------
def test_hookspecs_found():
    assert {"register_policies", "register_model_adapters", "on_step_end"} <= set(HOOKS)
    assert set(HOOKS) == set(Registry.hook_names())


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_docstring_names_every_param(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc, f"hookspec {hook} has no docstring"
    for arg in _hook_args(hook):
        assert re.search(rf":param {arg}:", doc), f"{hook}: docstring lacks ':param {arg}:'"
    assert ":return:" in doc, f"{hook}: docstring lacks ':return:'"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_documented_in_plugin_hooks_md(hook):
    section = _md_section((DOCS / "plugin-hooks.md").read_text(), hook)
    for arg in _hook_args(hook):
        assert f"`{arg}" in section, f"docs/plugin-hooks.md: {hook} does not describe {arg!r}"
    assert "Returns:" in section or "return" in section.lower()


def _test_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in (ROOT / "tests").rglob("*.py")
            if p.resolve() != Path(__file__).resolve()}


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_exercised_by_a_test(hook):
    """A hook counts as exercised when a test implements it or calls it."""
    pattern = re.compile(rf"\bdef {hook}\(|\.{hook}\(")
    users = [p.relative_to(ROOT) for p, text in _test_sources().items() if pattern.search(text)]
    assert users, (f"no test implements or calls hook {hook!r}: add a test with a plugin "
                   f"that implements it (@hookimpl def {hook}(...)) or calls it")


# -- knobs and presets ------------------------------------------------------------------------
@pytest.mark.parametrize("policy", _policies())
def test_policy_config_knobs_documented_and_presets(policy):
    item = _registry().get("policy", policy)
    cls = item.config
    assert isinstance(cls, type) and issubclass(cls, ConfigBase), \
        f"policy {policy!r}: config {cls!r} is not a cachekit.config.ConfigBase"
    for row in cls.knob_docs():
        assert row["doc"].strip(), f"policy {policy!r}: knob {row['name']!r} has no doc"
    assert {"slow", "fast"} <= set(cls.presets), \
        f"policy {policy!r}: presets {sorted(cls.presets)} lack 'slow' and/or 'fast'"
    for name in cls.presets:
        cls.from_preset(name)  # every preset is a valid config


@pytest.mark.parametrize("cls", [EngineConfig, SamplerConfig], ids=lambda c: c.__name__)
def test_engine_and_sampler_knobs_documented(cls):
    text = (DOCS / "configuration.md").read_text()
    for row in cls.knob_docs():
        assert row["doc"].strip(), f"{cls.__name__}.{row['name']} has no doc"
        assert f"`{row['name']}`" in text, \
            f"docs/configuration.md does not list {cls.__name__}.{row['name']}"


# -- README and CI ----------------------------------------------------------------------------
def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def _setup_commands() -> tuple[str, str]:
    blocks = [b.strip() for b in _bash_blocks(README.read_text()) if "python3 -m venv" in b]
    main = [b for b in blocks if "cachekit generate" in b]
    test = [b for b in blocks if "pytest" in b]
    assert len(main) == 1 and len(test) == 1, blocks
    return main[0], test[0]


def test_readme_setup_commands_install_torch_first():
    for cmd in _setup_commands():
        assert "\n" not in cmd, f"set-up must be one command line: {cmd!r}"
        steps = [s.strip() for s in cmd.split("&&")]
        assert steps[0] == "python3 -m venv .venv"
        torch_i = steps.index("pip install torch==2.13.0")
        proj_i = next(i for i, s in enumerate(steps) if s.startswith("pip install -e"))
        assert torch_i < proj_i, "torch==2.13.0 must be installed before the project"
    main, test = _setup_commands()
    assert main.endswith("cachekit generate --policy motioncache --out out/demo")
    assert test.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    _, test = _setup_commands()
    for step in (s.strip() for s in test.split("&&")):
        assert step in ci, f".ci/run lacks the README step {step!r}"


def test_readme_lists_every_registered_policy():
    text = README.read_text()
    for name in _policies():
        assert f"`{name}`" in text, f"README does not list policy {name!r}"


def test_readme_python_example_uses_existing_names():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python example"
    tree = ast.parse(blocks[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name} does not exist"


@pytest.mark.slow
def test_readme_python_example_runs(capsys):
    """The README's Python example, verbatim, on the bundled model (skipped without it)."""
    from cachekit.errors import CacheKitError
    from cachekit.plugins import get_registry

    try:
        get_registry().create_adapter("refdit")
    except (CacheKitError, ImportError) as exc:
        pytest.skip(f"bundled model not available: {exc}")
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "cachekit summary: policy=fixed_interval" in out


# -- writing-a-policy.md == the example package -----------------------------------------------
def _labelled_blocks(text: str) -> dict[str, str]:
    return dict(re.findall(r"^`([^`\s]+\.(?:py|toml))`:\n\n```(?:python|toml)\n(.*?)^```",
                           text, re.S | re.M))


def test_writing_a_policy_shows_the_example_package_verbatim():
    blocks = _labelled_blocks((DOCS / "writing-a-policy.md").read_text())
    files = sorted(str(p.relative_to(EXAMPLE)) for p in EXAMPLE.rglob("*")
                   if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts
                   and not any(part.endswith(".egg-info") or part == "build" for part in p.parts))
    assert sorted(blocks) == files
    for rel, shown in blocks.items():
        assert shown == (EXAMPLE / rel).read_text(), \
            f"docs/writing-a-policy.md shows a different {rel} than {EXAMPLE / rel}"


def test_example_package_declares_the_cachekit_entry_point():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["cachekit"]
    assert eps == {"every_other": "cachekit_example_policy.plugin"}


# -- links and nox ----------------------------------------------------------------------------
def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        assert (path.parent / target).exists(), f"{path.name}: broken link {target!r}"


def test_every_nox_session_has_a_docstring():
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    sessions = [f for f in tree.body if isinstance(f, ast.FunctionDef)
                and any("session" in ast.unparse(d) for d in f.decorator_list)]
    names = {f.name for f in sessions}
    assert {"tests", "tests_slow", "lint", "typecheck", "bench", "docs_check"} <= names
    for f in sessions:
        assert ast.get_docstring(f), f"nox session {f.name} has no docstring"


def test_policy_reference_is_current():
    """docs/policies.md is generated from the code; regenerate it when a knob changes."""
    from cachekit.docgen import policy_reference

    path = ROOT / "docs" / "policies.md"
    assert path.read_text() == policy_reference(), (
        "docs/policies.md is out of date: run `python -m cachekit.docgen docs/policies.md`")
