"""``vlmtools.wrap``: one object that knows a model's family, sites and layout."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Protocol

import torch

from .adapters import find_adapter
from .adapters.base import Adapter, UnsupportedModel
from .adapters.dit import probed
from .attention import activate, check_implementations, installed, register_sites
from .drop import residual_add_gathered
from .layout import DiTLayout, TokenLayout
from .plan import ACTIVE_PLAN, AttentionSite, Plan, StopForward, Trace


class Intervention(Protocol):
    """Anything ``use`` accepts: it adds its hooks to the plan of the block.

    An intervention holds settings only; what one block computes lives on a per-block run that
    ``attach`` registers as ``plan.trace[self]`` (and returns), read as ``trace[intervention]``.
    """

    def attach(self, vlm: Wrapped, plan: Plan) -> Any: ...


class Wrapped:
    """What every wrapped model shares: its sites by name and the ``use`` block."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter):
        self.model, self.adapter = model, adapter
        self.sites: list[AttentionSite] = adapter.sites(model)
        register_sites(self.sites)

    @property
    def family(self) -> str:
        return self.adapter.family

    def site(self, name: str | AttentionSite) -> AttentionSite:
        if isinstance(name, AttentionSite):
            return name
        for site in self.sites:
            if site.name == name:
                return site
        self._refuse_no_attention(name)
        indices: dict[str, list[int]] = {}
        for s in self.sites:
            prefix, index = s.name.rsplit(".", 1)
            indices.setdefault(prefix, []).append(int(index))
        raise LookupError(f"vlmtools: no site {name!r} in {self.family}; sites are "
                          + ", ".join(_named(p, found) for p, found in sorted(indices.items())))

    def _refuse_no_attention(self, name: str) -> None:
        """``UnsupportedModel`` with the family's reason for a decoder layer that has no attention."""

    def _installed(self, plan: Plan) -> AbstractContextManager:
        """What routes this model's planned attention through the seam while ``plan`` is open."""
        raise NotImplementedError

    @contextmanager
    def use(self, *interventions: Intervention) -> Iterator[Trace]:
        """Run the block with the interventions' hooks active; yields the trace.

        Everything is undone on exit, also when the block raises. A planned site that
        never ran is an error (a silent no-op would look like a result).
        """
        plan = Plan(parent=ACTIVE_PLAN.get())
        for intervention in interventions:
            intervention.attach(self, plan)
        with self._installed(plan), activate(plan):
            try:
                yield plan.trace
            except StopForward:
                return
        unfired = plan.unfired()
        if unfired:
            raise RuntimeError(f"vlmtools: planned sites never ran in this block: {unfired}")


