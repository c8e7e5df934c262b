"""Policy-specific semantics of ``teacache``, ``flowcache`` and ``motioncache`` and the built-in
motion estimators (reference/algorithms.md §3.2, §4.1, §5, §6). The generic policy contract
(every registered policy) lives in ``cachekit.testing.contract``; this file does not repeat it.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from cachekit_policies._indicator import (
    KNOWN_COEFFICIENTS,
    Calibration,
    CoefficientWarning,
)
from cachekit_policies.estimators import (
    FlowProxyEstimator,
    FrameDiffEstimator,
    LatentDiffEstimator,
    memory_key,
)
from cachekit_policies.flowcache import FlowCacheConfig, FlowCachePolicy
from cachekit_policies.motioncache import MotionCacheConfig, MotionCachePolicy
from cachekit_policies.teacache import TeaCacheConfig, TeaCachePolicy

from cachekit.calibration import CoefficientWarning as CoreCoefficientWarning
from cachekit.engine import CacheEngine
from cachekit.errors import ConfigError, PluginError
from cachekit.protocols import Outcome
from cachekit.sampling import SamplerConfig, generate
from cachekit.testing import ToyModel
from cachekit.types import ChunkCall, Decision, DecisionKind, Probe

POLICIES = {"teacache": TeaCacheConfig, "flowcache": FlowCacheConfig,
            "motioncache": MotionCacheConfig}



CHUNKED = SamplerConfig(num_frames=8, num_steps=10, ar_step=1)
LONG = SamplerConfig(num_frames=14, num_steps=6, ar_step=1, overlap_history=2,
                     base_num_frames=8)


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model():
    m = ToyModel(seed=0)
    return m, m.encode_condition(torch.tensor([3])), m.null_condition(1)


def sample(model, cfg: SamplerConfig, engine=None, seed: int = 0):
    m, cond, uncond = model
    return generate(m, cond, uncond=uncond, config=cfg, engine=engine, seed=seed)


def mods(ratios, shape=(1, 2, 6, 4), seed=0) -> list[torch.Tensor]:
    """Modulations whose consecutive rel_l1 drifts are ``ratios`` (up to the 1e-8 guard)."""
    base = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    out, c = [base], 1.0
    for r in ratios:
        c *= 1.0 + r
        out.append(base * c)
    return out


class StubEstimator:
    """Motion weights from a script ``fn(call) -> Tensor[N]``; records its calls."""

    name = "stub"

    def __init__(self, fn, uses_output: bool = True):
        self.fn, self.uses_output, self.calls = fn, uses_output, []

    def weights(self, call, probe, h_out, memory):
        self.calls.append((call.chunk, call.step, h_out is None))
        return self.fn(call)


class StubRegistry:
    def __init__(self, estimator):
        self.estimator, self.requests = estimator, []

    def create_estimator(self, name, **options):
        self.requests.append((name, options))
        return self.estimator


def drive_chunk(policy, modulations, *, frames=2, hw=4, branch="cond", chunk=0,
                num_steps=None, h_out=None, memory=None, state=None, start=0):
    """Call decide/observe for steps start..len(modulations)-1 of one chunk, like the engine."""
    n = frames * hw
    num_steps = num_steps or len(modulations)
    memory = {} if memory is None else memory
    out = []
    for s in range(start, len(modulations)):
        call = ChunkCall(branch=branch, chunk=chunk, step=s, num_steps=num_steps, frames=frames,
                         tokens_per_frame=hw)
        if state is None:
            state = policy.new_state(call)
        probe = Probe(modulation=modulations[s], grid=(frames, hw, 1))
        d = policy.decide(call, probe, state, memory)
        h = torch.zeros(1, n, 3) if h_out is None else h_out[s]
        policy.observe(call, probe, state, Outcome(decision=d, h_in=torch.zeros(1, n, 3), h_out=h,
                                                   computed_tokens=d.num_computed(n),
                                                   num_tokens=n), memory)
        out.append(d)
    return out, state


def kinds(decisions):
    return [d.kind.value[0] for d in decisions]   # "c", "r", "p"


# ------------------------------------------------------------------- configs and presets
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_presets_load_validate_and_build(registry, name):
    cls = POLICIES[name]
    assert set(cls.presets) >= {"slow", "fast"}
    for preset in cls.presets:
        cfg = cls.from_preset(preset)
        assert cls.from_dict(cfg.to_dict()) == cfg
        pol = registry.create_policy(name, preset=preset)
        assert pol.config == cfg and pol.name == name
    assert cls.from_preset("fast").threshold > cls.from_preset("slow").threshold


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_knob_documents_default_and_trade(name):
    for row in POLICIES[name].knob_docs():
        assert row["doc"] and row["trade"], row["name"]
        assert "Default" in row["doc"] or "default" in row["doc"], row["name"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_config_roundtrip_files(tmp_path, name):
    cls = POLICIES[name]
    cfg = cls(threshold=0.25, coefficients=(1.0, 0.5))
    for suffix in (".toml", ".json"):
        assert cls.load(cfg.save(tmp_path / f"c{suffix}")) == cfg


def test_config_errors():
    with pytest.raises(ConfigError, match="threshold"):
        FlowCacheConfig(threshold=-1)
    with pytest.raises(ConfigError, match="either coefficients or coefficients_file"):
        MotionCacheConfig(coefficients=(1.0, 0.0), coefficients_file="x.json")
    with pytest.raises(ConfigError, match="coefficients"):
        TeaCacheConfig(coefficients=("a",))
    with pytest.raises(ConfigError, match="weight_norm_mode"):
        MotionCacheConfig(weight_norm_mode="median")
    with pytest.raises(ConfigError, match="reuse_space"):
        MotionCacheConfig(reuse_space="latent")
    with pytest.raises(ConfigError, match="estimator"):
        MotionCacheConfig(estimator="Frame Diff")
    assert FlowCacheConfig(coefficients="wan2.1-t2v-14b").coefficients == \
        KNOWN_COEFFICIENTS["wan2.1-t2v-14b"]


def test_unknown_estimator_names_the_registered_ones(registry):
    with pytest.raises(PluginError, match="frame_diff"):
        registry.create_policy("motioncache", estimator="optical_flow")


def test_estimator_gets_the_weight_knobs(registry):
    pol = registry.create_policy("motioncache", estimator="latent_diff", weight_norm_mode="max",
                                 weight_floor=0.3, weight_power=2.0, motion_memory_steps=3)
    est = pol.estimator
    assert isinstance(est, LatentDiffEstimator)
    assert (est.norm, est.floor, est.power, est.memory_steps) == ("max", 0.3, 2.0, 3)


# ------------------------------------------------------------------ coefficients & warning
def write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


GOOD = {"model": "toy", "indicator": "modulation", "coefficients": [2.0, 0.0],
        "x_range": [0.0, 1.0]}


def test_coefficients_file_loads(tmp_path):
    p = write(tmp_path / "cal.json", {**GOOD, "format": "cachekit.calibration/1", "r2": 0.9,
                                      "scope": "chunk"})
    pol = FlowCachePolicy(FlowCacheConfig(coefficients_file=p))
    assert pol.indicator.coefficients == (2.0, 0.0)
    assert pol.indicator.rescale(0.25) == 0.5
    cal = Calibration.load(p)
    assert cal.extra == {"r2": 0.9, "scope": "chunk"}
    assert Calibration.load(cal.save(tmp_path / "again.json")) == cal


@pytest.mark.parametrize("content, match", [
    (None, "existing calibration JSON"),
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({k: v for k, v in GOOD.items() if k != "x_range"}, "missing \\['x_range'\\]"),
    ({**GOOD, "indicator": "latent"}, "indicator"),
    ({**GOOD, "coefficients": []}, "coefficients"),
    ({**GOOD, "coefficients": [1.0, "x"]}, "coefficients"),
    ({**GOOD, "x_range": [1.0, 0.0]}, "x_range"),
    ({**GOOD, "format": "other/2"}, "format"),
])
def test_coefficients_file_errors(tmp_path, content, match):
    path = tmp_path / "cal.json"
    if content is not None:
        write(path, content)
    with pytest.raises(ConfigError, match=match) as info:
        TeaCachePolicy(TeaCacheConfig(coefficients_file=str(path)))
    assert "cal.json" in str(info.value)


def test_coefficient_warning_for_the_wan_polynomial():
    assert CoefficientWarning is CoreCoefficientWarning        # one class for the whole project
    with pytest.warns(CoefficientWarning) as rec:
        pol = MotionCachePolicy(MotionCacheConfig(coefficients="wan2.1-t2v-1.3b-ret-steps"))
    messages = [str(w.message) for w in rec]
    assert any("negative" in m for m in messages) and any("decreas" in m for m in messages)
    assert all(m.startswith("motioncache: indicator polynomial") for m in messages)
    # negative values are clamped: an accumulator never shrinks
    assert pol.indicator.rescale(0.001) == 0.0
    assert pol.indicator.rescale(torch.tensor([0.2]))[0] == 0.0
    assert pol.indicator.rescale(0.05) > 0.1
    # inside its valid band it does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlowCachePolicy(FlowCacheConfig(coefficients="wan2.1-t2v-1.3b-ret-steps",
                                        coefficients_x_range=(0.005, 0.075)))
        FlowCachePolicy(FlowCacheConfig(coefficients=(3.0, 1.0, 0.0)))


def test_coefficient_warning_for_a_file_fitted_at_another_scope(tmp_path):
    p = write(tmp_path / "cal.json", {**GOOD, "scope": "chunk"})
    with pytest.warns(CoefficientWarning, match="scope"):
        TeaCachePolicy(TeaCacheConfig(coefficients_file=p))


# ------------------------------------------------------------------ threshold 0 == none
@pytest.mark.parametrize("name, mode", [("flowcache", "chunked"), ("motioncache", "chunked"),
                                        ("teacache", "vanilla")])
def test_threshold_zero_is_bit_identical_to_none(model, name, mode):
    cfg = CHUNKED.evolve(mode=mode)
    ref = sample(model, cfg, CacheEngine.from_name("none"))
    out = sample(model, cfg, CacheEngine.from_name(name, threshold=0.0, warmup_steps=1))
    assert torch.equal(ref.video, out.video)
    assert out.stats.decisions["reuse"] == 0 and out.stats.decisions["partial"] == 0


@pytest.mark.parametrize("name, mode, knobs", [
    ("flowcache", "chunked", {"threshold": 2.5}),
    ("motioncache", "chunked", {"threshold": 2.5, "warmup_steps": 1, "phase1_steps": 1}),
    ("teacache", "vanilla", {"threshold": 2.5}),
])
def test_reuse_changes_output_a_little(model, name, mode, knobs):
    cfg = CHUNKED.evolve(mode=mode)
    ref = sample(model, cfg)
    out = sample(model, cfg, CacheEngine.from_name(name, **knobs))
    assert out.stats.computed_token_fraction < 0.9
    err = float((out.video - ref.video).abs().max())
    assert 0 < err < float(ref.video.abs().max())


# --------------------------------------------------------------------- warm-up and steps
def test_flowcache_warmup_and_last_step_compute(model):
    engine = CacheEngine.from_name("flowcache", threshold=1e9, warmup_steps=3)
    stats = sample(model, CHUNKED, engine).stats
    for r in stats.records:
        if r.step < 3:
            assert (r.kind, r.reason) == ("compute", "warmup")
        elif r.step == CHUNKED.num_steps - 1:
            assert (r.kind, r.reason) == ("compute", "last_step")
        else:
            assert r.kind == "reuse"


def test_motioncache_first_w_plus_one_steps_compute(model):
    engine = CacheEngine.from_name("motioncache", threshold=1e9, warmup_steps=2)
    stats = sample(model, CHUNKED, engine).stats
    for r in stats.records:
        assert (r.kind == "compute") == (r.step <= 2), r
        if r.step <= 2:
            assert r.reason == ("warmup" if r.step < 2 else "boundary")


def test_teacache_counts_window_iterations_without_wrap(model):
    """S-T1: warm-up is the first W iterations of *each* window for *each* branch, once."""
    engine = CacheEngine.from_name("teacache", threshold=1e9, warmup_steps=3)
    result = sample(model, LONG.evolve(mode="vanilla"), engine)
    recs = result.stats.records
    assert {r.window for r in recs} == {0, 1}
    for r in recs:
        assert (r.kind == "compute") == (r.iteration < 3), r
    for w in (0, 1):
        for b in ("cond", "uncond"):
            n = sum(1 for r in recs if r.window == w and r.branch == b and r.kind == "compute")
            assert n == 3
    last = CacheEngine.from_name("teacache", threshold=1e9, warmup_steps=1, compute_last=True)
    recs = sample(model, LONG.evolve(mode="vanilla"), last).stats.records
    n_it = {w: 1 + max(r.iteration for r in recs if r.window == w) for w in (0, 1)}
    for r in recs:
        assert (r.kind == "compute") == (r.iteration in (0, n_it[r.window] - 1)), r


def test_teacache_is_window_scope(model):
    with pytest.raises(Exception, match="vanilla"):
        sample(model, CHUNKED, CacheEngine.from_name("teacache"))


# -------------------------------------------------------------- nonfinite & engine override
@pytest.mark.parametrize("policy", [
    FlowCachePolicy(FlowCacheConfig(warmup_steps=1, threshold=10.0, compute_last=False)),
    TeaCachePolicy(TeaCacheConfig(warmup_steps=1, threshold=10.0)),
    MotionCachePolicy(MotionCacheConfig(warmup_steps=0, threshold=10.0)),
], ids=lambda p: p.name)
def test_nonfinite_distance_computes_and_resets(policy):
    seq = mods([0.5, 0.5, 0.5, 0.5])
    seq[3] = seq[3].clone()
    seq[3][0, 0, 0, 0] = float("nan")
    decisions, state = drive_chunk(policy, seq[:4])
    assert decisions[1].kind is DecisionKind.REUSE
    assert decisions[3] == Decision.compute("nonfinite_distance")
    acc = state.acc if isinstance(state.acc, float) else float(state.acc.abs().max())
    assert acc == 0.0


def test_engine_recompute_resets_accumulators():
    pol = MotionCachePolicy(MotionCacheConfig(warmup_steps=0, threshold=10.0))
    decisions, state = drive_chunk(pol, mods([0.5, 0.5]))
    assert decisions[-1].kind is DecisionKind.REUSE and float(state.acc.min()) > 0
    call = ChunkCall(branch="cond", chunk=0, step=3, num_steps=9, frames=2, tokens_per_frame=4)
    probe = Probe(modulation=mods([0.5, 0.5, 0.5])[3], grid=(2, 4, 1))
    d = pol.decide(call, probe, state, {})
    assert d.kind is DecisionKind.REUSE
    # the residual was evicted: the engine computed everything instead
    pol.observe(call, probe, state, Outcome(decision=Decision.compute("missing_residual"),
                                            h_in=torch.zeros(1, 8, 3), h_out=torch.zeros(1, 8, 3),
                                            computed_tokens=8, num_tokens=8), {})
    assert float(state.acc.abs().max()) == 0.0


# ------------------------------------------------------------------ accumulate and reset
def test_flowcache_accumulates_and_resets_by_hand():
    # (drifts are a hair below the nominal ratios because of rel_l1's 1e-8 guard: thresholds
    # in these hand tests sit just below the nominal sums)
    pol = FlowCachePolicy(FlowCacheConfig(warmup_steps=1, threshold=0.99, compute_last=False))
    decisions, _ = drive_chunk(pol, mods([0.25, 0.5, 0.5, 0.25, 0.5, 0.25]))
    # acc: -, .25, .75, 1.25->0, .25, .75, 1.0->0
    assert kinds(decisions) == list("crrcrrc")
    assert decisions[3].reason == "threshold" and decisions[1].reason == "below_threshold"


# -------------------------------------------------------------------- motioncache by hand
def motion(weights_fn=None, uses_output=True, **knobs):
    est = StubEstimator(weights_fn or (lambda call: torch.ones(call.num_tokens)), uses_output)
    reg = StubRegistry(est)
    knobs.setdefault("temporal_vote", False)
    return MotionCachePolicy(MotionCacheConfig(**knobs), reg), est, reg


def test_motioncache_phase1_is_chunk_level_then_weights_apply():
    w = torch.tensor([1.0, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5])
    pol, est, _ = motion(lambda call: w, warmup_steps=1, phase1_steps=2, threshold=0.99,
                         min_update_ratio=0.0)
    decisions, state = drive_chunk(pol, mods([0.5] * 8))
    # steps 0,1 forced; phase 1 (uniform, d=.5): s2 acc .5 reuse, s3 1.0 compute (p1=1),
    # s4 .5 reuse, s5 compute (p1=2 -> phase 2, weights from s5's output on)
    assert kinds(decisions[:6]) == list("ccrcrc")
    assert [c[1] for c in est.calls][0] == 5
    # phase 2: tokens 0 and 4 (w=1) reach 1.0 every 2 steps, the others every 4
    assert decisions[6].kind is DecisionKind.REUSE
    assert decisions[7].kind is DecisionKind.PARTIAL
    assert decisions[7].tokens.tolist() == [0, 4] and decisions[7].reason == "phase2"
    assert decisions[8].kind is DecisionKind.REUSE
    assert state.p1_done and state.p1_count == 2


def test_motioncache_phase1_zero_starts_weights_at_the_boundary():
    pol, est, _ = motion(warmup_steps=2, phase1_steps=0, threshold=0.99)
    drive_chunk(pol, mods([0.5] * 4))
    assert est.calls[0][1] == 2            # computed after the boundary step, used at step 3


def test_motioncache_min_update_ratio_skips_and_keeps_accumulators():
    w = torch.tensor([1.0] + [0.25] * 7)
    pol, _, _ = motion(lambda call: w, warmup_steps=0, phase1_steps=0, threshold=0.99,
                       min_update_ratio=0.4)
    decisions, state = drive_chunk(pol, mods([0.5, 0.5]))
    # s1: a = [.5, .125...]: nothing; s2: token 0 reaches 1.0 -> 1/8 < 0.4: skip, keep a
    assert decisions[2] == Decision.reuse("min_update_ratio")
    torch.testing.assert_close(state.acc, torch.tensor([1.0] + [0.25] * 7))
    # with rho = 0 the same step computes token 0 alone and resets it
    pol0, _, _ = motion(lambda call: w, warmup_steps=0, phase1_steps=0, threshold=0.99,
                        min_update_ratio=0.0)
    decisions0, state0 = drive_chunk(pol0, mods([0.5, 0.5]))
    assert decisions0[2].tokens.tolist() == [0]
    torch.testing.assert_close(state0.acc, torch.tensor([0.0] + [0.25] * 7))


def test_motioncache_temporal_vote_in_decisions():
    # frames=3, hw=2: position 0 needs in 2 of 3 frames (on), position 1 in 1 of 3 (off)
    w = torch.tensor([1.0, 0.1, 1.0, 1.0, 0.1, 0.1])
    pol, _, _ = motion(lambda call: w, warmup_steps=0, phase1_steps=0, threshold=0.45,
                       min_update_ratio=0.0, temporal_vote=True)
    decisions, state = drive_chunk(pol, mods([0.5], shape=(1, 3, 6, 4)), frames=3, hw=2)
    assert decisions[1].tokens.tolist() == [0, 2, 4]
    torch.testing.assert_close(state.acc, torch.tensor([0.0, 0.05, 0.0, 0.5, 0.0, 0.05]))


def test_motioncache_chunk_wise_phase():
    pol, est, _ = motion(warmup_steps=1, chunk_wise_only_steps=3, chunk_wise_threshold=0.9,
                         phase1_steps=0, threshold=10.0)
    decisions, state = drive_chunk(pol, mods([0.5] * 7))
    # s2 .5 reuse, s3 1.0 compute, s4 .5 reuse; token-wise from s5 (tau 10: reuse)
    assert kinds(decisions) == list("ccrcrrrr")
    assert [d.reason for d in decisions[2:5]] == ["chunk_wise"] * 3
    assert est.calls[0][1] == 4            # weights from the last chunk-wise step on
    assert float(state.acc.max()) == pytest.approx(1.5)   # 3 token-wise steps of 0.5


def test_motioncache_token_distance_mode_per_frame():
    pol, _, _ = motion(warmup_steps=0, phase1_steps=0, threshold=0.99, min_update_ratio=0.0,
                       distance_mode="token")
    seq = mods([0.0, 0.0])
    seq[1] = seq[0].clone()
    seq[1][:, 1] *= 2.0                        # frame 1 drifts by 1.0, frame 0 not at all
    seq[2] = seq[1].clone()
    decisions, _ = drive_chunk(pol, seq)
    assert decisions[1].tokens.tolist() == [4, 5, 6, 7]


def test_motioncache_compute_last_option():
    pol, _, _ = motion(warmup_steps=0, threshold=1e9, compute_last=True)
    decisions, _ = drive_chunk(pol, mods([0.5] * 4))
    assert kinds(decisions) == list("crrrc") and decisions[-1].reason == "last_step"


def test_motioncache_latent_estimators_run_before_the_step():
    pol, est, _ = motion(uses_output=False, warmup_steps=1, phase1_steps=0, threshold=0.99)
    drive_chunk(pol, mods([0.5] * 4))
    assert [(s, no_out) for _, s, no_out in est.calls] == [(2, True), (3, True), (4, True)]


def test_motioncache_subsets_on_the_toy_model(model):
    engine = CacheEngine.from_name("motioncache", threshold=2.0, warmup_steps=1, phase1_steps=1,
                                   min_update_ratio=0.1)
    result = sample(model, CHUNKED, engine)
    partial = [r for r in result.stats.records if r.kind == "partial"]
    assert partial, "expected token subsets on this trajectory"
    for r in partial:
        assert 0.1 * r.tokens <= r.computed < r.tokens
    assert torch.isfinite(result.video).all()


@pytest.mark.parametrize("estimator", ["latent_diff", "flow_proxy"])
def test_motioncache_latent_estimators_on_the_toy_model(model, estimator):
    engine = CacheEngine.from_name("motioncache", threshold=2.0, warmup_steps=1, phase1_steps=0,
                                   estimator=estimator)
    result = sample(model, CHUNKED, engine)
    assert result.stats.computed_token_fraction < 1.0
    assert torch.isfinite(result.video).all()


# -------------------------------------------------------- motion memory keyed (chunk, step)
def test_frame_diff_compares_with_previous_chunk_at_the_same_step():
    est = FrameDiffEstimator(norm="max", memory_steps=2)
    frames, hw, d = 2, 3, 4
    memory: dict = {}
    gen = torch.Generator().manual_seed(0)
    outs = {(g, s): torch.randn(1, frames * hw, d, generator=gen) for g in (0, 1) for s in range(4)}

    def call(g, s):
        return ChunkCall(branch="cond", chunk=g, step=s, num_steps=4, frames=frames,
                         tokens_per_frame=hw)

    probe = Probe(grid=(frames, hw, 1))
    # chunk 0 runs ahead (ar_step = 2): steps 0..3, then chunk 1 steps 0..1
    for s in range(4):
        est.weights(call(0, s), probe, outs[0, s], memory)
    assert set(memory) == {memory_key("frame_diff", 0, 2), memory_key("frame_diff", 0, 3)}
    # chunk 1 at step 2 must use chunk 0's last frame at step 2, not its latest (step 3)
    w = est.weights(call(1, 2), probe, outs[1, 2], memory)
    prev = outs[0, 2].reshape(1, frames, hw, d)[:, -1]
    from cachekit.motion import frame_diff_weights
    want = frame_diff_weights(outs[1, 2].reshape(1, frames, hw, d), prev, norm="max")
    torch.testing.assert_close(w, want)
    assert memory_key("frame_diff", 0, 2) not in memory          # consumed
    assert set(memory) == {memory_key("frame_diff", 0, 3), memory_key("frame_diff", 1, 2)}
    # chunk 1 at step 3 finds chunk 0's step-3 frame; a missing one falls back, no error
    est.weights(call(1, 3), probe, outs[1, 3], memory)
    assert set(memory) == {memory_key("frame_diff", 1, 2), memory_key("frame_diff", 1, 3)}


class SpyEngine(CacheEngine):
    """Records the window memory's size after every call."""

    sizes: list

    def __call__(self, call, h_in, run, probe):
        out = super().__call__(call, h_in, run, probe)
        self.sizes.append(len(self._memory))
        return out


