"""The `cachekit` command line: plugin listing, error reporting, version, shared options."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cachekit import __version__, cli
from cachekit.errors import ConfigError, PluginError
from cachekit.plugins import AUTOLOAD_ENV, KINDS, Registry

EXAMPLE_SRC = (Path(__file__).resolve().parents[2] / "docs" / "examples" /
               "cachekit-example-policy" / "src")


@pytest.fixture(autouse=True)
def _autoload_on(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- cachekit plugins -------------------------------------------------------------------------
def test_plugins_table_lists_every_registered_item_with_provider(capsys):
    code, out, err = run_cli(capsys, "plugins")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "PROVIDER", "DISTRIBUTION", "DESCRIPTION"]
    registry = Registry()
    for item in registry.items():
        row = next((ln for ln in lines if ln.split()[:3] == [item.kind, item.name,
                                                             item.provider]), None)
        assert row is not None, f"{item.kind} {item.name} missing from:\n{out}"
        assert item.distribution in row
        assert item.description[:30] in row
    # The built-ins come from cachekit's own distribution through entry points.
    assert "builtin_policies" in out and f"cachekit {__version__}" in out
    # Second table: loaded plugins and the hooks they implement.
    assert any(ln.split()[:1] == ["PLUGIN"] for ln in lines)
    assert "register_policies" in out


def test_plugins_json_contents(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["cachekit"] == __version__ and doc["autoload"] is True
    expected = [r.as_dict() for r in Registry().items()]
    assert doc["items"] == expected
    by_name = {(d["kind"], d["name"]): d for d in doc["items"]}
    for name in ("none", "fixed_interval"):
        d = by_name[("policy", name)]
        assert d["provider"] == "builtin_policies"
        assert d["distribution"] == f"cachekit {__version__}"
        assert d["config"].startswith("cachekit_policies.")
    assert by_name[("residual_store", "memory")]["provider"] == "cachekit.core"
    assert {d["kind"] for d in doc["items"]} <= set(KINDS)
    plugins = {p["name"]: p for p in doc["plugins"]}
    assert "register_policies" in plugins["builtin_policies"]["hooks"]
    assert plugins["cachekit.core"]["distribution"] == f"cachekit {__version__}"


def test_plugins_kind_filter(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json", "--kind", "policy")
    assert code == 0
    items = json.loads(out)["items"]
    assert items and {d["kind"] for d in items} == {"policy"}


def test_plugins_with_autoload_disabled(capsys, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    assert "builtin_policies" not in out and "memory" in out
    assert AUTOLOAD_ENV in out
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert json.loads(out)["autoload"] is False


def test_explicit_plugin_module_is_listed_as_registered_explicitly(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    code, out, _ = run_cli(capsys, "-p", "cachekit_example_policy.plugin", "plugins", "--json")
    assert code == 0
    item = next(d for d in json.loads(out)["items"] if d["name"] == "every_other")
    assert item["kind"] == "policy" and item["distribution"] is None


# -- errors -----------------------------------------------------------------------------------
def test_cachekit_error_is_one_line_exit_2_without_traceback(capsys):
    code, out, err = run_cli(capsys, "-p", "no_such_module_xyz.plugin", "plugins")
    assert code == 2 and out == ""
    assert err.startswith("cachekit: error: -p/--plugin: could not import plugin module "
                          "'no_such_module_xyz.plugin'")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_errors_from_commands_are_reported_on_one_line(capsys, monkeypatch):
    def boom(args):
        raise ConfigError("Widget.size: expected an int >= 1,\n  got 0. Set --set size=1")

    monkeypatch.setattr(cli, "COMMANDS", [cli.Command("boom", "fail", lambda p: None, boom)])
    code, out, err = run_cli(capsys, "boom")
    assert code == 2
    assert err == ("cachekit: error: Widget.size: expected an int >= 1, got 0. "
                   "Set --set size=1\n")
    code, _, err = run_cli(capsys, "--traceback", "boom")
    assert code == 2 and "Traceback" in err and err.endswith("Set --set size=1\n")


def test_unexpected_exceptions_propagate(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "COMMANDS", [cli.Command("bug", "bug", lambda p: None, bug)])
    with pytest.raises(ZeroDivisionError):
        cli.main(["bug"])


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "cachekit: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2


# -- version ----------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cachekit {__version__}"


def test_console_script_entry_point():
    """`cachekit` as installed (the entry point declared in pyproject.toml)."""
    exe = Path(sys.executable).with_name("cachekit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                          "import sys; from cachekit.cli import main; "
                                          "sys.exit(main())"]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=False,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cachekit {__version__}"


# -- the registration table and shared options -------------------------------------------------
def test_every_command_has_help_and_a_unique_name(capsys):
    names = [c.name for c in cli.COMMANDS]
    assert len(names) == len(set(names)) and "plugins" in names
    assert all(c.help for c in cli.COMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: cachekit {name}" in capsys.readouterr().out


def _policy_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_policy_options(parser, default="fixed_interval")
    cli.add_engine_options(parser)
    return parser.parse_args(list(argv))


def test_policy_options_build_a_validated_config(tmp_path):
    registry = Registry()
    args = _policy_args("--preset", "fast", "--set", "warmup_steps=1")
    cfg = cli.policy_config_from_args(args, registry)
    assert cfg.interval == 3 and cfg.warmup_steps == 1

    path = registry.policy_config("fixed_interval", interval=4).save(tmp_path / "p.toml")
    args = _policy_args("--config", str(path), "--set", "compute_last=false")
    cfg = cli.policy_config_from_args(args, registry)
    assert cfg.interval == 4 and cfg.compute_last is False

    with pytest.raises(ConfigError, match="interval"):
        cli.policy_config_from_args(_policy_args("--set", "interval=0"), registry)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        cli.policy_config_from_args(_policy_args("--set", "interval"), registry)
    with pytest.raises(ConfigError, match="--preset and --config"):
        cli.policy_config_from_args(_policy_args("--preset", "fast", "--config",
                                                 str(path)), registry)
    with pytest.raises(PluginError, match="unknown policy 'nope'"):
        cli.policy_config_from_args(_policy_args("--policy", "nope"), registry)


def test_engine_options_and_build_engine():
    args = _policy_args("--set", "interval=2", "--engine-set", "store_dtype=bfloat16",
                        "--engine-set", "budget_bytes=4096")
    cfg = cli.engine_config_from_args(args)
    assert cfg.store_dtype == "bfloat16" and cfg.budget_bytes == 4096
    engine = cli.build_engine(args)
    assert engine.policy.name == "fixed_interval" and engine.policy.config.interval == 2
    assert engine.config == cfg
    with pytest.raises(ConfigError, match="store_dtype"):
        cli.engine_config_from_args(_policy_args("--engine-set", "store_dtype=int8"))


def test_format_table():
    text = cli.format_table([("a", None, "x y"), ("bbb", "c", "")], ("K", "NAME", "DESC"))
    assert text.splitlines() == ["K    NAME  DESC", "a    -     x y", "bbb  c"]
