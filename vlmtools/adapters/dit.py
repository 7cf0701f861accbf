"""The diffusers side of the seam: DiT adapters and probe processors.

diffusers calls ``attn.processor(attn, hidden_states, ...)``, and a processor cannot
know which layer it serves. So a :class:`Probe` is one small stateless callable per
planned attention module, carrying that module's site and the processor it replaces.

Routing. :func:`probed` sets probes with ``module.set_processor`` on the planned
modules only; every other module keeps its processor (and so diffusers' attention
dispatcher) untouched. At each call a probe looks up the active plan: with no hook
for its module in this context (another thread's plan, an outer block) it hands
the call to the original processor unchanged; otherwise it computes q/k/v exactly as
that processor does, runs :func:`~vlmtools.attention.run_planned` with the same fused
kernel, and finishes (output projections, text/image split) exactly as it does.

Lifetimes. Probes are reference-counted per module, so nested ``use`` blocks and
threads compose; the original processor is restored when the last block exits,
also when the forward raises, and a failure half-way through installing rolls
back what was set.

Where the text is. Most families attend jointly over one sequence of text and image
tokens (FLUX, FLUX.2, Qwen-Image text first; SD3, Mochi image first). Wan reaches the
text by cross-attention: its blocks' self-attention sees only the video tokens and
their cross-attention has the video tokens as queries and only the text as keys. Its
layout is then the *virtual* joint sequence ``[video, text]`` (image first), and each
site says what its keys are (:attr:`DiTSite.keys`): ``joint`` (key ``k`` is position
``k`` of the layout), ``image`` (only the image / video: key ``k`` is image position
``layout.image.span.start + k``, Wan's self-attention) or ``text`` (key ``k`` is text position
``layout.text.start + k``, Wan's cross-attention). Queries are positions of the layout from 0 on.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from ..attention import run_planned, visibility
from ..plan import ACTIVE_PLAN, AttentionCall, AttentionHook, AttentionSite
from .base import Adapter
from .dit_source import Source

Sizes = Callable[[Any, dict[str, Any]], tuple[int, tuple[int, int]]]
Keys = Literal["joint", "text", "image"]


class Probe:
    """Base of the family probes; subclasses define ``__call__`` with the original's signature.

    diffusers filters a processor's keyword arguments by its ``__call__`` signature,
    so each subclass repeats the signature of the processor it ``replaces``.
    """

    replaces: tuple[type, ...] = ()

    def __init__(self, site: AttentionSite, original: Callable):
        self.site, self.original = site, original

    def hooks(self) -> list[AttentionHook]:
        """The active plan's hooks for this module (marking it fired), or [] to run the original."""
        plan = ACTIVE_PLAN.get()
        hooks = plan.attention_hooks(self.site.module) if plan is not None else []
        if hooks:
            plan.mark_fired(self.site.module)
        return hooks

    def attend(self, hooks, query, key, value, mask, fused: Callable[[], torch.Tensor]) -> torch.Tensor:
        """:func:`run_planned` on ``(B, H, L, D)`` tensors; ``fused()`` returns the kernel's output so laid out."""
        call = AttentionCall(site=self.site, query=query, key=key, value=value,
                             visible=visibility(mask, query.shape[2], key.shape[2], False, query.device),
                             scaling=query.shape[-1] ** -0.5, kv_heads=key.shape[1])
        return run_planned(call, hooks, fused)


@dataclass(frozen=True)
class DiTSite(AttentionSite):
    """A DiT's attention site: ``keys`` says what the call's keys are (``joint``: position ``k`` of the
    layout; ``image``: image position ``layout.image.span.start + k``, a video self-attention without the
    text; ``text``: text position ``layout.text.start + k``, a cross-attention), ``block`` the path
    of the block holding the module (a Wan block's self- and cross-attention share it), ``probe`` the
    :class:`Probe` subclass set on the module when it is planned (None: the adapter's)."""

    keys: Keys = "joint"
    block: str = ""
    probe: type[Probe] | None = field(default=None, compare=False, repr=False)

    def key_offset(self, layout) -> int:
        """Layout position of the call's key 0."""
        return {"text": layout.text.start, "image": layout.image.span.start}.get(self.keys, 0)