@pytest.mark.parametrize("estimator", ["frame_diff", "latent_diff"])
def test_motion_memory_stays_bounded_on_a_long_run(model, registry, estimator):
    cfg = SamplerConfig(num_frames=8, num_steps=16, ar_step=2)
    engine = SpyEngine(registry.create_policy("motioncache", threshold=2.0, warmup_steps=1,
                                              phase1_steps=0, motion_memory_steps=3,
                                              estimator=estimator))
    engine.sizes = []
    sample(model, cfg, engine)
    # 2 branches x 4 chunks x at most motion_memory_steps (3) published frames
    assert 0 < max(engine.sizes) <= 2 * 4 * 3


# ------------------------------------------------------------------ no leaks across keys
class Recorder:
    """An engine stand-in that records every call of an uncached run."""

    def __init__(self):
        self.calls = []

    def begin_run(self, **info):
        pass

    def begin_window(self, window):
        pass

    def end_window(self):
        pass

    def end_run(self):
        return None

    def __call__(self, call, h_in, run, probe):
        h_out = run(h_in)
        self.calls.append((call, h_in.clone(), probe, h_out.clone()))
        return h_out


@pytest.fixture(scope="module")
def trajectory(model):
    rec = Recorder()
    sample(model, CHUNKED, rec)
    return rec.calls


