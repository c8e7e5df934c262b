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


def test_guidance_sheet_one_row_per_scale_and_seed(tmp_path):
    from PIL import Image

    adapter = RefDiTAdapter(tiny_model(3))
    adapter.default_sampler = lambda: RefDiTAdapter.default_sampler(adapter).evolve(
        num_steps=3, ar_step=1)
    path = diagnose.guidance_sheet(adapter, tmp_path / "g.png", scales=(1.5, 3.0),
                                   seeds=(0, 1, 2))
    with Image.open(path) as img:
        h = img.size[1]
    row = TINY.height * 2 + 2          # upscale 2, gap 2
    assert h == 6 * row + 2            # 2 scales x 3 seeds


def test_number_lists():
    assert diagnose._numbers("2,3") == [2.0, 3.0]
    assert diagnose._numbers("0-3", int) == [0, 1, 2, 3]
    assert diagnose._numbers("4,7", int) == [4, 7]


def test_samples_redraws_the_card_sheet(tmp_path, monkeypatch):
    from cachekit_models.refdit import adapter as adapter_mod

    monkeypatch.setattr(diagnose, "_load", lambda w, c: RefDiTAdapter(tiny_model(4)))
    monkeypatch.setattr(adapter_mod, "DEFAULT_STEPS", 2)
    monkeypatch.setattr(adapter_mod, "DEFAULT_AR_STEP", 1)
    out = tmp_path / "s.png"
    assert diagnose.main(["samples", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
