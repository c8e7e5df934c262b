"""`cachekit bench`, `cachekit report` and `cachekit metrics` on the toy model (tiny settings)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cachekit import bench
from cachekit.cli import Command, build_parser
from cachekit.errors import ConfigError
from cachekit.plugins import Registry

README_TEMPLATE = """# project

Intro text that must survive.

## Results

Some words before the table.

<!-- bench:start -->
old table
<!-- bench:end -->

## After

Trailing text, untouched.
"""

# A tiny benchmark: 8 frames, 12 steps, one seed, one repeat. MotionCache with a threshold
# that reuses on the toy model (its modulation drifts by about 1 per step) and no phase 1, so
# partial (token-subset) decisions happen.
TINY = ["bench", "--model", "toy", "--quick", "--frames", "8", "--steps", "12",
        "--policies", "none,teacache,motioncache", "--presets", "fast",
        "--set", "motioncache.threshold=2.0", "--set", "motioncache.warmup_steps=1",
        "--set", "motioncache.phase1_steps=0", "--set", "teacache.threshold=1.0",
        "--no-progress"]
RUNS_PER_ROW = 3  # vanilla, chunked, policy per repeat (one repeat)
WARMUP_RUNS = 2   # one untimed chunked + vanilla per schedule and invocation



def parser():
    return build_parser([
        Command("bench", "benchmark", bench.add_bench_arguments, bench.run_bench),
        Command("report", "report", bench.add_report_arguments, bench.run_report),
        Command("metrics", "metrics", bench.add_metrics_arguments, bench.run_metrics),
    ])


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    args._registry = Registry(autoload=True)
    return args._run(args)


@pytest.fixture
def count_runs(monkeypatch):
    """Counts generations (model runs) the bench makes."""
    calls: list[str] = []
    orig = bench._generate

    def counting(adapter, cond, uncond, config, engine, seed):
        calls.append(config.mode if engine is None else "policy")
        return orig(adapter, cond, uncond, config, engine, seed)

    monkeypatch.setattr(bench, "_generate", counting)
    return calls


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    torch.set_num_threads(1)
    assert run(*TINY, "--out", str(out)) == 0
    return out


def rows_of(out: Path) -> dict[str, dict]:
    return {r["policy"]: r for r in json.loads((out / "results.json").read_text())["rows"]}


# -- bench ------------------------------------------------------------------------------------
def test_bench_writes_every_file(bench_dir):
    doc = json.loads((bench_dir / "results.json").read_text())
    rows = doc["rows"]
    assert {r["policy"] for r in rows} == {"none", "teacache", "motioncache"}
    for name in ("results.json", "results.csv", "rows.jsonl", "pareto.png"):
        assert (bench_dir / name).is_file() and (bench_dir / name).stat().st_size > 0, name
    for r in rows:
        assert (bench_dir / f"heatmap_{r['tag']}.png").is_file()
        assert (bench_dir / r["video"]).is_file() and (bench_dir / r["reference"]).is_file()
        assert (bench_dir / r["recompute"]).is_file()
        assert (bench_dir / r["overlay"]).is_file()
    with open(bench_dir / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    meta = doc["meta"]
    assert meta["command"].startswith("cachekit bench --model toy")
    assert "--quick" in meta["command"] and all(r["command"] == meta["command"] for r in rows)
    assert meta["flops_source"] == "generic"
    assert meta["samplers"]["skyreels"]["num_frames"] == 8
    assert meta["environment"]["torch"] == torch.__version__
    assert len(doc["summary"]) == 3


def test_bench_row_contents(bench_dir):
    rows = rows_of(bench_dir)
    for r in rows.values():
        assert r["lpips"] is None
        assert r["wall_s"] > 0 and r["chunked_s"] > 0 and r["vanilla_s"] > 0
        assert r["speedup_vs_chunked"] > 0 and r["speedup_vs_vanilla"] > 0
        assert r["flops_chunked"] < r["flops_vanilla"]   # ar_step 2: the lossless layer
        own = "chunked" if r["mode"] == "chunked" else "vanilla"
        assert r["efficiency"] == pytest.approx(r[f"speedup_vs_{own}"] /
                                                r[f"flop_speedup_vs_{own}"])
        assert 0 < r["ssim"] <= 1 + 1e-9
        assert r["ssim_window"] == 3                     # the toy's 4x4 frames
        assert r["schedule"] == "skyreels" and r["seed"] == 0 and r["repeats"] == 1
    none = rows["none"]
    assert none["flop_speedup_vs_chunked"] == 1.0 and none["computed_token_fraction"] == 1.0
    assert none["mode"] == "chunked" and none["peak_cache_bytes"] == 0
    assert none["flop_speedup_vs_vanilla"] == pytest.approx(
        none["flops_vanilla"] / none["flops_chunked"])
    tea = rows["teacache"]
    assert tea["mode"] == "vanilla"
    assert tea["flops"] <= tea["flops_vanilla"]
    mc = rows["motioncache"]
    assert mc["decisions"]["partial"] > 0
    assert mc["computed_token_fraction"] < 1 and mc["flop_speedup_vs_chunked"] > 1
    assert mc["peak_cache_bytes"] > 0 and math.isfinite(mc["psnr"])
    assert "LPIPS" in json.loads((bench_dir / "results.json").read_text())["meta"][
        "lpips_reason"]


def test_recompute_maps_are_frequencies(bench_dir):
    rows = rows_of(bench_dir)
    for r in rows.values():
        with np.load(bench_dir / r["recompute"]) as z:
            freq, calls = z["freq"], z["calls"]
        assert freq.shape == (4, 2, 4, 4)  # 4 chunks of 2 frames of 4x4 tokens
        assert freq.min() >= 0 and freq.max() <= 1
        assert (calls == 2 * 12).all() if r["mode"] == "chunked" else calls.min() > 0
    assert (np.load(bench_dir / rows["none"]["recompute"])["freq"] == 1).all()
    mc = np.load(bench_dir / rows["motioncache"]["recompute"])["freq"]
    assert 0 < mc.mean() < 1
    # the mean frequency is the computed-token fraction (every chunk has the same calls)
    assert mc.mean() == pytest.approx(rows["motioncache"]["computed_token_fraction"])


def test_resume_skips_finished_rows(bench_dir, tmp_path, count_runs):
    out = tmp_path / "resumed"
    shutil.copytree(bench_dir, out)
    assert run(*TINY, "--out", str(out)) == 0
    assert count_runs == []                                 # nothing recomputed
    before = (out / "rows.jsonl").read_text()
    # one more seed: only its three rows run
    assert run(*TINY, "--seeds", "0,1", "--out", str(out)) == 0
    assert len(count_runs) == WARMUP_RUNS + 3 * RUNS_PER_ROW
    assert count_runs.count("policy") == 3
    assert (out / "rows.jsonl").read_text().startswith(before)
    doc = json.loads((out / "results.json").read_text())
    assert sorted((r["policy"], r["seed"]) for r in doc["rows"]) == sorted(
        (p, s) for p in ("none", "teacache", "motioncache") for s in (0, 1))
    assert len(doc["meta"]["invocations"]) == 3


def test_resume_refuses_other_sampler_settings(bench_dir, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(bench_dir, out)
    with pytest.raises(ConfigError, match="num_steps"):
        run(*TINY, "--steps", "10", "--out", str(out))
    assert run(*TINY, "--steps", "10", "--fresh", "--policies", "none", "--out", str(out)) == 0
    assert {r["policy"] for r in json.loads((out / "results.json").read_text())["rows"]} == \
        {"none"}


def test_sweep_and_settings_expansion():
    reg = Registry(autoload=True)
    s = bench.expand_settings(reg, ["none", "flowcache", "teacache"], presets=["slow", "fast"])
    assert [(x.policy, x.label) for x in s] == [
        ("none", "slow/fast"), ("flowcache", "slow"), ("flowcache", "fast"),
        ("teacache", "slow"), ("teacache", "fast")]
    assert {x.mode for x in s if x.policy == "teacache"} == {"vanilla"}
    s = bench.expand_settings(reg, ["none", "motioncache"],
                              sweeps=bench.parse_sweeps(["threshold=0.1,0.3"]),
                              overrides=bench.parse_policy_overrides(["weight_floor=0.5"]))
    assert [(x.policy, x.label) for x in s] == [
        ("none", "default"), ("motioncache", "threshold=0.1"), ("motioncache", "threshold=0.3")]
    assert all(x.config.weight_floor == 0.5 for x in s if x.policy == "motioncache")
    with pytest.raises(ConfigError, match="--set"):
        bench.expand_settings(reg, ["none"], overrides={"*": {"no_such_knob": 1}})
    with pytest.raises(ConfigError, match="registered policy"):
        bench.expand_settings(reg, ["none"],
                              overrides=bench.parse_policy_overrides(["nosuch.threshold=1"]))
    with pytest.raises(ConfigError, match="--sweep"):
        bench.parse_sweeps(["threshold"])


def test_settings_use_the_models_calibration_like_generate(tmp_path):
    """A benchmarked default is what `cachekit generate` runs: the adapter's shipped
    calibration for the policy's scope, unless the user named coefficients."""
    from cachekit.calibration import save_calibration

    files = {}
    for scope in ("chunk", "window"):
        files[scope] = save_calibration(
            {"format": "cachekit.calibration/1", "model": "fake", "scope": scope,
             "indicator": "modulation", "coefficients": [2.0, 0.0], "x_range": [0.0, 1.0]},
            tmp_path / f"cal-{scope}.json")

    class Adapter:
        def calibration_file(self, scope):
            return files[scope]

    reg = Registry(autoload=True)
    s = bench.expand_settings(reg, ["none", "flowcache", "teacache", "motioncache"],
                              presets=["slow"], adapter=Adapter())
    got = {x.policy: x.config.to_dict().get("coefficients_file") for x in s}
    assert got == {"none": None, "flowcache": str(files["chunk"]),
                   "teacache": str(files["window"]), "motioncache": str(files["chunk"])}
    assert all("cal-" in x.tag for x in s if x.policy != "none")
    mine = bench.expand_settings(reg, ["flowcache"], presets=["slow"], adapter=Adapter(),
                                 overrides=bench.parse_policy_overrides(["coefficients=[1,0]"]))
    assert mine[0].config.coefficients_file is None and mine[0].config.coefficients == (1.0, 0.0)


