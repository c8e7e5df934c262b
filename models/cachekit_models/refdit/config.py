"""Configuration of the bundled reference DiT (``refdit``)."""

from __future__ import annotations

from typing import Any

import attrs

from cachekit.errors import ConfigError, invalid_value
from cachekit.types import ModelSpec

from ..synthetic import ATTRIBUTES

__all__ = ["RefDiTConfig"]


def _pos_int(_inst, attr, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(invalid_value(f"RefDiTConfig.{attr.name}", "an int >= 1", value))


@attrs.frozen(kw_only=True)
class RefDiTConfig:
    """Geometry and width of the reference model. Defaults are the shipped model.

    The model works in pixel space: ``channels`` = 3 (RGB scaled to [-1, 1]), no autoencoder.
    A frame of ``height x width`` pixels becomes ``(height/patch) * (width/patch)`` tokens.

    * ``chunk_frames`` (default 4): the causal block size; attention is block-causal across
      chunks of this many frames.
    * ``max_frames`` (default 16): the longest window the model was trained on (RoPE covers
      any length, but quality beyond it is untested).
    * ``hidden`` / ``heads`` / ``num_blocks`` / ``ffn_mult``: width and depth; the cost of a
      forward grows linearly in ``num_blocks`` and roughly quadratically in ``hidden``.
    * ``freq_dim`` (default 256): sinusoidal timestep embedding size (as Wan).
    * ``rope_theta`` (default 10000): RoPE base.
    * ``cond_vocab``: number of values per condition attribute (from ``synthetic.ATTRIBUTES``).
    * ``eps`` (default 1e-6): epsilon of the layer norms.
    * ``prediction`` (``"x0"`` or ``"v"``): what the output head predicts. The model always
      *returns* the flow-matching velocity ``v = eps - x0``; with ``"x0"`` the head predicts the
      clean patch and ``v = (x_sigma - x0_hat) / max(sigma, sigma_min)``. Pixel patches of
      ``channels * patch**2`` values are about as wide as the hidden state here, and predicting
      the clean signal (which lies on a low-dimensional set) rather than noise-like targets is
      what lets a narrow pixel-space transformer learn them (Li and He, "Back to Basics: Let
      Denoising Generative Models Denoise", 2025, x-prediction with a velocity loss).
    * ``sigma_min`` (default 0.05): the floor of that division (the same clip as that paper).
    """

    channels: int = attrs.field(default=3, validator=_pos_int)
    height: int = attrs.field(default=32, validator=_pos_int)
    width: int = attrs.field(default=32, validator=_pos_int)
    patch: int = attrs.field(default=8, validator=_pos_int)
    chunk_frames: int = attrs.field(default=4, validator=_pos_int)
    max_frames: int = attrs.field(default=16, validator=_pos_int)
    hidden: int = attrs.field(default=192, validator=_pos_int)
    heads: int = attrs.field(default=4, validator=_pos_int)
    num_blocks: int = attrs.field(default=4, validator=_pos_int)
    ffn_mult: int = attrs.field(default=4, validator=_pos_int)
    freq_dim: int = attrs.field(default=256, validator=_pos_int)
    rope_theta: float = attrs.field(default=10000.0, converter=float)
    cond_vocab: tuple[int, ...] = attrs.field(
        default=tuple(len(v) for v in ATTRIBUTES.values()), converter=tuple)
    eps: float = attrs.field(default=1e-6, converter=float)
    prediction: str = attrs.field(default="x0")
    sigma_min: float = attrs.field(default=0.05, converter=float)

    def __attrs_post_init__(self):
        if self.height % self.patch or self.width % self.patch:
            raise ConfigError(invalid_value(
                "RefDiTConfig.patch", f"a divisor of height={self.height} and width={self.width}",
                self.patch))
        if self.hidden % self.heads:
            raise ConfigError(invalid_value(
                "RefDiTConfig.heads", f"a divisor of hidden={self.hidden}", self.heads))
        head_dim = self.hidden // self.heads
        if head_dim % 2 or head_dim < 6:
            raise ConfigError(invalid_value(
                "RefDiTConfig.hidden/heads", "an even head dim >= 6 (3-D RoPE splits it in "
                "t/h/w rotation pairs)", head_dim))
        if self.prediction not in ("x0", "v"):
            raise ConfigError(invalid_value("RefDiTConfig.prediction", "'x0' or 'v'",
                                            self.prediction))
        if not 0.0 < self.sigma_min < 1.0:
            raise ConfigError(invalid_value("RefDiTConfig.sigma_min", "a float in (0, 1)",
                                            self.sigma_min))
        if self.max_frames % self.chunk_frames:
            raise ConfigError(invalid_value(
                "RefDiTConfig.max_frames", f"a multiple of chunk_frames={self.chunk_frames}",
                self.max_frames))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid of one frame ``(H_tokens, W_tokens)``."""
        return (self.height // self.patch, self.width // self.patch)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        """Values per patch token: ``channels * patch * patch``."""
        return self.channels * self.patch * self.patch

    @property
    def cond_tokens(self) -> int:
        """Condition tokens per sample: one per attribute."""
        return len(self.cond_vocab)

    def spec(self, name: str = "refdit") -> ModelSpec:
        """The geometry as the sampler and engine see it."""
        return ModelSpec(name=name, channels=self.channels, height=self.height, width=self.width,
                         patch=(self.patch, self.patch), chunk_frames=self.chunk_frames,
                         max_frames=self.max_frames, hidden=self.hidden,
                         num_blocks=self.num_blocks, modulation_vectors=6)

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["cond_vocab"] = list(self.cond_vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RefDiTConfig":
        known = {a.name for a in attrs.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(invalid_value("RefDiTConfig", f"keys among {sorted(known)}",
                                            sorted(unknown)))
        return cls(**d)
