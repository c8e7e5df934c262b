"""The samplers end to end on the toy model: lossless structure, engine transparency, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cachekit.calibration import CoefficientWarning, calibrate, check_polynomial, fit_polynomial
from cachekit.engine import CacheEngine
from cachekit.errors import ConfigError
from cachekit.generation import run_generation
from cachekit.sampling import SamplerConfig, generate
from cachekit.schedule import diffusion_forcing_schedule, plan_windows
from cachekit.testing import ToyModel

CASES = [
    SamplerConfig(num_frames=8, num_steps=5, ar_step=0),
    SamplerConfig(num_frames=8, num_steps=5, ar_step=2),
    SamplerConfig(num_frames=14, num_steps=4, ar_step=1, overlap_history=2, base_num_frames=8,
                  addnoise_condition=20),
    SamplerConfig(num_frames=8, num_steps=4, schedule="magi", window_size=2),
    SamplerConfig(num_frames=8, num_steps=4, ar_step=1, guidance_scale=1.0),
]


@pytest.fixture(scope="module")
def toy():
    model = ToyModel(max_frames=8)
    cond, uncond, _ = model.encode_prompt("3", seed=0, batch=2)
    return model, cond, uncond


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.tag())
def test_chunked_equals_vanilla(toy, cfg):
    model, cond, uncond = toy
    a = generate(model, cond, uncond=uncond, config=cfg, seed=3)
    b = generate(model, cond, uncond=uncond, config=cfg.evolve(mode="vanilla"), seed=3)
    assert torch.isfinite(a.video).all()
    assert (a.video - b.video).abs().max() <= 1e-5
    # the video is not trivially constant: different seeds differ
    c = generate(model, cond, uncond=uncond, config=cfg, seed=4)
    assert (a.video - c.video).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.tag())
@pytest.mark.parametrize("mode", ["chunked", "vanilla"])
def test_none_engine_is_bit_identical_and_counts_calls(toy, cfg, mode):
    model, cond, uncond = toy
    cfg = cfg.evolve(mode=mode)
    plain = generate(model, cond, uncond=uncond, config=cfg, seed=1)
    engine = CacheEngine.from_name("none")
    out = generate(model, cond, uncond=uncond, config=cfg, seed=1, engine=engine)
    assert torch.equal(plain.video, out.video)
    stats = out.stats
    branches = 1 if cfg.guidance_scale == 1.0 else 2
    if mode == "vanilla":
        assert stats.calls == out.iterations * branches
    else:
        # one engine call per ACTIVE chunk-step per branch
        cbs = cfg.causal_block_size or model.spec.chunk_frames
        base = cfg.base_num_frames or model.spec.max_frames
        expected = 0
        if cfg.schedule == "magi":
            expected = (cfg.num_frames // cbs) * cfg.num_steps
        else:
            for p in plan_windows(cfg.num_frames, min(base, cfg.num_frames), cfg.overlap_history,
                                  causal_block_size=cbs):
                s = diffusion_forcing_schedule(p.num_frames, cfg.num_steps, p.num_frames,
                                               cfg.ar_step, cbs, p.prefix_frames)
                expected += sum(s.updates_per_chunk())
        assert stats.calls == expected * branches
    assert stats.computed_token_fraction == 1.0


def test_engine_state_resets_between_windows(toy):
    model, cond, uncond = toy
    cfg = CASES[2]
    engine = CacheEngine.from_name("fixed_interval", interval=2, warmup_steps=1)
    out = generate(model, cond, uncond=uncond, config=cfg, seed=0, engine=engine)
    windows = sorted({r.window for r in out.stats.records})
    assert windows == [0, 1]
    for w in windows:
        first = [r for r in out.stats.records if r.window == w and r.step == 0]
        assert first and all(r.kind == "compute" for r in first)


def test_magi_refuses_videos_longer_than_the_model(toy):
    model, cond, uncond = toy
    with pytest.raises(ConfigError, match="num_frames"):
        generate(model, cond, config=SamplerConfig(num_frames=16, schedule="magi"))


def test_run_generation_writes_outputs(tmp_path):
    out = run_generation(adapter=ToyModel(), model="toy", policy="fixed_interval",
                         sampler=SamplerConfig(num_frames=8, num_steps=8, ar_step=1),
                         out=tmp_path, seed=2)
    for key in ("video", "npy", "contact_sheet", "summary"):
        assert (tmp_path / out.files[key].split("/")[-1]).is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("model", "policy", "settings", "seed", "wall_s", "computed_token_fraction"):
        assert key in summary
    assert 0 < summary["computed_token_fraction"] < 1
    frames = np.load(tmp_path / "video.npy")
    assert frames.shape == (8, 4, 4, 3) and frames.dtype == np.float32
    assert frames.min() >= 0 and frames.max() <= 1


def test_calibration_fit_and_warnings(toy):
    x = np.linspace(0, 1, 50)
    fit = fit_polynomial(x, 2 * x + 1, degree=2)
    assert fit["r2"] > 0.999
    assert np.allclose(fit["coefficients"], [0, 2, 1], atol=1e-6)
    with pytest.warns(CoefficientWarning, match="negative"):
        check_polynomial([1.0, -0.5], [0.0, 1.0])
    with pytest.warns(CoefficientWarning, match="decreases"):
        check_polynomial([-1.0, 2.0], [0.0, 1.0])
    with pytest.raises(ConfigError, match="distinct"):
        fit_polynomial([0.1, 0.1, 0.1], [1, 2, 3], degree=2)
    model, _, _ = toy
    with pytest.warns(CoefficientWarning):  # a random toy model gives a poor, wiggly fit
        data = calibrate(model, seeds=[0], sampler=SamplerConfig(num_frames=8, num_steps=8,
                                                                  ar_step=1), model="toy")
    assert data["num_pairs"] == sum(data["pairs_per_branch"].values()) > 0
    assert data["scope"] == "chunk" and len(data["coefficients"]) == 5


def test_model_calibration_is_the_default_only_when_no_coefficients_are_set(tmp_path):
    from cachekit.calibration import save_calibration

    path = save_calibration({"format": "cachekit.calibration/1", "model": "toy",
                             "scope": "chunk", "indicator": "modulation", "degree": 1,
                             "coefficients": [0.5, 0.0], "x_range": [0.0, 2.0]},
                            tmp_path / "cal.json")

    class CalibratedToy(ToyModel):
        def calibration_file(self, scope):
            return path if scope == "chunk" else None

    sampler = SamplerConfig(num_frames=8, num_steps=6, ar_step=1)
    out = run_generation(adapter=CalibratedToy(), model="toy", policy="flowcache",
                         sampler=sampler)
    assert out.summary["settings"]["coefficients_file"] == str(path)
    # an explicit choice wins, identity included
    out = run_generation(adapter=CalibratedToy(), model="toy", policy="flowcache",
                         knobs={"coefficients": [1.0, 0.0]}, sampler=sampler)
    assert out.summary["settings"]["coefficients_file"] is None
    # a window-scope policy gets nothing from a chunk-scope calibration
    out = run_generation(adapter=CalibratedToy(), model="toy", policy="teacache",
                         sampler=sampler)
    assert out.summary["settings"]["coefficients_file"] is None


def test_ndcg_and_motion_ranking_on_the_toy_model():
    from cachekit.analysis import motion_ranking, ndcg, spearman
    from cachekit.plugins import get_registry

    gains = torch.tensor([3.0, 0.0, 1.0, 2.0])
    assert ndcg(gains, gains) == pytest.approx(1.0)
    assert ndcg(-gains, gains) < ndcg(torch.tensor([2.0, 0.0, 0.5, 1.0]), gains)
    assert ndcg(torch.zeros(3), torch.zeros(3)) == 1.0
    assert spearman(gains, gains) == pytest.approx(1.0)
    assert spearman(-gains, gains) == pytest.approx(-1.0)
    assert spearman(torch.zeros(4), gains) == 0.0
    res = motion_ranking(ToyModel(max_frames=8), seeds=[0], registry=get_registry(),
                         sampler=SamplerConfig(num_frames=8, num_steps=4, ar_step=1))
    assert {"frame_diff", "latent_diff", "flow_proxy", "random"} <= set(res)
    for r in res.values():
        assert 0.0 <= r["min"] <= r["mean"] <= 1.0 and r["n"] > 0
        assert -1.0 <= r["spearman"] <= 1.0
