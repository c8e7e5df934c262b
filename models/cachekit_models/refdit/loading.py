"""Load the bundled reference DiT weights, checking their sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import torch

from cachekit.errors import WeightsError

from .config import RefDiTConfig
from .model import RefDiT

__all__ = ["load_refdit", "DEFAULT_WEIGHTS", "sha256_file"]

#: The shipped weights; ``refdit.json`` next to it holds the config and the checksum.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "refdit.safetensors"

_FIX = ("Reinstall cachekit to restore the bundled weights, or re-create them with "
        "`python -m cachekit_models.refdit.train --out runs/refdit` (it exports into the "
        "package's weights/ folder).")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_refdit(path: Optional[Union[str, Path]] = None, *, verify: bool = True,
                device: Union[str, torch.device] = "cpu") -> RefDiT:
    """Load a reference DiT in eval mode.

    ``path`` is a ``.safetensors`` file or a folder holding ``refdit.safetensors``; default:
    the weights bundled with the package. Its metadata (config, sha256) is read from the
    ``.json`` file of the same name. With ``verify`` (default) the file's sha256 must match.

    Raises :class:`cachekit.errors.WeightsError` naming the file, what was expected and what
    was found (missing file, checksum mismatch, unreadable or mismatched tensors), and the fix.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st = Path(path) if path is not None else DEFAULT_WEIGHTS
    if st.is_dir():
        st = st / "refdit.safetensors"
    meta_path = st.with_suffix(".json")
    if not st.is_file():
        raise WeightsError(f"refdit weights {st}: expected a safetensors file, got missing. {_FIX}")
    if not meta_path.is_file():
        raise WeightsError(f"refdit metadata {meta_path}: expected a json file with the config "
                           f"and sha256, got missing. {_FIX}")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = RefDiTConfig.from_dict(meta["config"])
    except Exception as exc:  # any parse or validation failure is a broken install
        raise WeightsError(f"refdit metadata {meta_path}: expected valid json with a 'config' "
                           f"entry, got an unreadable file ({exc}). {_FIX}") from exc
    if verify:
        expected = meta.get("sha256")
        actual = sha256_file(st)
        if expected != actual:
            raise WeightsError(f"refdit weights {st}: expected sha256 {expected}, got {actual} "
                               f"(the file is corrupt or was replaced). {_FIX}")
    try:
        state = load_file(str(st), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"refdit weights {st}: expected a readable safetensors file, got "
                           f"an error ({exc}). {_FIX}") from exc
    model = RefDiT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"refdit weights {st}: expected the tensors of config {cfg}, got "
                           f"missing {missing[:5]} and unexpected {unexpected[:5]}. {_FIX}")
    return model.to(device).eval().requires_grad_(False)
