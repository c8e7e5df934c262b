"""Reference DiT: execution modes (chunked == vanilla), hook and block-runner contract, loading.

All model tests use a tiny random-init config (the output head is re-initialised away from
Wan's zero init, otherwise every velocity would be 0 and equality tests would be vacuous).
"""

from __future__ import annotations

import json

import pytest
import torch

from cachekit.errors import ConfigError, WeightsError
from cachekit.types import ChunkState, IterationInfo, Scope
from cachekit_models.refdit.adapter import RefDiTAdapter
from cachekit_models.refdit.config import RefDiTConfig
from cachekit_models.refdit.loading import DEFAULT_WEIGHTS, load_refdit, sha256_file
from cachekit_models.refdit.model import RefDiT
from cachekit_models.synthetic import Condition

TINY = RefDiTConfig(height=16, width=16, patch=4, chunk_frames=2, max_frames=8, hidden=32,
                    heads=2, num_blocks=2, freq_dim=32)
BATCH = 2


def tiny_model(seed: int = 0) -> RefDiT:
    torch.manual_seed(seed)
    model = RefDiT(TINY)
    torch.nn.init.normal_(model.head.weight, std=0.2)
    return model.eval()


def df_rows(num_chunks: int, num_steps: int, ar_step: int, prefix: int = 0):
    """The SkyReels-V2 diffusion-forcing step matrix (reference/algorithms.md section 1.2).

    Yields ``(states, steps, level)`` per iteration: ``level[g]`` is the schedule index
    ``r`` in ``0..T+1`` (0 = noise, T+1 = done) chunk ``g`` is at after this iteration.
    """
    t = num_steps
    prev = [t + 1 if g < prefix else 0 for g in range(num_chunks)]
    while any(p < t for p in prev):
        new = list(prev)
        new[0] = prev[0] + 1
        for g in range(1, num_chunks):
            new[g] = prev[g] + 1 if prev[g - 1] >= t else new[g - 1] - ar_step
        new = [min(max(r, 0), t + 1) for r in new]
        states, steps = [], []
        for g in range(num_chunks):
            if g < prefix:
                states.append(ChunkState.PREFIX)
                steps.append(t)
            elif new[g] != prev[g] and new[g] != t + 1:
                states.append(ChunkState.ACTIVE)
                steps.append(new[g] - 1)
            elif new[g] == t + 1:
                states.append(ChunkState.FINISHED)
                steps.append(t)
            else:
                states.append(ChunkState.PENDING)
                steps.append(0)
        yield tuple(states), tuple(steps)
        prev = new


def run_schedule(model, modes=("vanilla", "chunked"), num_steps=4, ar_step=2, prefix=0,
                 hooks=None, seed=0, on_iteration=None):
    """Drive both modes through one window of a DF schedule with two interleaved branches.

    Both modes see the same latents (updated with the vanilla CFG velocity), so their outputs
    are directly comparable. Returns the max abs difference on ACTIVE frames.
    """
    cfg = model.cfg
    adapter = RefDiTAdapter(model)
    hooks = hooks or {}
    sessions = {m: adapter.session(batch=BATCH, mode=m, hook=hooks.get(m)) for m in modes}
    n_chunks = cfg.max_frames // cfg.chunk_frames
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, cfg.channels, cfg.max_frames, cfg.height, cfg.width, generator=gen)
    conds = adapter.encode_condition([Condition(), Condition.parse("shape=square,color=blue")])
    branches = {"cond": conds, "uncond": adapter.null_condition(BATCH)}
    for s in sessions.values():
        s.begin_window(1 if prefix else 0, cfg.max_frames)
    rows = list(df_rows(n_chunks, num_steps, ar_step, prefix))
    level = torch.zeros(n_chunks)  # steps done per chunk (for sigma)
    for g in range(prefix):
        level[g] = num_steps
    worst = 0.0
    for it, (states, steps) in enumerate(rows):
        sig_c = torch.tensor([1.0 - steps[g] / num_steps if states[g] is not ChunkState.PENDING
                              else 1.0 for g in range(n_chunks)])
        sigma = sig_c.repeat_interleave(cfg.chunk_frames)[None].expand(BATCH, -1).contiguous()
        active = torch.tensor([s is ChunkState.ACTIVE for s in states]).repeat_interleave(
            cfg.chunk_frames)
        outs = {}
        for branch, ctx in branches.items():
            info = IterationInfo(window=1 if prefix else 0, iteration=it,
                                 num_iterations=len(rows), branch=branch, num_steps=num_steps,
                                 chunk_frames=cfg.chunk_frames, states=states, steps=steps)
            for mode, sess in sessions.items():
                outs[mode, branch] = sess.velocity(x, sigma, ctx, info)
            if on_iteration is not None:
                on_iteration(it, branch, states)
        if len(modes) == 2:
            for branch in branches:
                diff = (outs["vanilla", branch] - outs["chunked", branch])[:, :, active]
                worst = max(worst, float(diff.abs().max()))
        ref = modes[0]
        v = outs[ref, "uncond"] + 3.0 * (outs[ref, "cond"] - outs[ref, "uncond"])
        dt = 1.0 / num_steps
        x = torch.where(active[None, None, :, None, None], x - dt * v, x)
    return worst


