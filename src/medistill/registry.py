"""Name -> class registries for nets, losses, distillers and tasks.

A component is added by decorating it, never by editing a dispatcher::

    @NETS.register("unet")
    class UNet(nn.Module): ...

Configs then name it by key (``net: {name: unet, ...}``) and :meth:`Registry.build` makes it.
Unknown names raise :class:`~medistill.errors.MedistillError` listing the closest known names.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from medistill.errors import MedistillError

T = TypeVar("T")

# Modules whose import registers components; imported lazily on first lookup so that
# ``import medistill`` stays cheap.
_PROVIDERS = (
    "medistill.nets",
    "medistill.losses",
    "medistill.distill",
    "medistill.tasks",
)


class Registry:
    """A named mapping from keys to classes or factory functions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name``; a name may be registered only once."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj  # type: ignore[assignment]
            return obj

        return deco

    def names(self) -> list[str]:
        _import_providers()
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., Any]:
        _import_providers()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            known = ", ".join(sorted(self._items)) or "none"
            raise MedistillError(f"unknown {self.kind} {name!r}{hint} (known: {known})")
        return self._items[name]

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: object) -> bool:
        _import_providers()
        return name in self._items


_imported = False


def _import_providers() -> None:
    global _imported
    if _imported:
        return
    _imported = True
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a provider package not present in this build
            if exc.name != mod:
                raise


NETS = Registry("net")
LOSSES = Registry("loss")
DISTILLERS = Registry("distiller")
TASKS = Registry("task")
