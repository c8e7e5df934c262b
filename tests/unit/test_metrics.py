"""Fidelity metrics (PSNR, SSIM, LPIPS reporting) and the analytic FLOPs accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cachekit import metrics
from cachekit.engine import CacheEngine
from cachekit.errors import ConfigError
from cachekit.sampling import SamplerConfig, generate
from cachekit.stats import CallRecord
from cachekit.testing.toy import ToyModel, ToySession



def video(seed: int = 0, shape=(3, 16, 16, 3)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


# -- PSNR -------------------------------------------------------------------------------------
def test_psnr_of_identical_videos_is_inf():
    v = video()
    assert metrics.psnr(v, v.copy()) == math.inf
    assert metrics.compare_videos(v, v)["psnr"] == math.inf


def test_psnr_of_a_known_mse():
    a = np.zeros((2, 8, 8, 3))
    b = np.full((2, 8, 8, 3), 0.1)              # MSE 0.01 -> 20 dB
    assert metrics.mse(a, b) == pytest.approx(0.01)
    assert metrics.psnr(a, b) == pytest.approx(20.0)
    # one MSE over the whole video, not a mean of per-frame PSNRs
    c = a.copy()
    c[0] = 0.1                                  # frame 0 off by 0.1, frame 1 exact
    assert metrics.psnr(a, c) == pytest.approx(-10 * math.log10(0.005))


def test_psnr_data_range():
    a, b = np.zeros((1, 4, 4, 3)), np.full((1, 4, 4, 3), 25.5)
    assert metrics.psnr(a, b, data_range=255.0) == pytest.approx(20.0)


# -- SSIM -------------------------------------------------------------------------------------
def test_ssim_of_identical_videos_is_one():
    v = video(1)
    assert metrics.ssim(v, v) == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_with_noise():
    v = video(2, (2, 24, 24, 3)) * 0.5 + 0.25
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(v.shape)
    scores = [metrics.ssim(np.clip(v + s * noise, 0, 1), v) for s in (0.0, 0.02, 0.05, 0.2)]
    assert scores[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_ssim_matches_scikit_image_gaussian_mean_over_frames():
    skm = pytest.importorskip("skimage.metrics")
    a = video(4, (3, 20, 24, 3))
    b = np.clip(a + 0.1 * np.random.default_rng(5).standard_normal(a.shape), 0, 1)
    ref = np.mean([skm.structural_similarity(x, y, channel_axis=-1, data_range=1.0,
                                             gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False)
                   for x, y in zip(a, b)])
    assert metrics.ssim(a, b) == pytest.approx(ref, abs=1e-6)


def test_ssim_window_shrinks_for_small_frames():
    assert metrics.ssim_window(32, 32) == 11
    assert metrics.ssim_window(4, 4) == 3
    assert metrics.ssim_window(10, 40) == 9
    assert metrics.ssim_window(1, 5) == 1
    a = video(6, (2, 4, 4, 3))
    s = metrics.ssim(a, np.clip(a + 0.05, 0, 1))
    assert math.isfinite(s) and s < 1.0
    assert metrics.compare_videos(a, a)["ssim_window"] == 3


# -- errors and LPIPS -------------------------------------------------------------------------
def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"\(3, 16, 16, 3\) and \(2, 16, 16, 3\)"):
        metrics.psnr(video(0), video(0, (2, 16, 16, 3)))
    with pytest.raises(ConfigError, match="same shape"):
        metrics.ssim(video(0), video(0, (3, 16, 8, 3)))
    with pytest.raises(ConfigError, match=r"\[F, H, W, 3\]"):
        metrics.compare_videos(np.zeros((3, 4, 4)), np.zeros((3, 4, 4)))
    bad = video(0)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="finite"):
        metrics.psnr(bad, video(0))


def test_lpips_is_reported_as_unavailable_with_a_reason():
    res = metrics.compare_videos(video(0), video(1))
    assert res["lpips"] is None
    assert "weights" in res["lpips_reason"] and res["lpips_reason"] == metrics.LPIPS_UNAVAILABLE


# -- FLOPs ------------------------------------------------------------------------------------
def test_generic_block_flops_formula():
    toy = ToyModel(seed=0)
    d, blocks = toy.spec.hidden, toy.spec.num_blocks
    assert metrics.generic_block_flops(toy.spec, 10, 30) == blocks * (24 * 10 * d * d +
                                                                      4 * 10 * 30 * d)
    cost, source = metrics.block_cost(toy)
    assert source == "generic" and cost(10, 30) == metrics.generic_block_flops(toy.spec, 10, 30)

    class WithModel:
        spec = toy.spec

        class model:
            @staticmethod
            def block_flops(q, kv):
                return 7 * q + kv

    cost, source = metrics.block_cost(WithModel())
    assert source == "model" and cost(2, 3) == 17


@pytest.fixture
def counted_passes(monkeypatch):
    """Query tokens of every block-stack run of the toy model."""
    passes: list[int] = []
    orig = ToySession._blocks

    def counting(self, h, *args, **kwargs):
        passes.append(h.shape[1])
        return orig(self, h, *args, **kwargs)

    monkeypatch.setattr(ToySession, "_blocks", counting)
    return passes


SAMPLERS = {
    "one_window": SamplerConfig(num_frames=8, num_steps=6, ar_step=2),
    "two_windows": SamplerConfig(num_frames=12, num_steps=5, ar_step=1, base_num_frames=8,
                                 overlap_history=4),
    "synchronous": SamplerConfig(num_frames=8, num_steps=4, ar_step=0),
    "magi": SamplerConfig(num_frames=8, num_steps=6, schedule="magi", window_size=2),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_uncached_flop_accounting_counts_what_the_model_runs(name, counted_passes):
    toy = ToyModel(seed=0)
    cfg = SAMPLERS[name]
    cond, uncond, _ = toy.encode_prompt(None, seed=0, batch=1)
    tokens_only = lambda q, kv: float(q)  # noqa: E731
    for mode in ("chunked", "vanilla"):
        counted_passes.clear()
        generate(toy, cond, uncond=uncond, config=cfg.evolve(mode=mode), seed=0)
        count = metrics.generation_flops(toy.spec, cfg, tokens_only, mode=mode)
        assert count.tokens == sum(counted_passes), mode
        assert count.flops == count.tokens


def test_chunked_uncached_costs_less_than_vanilla_with_ar_step():
    toy = ToyModel(seed=0)
    cost, _ = metrics.block_cost(toy)
    for ar in (1, 2, 3):
        cfg = SamplerConfig(num_frames=8, num_steps=6, ar_step=ar)
        chunked = metrics.generation_flops(toy.spec, cfg, cost, mode="chunked")
        vanilla = metrics.generation_flops(toy.spec, cfg, cost, mode="vanilla")
        assert 0 < chunked.flops < vanilla.flops
        assert chunked.context_flops > 0 and vanilla.context_flops == 0


def test_cached_flops_follow_the_engine_records(registry, counted_passes):
    toy = ToyModel(seed=0)
    cfg = SamplerConfig(num_frames=8, num_steps=16, ar_step=2)
    cond, uncond, _ = toy.encode_prompt(None, seed=0, batch=1)
    cost, _ = metrics.block_cost(toy)
    # `none` through the engine: exactly the uncached chunked count (ratio 1.0)
    eng = CacheEngine(registry.create_policy("none"), registry=registry)
    res = generate(toy, cond, uncond=uncond, config=cfg, seed=0, engine=eng)
    base = metrics.generation_flops(toy.spec, cfg, cost, mode="chunked")
    none = metrics.generation_flops(toy.spec, cfg, cost, mode="chunked",
                                    records=res.stats.records)
    assert none.flops == base.flops
    # a token-wise policy: the records' computed tokens are what the model ran
    pol = registry.create_policy("motioncache", threshold=2.0, warmup_steps=1, phase1_steps=0)
    eng = CacheEngine(pol, registry=registry)
    counted_passes.clear()
    res = generate(toy, cond, uncond=uncond, config=cfg, seed=0, engine=eng)
    assert res.stats.decisions["partial"] > 0 and res.stats.decisions["reuse"] > 0
    count = metrics.generation_flops(toy.spec, cfg, lambda q, kv: float(q), mode="chunked",
                                     records=res.stats.records)
    assert count.tokens == sum(counted_passes)
    cached = metrics.generation_flops(toy.spec, cfg, cost, mode="chunked",
                                      records=res.stats.records)
    assert cached.flops < base.flops


def test_records_that_do_not_match_the_schedule_are_refused():
    toy = ToyModel(seed=0)
    cfg = SamplerConfig(num_frames=8, num_steps=4, ar_step=2)
    bogus = [CallRecord(0, 99, "cond", 0, 0, "compute", 32, 32)]
    with pytest.raises(ConfigError, match="records"):
        metrics.generation_flops(toy.spec, cfg, lambda q, kv: q, mode="chunked", records=bogus)
