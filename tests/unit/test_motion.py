"""cachekit.motion: indicator primitives and motion maps against hand transcriptions of the spec
(reference/algorithms.md §2, §5.5, §5.6, §6.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from hypothesis import given, settings
from hypothesis import strategies as st

from cachekit.errors import ConfigError
from cachekit.motion import (
    flow_proxy_map,
    frame_diff_map,
    frame_diff_weights,
    latent_diff_map,
    normalize_weights,
    poly_rescale,
    rel_l1,
    temporal_vote,
)



# ------------------------------------------------------------------------------- rel_l1, poly
def test_rel_l1_values():
    b = torch.tensor([1.0, -2.0, 3.0, -4.0])
    a = b + torch.tensor([0.5, 0.5, -0.5, 0.5])
    assert float(rel_l1(a, b)) == pytest.approx(0.5 / 2.5)
    assert float(rel_l1(b, b)) == 0.0
    z = torch.zeros(3)
    assert float(rel_l1(z, z)) == 0.0  # eps: identical all-zero signals are "no drift"
    assert not torch.isfinite(rel_l1(torch.tensor([float("nan")]), torch.ones(1)))


def test_rel_l1_per_frame_and_errors():
    prev = torch.ones(2, 3, 6, 4)
    cur = prev.clone()
    cur[:, 1] *= 1.5
    cur[:, 2] *= 0.75
    per_frame = rel_l1(cur, prev, dim=(0, 2, 3))
    torch.testing.assert_close(per_frame, torch.tensor([0.0, 0.5, 0.25]))
    with pytest.raises(ConfigError, match="equal shapes"):
        rel_l1(torch.ones(2), torch.ones(3))


def test_rel_l1_half_precision_is_computed_in_float32():
    a = torch.full((4,), 1.5, dtype=torch.bfloat16)
    b = torch.ones(4, dtype=torch.bfloat16)
    r = rel_l1(a, b)
    assert r.dtype == torch.float32 and float(r) == pytest.approx(0.5)


@given(coeffs=st.lists(st.floats(-50, 50), min_size=1, max_size=5),
       x=st.floats(-2, 2))
def test_poly_rescale_matches_polyval(coeffs, x):
    want = float(np.polyval(np.asarray(coeffs, dtype=np.float64), x))
    assert poly_rescale(x, coeffs) == pytest.approx(want, rel=1e-9, abs=1e-9)
    t = poly_rescale(torch.tensor([x], dtype=torch.float64), coeffs)
    assert float(t[0]) == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_poly_rescale_identity():
    x = torch.tensor([0.1, 0.2])
    assert poly_rescale(x, ()) is x
    assert poly_rescale(0.3, ()) == 0.3


# ---------------------------------------------------------------------- frame diff vs §5.5
def reference_frame_diff_weights(h, prev, norm, floor):
    """Loop transcription of ``_compute_weights_from_frame_diff`` as §5.5 states it (with our
    documented fallback: without a previous frame, frame 0 copies frame 1's map; ones for a
    single frame)."""
    b, f, hw, d = h.shape
    eps = 1e-8
    dmap = [[0.0] * hw for _ in range(f)]

    def rel(cur, prv, p):
        num = 0.0
        den = 0.0
        for bi in range(b):
            for c in range(d):
                num += abs(float(cur[bi, p, c]) - float(prv[bi, p, c]))
                den += abs(float(prv[bi, p, c]))
        return (num / (b * d)) / (den / (b * d) + eps)

    for fi in range(1, f):
        for p in range(hw):
            dmap[fi][p] = rel(h[:, fi], h[:, fi - 1], p)
    for p in range(hw):
        if prev is not None:
            dmap[0][p] = rel(h[:, 0], prev, p)
        elif f > 1:
            dmap[0][p] = dmap[1][p]
        else:
            dmap[0][p] = 1.0
    out = []
    for fi in range(f):
        row = dmap[fi]
        if norm == "mean":
            m = sum(row) / hw
            out += [v / (m + eps) for v in row]
        elif norm == "max":
            mx = max(row)
            out += [v / (mx + eps) for v in row]
        else:
            lo, hi = min(row), max(row)
            out += [floor + (1 - floor) * (v - lo) / (hi - lo + eps) for v in row]
    return torch.tensor(out, dtype=torch.float64)


@st.composite
def hidden_cases(draw):
    b = draw(st.integers(1, 2))
    f = draw(st.integers(1, 4))
    hw = draw(st.integers(1, 5))
    d = draw(st.integers(1, 4))
    vals = st.floats(-4, 4, allow_nan=False, width=32)
    h = torch.tensor(draw(st.lists(vals, min_size=b * f * hw * d, max_size=b * f * hw * d)),
                     dtype=torch.float64).reshape(b, f, hw, d)
    prev = None
    if draw(st.booleans()):
        prev = torch.tensor(draw(st.lists(vals, min_size=b * hw * d, max_size=b * hw * d)),
                            dtype=torch.float64).reshape(b, hw, d)
    norm = draw(st.sampled_from(["mean", "max", "max_rescale"]))
    floor = draw(st.floats(0, 1))
    return h, prev, norm, floor


@settings(max_examples=60, deadline=None)
@given(case=hidden_cases())
def test_frame_diff_weights_match_loop_transcription(case):
    h, prev, norm, floor = case
    got = frame_diff_weights(h, prev, norm=norm, floor=floor)
    want = reference_frame_diff_weights(h, prev, norm, floor)
    assert got.shape == (h.shape[1] * h.shape[2],)
    # Ratios with tiny denominators can be huge in 'mean' mode: compare relatively as well.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_frame_diff_first_frame_uses_previous_chunk_frame():
    h = torch.ones(1, 2, 3, 4)
    h[:, 1, 0] = 2.0                      # position 0 moves between frame 0 and 1
    prev = torch.ones(1, 3, 4)
    prev[:, 2] = 3.0                      # position 2 differs from the previous chunk
    d = frame_diff_map(h, prev)
    torch.testing.assert_close(d[1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(d[0], torch.tensor([0.0, 0.0, 2.0 / 3.0]))
    d_none = frame_diff_map(h, None)
    torch.testing.assert_close(d_none[0], d_none[1])          # fallback: frame 1's map
    with pytest.raises(ConfigError, match="prev_last_frame"):
        frame_diff_map(h, torch.ones(1, 2, 4))


# -------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("mode", ["mean", "max", "max_rescale"])
def test_normalize_weights_ranges(mode):
    d = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) * 5
    w = normalize_weights(d, mode, floor=0.6)
    if mode == "mean":
        torch.testing.assert_close(w.mean(dim=1), torch.ones(3))
    elif mode == "max":
        assert float(w.max()) <= 1.0 and float(w.min()) >= 0.0
        torch.testing.assert_close(w.amax(dim=1), torch.ones(3))
    else:
        torch.testing.assert_close(w.amin(dim=1), torch.full((3,), 0.6))
        torch.testing.assert_close(w.amax(dim=1), torch.ones(3))


def test_normalize_weights_constant_frame_and_power():
    d = torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, 2.0]])
    w = normalize_weights(d, "max_rescale", floor=0.6)
    torch.testing.assert_close(w[0], torch.full((3,), 0.6))       # as the reference: floor
    w2 = normalize_weights(d, "max_rescale", floor=0.0, power=2.0)
    torch.testing.assert_close(w2[1], torch.tensor([0.0, 0.25, 1.0]), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="one of"):
        normalize_weights(d, "median")


# ----------------------------------------------------------------------------- latent maps
def test_latent_diff_map_by_hand():
    x = torch.zeros(1, 2, 3, 2, 4)
    x[0, :, 1, 0, 0] = 4.0          # frame 1, pixel (0, 0), both channels
    x[0, 0, 2, 1, 3] = 8.0          # frame 2, pixel (1, 3), channel 0 only
    d = latent_diff_map(x, None, (2, 2))          # tokens: 1 x 2 per frame
    # frame1-frame0: |4| on 1 of 4 pixels of token 0 -> 1.0 ; frame2-frame1: token 0 back to 0
    # (diff 4 -> 1.0), token 1: 8 on one channel of one pixel -> 8/2/4 = 1.0
    torch.testing.assert_close(d[1], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(d[2], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(d[0], d[1])                         # fallback
    prev = torch.zeros(1, 2, 2, 4)
    prev[0, :, 0, 2] = -2.0
    d2 = latent_diff_map(x, prev, (2, 2))
    torch.testing.assert_close(d2[0], torch.tensor([0.0, 0.5]))
    with pytest.raises(ConfigError, match="patch"):
        latent_diff_map(x, None, (3, 3))


def _smooth_texture(h, w, cell, gen):
    base = torch.randn(1, 1, h // cell + 2, w // cell + 2, generator=gen)
    return nnf.interpolate(base, scale_factor=cell, mode="bicubic",
                           align_corners=False)[0, 0, :h, :w]


def sprite_video(vels=(0, 1, 3), frames=4, height=48, width=64, size=10, seed=0):
    """Three textured squares over a static textured background; sprite i moves right at
    ``vels[i]`` px/frame, its texture moving with it. Returns latent [1,1,F,H,W] and masks."""
    g = torch.Generator().manual_seed(seed)
    bg = _smooth_texture(height, width, 4, g)
    x = bg.expand(frames, height, width).clone()
    masks = torch.zeros(len(vels), frames, height, width, dtype=torch.bool)
    for i, v in enumerate(vels):
        tex = _smooth_texture(size, size, 4, g) + 2.0
        top = 4 + i * (size + 4)
        for f in range(frames):
            left = 4 + v * f
            x[f, top:top + size, left:left + size] = tex
            masks[i, f, top:top + size, left:left + size] = True
    return x[None, None], masks


def _token_masks(masks, patch=2):
    n, f, h, w = masks.shape
    cover = nnf.avg_pool2d(masks.float().reshape(-1, 1, h, w), patch).reshape(n, f, -1)
    return cover > 0.99, ~(cover.sum(0) > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flow_proxy_ranks_sprite_speeds(seed):
    x, masks = sprite_video(seed=seed)
    sprite_tok, static_tok = _token_masks(masks)
    for fn in (lambda v: flow_proxy_map(v, None, (2, 2)),
               lambda v: normalize_weights(flow_proxy_map(v, None, (2, 2)), "max_rescale", 0.6)):
        d = fn(x)
        assert d.shape == (4, 24 * 32)
        for f in range(1, 4):
            still, slow, fast = (float(d[f][sprite_tok[i, f]].mean()) for i in range(3))
            background = float(d[f][static_tok[f]].mean())
            assert fast > slow > still
            assert slow > background
    raw = flow_proxy_map(x, None, (2, 2))
    for f in range(1, 4):   # roughly pixels per frame (normal flow <= true speed)
        assert float(raw[f][sprite_tok[1, f]].mean()) < 1.2
        assert 1.2 < float(raw[f][sprite_tok[2, f]].mean()) < 3.3


def test_flow_proxy_static_and_previous_frame():
    x, _ = sprite_video(vels=(0, 0, 0))
    d = flow_proxy_map(x, None, (2, 2))
    assert float(d.abs().max()) == 0.0
    # frame 0 against a previous chunk's last frame shifted by one pixel: motion at frame 0 only
    prev = torch.roll(x[:, :, 0], shifts=1, dims=-1)
    d2 = flow_proxy_map(x, prev, (2, 2))
    assert float(d2[0].mean()) > 0.1 and float(d2[1:].abs().max()) == 0.0
    with pytest.raises(ConfigError, match="blur"):
        flow_proxy_map(x, None, (2, 2), blur=2)


# ------------------------------------------------------------------------------ the vote
def test_temporal_vote_symmetric_majority_five_frames():
    hw = 4
    need = torch.zeros(5, hw, dtype=torch.bool)
    need[:3, 0] = True      # 3 of 5 -> all on
    need[:2, 1] = True      # 2 of 5 -> all off
    need[:, 2] = True       # 5 of 5 -> on
    out = temporal_vote(need.reshape(-1), 5, 0.5).reshape(5, hw)
    assert out[:, 0].all() and not out[:, 1].any() and out[:, 2].all() and not out[:, 3].any()


@settings(max_examples=80, deadline=None)
@given(frames=st.sampled_from([1, 3, 5, 7]), hw=st.integers(1, 6), data=st.data())
def test_temporal_vote_is_symmetric_and_constant_over_frames(frames, hw, data):
    bits = data.draw(st.lists(st.booleans(), min_size=frames * hw, max_size=frames * hw))
    need = torch.tensor(bits)
    out = temporal_vote(need, frames, 0.5)
    grid = out.reshape(frames, hw)
    assert (grid == grid[0]).all()                             # one verdict per position
    # symmetric: with an odd frame count, flipping every vote flips every verdict
    assert torch.equal(temporal_vote(~need, frames, 0.5), ~out)
    # a unanimous position keeps its verdict
    for p in range(hw):
        col = need.reshape(frames, hw)[:, p]
        if col.all() or not col.any():
            assert bool(grid[0, p]) == bool(col[0])


def test_temporal_vote_bad_frames():
    with pytest.raises(ConfigError, match="divisor"):
        temporal_vote(torch.zeros(7, dtype=torch.bool), 2, 0.5)