def replay(policy, calls, *, window=0) -> dict:
    engine = CacheEngine(policy)
    engine.begin_run()
    engine.begin_window(window)
    for call, h_in, probe, h_out in calls:
        def run(h, idx=None, h_out=h_out):
            return h_out.clone() if idx is None else h_out[:, idx].clone()
        engine(call, h_in.clone(), run, probe)
    stats = engine.end_run()
    return {(r.branch, r.chunk, r.step): (r.kind, r.computed, r.reason) for r in stats.records}


@pytest.mark.parametrize("knobs", [
    {"threshold": 2.0, "warmup_steps": 1, "phase1_steps": 1},
    {"threshold": 1.5, "warmup_steps": 1, "phase1_steps": 0, "estimator": "latent_diff",
     "min_update_ratio": 0.2},
])
def test_motioncache_state_does_not_leak_across_branch_or_chunk(registry, trajectory, knobs):
    def pol():
        return registry.create_policy("motioncache", **knobs)

    everything = replay(pol(), trajectory)
    assert any(k == "partial" for k, _, _ in everything.values())
    # chunk 0 of cond alone
    alone = replay(pol(), [c for c in trajectory if c[0].key == ("cond", 0)])
    assert alone == {k: v for k, v in everything.items() if k[:2] == ("cond", 0)}
    # chunks 0 and 1 of cond (chunk 1 legitimately reads chunk 0's frames), no uncond, no 2, 3
    pair = replay(pol(), [c for c in trajectory if c[0].key in (("cond", 0), ("cond", 1))])
    assert pair == {k: v for k, v in everything.items() if k[:2] in (("cond", 0), ("cond", 1))}
    # uncond first inside every iteration: same decisions
    swapped = sorted(trajectory, key=lambda c: (c[0].iteration, c[0].branch != "uncond"))
    assert replay(pol(), swapped) == everything