def test_recording_policy_delegates_and_counts_token_subsets(registry):
    from cachekit.protocols import Outcome
    from cachekit.types import ChunkCall, Decision

    inner = registry.create_policy("motioncache")
    rec = bench.RecordingPolicy(inner)
    assert (rec.name, rec.scope, rec.needs_residual, rec.config) == \
        (inner.name, inner.scope, inner.needs_residual, inner.config)
    assert rec.contract is inner.contract           # anything else: delegated
    h = torch.zeros(1, 8, 2)
    call = ChunkCall(branch="cond", chunk=1, step=0, num_steps=4, frames=2, tokens_per_frame=4)

    def outcome(decision, computed):
        return Outcome(decision=decision, h_in=h, h_out=h, computed_tokens=computed,
                       num_tokens=8)

    class Silent:  # observe without side effects
        name, scope, needs_residual, config = "x", None, True, None

        def observe(self, *a):
            pass

    rec = bench.RecordingPolicy(Silent())
    rec.observe(call, None, None, outcome(Decision.compute(), 8), {})
    rec.observe(call, None, None, outcome(Decision.reuse(), 0), {})
    rec.observe(call, None, None, outcome(Decision.subset(torch.tensor([0, 5]), 8), 2), {})
    freq, calls = rec.frequency(chunk_frames=2)
    assert calls.tolist() == [0, 3]
    assert freq[1].tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1 / 3,
                                              1 / 3])
    # a whole-window call (vanilla execution) counts for every chunk of the window
    rec.reset()
    wcall = ChunkCall(branch="cond", chunk=0, step=0, num_steps=4, frames=4, tokens_per_frame=4)
    rec.observe(wcall, None, None, Outcome(decision=Decision.compute(), h_in=h, h_out=h,
                                           computed_tokens=16, num_tokens=16), {})
    freq, calls = rec.frequency(chunk_frames=2)
    assert calls.tolist() == [1, 1] and (freq == 1).all()


