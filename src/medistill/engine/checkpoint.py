"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts. Loading never unpickles
arbitrary objects, so a checkpoint from an untrusted source cannot execute code; one that contains
pickled objects is refused with a clear message.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Save ``state`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; refuse files that need arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise MedistillError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise MedistillError(
            f"{path}: refused to load: the checkpoint contains pickled objects that are not plain "
            f"tensors/numbers ({first[:160]})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise MedistillError(f"{path}: not a readable checkpoint ({exc})".splitlines()[0]) from exc
    if not isinstance(state, dict):
        raise MedistillError(f"{path}: not a medistill checkpoint (expected a dict)")
    return state


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict without DDP's ``module.`` prefix."""
    inner = getattr(model, "module", model)
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