@pytest.mark.parametrize("name", ["flowcache", "motioncache"])
def test_state_does_not_leak_across_windows(registry, trajectory, name):
    pol = registry.create_policy(name, threshold=2.0, warmup_steps=1)
    engine = CacheEngine(pol)
    engine.begin_run()
    per_window = []
    for w in range(2):
        engine.begin_window(w)
        for call, h_in, probe, h_out in trajectory:
            def run(h, idx=None, h_out=h_out):
                return h_out.clone() if idx is None else h_out[:, idx].clone()
            engine(call, h_in.clone(), run, probe)
        engine.end_window()
    stats = engine.end_run()
    for w in range(2):
        per_window.append([(r.branch, r.chunk, r.step, r.kind, r.computed)
                           for r in stats.records if r.window == w])
    assert per_window[0] == per_window[1]


# ------------------------------------------------- larger threshold never computes more
def drive_recorded(policy, calls) -> int:
    """decide/observe on recorded inputs (fixed trajectory); returns computed tokens."""
    states: dict = {}
    memory: dict = {}
    total = 0
    for call, h_in, probe, h_out in calls:
        state = states.setdefault(call.key, policy.new_state(call))
        mem = memory.setdefault(call.branch, {})
        d = policy.decide(call, probe, state, mem)
        n = call.num_tokens
        policy.observe(call, probe, state, Outcome(decision=d, h_in=h_in, h_out=h_out,
                                                   computed_tokens=d.num_computed(n),
                                                   num_tokens=n), mem)
        total += d.num_computed(n)
    return total