# --- (a) chunked == vanilla -------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [0, 1])
def test_chunked_equals_vanilla_over_df_window(prefix):
    model = tiny_model()
    worst = run_schedule(model, num_steps=4, ar_step=2, prefix=prefix)
    assert worst <= 1e-4, worst


def test_df_schedule_has_mixed_states():
    rows = list(df_rows(4, 4, 2))
    seen = {s for states, _ in rows for s in states}
    assert seen == {ChunkState.ACTIVE, ChunkState.PENDING, ChunkState.FINISHED}
    assert len(rows) == 4 + 3 * 2


# --- (b) pass-through hook ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["chunked", "vanilla"])
def test_pass_through_hook_is_bit_identical(mode):
    model = tiny_model(1)
    results = []
    for hook in (None, lambda call, h, run, probe: run(h)):
        outs = []
        adapter = RefDiTAdapter(model)
        sess = adapter.session(batch=BATCH, mode=mode, hook=hook)
        cfg = model.cfg
        sess.begin_window(0, cfg.max_frames)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(BATCH, 3, cfg.max_frames, cfg.height, cfg.width, generator=gen)
        for it, (states, steps) in enumerate(df_rows(4, 3, 1)):
            sigma = torch.rand(BATCH, cfg.max_frames, generator=gen)
            info = IterationInfo(window=0, iteration=it, num_iterations=6, branch="cond",
                                 num_steps=3, chunk_frames=2, states=states, steps=steps)
            outs.append(sess.velocity(x, sigma, adapter.null_condition(BATCH), info))
        results.append(torch.stack(outs))
    assert torch.equal(results[0], results[1])


# --- (c) selective block runner -----------------------------------------------------------------

def _capture_runner(model, states, steps, target_chunk):
    """Run one chunked call whose hook hands back (run, h_in, session) for ``target_chunk``."""
    adapter = RefDiTAdapter(model)
    captured = {}

    def hook(call, h, run, probe):
        out = run(h)
        if call.chunk == target_chunk:
            captured.update(run=run, h=h.clone(), out=out.clone())
        return out

    cfg = model.cfg
    sess = adapter.session(batch=BATCH, mode="chunked", hook=hook)
    sess.begin_window(0, cfg.max_frames)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, 3, cfg.max_frames, cfg.height, cfg.width, generator=gen)
    sigma = torch.rand(BATCH, cfg.max_frames, generator=gen)
    info = IterationInfo(window=0, iteration=0, num_iterations=1, branch="cond", num_steps=4,
                         chunk_frames=cfg.chunk_frames, states=states, steps=steps)
    sess.velocity(x, sigma, adapter.encode_condition([Condition()] * BATCH), info)
    return captured, sess