# -- report -----------------------------------------------------------------------------------
def test_report_rewrites_only_between_the_markers(bench_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEMPLATE)
    docs = tmp_path / "docs" / "benchmarks.md"
    assert run("report", str(bench_dir), "--readme", str(readme), "--docs", str(docs)) == 0
    text = readme.read_text()
    start, end = text.index(bench.README_START), text.index(bench.README_END)
    assert text[:start] == README_TEMPLATE[:README_TEMPLATE.index(bench.README_START)]
    assert text[end:] == README_TEMPLATE[README_TEMPLATE.index(bench.README_END):]
    section = text[start:end]
    assert "old table" not in section
    assert "| `motioncache` |" in section and "uncached" in section
    assert "cachekit bench --model toy" in section and "toy" in section
    assert "docs/benchmarks.md" in section
    # the page: every figure linked, every link resolves, the command is there
    page = docs.read_text()
    assert "cachekit bench --model toy" in page and "LPIPS" in page
    links = [ln.split("](")[1].rstrip(")") for ln in page.splitlines() if ln.startswith("![")]
    assert "benchmarks/pareto.png" in links and len(links) == 4  # pareto + 3 heatmaps
    for link in links:
        assert (docs.parent / link).is_file(), link
    # idempotent
    assert run("report", str(bench_dir), "--readme", str(readme), "--docs", str(docs)) == 0
    assert readme.read_text() == text
    # a figure an earlier report wrote but this run does not make is removed
    stale = docs.parent / "benchmarks" / "heatmap_gone_policy.png"
    stale.write_bytes(b"old")
    keep = docs.parent / "benchmarks" / "diagram.png"
    keep.write_bytes(b"hand-made")
    assert run("report", str(bench_dir), "--readme", str(readme), "--docs", str(docs)) == 0
    assert not stale.exists() and keep.exists()
    # the hand-written reading survives a regeneration; the generated rest is rewritten
    assert bench.READING_START in page and "No reading written yet" in page
    mine = "MotionCache wins here because the background is static."
    edited = page.replace(page[page.index(bench.READING_START) + len(bench.READING_START):
                               page.index(bench.READING_END)], "\n" + mine + "\n")
    docs.write_text(edited.replace("## How it is measured", "## stale heading"))
    assert run("report", str(bench_dir), "--readme", str(readme), "--docs", str(docs)) == 0
    again = docs.read_text()
    assert mine in again and "No reading written yet" not in again
    assert "## How it is measured" in again and "stale heading" not in again