THRESHOLDS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 1e9]


@pytest.mark.parametrize("name, knobs", [
    ("flowcache", {"warmup_steps": 1}),
    ("motioncache", {"warmup_steps": 1, "phase1_steps": 0, "temporal_vote": False,
                     "min_update_ratio": 0.0}),
    ("motioncache", {"warmup_steps": 1, "phase1_steps": 0, "temporal_vote": False,
                     "min_update_ratio": 0.0, "estimator": "flow_proxy", "distance_mode": "token"}),
])
def test_larger_threshold_never_computes_more(registry, trajectory, name, knobs):
    counts = [drive_recorded(registry.create_policy(name, threshold=t, **knobs), trajectory)
              for t in THRESHOLDS]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1]


def test_teacache_larger_threshold_never_computes_more(model, registry):
    rec = Recorder()
    sample(model, CHUNKED.evolve(mode="vanilla"), rec)
    counts = [drive_recorded(registry.create_policy("teacache", threshold=t, warmup_steps=1),
                             rec.calls) for t in THRESHOLDS]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


# ---------------------------------------------------------------------------- estimators
def test_estimators_are_registered(registry):
    assert {"frame_diff", "latent_diff", "flow_proxy"} <= set(registry.names("motion_estimator"))
    est = registry.create_estimator("flow_proxy", blur=5, norm="max")
    assert isinstance(est, FlowProxyEstimator) and est.blur == 5
    with pytest.raises(ConfigError, match="blur"):
        registry.create_estimator("flow_proxy", blur=4)
    with pytest.raises(ConfigError, match="norm"):
        registry.create_estimator("frame_diff", norm="median")


