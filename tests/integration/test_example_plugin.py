"""The example third-party policy plugin installs, registers and runs like a real one.

``docs/examples/cachekit-example-policy`` is written only from ``docs/writing-a-policy.md``
(``tests/unit/test_docs.py`` checks the two stay identical). This test installs it into a fresh
virtual environment that sees the current one (torch and cachekit are not installed again),
then checks, in that environment, that the registry lists ``every_other`` with the example's
distribution as provider, runs it through a :class:`~cachekit.engine.CacheEngine` on the toy
model, and runs the example's own tests.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "cachekit-example-policy"

SNIPPET = textwrap.dedent("""
    import json
    import torch
    from cachekit.engine import CacheEngine
    from cachekit.plugins import Registry
    from cachekit.sampling import SamplerConfig, generate
    from cachekit.testing import ToyModel

    registry = Registry()
    item = registry.get("policy", "every_other")
    engine = CacheEngine.from_name("every_other", warmup_steps=1, registry=registry)
    model = ToyModel(seed=0)
    result = generate(model, model.encode_condition(torch.tensor([1])), engine=engine,
                      config=SamplerConfig(num_frames=4, num_steps=5, guidance_scale=1.0))
    print(json.dumps({
        "item": item.as_dict(),
        "policies": registry.names("policy"),
        "kinds": [r.kind for r in result.stats.records],
        "steps": [r.step for r in result.stats.records],
        "chunks": [r.chunk for r in result.stats.records],
        "summary": result.stats.to_dict(records=False),
    }))
""")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (f"{cmd} failed with {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def example_env(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(python of a venv with the example installed, copy of the example, environment)."""
    tmp = tmp_path_factory.mktemp("example_plugin")
    src = tmp / "cachekit-example-policy"
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in docs/.
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CACHEKIT_DISABLE_PLUGIN_AUTOLOAD", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # When the tests run inside a venv, --system-site-packages exposes the *base* interpreter's
    # site-packages, not this venv's. Add this environment's site directories (processing their
    # .pth files, which is how editable installs put cachekit on the path).
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp, env).strip()
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_outer_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in outer) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", str(src)], tmp, env)
    return py, src, env


def test_example_plugin_is_listed_and_runs(example_env):
    py, _src, env = example_env
    out = json.loads(_run([str(py), "-c", SNIPPET], py.parent.parent.parent, env))
    item = out["item"]
    assert item["name"] == "every_other" and item["kind"] == "policy"
    assert item["provider"] == "every_other"  # the entry-point name
    assert item["distribution"].replace("_", "-").startswith("cachekit-example-policy 0.1.0")
    assert item["config"] == "cachekit_example_policy.policy.EveryOtherConfig"
    assert {"none", "fixed_interval", "every_other"} <= set(out["policies"])

    kinds = out["kinds"]
    summary = out["summary"]
    assert summary["policy"] == "every_other" and summary["calls"] == len(kinds) > 0
    assert summary["decisions"]["reuse"] > 0 and summary["recomputes"] == {}
    # warmup_steps=1: step 0 computes; afterwards never two reuses in a row per chunk.
    last: dict[int, str] = {}
    for kind, step, chunk in zip(kinds, out["steps"], out["chunks"], strict=True):
        if step == 0:
            assert kind == "compute"
        assert not (kind == "reuse" and last.get(chunk) == "reuse")
        last[chunk] = kind


def test_example_plugin_own_tests_pass(example_env):
    py, src, env = example_env
    _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(src / "tests")],
         src, env)


def test_example_not_visible_here():
    """Installing into the throw-away venv must not leak into this environment."""
    from cachekit.plugins import Registry

    assert "every_other" not in Registry().names("policy")
