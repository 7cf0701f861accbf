"""Which source RefAM reads a model through.

A source (:class:`vlmtools.adapters.dit_source.Source`) turns a real image and prompt into
one transformer call. The family's adapter names the sources of its pipelines and bare
transformer (``DiTAdapter.sources``); a pipeline class registered here (the zoo's
flux-shapes) takes precedence, so a pipeline the family does not know can bring its own.
"""

from __future__ import annotations

from collections.abc import Callable

from vlmtools.adapters import UnsupportedModel, find_adapter
from vlmtools.adapters.dit_source import Source

SOURCES: dict[str, Callable[..., Source]] = {}
"""Class name (of a pipeline or a bare transformer) -> its source factory ``(model, **options)``."""


def register_source(class_name: str, factory: Callable[..., Source]) -> None:
    """Make RefAM read models of ``class_name`` (or a subclass) through ``factory(model, **options)``."""
    SOURCES[class_name] = factory


def source_for(model, **options) -> Source:
    """The source registered for ``model``'s class (or nearest base), else the one its family's adapter names
    for it (``model`` a pipeline with a ``.transformer``, or a bare transformer); ``UnsupportedModel`` else."""
    factory = _by_class(model, SOURCES)
    if factory is None:
        adapter = find_adapter(getattr(model, "transformer", model))
        factory = _by_class(model, dict(getattr(adapter, "sources", ())))
        if factory is None:
            known = ", ".join(name for name, _ in getattr(adapter, "sources", ())) or "nothing"
            raise UnsupportedModel(
                f"RefAM: unsupported model {type(model).__name__}; the {adapter.family} adapter names sources for "
                f"{known}; register another with grounding.refam.register_source"
            )
    return factory(model, **options)


def _by_class(model, factories: dict[str, Callable[..., Source]]) -> Callable[..., Source] | None:
    for cls in type(model).__mro__:
        if cls.__name__ in factories:
            return factories[cls.__name__]
    return None