def test_selective_all_tokens_equals_full():
    model = tiny_model(2)
    A, F = ChunkState.ACTIVE, ChunkState.FINISHED
    cap, _ = _capture_runner(model, (F, A, A, ChunkState.PENDING), (4, 2, 0, 0), 1)
    n = cap["h"].shape[1]
    with torch.no_grad():
        full = cap["run"](cap["h"])
        sub = cap["run"](cap["h"], torch.arange(n))
    assert torch.allclose(full, sub, atol=1e-5, rtol=0)
    assert torch.allclose(full, cap["out"], atol=1e-6, rtol=0)


def test_selective_subset_matches_full_and_keeps_other_kv():
    model = tiny_model(3)
    A, F = ChunkState.ACTIVE, ChunkState.FINISHED
    cap, sess = _capture_runner(model, (F, A, A, ChunkState.PENDING), (4, 2, 0, 0), 2)
    run, h = cap["run"], cap["h"]
    n = h.shape[1]
    tpf, g = model.cfg.tokens_per_frame, 2
    # tokens from both frames of the chunk, so a "first K frames" slicing bug would show
    tokens = torch.tensor([1, 5, 6, 14, tpf + 2, tpf + 9, n - 1])
    with torch.no_grad():
        full = run(h)
        kv_before = [(k.clone(), v.clone()) for k, v in sess._kv["cond"]]
        # corrupt the unselected tokens' inputs: they must not matter
        h_sub = h[:, tokens].clone()
        h_sub_copy = h_sub.clone()
        sub = run(h_sub, tokens)
    assert torch.equal(h_sub, h_sub_copy), "the runner must not modify its input in place"
    assert torch.allclose(sub, full[:, tokens], atol=1e-5, rtol=0)
    start = g * n
    keep = torch.ones(sess._frames * tpf, dtype=torch.bool)
    keep[start + tokens] = False
    for (k0, v0), (k1, v1) in zip(kv_before, sess._kv["cond"]):
        assert torch.equal(k0[:, :, keep], k1[:, :, keep])
        assert torch.equal(v0[:, :, keep], v1[:, :, keep])
        # the subset rewrote its own K/V with the same values (same input as the full run)
        assert torch.allclose(k0[:, :, ~keep], k1[:, :, ~keep], atol=1e-5)


def test_selective_rejects_bad_tokens():
    model = tiny_model(4)
    A = ChunkState.ACTIVE
    cap, _ = _capture_runner(model, (A, ChunkState.PENDING, ChunkState.PENDING,
                                     ChunkState.PENDING), (0, 0, 0, 0), 0)
    h = cap["h"]
    with pytest.raises(ConfigError, match="tokens"):
        cap["run"](h[:, :2], torch.tensor([3, 1]))
    with pytest.raises(ConfigError, match="tokens"):
        cap["run"](h[:, :1], torch.tensor([h.shape[1]]))


def test_vanilla_subset_raises_not_implemented():
    model = tiny_model(5)
    adapter = RefDiTAdapter(model)

    def hook(call, h, run, probe):
        return run(h[:, :3], torch.arange(3))

    sess = adapter.session(batch=BATCH, mode="vanilla", hook=hook)
    cfg = model.cfg
    sess.begin_window(0, cfg.max_frames)
    info = IterationInfo(window=0, iteration=0, num_iterations=1, branch="cond", num_steps=2,
                         chunk_frames=2, states=[ChunkState.ACTIVE] + [ChunkState.PENDING] * 3,
                         steps=[0] * 4)
    with pytest.raises(NotImplementedError, match="mode='chunked'"):
        sess.velocity(torch.zeros(BATCH, 3, 8, 16, 16), torch.ones(BATCH, 8),
                      adapter.null_condition(BATCH), info)


# --- (d) hook calls and what runs ---------------------------------------------------------------

