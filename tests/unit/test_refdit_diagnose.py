"""The context diagnostics of the bundled model's package run and report sane figures."""

from __future__ import annotations

import torch

from cachekit_models.refdit import diagnose
from cachekit_models.refdit.adapter import RefDiTAdapter
from cachekit_models.synthetic import Condition

from test_refdit import TINY, tiny_model


def test_context_errors_shape_and_sanity():
    errs = diagnose.context_errors(tiny_model(0), sigmas=(0.5,), videos=2)
    own, other = errs[0.5]
    assert own > 0 and other > 0 and torch.isfinite(torch.tensor([own, other])).all()


def test_context_errors_see_a_context_blind_model_as_blind():
    # a model whose blocks never attend across chunks gets the same error either way
    model = tiny_model(1)
    model.block_causal_mask = lambda frames: torch.block_diag(*[
        torch.ones(TINY.chunk_frames * TINY.tokens_per_frame,
                   TINY.chunk_frames * TINY.tokens_per_frame, dtype=torch.bool)
        for _ in range(frames // TINY.chunk_frames)])
    own, other = diagnose.context_errors(model, sigmas=(0.5,), videos=2)[0.5]
    assert abs(own - other) < 1e-6


def test_continue_prefix_keeps_the_prefix_and_fills_the_rest(tmp_path):
    adapter = RefDiTAdapter(tiny_model(2))
    adapter.default_sampler = lambda: RefDiTAdapter.default_sampler(adapter).evolve(
        num_steps=3, ar_step=1)
    cond = Condition.parse("motion=fast")
    real = diagnose._video(cond, 0, TINY, TINY.max_frames)
    out = diagnose.continue_prefix(adapter, cond, real, TINY.chunk_frames)
    assert out.shape == real.shape
    assert torch.equal(out[:, :, :TINY.chunk_frames], real[:, :, :TINY.chunk_frames])
    assert not torch.allclose(out[:, :, TINY.chunk_frames:], real[:, :, TINY.chunk_frames:])
    path = diagnose.continuation_sheet(adapter, tmp_path / "c.png", prompts=["motion=fast"])
    assert path.stat().st_size > 0
