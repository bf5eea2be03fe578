"""Tensors cached on disk under a content key: computed once per machine, loaded safely, never half-written.

Why: some arrays cost minutes to compute but are a pure function of a few parameters (the CT system matrix
of a scan geometry: :func:`medistill.physics.ct.operator`). They live in the medistill cache
(:func:`medistill.io.examples.data_root`, i.e. ``$MEDISTILL_DATA`` or ``~/.cache/medistill``) as
``<folder>/<key>.pt``: written atomically with ``torch.save`` (a file is complete or absent), read with
``torch.load(weights_only=True)`` (plain tensors only, no pickled code runs) and memory-mapped, so a
multi-GB matrix opens in about a second and processes share its pages. A file that does not load is
reported and treated as absent: the caller recomputes it and overwrites it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from medistill.io.atomic import atomic_path
from medistill.io.examples import data_root

_OFF = ("0", "false", "no", "off")


def enabled(env_var: str) -> bool:
    """False when the environment variable ``env_var`` is set to 0 / false / no / off (any case)."""
    return os.environ.get(env_var, "").strip().lower() not in _OFF


def cache_file(folder: str, key: str) -> Path:
    """Where the tensors of ``key`` are kept: ``<data_root>/<folder>/<key>.pt``."""
    return data_root() / folder / f"{key}.pt"


def load_tensors(path: Path) -> dict[str, Tensor] | None:
    """The ``{name: tensor}`` stored at ``path`` (CPU, memory-mapped), or None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, garbage, foreign pickle: all mean "recompute"
        warnings.warn(f"ignoring unreadable cache file {path} ({type(exc).__name__}: {exc})", stacklevel=2)
        return None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        warnings.warn(f"ignoring cache file {path}: not a dict of named tensors", stacklevel=2)
        return None
    return data


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> bool:
    """Store ``tensors`` (moved to CPU) at ``path`` atomically; False (and a warning) if it cannot be written.

    A cache that cannot be written (read-only home, full disk) costs time, not the result, so it warns.
    """
    try:
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    except OSError as exc:
        warnings.warn(f"could not write cache file {path} ({exc}); see MEDISTILL_DATA", stacklevel=2)
        return False
    return True