def test_hook_calls_and_block_counts():
    model = tiny_model(6)
    cfg = model.cfg
    calls = {"chunked": [], "vanilla": []}

    def make_hook(mode):
        def hook(call, h, run, probe):
            calls[mode].append((call, tuple(probe.grid), tuple(probe.modulation.shape)))
            return run(h)
        return hook

    block_calls = []
    handles = [b.register_forward_pre_hook(lambda mod, args: block_calls.append(args[0].shape[1]))
               for b in model.blocks]
    per_iteration = []

    def on_iteration(it, branch, states):
        per_iteration.append((branch, states, list(block_calls)))
        block_calls.clear()

    try:
        run_schedule(model, modes=("chunked",), hooks={"chunked": make_hook("chunked")},
                     num_steps=3, ar_step=2, on_iteration=on_iteration)
    finally:
        for hd in handles:
            hd.remove()

    tokens_chunk = cfg.chunk_frames * cfg.tokens_per_frame
    written = {"cond": {}, "uncond": {}}
    expected_calls = []
    for branch, states, blocks in per_iteration:
        active = [g for g, s in enumerate(states) if s is ChunkState.ACTIVE]
        runs = 0
        for g in range(max(active) + 1):
            s = states[g]
            if s is ChunkState.ACTIVE:
                runs += 1
                written[branch][g] = s
                expected_calls.append((branch, g))
            elif s is ChunkState.FINISHED and written[branch].get(g) is not s:
                runs += 1
                written[branch][g] = s
        assert ChunkState.PENDING not in states[:max(active)]
        assert len(blocks) == runs * cfg.num_blocks, (states, blocks)
        assert all(n == tokens_chunk for n in blocks)
    got = [(c.branch, c.chunk) for c, _, _ in calls["chunked"]]
    assert got == expected_calls
    for call, grid, mod_shape in calls["chunked"]:
        assert call.scope is Scope.CHUNK
        assert call.frames == cfg.chunk_frames and call.tokens_per_frame == cfg.tokens_per_frame
        assert grid == (cfg.chunk_frames, *cfg.grid)
        assert mod_shape == (BATCH, cfg.chunk_frames, 6, cfg.hidden)
        assert call.num_steps == 3 and 0 <= call.step < 3
        assert call.timestep == pytest.approx(1000.0 * (1 - call.step / 3), abs=1e-3)
    # each (branch, chunk) sees steps 0, 1, 2 in order
    for branch in ("cond", "uncond"):
        for g in range(4):
            steps = [c.step for c, _, _ in calls["chunked"] if c.key == (branch, g)]
            assert steps == [0, 1, 2]

    calls["vanilla"].clear()
    n_rows = len(list(df_rows(4, 3, 2)))
    run_schedule(model, modes=("vanilla",), hooks={"vanilla": make_hook("vanilla")},
                 num_steps=3, ar_step=2)
    assert len(calls["vanilla"]) == 2 * n_rows
    for i, (call, grid, mod_shape) in enumerate(calls["vanilla"]):
        assert call.scope is Scope.WINDOW and call.chunk == 0
        assert call.step == i // 2 and call.num_steps == n_rows
        assert call.branch == ("cond", "uncond")[i % 2]
        assert call.frames == cfg.max_frames and grid == (cfg.max_frames, *cfg.grid)


def test_session_requires_window_and_shapes():
    model = tiny_model(7)
    adapter = RefDiTAdapter(model)
    sess = adapter.session(batch=1)
    info = IterationInfo(window=0, iteration=0, num_iterations=1, branch="cond", num_steps=1,
                         chunk_frames=2, states=[ChunkState.ACTIVE] * 4, steps=[0] * 4)
    x = torch.zeros(1, 3, 8, 16, 16)
    from cachekit.errors import CacheContextError
    with pytest.raises(CacheContextError, match="begin_window"):
        sess.velocity(x, torch.ones(1, 8), adapter.null_condition(1), info)
    sess.begin_window(0, 8)
    with pytest.raises(ConfigError, match="sigma"):
        sess.velocity(x, torch.ones(1, 6), adapter.null_condition(1), info)
    with pytest.raises(ConfigError, match="mode"):
        adapter.session(batch=1, mode="fast")


