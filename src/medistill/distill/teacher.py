"""A frozen teacher for knowledge distillation, with features tapped by forward hooks.

Follows torchdistill (Matsubara, 2021): the teacher's code is never edited; intermediate features are
recorded by forward hooks on named submodules. Fixes two bugs of seed C's released KD agent (spec C.9):
the teacher was never switched to eval mode (BN used batch statistics, dropout was active) and its
weights were never loaded (misspelled config key). Here the teacher is always in eval mode, has
``requires_grad=False``, runs under ``no_grad``, and :meth:`FrozenTeacher.from_checkpoint` loads weights
strictly or fails naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medistill.errors import MedistillError

STATE_KEYS = ("model", "state_dict", "model_state_dict", "net")


class FeatureHooks:
    """Records the outputs of named submodules of ``model`` on every forward.

    ``features[name]`` (in the order of ``names``) holds the latest output (a tensor, with its graph
    when the forward is differentiable, so the same class taps student features for feature KD).
    Use as a context manager or call :meth:`remove`. Unknown names raise ``MedistillError``, listing
    the valid ones.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self._latest: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            known = ", ".join(n for n in modules if n) or "none"
            raise MedistillError(f"no submodule named {missing} in {type(model).__name__} (known: {known})")
        self._handles = [modules[n].register_forward_hook(self._recorder(n)) for n in self.names]

    def _recorder(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._latest[name] = output

        return hook

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """Latest output of each hooked submodule, in the order of ``names`` (not of execution)."""
        return {n: self._latest[n] for n in self.names if n in self._latest}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def load_state(path: str | Path, key: str | None = None) -> Mapping[str, torch.Tensor]:
    """The model state dict in a checkpoint: the file itself, or its ``key`` entry (default: the first of
    ``model``, ``state_dict``, ``model_state_dict``, ``net`` found). Loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise MedistillError(f"teacher checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a bad file for the user
        raise MedistillError(f"teacher checkpoint {path} could not be read: {exc}") from exc
    if not isinstance(ckpt, Mapping):
        raise MedistillError(f"teacher checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    keys = (key,) if key else STATE_KEYS
    for k in keys:
        if isinstance(ckpt.get(k), Mapping):
            return ckpt[k]
    if key:
        raise MedistillError(f"teacher checkpoint {path} has no entry {key!r} (has: {', '.join(ckpt)})")
    return ckpt


class FrozenTeacher(nn.Module):
    """Wraps a trained teacher: eval mode forever, no gradients, features by hooks.

    Args:
        model: the teacher network (not modified beyond ``eval()``, ``requires_grad_(False)`` and hooks).
        feature_names: submodule names whose outputs to record (e.g. ``model.feature_names``).
        multiscale: return all deep-supervision outputs, asked for explicitly with ``model(x, scales=True)``
            (the teacher stays in eval mode: BN running statistics, no dropout).

    ``forward(x)``: ``B C *S`` -> the teacher's output (a tensor, or a list finest first when
    ``multiscale``), computed under ``no_grad``; the hooked features are then in :attr:`features`.
    ``train()`` is accepted (so a parent's ``train()`` works) but keeps the teacher in eval mode.
    """

    def __init__(self, model: nn.Module, feature_names: Iterable[str] = (), multiscale: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multiscale = multiscale
        self.model.requires_grad_(False)
        self.hooks = FeatureHooks(model, feature_names)
        self.train(False)

    @classmethod
    def from_checkpoint(
        cls,
        model: nn.Module,
        path: str | Path,
        key: str | None = None,
        feature_names: Iterable[str] = (),
        multiscale: bool = False,
    ) -> FrozenTeacher:
        """Load ``path`` strictly into ``model`` (every key must match) and freeze it."""
        state = dict(load_state(path, key))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing/unexpected keys or shape mismatches, listed by torch
            detail = str(exc).splitlines()
            raise MedistillError(
                f"teacher checkpoint {path} does not fit {type(model).__name__}: {' '.join(detail[1:4])}"
            ) from exc
        return cls(model, feature_names, multiscale)

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """Hooked features of the last forward, by submodule name."""
        return self.hooks.features

    @property
    def n_scales(self) -> int:
        """How many outputs :meth:`forward` returns (1 unless ``multiscale``)."""
        return int(getattr(self.model, "n_scales", 1)) if self.multiscale else 1

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Keep every layer in eval mode whatever ``mode`` says (a teacher never trains)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x, scales=True) if self.multiscale else self.model(x)