def test_latent_estimator_needs_a_latent():
    call = ChunkCall(branch="cond", chunk=0, step=0, num_steps=2, frames=2, tokens_per_frame=4)
    with pytest.raises(ConfigError, match="probe.latent"):
        LatentDiffEstimator().weights(call, Probe(grid=(2, 2, 2)), None, {})


def test_estimator_nonfinite_signal_gives_uniform_weights():
    call = ChunkCall(branch="cond", chunk=0, step=0, num_steps=2, frames=2, tokens_per_frame=4)
    h = torch.ones(1, 8, 3)
    h[0, 5, 0] = float("inf")
    w = FrameDiffEstimator().weights(call, Probe(grid=(2, 2, 2)), h, {})
    assert torch.equal(w, torch.ones(8))


def test_modulation_is_required():
    call = ChunkCall(branch="cond", chunk=0, step=0, num_steps=2, frames=1, tokens_per_frame=4)
    with pytest.raises(Exception, match="probe.modulation"):
        FlowCachePolicy().decide(call, Probe(grid=(1, 2, 2)), FlowCachePolicy().new_state(call),
                                 {})


# ------------------------------------------------- a plugin's estimator, selected by name
class ConstantMotion:
    """A third-party estimator: every token of frame f gets weight ``(f + 1) / F``."""

    name = "constant_motion"
    uses_output = False

    def __init__(self, **options):
        self.options = options

    def weights(self, call, probe, h_out, memory):
        f = torch.arange(call.frames, dtype=torch.float32) + 1
        return (f / call.frames).repeat_interleave(call.tokens_per_frame)


class MotionPlugin:
    from cachekit.hookspecs import hookimpl

    @hookimpl
    def register_motion_estimators(self, register):
        register("constant_motion", ConstantMotion, description="weights rise with the frame")


def test_motioncache_uses_a_plugin_estimator(model, fresh_registry):
    fresh_registry.add_plugin(MotionPlugin(), name="motion-plugin")
    assert fresh_registry.get("motion_estimator", "constant_motion").provider == "motion-plugin"
    pol = fresh_registry.create_policy("motioncache", estimator="constant_motion",
                                       threshold=1.5, warmup_steps=1, phase1_steps=0,
                                       temporal_vote=False, min_update_ratio=0.0)
    assert isinstance(pol.estimator, ConstantMotion)
    assert pol.estimator.options["norm"] == "max_rescale"
    stats = sample(model, CHUNKED, CacheEngine(pol, registry=fresh_registry)).stats
    # the plugin's weights drive the subsets: on this trajectory every partial step recomputes
    # exactly one frame's 16 tokens (the faster-accumulating frame 1)
    partial = [r for r in stats.records if r.kind == "partial"]
    assert partial and all(r.computed == 16 for r in partial)
