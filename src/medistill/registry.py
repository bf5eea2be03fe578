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
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

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

    def check_args(self, name: str, args: dict[str, Any], where: str, supplied: Iterable[str] = ()) -> None:
        """Validate ``args`` against the registered constructor's signature, before any work.

        Unknown arguments are refused with the closest valid names, values are checked against the
        annotations (pydantic, lax: ``1`` is a valid float), and required arguments must be given
        unless the caller ``supplied`` them (a task passes ``in_channels``, ``out_channels``, ...).
        ``where`` is the dotted config path named in the message (``stages.1.distillers.mskd``).
        """
        obj = self.get(name)
        supplied = set(supplied)
        taken = sorted(supplied & set(args))
        if taken:
            raise MedistillError(f"{where}.args: {', '.join(taken)} is set by the task, not the config")
        schema, params = _args_schema(obj, supplied)
        if schema is None:
            return
        unknown = [k for k in args if k not in params]
        if unknown and not _takes_kwargs(obj):
            close = difflib.get_close_matches(unknown[0], params, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(params) or 'none'}"
            raise MedistillError(
                f"{where}.args.{unknown[0]}: unknown argument of {self.kind} {name!r} ({hint})"
            )
        missing = [k for k, required in params.items() if required and k not in args and k not in supplied]
        if missing:
            raise MedistillError(f"{where}.args: {self.kind} {name!r} needs {', '.join(missing)}")
        try:
            schema.model_validate({k: v for k, v in args.items() if k in params})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise MedistillError(f"{where}.args.{loc}: {err['msg']} (got {err.get('input')!r})") from None

    def __contains__(self, name: object) -> bool:
        _import_providers()
        return name in self._items


def _takes_kwargs(obj: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _args_schema(
    obj: Callable[..., Any], supplied: set[str]
) -> tuple[type[BaseModel] | None, dict[str, bool]]:
    """A pydantic model of ``obj``'s keyword arguments but the ``supplied`` ones, and ``{name: required}``
    of all of them (None: no signature)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None, {}
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that cannot be resolved at run time: check names only
        hints = {}
    fields: dict[str, Any] = {}
    params: dict[str, bool] = {}
    for pname, param in sig.parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        required = param.default is inspect.Parameter.empty
        params[pname] = required
        if pname not in supplied:
            fields[pname] = (hints.get(pname, Any), ... if required else param.default)
    cfg = ConfigDict(arbitrary_types_allowed=True, extra="ignore")
    try:
        return create_model(f"{getattr(obj, '__name__', 'component')}Args", __config__=cfg, **fields), params
    except Exception:  # an annotation pydantic cannot express: check names only
        return None, params


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