def test_report_without_markers_is_an_error(bench_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ConfigError, match="bench:start"):
        run("report", str(bench_dir), "--readme", str(readme), "--no-docs")
    assert readme.read_text() == "# no markers\n"


def test_bench_report_only(bench_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEMPLATE)
    assert run("bench", "--report-only", "--out", str(bench_dir), "--readme", str(readme),
               "--no-docs") == 0
    assert "| `none` |" in readme.read_text()


def test_replace_between_markers():
    text = "a\n<!-- bench:start -->\nx\n<!-- bench:end -->\nb\n"
    assert bench.replace_between_markers(text, "NEW") == \
        "a\n<!-- bench:start -->\nNEW\n<!-- bench:end -->\nb\n"
    with pytest.raises(ConfigError):
        bench.replace_between_markers(text + "<!-- bench:start -->", "NEW")


# -- metrics ----------------------------------------------------------------------------------
def test_metrics_command(tmp_path, capsys):
    a = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", np.clip(a + 0.01, 0, 1))
    assert run("metrics", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "SSIM" in out and "LPIPS  unavailable" in out
    assert run("metrics", str(tmp_path / "a.npy"), str(tmp_path / "a.npy"), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["psnr"] == "inf" and doc["ssim"] == pytest.approx(1.0) and doc["lpips"] is None
    np.save(tmp_path / "c.npy", a[:2])
    with pytest.raises(ConfigError, match="same shape"):
        run("metrics", str(tmp_path / "a.npy"), str(tmp_path / "c.npy"))
