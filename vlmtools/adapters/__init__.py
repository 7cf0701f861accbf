"""Model families. Each module here defines ``ADAPTER``; :func:`find_adapter` picks one."""
from __future__ import annotations

import importlib
import pkgutil

from .base import Adapter


class UnsupportedModel(TypeError):
    """A model no family here (or no method's reader) knows; the ``vlmtools`` command reports it as a refusal."""


def _discover() -> list[Adapter]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "ADAPTER", None), Adapter):
            found.append(module.ADAPTER)
    return found


FAMILIES: list[Adapter] = _discover()


def find_adapter(model) -> Adapter:
    """The adapter of ``model``'s class, or :class:`UnsupportedModel` naming the supported classes."""
    for adapter in FAMILIES:
        if adapter.matches(model):
            return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.classes)})" for a in FAMILIES)
    raise UnsupportedModel(f"vlmtools: unsupported model class {type(model).__name__}. Supported families: {supported}. "
                    "To add one, add a module defining ADAPTER to vlmtools/adapters/.")