class WrappedModel(Wrapped):
    """A Hugging Face model plus its adapter. The model itself is not modified.

    >>> vlm = vlmtools.wrap(model, processor)
    >>> with vlm.use(vlmtools.RecordRows(["text.2"])) as trace:
    ...     model(**inputs)
    """

    def __init__(self, model: torch.nn.Module, adapter: Adapter, processor: Any = None):
        check_implementations(model, adapter.config_keys)  # an attention implementation the seam serves, or why not
        super().__init__(model, adapter)
        self.processor = processor
        self.layers: list[torch.nn.Module] = adapter.blocks(model, "text")
        letterboxes = bool(getattr(getattr(processor, "image_processor", None), "do_pad", False))
        self.letterbox_tower: torch.nn.Module | None = (
            model.get_submodule(adapter.vision_tower) if letterboxes and adapter.letterbox else None)
        """Where the pixels of a letterboxing processor's images are read (the layout flags their padding)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_kinds(self) -> list[str]:
        """Each decoder layer's token mixer: ``attention``, ``gated_attention`` or ``linear`` (no attention map,
        no site; Qwen3.5's Gated DeltaNet layers), from the family's adapter."""
        return self.adapter.kinds(self.model)

    @property
    def attention_layers(self) -> list[int]:
        """Decoder layers with softmax attention, each a site ``text.{i}`` (every layer but in hybrid families)."""
        return [i for i, kind in enumerate(self.layer_kinds) if kind != "linear"]

    @property
    def gated_layers(self) -> list[int]:
        """Decoder layers whose attention output a sigmoid gate scales (Qwen3.5's full-attention layers)."""
        return [i for i, kind in enumerate(self.layer_kinds) if kind == "gated_attention"]

    def _refuse_no_attention(self, name: str) -> None:
        stream, _, index = name.rpartition(".")
        if stream == "text" and index.isdigit() and int(index) < self.num_layers \
                and self.layer_kinds[int(index)] == "linear":
            raise UnsupportedModel(
                f"vlmtools: {self.family}: {name} has no attention map to read or edit ({self.adapter.no_attention}); "
                f"its attention layers are {', '.join(f'text.{i}' for i in self.attention_layers)}")

    def layout(self, inputs: dict[str, Any]) -> TokenLayout:
        """Where visual, text, padding and layout tokens sit in this batch (with each image's
        letterbox padding when the processor letterboxes and ``inputs`` hold the pixels)."""
        layout = self.adapter.layout(self.model, inputs)
        if self.letterbox_tower is not None and inputs.get("pixel_values") is not None:
            layout.flag_letterbox(self.adapter.letterbox(self.model, inputs["pixel_values"]).cpu())
        return layout

    def see_inputs(self, plan: Plan, kwargs: dict[str, Any]) -> None:
        """Called by the seam on every top-level forward: track prompt layout and step."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5
        fresh = cache is None or cache.get_seq_length() == 0
        plan.state.cache = cache
        if fresh:
            plan.state.layout = self.layout(kwargs)
            plan.state.input_ids = input_ids
            plan.state.step = 0
            plan.state.kept_keys = {}  # a token drop records this prompt's kept positions layer by layer
            if self.letterbox_tower is not None:
                self._letterbox_before(plan.state, kwargs)
        else:
            plan.state.step += 1

    @staticmethod
    def _letterbox_before(state, kwargs: dict[str, Any]) -> None:
        """A prompt given its pixels has its letterbox flags (``layout``) and the tower will see those
        pixels inside this forward; without them (``generate`` encodes the images before the prefill)
        the flags are those of the tower's run just before."""
        state.pixels_pending = kwargs.get("pixel_values") is not None
        if not state.pixels_pending and state.letterbox is not None:
            state.layout.flag_letterbox(state.letterbox)
        state.letterbox = None

    def see_pixels(self, plan: Plan, pixel_values: torch.Tensor) -> None:
        """Called by the seam before the vision tower runs, when the processor letterboxes."""
        if plan.state.pixels_pending:
            plan.state.pixels_pending = False
        else:
            plan.state.letterbox = self.adapter.letterbox(self.model, pixel_values).cpu()

    @contextmanager
    def _installed(self, plan: Plan) -> Iterator[None]:
        with installed(self.model, self.adapter.config_keys, self.layers, self), ExitStack() as stack:
            for add in self.adapter.residual_adds:  # a token drop hands them the tokens still present
                stack.enter_context(residual_add_gathered(self.model, add))
            yield


class WrappedDiT(Wrapped):
    """A diffusers diffusion transformer (FLUX, SD3) plus its adapter. The model itself is not modified.

    >>> dit = vlmtools.wrap(flux_pipeline)
    >>> joint = dit.layout(512, (64, 64))
    >>> with dit.use(vlmtools.RecordBlock(["dit.double.9"], joint.image.span, joint.text, mean_heads=True)) as trace:
    ...     flux_pipeline(prompt, num_inference_steps=1)
    """

    def layout(self, text_len: int, image_grid: tuple[int, int]) -> DiTLayout:
        """The text span and the image span with its (rows, cols) grid of one joint attention."""
        return DiTLayout.of(text_len, image_grid, self.adapter.image_first)

    def see_inputs(self, plan: Plan, kwargs: dict[str, Any]) -> None:
        """Called by the seam before every transformer call: the layout, and ``step`` counting calls."""
        if "hidden_states" not in kwargs or "encoder_hidden_states" not in kwargs:
            raise TypeError(f"vlmtools: call the {self.family} transformer with keyword arguments (hidden_states=..., "
                            "encoder_hidden_states=..., as diffusers pipelines do) inside a use block")
        plan.state.step = 0 if plan.state.layout is None else plan.state.step + 1
        plan.state.layout = self.layout(*self.adapter.sizes(self.model, kwargs))

    @contextmanager
    def _installed(self, plan: Plan) -> Iterator[None]:
        planned = [site for site in self.sites if plan.attention_hooks(site.module)]
        with installed(self.model, (), (), self), probed(planned, self.adapter.probe):
            yield


def _named(prefix: str, indices: list[int]) -> str:
    """``text.0..text.3``, or each name when the indices have gaps (a hybrid family's attention layers)."""
    indices = sorted(indices)
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{prefix}.{indices[0]}..{prefix}.{indices[-1]}"
    return ", ".join(f"{prefix}.{i}" for i in indices)


def check_processor(model: torch.nn.Module, processor: Any) -> None:
    """Raise ValueError when a transformers processor belongs to another kind of model than ``model``
    (the class transformers pairs with its ``model_type``, or a subclass), or its image token is not the
    model's: such a pair fails later, far from the cause. Processors of other kinds are not checked."""
    from transformers import ProcessorMixin
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if not isinstance(processor, ProcessorMixin):
        return
    expected = PROCESSOR_MAPPING_NAMES.get(model.config.model_type)
    names = [cls.__name__ for cls in type(processor).__mro__]
    if expected and expected not in names:
        raise ValueError(f"vlmtools: a {names[0]} does not go with {type(model).__name__}, whose processor is a "
                         f"{expected}: load the processor from the model's own folder")
    ids = getattr(processor, "image_token_id", None), getattr(model.config, "image_token_id", None)
    if None not in ids and ids[0] != ids[1]:
        raise ValueError(f"vlmtools: the processor's image token id {ids[0]} is not the model's ({ids[1]}): "
                         "load the processor from the model's own folder")


def wrap(model: Any, processor: Any = None) -> Wrapped:
    """Wrap a transformers VLM, or a diffusers DiT or its pipeline; raises ``UnsupportedModel`` (a
    ``TypeError``) if unsupported, ``ValueError`` for another model's processor (``check_processor``).

    >>> vlm = vlmtools.wrap(model, processor)       # LLaVA, LLaVA-NeXT, Qwen2-VL, ...
    >>> dit = vlmtools.wrap(flux_pipeline)          # its .transformer
    """
    if not isinstance(model, torch.nn.Module) and isinstance(getattr(model, "transformer", None), torch.nn.Module):
        model = model.transformer
    adapter = find_adapter(model)
    if adapter.kind == "dit":
        if processor is not None:
            raise TypeError(f"vlmtools: a {adapter.family} transformer takes no processor; wrap(transformer) alone")
        return WrappedDiT(model, adapter)
    check_processor(model, processor)
    return WrappedModel(model, adapter, processor)