def test_spec_and_flops():
    model = tiny_model()
    spec = RefDiTAdapter(model).spec
    assert spec.tokens_per_frame == 16 and spec.chunk_frames == 2 and spec.max_frames == 8
    full = model.block_flops(128, 128)
    assert model.block_flops(32, 128) < full
    assert model.block_flops(128, 128, batch=2) == 2 * full


# --- (e) loading errors ---------------------------------------------------------------------------

def _save(model, folder):
    from safetensors.torch import save_file
    st = folder / "refdit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    (folder / "refdit.json").write_text(json.dumps(
        {"config": model.cfg.to_dict(), "sha256": sha256_file(st)}))
    return st


def test_load_roundtrip(tmp_path):
    model = tiny_model(8)
    st = _save(model, tmp_path)
    loaded = load_refdit(st)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert load_refdit(tmp_path).cfg == model.cfg


def test_load_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="missing") as exc:
        load_refdit(tmp_path / "refdit.safetensors")
    assert "refdit.safetensors" in str(exc.value) and "train" in str(exc.value)


def test_load_corrupt_file(tmp_path):
    st = _save(tiny_model(9), tmp_path)
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256") as exc:
        load_refdit(st)
    msg = str(exc.value)
    assert json.loads((tmp_path / "refdit.json").read_text())["sha256"] in msg
    assert sha256_file(st) in msg and "reinstall" in msg.lower()


# --- (f) shipped weights --------------------------------------------------------------------------

@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="bundled weights not trained yet")
def test_shipped_weights_load_and_run():
    adapter = RefDiTAdapter()
    cfg = adapter.model.cfg
    sess = adapter.session(batch=1, mode="chunked")
    sess.begin_window(0, cfg.max_frames)
    n = cfg.max_frames // cfg.chunk_frames
    info = IterationInfo(window=0, iteration=0, num_iterations=1, branch="cond", num_steps=2,
                         chunk_frames=cfg.chunk_frames,
                         states=[ChunkState.ACTIVE] + [ChunkState.PENDING] * (n - 1),
                         steps=[0] * n)
    x = torch.randn(1, cfg.channels, cfg.max_frames, cfg.height, cfg.width,
                    generator=torch.Generator().manual_seed(0))
    v = sess.velocity(x, torch.ones(1, cfg.max_frames),
                      adapter.encode_condition([adapter.sample_condition(0)]), info)
    assert torch.isfinite(v).all()
    assert v[:, :, :cfg.chunk_frames].abs().mean() > 0


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="bundled weights not trained yet")
def test_shipped_model_chunked_equals_vanilla_exactly_in_float64():
    """chunked == vanilla is exact, not approximate: over several windows (clean prefix,
    addnoise, CFG) the bundled model in float64 gives the same video in both modes to 1e-9.
    In float32 the two orders of summation differ by ~1e-6 per call and a 50-step CFG-3
    trajectory amplifies that to 1e-5..5e-4 after some windows (README, lossless layer); a
    semantic difference would show here at the size of the signal instead."""
    from cachekit.sampling import SamplerConfig, generate

    adapter = RefDiTAdapter(load_refdit().double())
    cfg = adapter.model.cfg
    cond = adapter.encode_condition(["shape=cross,color=yellow,motion=fast"])
    assert cond.dtype == torch.float64
    sampler = SamplerConfig(num_frames=cfg.max_frames + 2 * cfg.chunk_frames,
                            overlap_history=2 * cfg.chunk_frames, addnoise_condition=20,
                            num_steps=8, ar_step=2, guidance_scale=3.0, shift=2.0)
    videos = {m: generate(adapter, cond, uncond=adapter.null_condition(1),
                          config=sampler.evolve(mode=m), seed=1).video
              for m in ("chunked", "vanilla")}
    assert videos["chunked"].dtype == torch.float64
    assert float((videos["chunked"] - videos["vanilla"]).abs().max()) <= 1e-9
    assert float(videos["vanilla"].std()) > 0.1  # a real video, not a constant