class Stream(NamedTuple):
    """One kind of site: ``dit.{name}.{i}`` is ``{path}[i].{attn}``; ``keys`` and ``probe`` as in :class:`DiTSite`.
    A plain ``(name, path)`` pair reads the adapter's ``attn`` and ``probe``."""

    name: str
    path: str
    attn: str | None = None
    keys: Keys = "joint"
    probe: type[Probe] | None = None


@dataclass(frozen=True)
class DiTAdapter(Adapter):
    """A diffusion transformer whose joint attention is probed through diffusers processors.

    ``streams`` pairs each site stream with the path of its blocks (sites are named
    ``dit.{stream}.{i}``, the attention module being ``block.{attn}``), or gives a
    :class:`Stream` (its own attention attribute, keys and probe); ``probe`` is
    the :class:`Probe` subclass set on planned modules; ``sizes(model, inputs)``
    reads ``(text_len, (rows, cols))`` from the transformer's keyword inputs (a video's
    latent frames stacked: ``(frames * rows, cols)``); ``frames(model, inputs)`` the number
    of latent frames of a video DiT (None: images);
    ``image_first`` orders the joint sequence (SD3, Mochi; Wan's virtual one), FLUX putting the text first.
    ``sources`` pairs class names (of the family's pipelines and of the bare transformer)
    with the :class:`~vlmtools.adapters.dit_source.Source` that reads them, ``source(model, **options)``.
    """

    kind: Literal["vlm", "dit"] = "dit"
    text_layers: str | None = None
    attn: str = "attn"
    config_keys: tuple[str, ...] = ()
    streams: tuple[tuple[str, str] | Stream, ...] = ()
    probe: type[Probe] = Probe
    sizes: Sizes | None = None
    frames: Callable[[Any, dict[str, Any]], int] | None = None
    image_first: bool = False
    sources: tuple[tuple[str, Callable[..., Source]], ...] = ()

    def sites(self, model: torch.nn.Module) -> list[DiTSite]:
        sites = []
        for stream in self.streams:
            stream = Stream(*stream)
            for index, block in enumerate(model.get_submodule(stream.path)):
                attn = getattr(block, stream.attn or self.attn)
                sites.append(DiTSite(name=f"dit.{stream.name}.{index}", stream="dit", index=index, module=attn,
                                     heads=attn.heads, kv_heads=attn.heads, head_dim=attn.inner_dim // attn.heads,
                                     keys=stream.keys, block=f"{stream.path}.{index}", probe=stream.probe))
        return sites


_PROBES: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()  # module -> [probe, count]
_LOCK = threading.Lock()


@contextmanager
def probed(sites: Sequence[AttentionSite], probe: type[Probe]) -> Iterator[None]:
    """Set a ``probe`` on each site's module for the block; restore the original processors after."""
    entered = []
    try:
        with _LOCK:
            for site in sites:
                _enter(site, probe)
                entered.append(site.module)
        yield
    finally:
        with _LOCK:
            for module in entered:
                _exit(module)


def _enter(site: AttentionSite, probe: type[Probe]) -> None:
    module = site.module
    probe = getattr(site, "probe", None) or probe
    entry = _PROBES.get(module)
    if entry is None:
        current = module.processor
        if type(current) not in probe.replaces:
            expected = "/".join(cls.__name__ for cls in probe.replaces)
            raise TypeError(f"vlmtools: {site.name} runs {type(current).__name__}, but its probe reproduces only "
                            f"{expected}; set that processor back on the module, or leave {site.name} unplanned")
        entry = _PROBES[module] = [probe(site, current), 0]
        _set_processor(module, entry[0])
    entry[1] += 1


def _exit(module: torch.nn.Module) -> None:
    entry = _PROBES[module]
    entry[1] -= 1
    if entry[1] == 0:
        _set_processor(module, entry[0].original)
        del _PROBES[module]


def _set_processor(module: torch.nn.Module, processor: Callable) -> None:
    """``set_processor`` where the module has it; Mochi's attention only holds a ``processor`` attribute."""
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor
