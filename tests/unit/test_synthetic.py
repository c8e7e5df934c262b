"""Synthetic video generator: determinism, ranges, motion classes, condition strings."""

from __future__ import annotations

import numpy as np
import pytest

from cachekit.errors import ConfigError
from cachekit_models.synthetic import ATTRIBUTES, Condition, make_video, sample_condition


def test_deterministic_given_seed():
    cond = Condition.parse("shape=triangle,color=cyan,motion=fast,background=noise")
    a, meta_a = make_video(cond, 7, 8, 32, 32)
    b, meta_b = make_video(cond, 7, 8, 32, 32)
    c, _ = make_video(cond, 8, 8, 32, 32)
    assert np.array_equal(a, b)
    assert np.array_equal(meta_a["position"], meta_b["position"])
    assert not np.array_equal(a, c)
    assert sample_condition(3) == sample_condition(3)


@pytest.mark.parametrize("seed", range(6))
def test_shape_dtype_and_range(seed):
    cond = sample_condition(seed)
    video, meta = make_video(cond, seed, 5, 24, 40)
    assert video.shape == (5, 24, 40, 3) and video.dtype == np.float32
    assert video.min() >= 0.0 and video.max() <= 1.0
    assert meta["position"].shape == (5, 2) and meta["velocity"].shape == (5, 2)
    assert meta["mask"].shape == (5, 24, 40) and meta["mask"].dtype == bool
    assert meta["mask"].any(axis=(1, 2)).all(), "the sprite is visible in every frame"


def test_static_scene_has_zero_frame_difference():
    for seed in range(4):
        cond = Condition(motion="static", background=ATTRIBUTES["background"][seed])
        video, meta = make_video(cond, seed, 6, 32, 32)
        assert np.abs(np.diff(video, axis=0)).max() == 0.0
        assert np.abs(meta["velocity"]).max() == 0.0


def _mean_speed(motion: str, n: int = 12) -> float:
    speeds = []
    for seed in range(n):
        _, meta = make_video(Condition(motion=motion), seed, 8, 32, 32)
        speeds.append(np.linalg.norm(meta["velocity"], axis=1).mean())
    return float(np.mean(speeds))


def _mean_frame_diff(motion: str, n: int = 12) -> float:
    diffs = []
    for seed in range(n):
        video, _ = make_video(Condition(motion=motion, background="gradient"), seed, 8, 32, 32)
        diffs.append(np.abs(np.diff(video, axis=0)).mean())
    return float(np.mean(diffs))


def test_motion_magnitudes_ordered():
    assert _mean_speed("static") == 0.0 < _mean_speed("slow") < _mean_speed("fast")
    assert _mean_frame_diff("static") < _mean_frame_diff("slow") < _mean_frame_diff("fast")
    assert _mean_speed("pan") > 0


def test_velocity_matches_position_track():
    # away from bounces the position advances by the reported velocity
    _, meta = make_video(Condition(motion="fast"), 2, 8, 32, 32)
    step = np.diff(meta["position"], axis=0)
    same_dir = np.all(np.sign(meta["velocity"][:-1]) == np.sign(meta["velocity"][1:]), axis=1)
    assert same_dir.any()
    np.testing.assert_allclose(step[same_dir], meta["velocity"][:-1][same_dir], atol=1e-4)


def test_pan_moves_background_and_sprite_together():
    cond = Condition(motion="pan", background="stripes")
    video, meta = make_video(cond, 4, 4, 32, 32)
    assert np.abs(meta["pan"]).sum() > 0
    np.testing.assert_allclose(meta["velocity"], np.repeat(meta["pan"][None], 4, axis=0))
    # the background itself changes between frames (not only around the sprite)
    bg = ~(meta["mask"][0] | meta["mask"][1])
    assert np.abs(video[1] - video[0])[bg].mean() > 1e-3


def test_parse_round_trip_and_ids():
    for seed in range(10):
        cond = sample_condition(seed)
        assert Condition.parse(str(cond)) == cond
        assert Condition.from_ids(cond.ids()) == cond
    cond = Condition.parse(" color=blue , shape=square ")
    assert (cond.shape, cond.color) == ("square", "blue")
    assert cond.motion == Condition().motion  # unnamed attributes keep their defaults


def test_bad_value_error_names_attribute_and_choices():
    with pytest.raises(ConfigError) as exc:
        Condition.parse("shape=hexagon")
    msg = str(exc.value)
    assert "shape" in msg and "hexagon" in msg and "circle" in msg
    with pytest.raises(ConfigError, match="attribute"):
        Condition.parse("size=big")
    with pytest.raises(ConfigError, match="key=value"):
        Condition.parse("circle")
    with pytest.raises(ConfigError, match="color"):
        Condition(color="purple")
