"""``vlmtools.wrap``: one object that knows a model's family, sites and layout."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

import torch

from .adapters import find_adapter
from .adapters.base import Adapter
from .attention import activate, installed, register_sites
from .layout import TokenLayout
from .plan import ACTIVE_PLAN, AttentionSite, Plan, StopForward, Trace


class Intervention(Protocol):
    """Anything ``use`` accepts: it adds its hooks to the plan of the block."""

    def attach(self, vlm: "WrappedModel", plan: Plan) -> None: ...


class WrappedModel:
    """A Hugging Face model plus its adapter. The model itself is not modified.

    >>> vlm = vlmtools.wrap(model, processor)
    >>> with vlm.use(vlmtools.RecordRows(["text.2"])) as trace:
    ...     model(**inputs)
    """

    def __init__(self, model: torch.nn.Module, adapter: Adapter, processor: Any = None):
        self.model, self.adapter, self.processor = model, adapter, processor
        self.sites: list[AttentionSite] = adapter.sites(model)
        self.layers: list[torch.nn.Module] = adapter.blocks(model, "text")
        register_sites(self.sites)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def site(self, name: str | AttentionSite) -> AttentionSite:
        if isinstance(name, AttentionSite):
            return name
        for site in self.sites:
            if site.name == name:
                return site
        streams = sorted({s.stream for s in self.sites})
        counts = {st: sum(s.stream == st for s in self.sites) for st in streams}
        raise LookupError(f"vlmtools: no site {name!r} in {self.family}; sites are "
                          + ", ".join(f"{st}.0..{st}.{n - 1}" for st, n in counts.items()))

    def layout(self, inputs: dict[str, Any]) -> TokenLayout:
        """Where visual, text, padding and layout tokens sit in this batch."""
        return self.adapter.layout(self.model, inputs)

    def see_inputs(self, plan: Plan, kwargs: dict[str, Any]) -> None:
        """Called by the seam on every top-level forward: track prompt layout and step."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            return
        cache = kwargs.get("past_key_values")
        fresh = cache is None or cache.get_seq_length() == 0
        if fresh:
            plan.state.layout = self.layout(kwargs)
            plan.state.step = 0
        else:
            plan.state.step += 1

    @contextmanager
    def use(self, *interventions: Intervention) -> Iterator[Trace]:
        """Run the block with the interventions' hooks active; yields the trace.

        Everything is undone on exit, also when the block raises. A planned site that
        never ran is an error (a silent no-op would look like a result).
        """
        plan = Plan(parent=ACTIVE_PLAN.get())
        for intervention in interventions:
            intervention.attach(self, plan)
        with installed(self.model, self.adapter.config_keys, self.layers, self), activate(plan):
            try:
                yield plan.trace
            except StopForward:
                return
        unfired = plan.unfired()
        if unfired:
            raise RuntimeError(f"vlmtools: planned sites never ran in this block: {unfired}")


def wrap(model: torch.nn.Module, processor: Any = None) -> WrappedModel:
    """Wrap a transformers VLM (or diffusers DiT) for the seam; raises ``TypeError`` if unsupported."""
    return WrappedModel(model, find_adapter(model), processor)