def test_prompt_and_decode():
    adapter = RefDiTAdapter(tiny_model())
    cond, uncond, text = adapter.encode_prompt("shape=square,motion=fast", seed=0, batch=2)
    assert cond.shape == uncond.shape == (2, 5, TINY.hidden)
    assert Condition.parse(text) == Condition(shape="square", motion="fast")
    _, _, drawn = adapter.encode_prompt(None, seed=3, batch=1)
    assert Condition.parse(drawn) == adapter.sample_condition(3)
    frames = adapter.decode(torch.full((1, 3, 2, 16, 16), -1.0))
    assert frames.shape == (1, 2, 16, 16, 3) and frames.max() == 0.0


# --- training helpers -----------------------------------------------------------------------------

def test_df_sigmas_and_train_step(tmp_path):
    from cachekit_models.refdit import train

    gen = torch.Generator().manual_seed(0)
    sig, mask = train.df_sigmas(64, 4, gen)
    assert sig.shape == mask.shape == (64, 4)
    assert ((sig >= 0) & (sig <= 1)).all()
    assert (sig[~mask] == 0).all() and mask.any(dim=1).all() and (~mask).any()
    assert (sig[:, 1:] != sig[:, :1]).any(), "chunks get independent sigmas"
    model = RefDiT(TINY)
    x0, ids = train.video_batch(TINY, 0, 0, 2, TINY.max_frames)
    assert x0.shape == (2, 3, 8, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    loss = train.train_step(model, x0, ids, gen)
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad.abs().sum() > 0
    vids = train.preview_sample(model, [Condition()], frames=4, steps=2)
    assert vids.shape == (1, 4, 16, 16, 3)
    train.draw_samples_png(vids, ["c"], tmp_path / "s.png")
    train.draw_loss_png([(10, 1.0), (20, 0.5), (30, 0.3)], tmp_path / "l.png")
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "l.png").stat().st_size > 0


def test_train_step_weight_cap():
    from cachekit_models.refdit import train

    torch.manual_seed(0)
    model = RefDiT(TINY)
    torch.nn.init.normal_(model.head.weight, std=0.2)
    x0, ids = train.video_batch(TINY, 0, 0, 4, TINY.max_frames)

    def loss(cap):
        with torch.no_grad():
            return float(train.train_step(model, x0, ids, torch.Generator().manual_seed(1), cap))

    plain = loss(None)
    # the factor min(1, C sigma^2) is <= 1 and reaches 1 for a huge cap
    assert loss(4.0) < plain
    assert loss(1e9) == pytest.approx(plain, rel=1e-6)
    assert loss(0.0) == 0.0


def test_shipped_calibration_files_match_the_weights():
    """Each shipped calibration names this model and scope and is readable by the policies."""
    from cachekit.calibration import load_calibration
    from cachekit_models.refdit.adapter import RefDiTAdapter
    from cachekit_models.refdit.loading import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("bundled weights not trained yet")
    adapter = RefDiTAdapter()
    found = 0
    for scope in ("chunk", "window"):
        path = adapter.calibration_file(scope)
        if path is None:
            continue
        data = load_calibration(path)
        assert data["model"] == "refdit" and data["scope"] == scope
        found += 1
    if not found:
        pytest.skip("no calibration shipped yet (run `cachekit calibrate`)")


def test_chunk_time_embedding_memo_is_exact_and_per_window():
    model = tiny_model(6)
    sess = RefDiTAdapter(model).session(batch=BATCH, mode="chunked")
    sess.begin_window(0, TINY.max_frames)
    one = torch.full((BATCH, TINY.chunk_frames), 0.37)
    mixed = torch.tensor([[0.37, 0.5]] * BATCH)
    for sg in (one, mixed):
        for got, want in zip(sess._chunk_time_embedding(sg), model.time_embedding(sg)):
            assert torch.equal(got, want)
    assert sess._chunk_time_embedding(one)[1] is sess._chunk_time_embedding(one)[1]
    assert sess._chunk_time_embedding(mixed)[1] is not sess._chunk_time_embedding(mixed)[1]
    cached = sess._chunk_time_embedding(one)[1]
    sess.begin_window(1, TINY.max_frames)
    assert sess._chunk_time_embedding(one)[1] is not cached
