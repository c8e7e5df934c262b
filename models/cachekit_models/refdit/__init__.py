"""The bundled reference model: a small Wan/SkyReels-V2-style diffusion-forcing video DiT.

See ``MODEL_CARD.md`` in this package. Public entry points: :class:`RefDiTConfig`,
:class:`RefDiT`, :func:`load_refdit`, :class:`RefDiTAdapter`.
"""

from .adapter import RefDiTAdapter, RefDiTSession
from .config import RefDiTConfig
from .loading import load_refdit
from .model import RefDiT

__all__ = ["RefDiTConfig", "RefDiT", "RefDiTAdapter", "RefDiTSession", "load_refdit"]
