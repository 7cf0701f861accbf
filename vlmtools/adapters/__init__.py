"""Model families, one module each, found by the model's name and imported only when one is wrapped.

A transformers model's family module is named after its ``config.model_type`` (``llava_next``,
``qwen2_5_vl``); a diffusers transformer's after its class without the ``Transformer2DModel`` /
``Transformer3DModel`` suffix, in snake case (``FluxTransformer2DModel`` -> ``flux``, ``SD3...`` ->
``sd3``). That module defines ``ADAPTER``; importing it (and the library it needs, e.g. diffusers)
happens the first time :func:`find_adapter` meets a model of that name. A family kept elsewhere
(your own package, a test) joins with :func:`register`.
"""
from __future__ import annotations

import importlib
import pkgutil
import re

from .base import Adapter, UnsupportedModel


REGISTERED: dict[str, Adapter] = {}
"""Class name -> adapter of every family registered so far (built-in ones as their models are met)."""

_NOT_FAMILIES = {"base", "dit", "dit_source", "vision"}


def register(adapter: Adapter) -> Adapter:
    """Make ``wrap`` pick ``adapter`` for models of its ``classes`` (or their subclasses)."""
    for name in adapter.classes:
        REGISTERED[name] = adapter
    return adapter


def unregister(adapter: Adapter) -> None:
    for name in adapter.classes:
        if REGISTERED.get(name) is adapter:
            del REGISTERED[name]


def family_module(model) -> str | None:
    """The name of the built-in family module that would hold ``model``'s adapter."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type
    stem = re.sub(r"Transformer[23]DModel$", "", type(model).__name__)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", stem).lower() if stem != type(model).__name__ else None


def builtin_families() -> list[str]:
    """Names of the family modules in this package (none imported)."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in _NOT_FAMILIES)


def find_adapter(model) -> Adapter:
    """The adapter of ``model``'s class (or nearest base class), or :class:`UnsupportedModel` naming the families."""
    adapter = _registered(model)
    name = family_module(model)
    if adapter is None and name in builtin_families():
        module = importlib.import_module(f"{__name__}.{name}")
        register(module.ADAPTER)
        adapter = _registered(model)
    if adapter is None:
        known = sorted(set(builtin_families()) | {a.family for a in REGISTERED.values()})
        raise UnsupportedModel(f"vlmtools: unsupported model class {type(model).__name__}. Supported families: "
                               f"{', '.join(known)}. To add one, add a module named after its model_type defining "
                               "ADAPTER to vlmtools/adapters/, or call vlmtools.adapters.register(adapter).")
    return adapter


def _registered(model) -> Adapter | None:
    for cls in type(model).__mro__:
        if cls.__name__ in REGISTERED:
            return REGISTERED[cls.__name__]
    return None
