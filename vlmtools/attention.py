"""The one attention seam: the user's kernel everywhere, an explicit path only where planned.

Routing. transformers dispatches attention through a registry keyed by
``config._attn_implementation``. For each implementation it serves (:data:`SERVED`)
the seam registers one name, ``"vlmtools:<implementation>"`` (:func:`seam_name`), twice:
a function with ``AttentionInterface`` and that implementation's own mask builder with
``AttentionMaskInterface``, so transformers builds the mask the implementation reads
(4-D float for eager, 4-D boolean or none for SDPA, a ``BlockMask`` for flex, the 2-D
padding mask or none for FlashAttention, which then runs padding-free / varlen; without
a mask function the causal mask would silently disappear). While at least one ``use``
block is open on a model, each of its text and vision sub-configs names the seam of the
implementation it was loaded with. The function looks up the active
:class:`~vlmtools.plan.Plan` (a context variable) and

* for every module nobody planned in the calling thread (so also for every call of a
  thread outside any block) calls the loaded implementation's function from transformers'
  registry (eager: the one of the module's own modeling file) with the arguments and mask
  as given: the plain model, bit for bit;
* for a planned module, runs that same kernel for the fused output, then recomputes, in
  fp32, only the query rows some hook asked for (chunked when all rows are asked for, so
  no ``L x L`` tensor is ever held), with the visibility of those rows taken from what the
  kernel was given (the 4-D mask's rows; the ``BlockMask``'s ``mask_mod`` on those rows;
  causality, the padding mask and the cumulative lengths of FlashAttention), lets hooks
  edit and record them, and writes back the rows that were edited. Hooks read that
  visibility through ``call.visible_rows(rows)``. A hook's fixed additive logit bias
  (``logit_bias``) goes into the kernel itself where it takes one (SDPA and flex through
  transformers' ``position_bias``, eager through its float mask), so a method that only
  biases logits (ZeroTuning) keeps the fused kernel; FlashAttention takes none, and there
  every row of the call takes the explicit path.

Any other implementation (``paged|eager``, a kernel from the Hub, one a user registered)
is refused at ``wrap`` and at ``use`` (:class:`~vlmtools.adapters.base.UnsupportedModel`
naming it and the served ones): the seam never switches a kernel silently.

diffusers processors reuse :func:`run_planned` (see ``vlmtools.adapters.dit``).

Lifetimes. :func:`installed` switches the sub-configs and adds the decoder-layer
pre-hooks on first entry and restores both on last exit (reference-counted per model,
so two threads may each hold their own plan on one model); everything is undone in
``finally`` blocks, also when the forward raises.

``torch.compile``: the context-variable lookup is a Python call, so a compiled model
graph-breaks at planned sites; unplanned sites trace to the loaded kernel.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .adapters.base import UnsupportedModel
from .plan import ACTIVE_PLAN, ALL, AttentionCall, AttentionHook, AttentionSite, Plan

SEAM = "vlmtools"
"""Prefix of the names the seam registers: ``"vlmtools:sdpa"`` stands for SDPA inside a block."""
SERVED = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
"""The attention implementations a model may be loaded with to be wrapped."""
CHUNK_BYTES = 32 * 2**20  # fp32 logits held at once by the explicit path


def seam_name(implementation: str) -> str:
    """The name a sub-config loaded with ``implementation`` carries inside a ``use`` block."""
    return f"{SEAM}:{implementation}"


def loaded_implementation(name: str | None) -> str | None:
    """The implementation behind a config's ``_attn_implementation`` (the loaded one inside a block)."""
    return name.removeprefix(f"{SEAM}:") if isinstance(name, str) else name


def run_planned(call: AttentionCall, hooks: Sequence[AttentionHook], fused: Callable[[], torch.Tensor] | None,
                biased: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Attention output ``(B, H, Lq, D)`` for a planned call.

    ``fused()`` computes the unedited output with the fast kernel; it is skipped when the hooks edit every row
    anyway. ``biased(bias)`` computes it with the hooks' summed :meth:`~vlmtools.plan.AttentionHook.logit_bias`
    added inside that kernel, or returns None where the kernel cannot take it; then every row takes the
    explicit path, as it does without ``biased``.
    """
    for hook in hooks:
        hook.observe(call)
    bias = _logit_bias(hooks, call)
    wanted = [(hook, rows) for hook in hooks if (rows := hook.rows(call)) is not None]
    editing_all = any(hook.edits and rows is ALL for hook, rows in wanted)
    q = call.query
    out = None
    if fused is not None and not editing_all:
        out = fused() if bias is None else biased(bias) if biased is not None else None
    rewrite = bias is not None and out is None  # the bias is added on the explicit path, to every row
    if out is None:
        out = q.new_empty(*q.shape[:3], call.value.shape[-1])
    if not wanted and not rewrite:
        return out
    key_t = call.key.float().transpose(-1, -2)
    value = call.value.float()
    for group in _row_groups(wanted + [(None, ALL)] * rewrite, call):
        whole = group.numel() == call.q_len  # every row in one chunk (a decoding step): no row copies
        logits = (q if whole else q.index_select(2, group)).float() @ key_t
        logits.mul_(call.scaling)
        if bias is not None:
            logits += bias if bias.shape[-2] == 1 else bias.index_select(-2, group)
        visible = call.visible_rows(group)
        if visible is not None:
            logits.masked_fill_(~visible, torch.finfo(logits.dtype).min)
        selected = [(hook, pos) for hook, rows in wanted if (pos := _positions(group, rows)) is None or pos.numel()]
        edits_logits = False
        for hook, pos in selected:
            if hook.edits_logits:
                _put(logits, pos, hook.edit_logits(call, _take(group, pos, 0), _take(logits, pos)))
                edits_logits = True
        if edits_logits and visible is not None:  # an edit never makes a hidden key visible (a window, padding)
            logits.masked_fill_(~visible, torch.finfo(logits.dtype).min)
        probs = _softmax_(logits)
        for hook, pos in selected:
            if hook.edits_probs:
                _put(probs, pos, hook.edit_probs(call, _take(group, pos, 0), _take(probs, pos)))
        for hook, pos in selected:
            hook.record(call, _take(group, pos, 0), _take(probs, pos))
        edited = [pos for hook, pos in selected if hook.edits] + [None] * rewrite
        if edited:
            pos = None if any(p is None for p in edited) else torch.unique(torch.cat(edited))
            if whole and pos is None:
                out = (probs @ value).to(out.dtype)
            else:
                out[:, :, _take(group, pos, 0)] = (_take(probs, pos) @ value).to(out.dtype)
    return out


def _logit_bias(hooks: Sequence[AttentionHook], call: AttentionCall) -> torch.Tensor | None:
    """The hooks' additive logit biases summed (fp32, broadcastable to ``(B, H, Lq, Lk)``), or None."""
    biases = [bias.float() for hook in hooks if (bias := hook.logit_bias(call)) is not None]
    return functools.reduce(torch.add, biases) if biases else None


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place (the explicit path holds one logits buffer per chunk)."""
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(-1, keepdim=True))


def _row_groups(wanted, call: AttentionCall) -> Iterator[torch.Tensor]:
    device = call.query.device
    if any(rows is ALL for _, rows in wanted):
        rows = torch.arange(call.q_len, device=device)
    else:
        rows = torch.unique(torch.cat([r.to(device).flatten() for _, r in wanted]))
    batch, heads = call.query.shape[:2]
    # a logits chunk never outgrows the keys and values themselves (nor CHUNK_BYTES)
    budget = min(CHUNK_BYTES, max(2**20, 4 * call.key.numel() + 4 * call.value.numel()))
    chunk = max(1, budget // (4 * batch * heads * call.k_len))
    yield from rows.split(chunk)


def _positions(group: torch.Tensor, rows) -> torch.Tensor | None:
    """Where ``rows`` sit in ``group``; None means all of the group (no copy needed)."""
    if rows is ALL:
        return None
    pos = torch.isin(group, rows.to(group.device)).nonzero().squeeze(1)
    return None if pos.numel() == group.numel() else pos


def _take(t: torch.Tensor, pos: torch.Tensor | None, dim: int = 2) -> torch.Tensor:
    return t if pos is None else t.index_select(dim, pos)


def _put(t: torch.Tensor, pos: torch.Tensor | None, value: torch.Tensor) -> None:
    if pos is None:
        if value is not t:
            t.copy_(value)
    else:
        t[:, :, pos] = value


def visibility(mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean visibility from a dense mask as eager or SDPA get it (bool mask, float mask or None)."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        # SDPA's is_causal aligns the upper-left corner: query i sees keys 0..i
        return (torch.arange(q_len, device=device)[:, None] >= torch.arange(k_len, device=device))[None, None]
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        return mask
    lowest = torch.finfo(mask.dtype).min / 2
    if ((mask != 0) & (mask > lowest)).any():
        raise NotImplementedError("vlmtools: additive attention biases (e.g. ALiBi) are not supported on planned layers")
    return mask > lowest


RowsVisible = Callable[[torch.Tensor], "torch.Tensor | None"]
"""``rows -> (B|1, 1, len(rows), Lk)`` boolean visibility of those query rows, or None (all visible)."""


@dataclass
class KernelCall(AttentionCall):
    """An :class:`AttentionCall` whose visibility is computed for the rows asked (``visible_rows``)
    from what the kernel was given, where no dense mask exists: flex's ``BlockMask``, FlashAttention's
    causality, padding mask and cumulative lengths. ``visible`` is then None; read ``visible_rows``."""

    rows_visible: RowsVisible | None = None

    def visible_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        if self.rows_visible is None:
            return super().visible_rows(rows)
        return self.rows_visible(rows)


def block_mask_rows(block_mask) -> RowsVisible:
    """Visibility of some query rows from a flex ``BlockMask``: its ``mask_mod`` evaluated on those rows
    only, on broadcast index tensors as transformers' own non-vmap mask expansion does, or (a ``mask_mod``
    written for vmap only) vmapped as transformers' vmap expansion does."""
    batch = block_mask.shape[0]
    k_len = block_mask.seq_lengths[1]

    def rows_visible(rows: torch.Tensor) -> torch.Tensor:
        indices = (torch.arange(batch, device=rows.device), torch.zeros(1, dtype=torch.long, device=rows.device),
                   rows, torch.arange(k_len, device=rows.device))
        shape = (batch, 1, rows.numel(), k_len)
        try:
            visible = block_mask.mask_mod(*(i.view([-1 if d == n else 1 for d in range(4)])
                                            for n, i in enumerate(indices)))
            if visible.dim() <= 4:
                return visible.expand(shape)
        except (RuntimeError, IndexError, TypeError):
            pass
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
        from transformers.masking_utils import _vmap_expansion_sdpa

        with TransformGetItemToIndex():
            return _vmap_expansion_sdpa(block_mask.mask_mod)(*indices).expand(shape)

    return rows_visible


def flash_rows(padding: torch.Tensor | None, q_len: int, k_len: int, causal: bool, window: int | None = None,
               cu_q: torch.Tensor | None = None, cu_k: torch.Tensor | None = None) -> RowsVisible | None:
    """Visibility of some query rows as FlashAttention computes them, or None when every key is visible.

    ``padding``: the ``(B, Lk)`` boolean mask FlashAttention unpads with (None: no padding); causal
    attention aligns the bottom-right corner (query i sees keys up to ``i + Lk - Lq``); ``window``:
    the sliding window (flash's ``window_size = (w - 1, w - 1)``); ``cu_q`` / ``cu_k``: cumulative
    lengths of sequences packed in one row (varlen), each attending only within itself.
    """
    window = window if window is not None and k_len > window else None
    if padding is None and cu_q is None and window is None and (not causal or q_len == 1):
        return None

    def rows_visible(rows: torch.Tensor) -> torch.Tensor:
        keys = torch.arange(k_len, device=rows.device)
        visible = torch.ones(rows.numel(), k_len, dtype=torch.bool, device=rows.device)
        if cu_q is not None:
            starts_q, starts_k = cu_q.long(), cu_k.long()
            seq_q = torch.searchsorted(starts_q, rows, right=True) - 1
            seq_k = torch.searchsorted(starts_k, keys, right=True) - 1
            visible &= seq_q[:, None] == seq_k[None]
            shift = (starts_k.diff() - starts_q.diff())[seq_q.clamp(max=len(starts_q) - 2)]
            ahead = (rows - starts_q[seq_q] + shift)[:, None] - (keys - starts_k[seq_k])[None]
        else:
            ahead = rows[:, None] + (k_len - q_len) - keys[None]  # how far the query is past the key
        if causal:
            visible &= ahead >= 0
        if window is not None:
            visible &= (ahead < window) & (ahead > -window)
        visible = visible[None, None]
        if padding is not None:
            visible = visible & padding[:, None, None, :k_len].bool()
        return visible

    return rows_visible


@functools.cache
def _eager_function(cls: type) -> Callable:
    """The eager attention function of ``cls``'s modeling file: what transformers calls for "eager"."""
    function = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
    if function is None:
        raise UnsupportedModel(f"vlmtools: {cls.__name__} ({cls.__module__}) defines no eager_attention_forward, so "
                               f"the seam cannot call its eager attention; load the model with one of "
                               f"{', '.join(s for s in SERVED if s != 'eager')}")
    return function


def _kernel(implementation: str, module) -> Callable:
    """The function transformers calls for ``implementation`` on ``module``."""
    return _eager_function(type(module)) if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


class _ConfigAs:
    """A module's config that names the implementation the model was loaded with."""

    def __init__(self, config, implementation: str):
        self._config, self._attn_implementation = config, implementation

    def __getattr__(self, name):
        return getattr(self._config, name)


class _AsLoaded:
    """An attention module as the kernel of its loaded implementation sees it: transformers'
    FlashAttention function loads its kernel by the name in ``module.config._attn_implementation``,
    which names the seam inside a block."""

    def __init__(self, module, implementation: str):
        self._module, self.config = module, _ConfigAs(module.config, implementation)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _seam_function(implementation: str) -> Callable:
    """The attention function registered as :func:`seam_name` of ``implementation``."""
    flash = "flash" in implementation

    def seam_attention(module, query, key, value, attention_mask, *args, **kwargs):
        kernel = _kernel(implementation, module)
        as_loaded = _AsLoaded(module, implementation) if flash else module
        plan = ACTIVE_PLAN.get()
        hooks = plan.attention_hooks(module) if plan is not None else ()
        if not hooks:
            return kernel(as_loaded, query, key, value, attention_mask, *args, **kwargs)
        plan.mark_fired(module)
        given = _arguments(kernel, as_loaded, query, key, value, attention_mask, args, kwargs)
        for name in ("softcap", "s_aux", "position_bias"):
            if given.get(name) is not None:
                raise NotImplementedError(f"vlmtools: {name} is not supported on planned layers "
                                          f"({type(module).__name__} under {implementation})")

        def fused():
            out, _ = kernel(as_loaded, query, key, value, attention_mask, *args, **kwargs)
            return out.transpose(1, 2)

        def biased(bias):
            mask = _mask_with_bias(implementation, attention_mask, bias.to(query.dtype), query, key)
            if mask is None:
                return None
            bias_kwargs = {"position_bias": mask[1]} if mask[1] is not None else {}
            out, _ = kernel(as_loaded, query, key, value, mask[0], *args, **{**kwargs, **bias_kwargs})
            return out.transpose(1, 2)

        n_rep = query.shape[1] // key.shape[1]
        causal = given.get("is_causal")
        causal = causal if causal is not None else getattr(module, "is_causal", True)
        call = KernelCall(
            site=_site_of(module),
            query=query,
            key=repeat_kv(key, n_rep),
            value=repeat_kv(value, n_rep),
            visible=None,
            scaling=given.get("scaling") or query.shape[-1] ** -0.5,
            kv_heads=key.shape[1],
        )
        _set_visibility(call, implementation, attention_mask, causal, given)
        out = run_planned(call, hooks, fused, biased)
        return out.transpose(1, 2).contiguous(), None

    seam_attention.__name__ = seam_attention.__qualname__ = f"seam_attention_{implementation}"
    return seam_attention


def _mask_with_bias(implementation: str, mask, bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
    """``(mask, position_bias)`` that make ``implementation``'s kernel add ``bias`` to its logits, or None where it
    cannot: FlashAttention takes no bias, and SDPA's and eager's combined float mask ``(B, H, Lq, Lk)`` is
    materialised, so a larger one than the explicit path's chunk (:data:`CHUNK_BYTES`) goes there instead.

    SDPA and flex take transformers' own ``position_bias`` (combined there with the mask and causality; flex reads
    it per score); eager, which has no such argument, gets the bias added to its float mask.
    """
    if "flash" in implementation:
        return None
    batch, heads, q_len, _ = query.shape
    bias = bias.expand(max(batch, bias.shape[0]), heads, q_len, key.shape[2])
    if implementation == "flex_attention":
        return mask, bias
    if bias.numel() * bias.element_size() > CHUNK_BYTES:
        return None
    if implementation == "sdpa":
        return (mask[..., :key.shape[2]] if isinstance(mask, torch.Tensor) else mask), bias
    if mask is None:
        return bias.contiguous(), None
    mask = mask[..., :key.shape[2]]
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(bias.dtype).min), None
    return mask + bias, None


def _arguments(kernel, module, query, key, value, attention_mask, args, kwargs) -> dict:
    """The kernel's arguments by name (transformers passes them by keyword; a positional one is bound)."""
    if not args:
        return kwargs
    bound = inspect.signature(kernel).bind(module, query, key, value, attention_mask, *args, **kwargs).arguments
    return {**bound.pop("kwargs", {}), **bound}


def _set_visibility(call: KernelCall, implementation: str, mask, causal: bool, given: dict) -> None:
    """What the planned rows may see: as the kernel was told, in the form each implementation is told it."""
    q_len, k_len, device = call.q_len, call.k_len, call.query.device
    if "flash" in implementation:
        cu_q, cu_k = (None, None) if mask is not None else (given.get("cu_seq_lens_q"), given.get("cu_seq_lens_k"))
        positions = given.get("position_ids")
        if mask is None and cu_q is None and _is_packed_sequence(positions, call.query.shape[0]):
            (cu_q, cu_k), _ = prepare_fa_kwargs_from_position_ids(positions)
        call.rows_visible = flash_rows(mask, q_len, k_len, causal, given.get("sliding_window"), cu_q, cu_k)
    elif mask is not None and not isinstance(mask, torch.Tensor):  # flex's BlockMask
        call.rows_visible = block_mask_rows(mask)
    elif implementation == "flex_attention":
        call.visible = visibility(mask, q_len, k_len, False, device)  # no BlockMask: every key (or a score mask)
    else:
        call.visible = visibility(mask, q_len, k_len, causal and implementation == "sdpa", device)


def _mask_function(implementation: str) -> Callable:
    """The mask builder registered as :func:`seam_name` of ``implementation``: that implementation's own
    (looked up at each call, so a mask function registered later for it is the one used)."""
    def mask(*args, **kwargs):
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](*args, **kwargs)
    return mask


for _implementation in SERVED:
    AttentionInterface.register(seam_name(_implementation), _seam_function(_implementation))
    AttentionMaskInterface.register(seam_name(_implementation), _mask_function(_implementation))


def check_implementations(model, config_keys: Sequence[str]) -> dict[str, str]:
    """Each sub-config's loaded attention implementation, by config key (``""``: the top-level config).

    Raises :class:`UnsupportedModel` for one the seam does not serve, naming it and :data:`SERVED`, and for a
    language model's implementation that the model's class tells transformers it does not support (a config
    switched directly, past transformers' own check at loading): Gemma 3 under FlashAttention, which drops its
    bidirectional mask over image tokens.
    """
    found = {}
    for key in config_keys:
        name = loaded_implementation(_config(model, key)._attn_implementation)
        where = f"its {key}" if key else "it"
        if name not in SERVED:
            raise UnsupportedModel(
                f"vlmtools: {type(model).__name__} runs attn_implementation={name!r} for {where}, which the seam "
                f"does not serve (served: {', '.join(SERVED)}); load the model with one of those, or call "
                f"model.set_attn_implementation(...) before wrapping it")
        flag = _SUPPORTS.get(name.split("_attention")[0] if "flash" in name else name)
        if key == "text_config" and flag is not None and getattr(type(model), flag, True) is False:
            raise UnsupportedModel(
                f"vlmtools: {type(model).__name__} runs attn_implementation={name!r} for {where}, which its class "
                f"does not support ({flag} = False: transformers refuses to load it so; Gemma 3's FlashAttention "
                f"would drop the bidirectional mask over image tokens); use sdpa, eager or flex_attention")
        found[key] = name
    return found


_SUPPORTS = {"flash": "_supports_flash_attn", "flex_attention": "_supports_flex_attn", "sdpa": "_supports_sdpa"}
"""An implementation (FlashAttention of every version as one) -> the class flag transformers reads at loading."""

_SITES: "weakref.WeakKeyDictionary[torch.nn.Module, AttentionSite]" = weakref.WeakKeyDictionary()


def register_sites(sites: Sequence[AttentionSite]) -> None:
    """Let the seam name the modules it is called from (processors cannot know their layer)."""
    for site in sites:
        _SITES[site.module] = site


def _site_of(module) -> AttentionSite:
    try:
        return _SITES[module]
    except KeyError:
        raise LookupError(f"vlmtools: planned module {type(module).__name__} is not a registered site; "
                          "plan sites obtained from vlm.sites") from None


class _Installation:
    def __init__(self, model, config_keys: Sequence[str], layers: Sequence[torch.nn.Module], watcher):
        self.model, self.config_keys, self.layers, self.watcher = model, tuple(config_keys), tuple(layers), watcher
        self.count = 0
        self.original: dict[str, str] = {}
        self.handles = []

    def enter(self):
        if self.count == 0:
            try:
                # diffusers models have no config keys (no registry): their probes are processors
                self.original = check_implementations(self.model, self.config_keys)
                for key, implementation in self.original.items():
                    # the sub-config alone, unchecked: the seam's name stands for the implementation transformers
                    # checked when the model was loaded (set_attn_implementation would load a flash kernel by it)
                    _config(self.model, key)._attn_implementation_internal = seam_name(implementation)
                for index, layer in enumerate(self.layers):
                    self.handles.append(layer.register_forward_pre_hook(_layer_prehook(index), with_kwargs=True))
                if self.watcher is not None:
                    self.handles.append(self.model.register_forward_pre_hook(_inputs_prehook(self.watcher),
                                                                             with_kwargs=True))
                    tower = getattr(self.watcher, "letterbox_tower", None)
                    if tower is not None:
                        self.handles.append(tower.register_forward_pre_hook(_pixels_prehook(self.watcher),
                                                                            with_kwargs=True))
            except BaseException:
                self.restore()
                raise
        self.count += 1

    def exit(self):
        self.count -= 1
        if self.count == 0:
            self.restore()

    def restore(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for key, implementation in self.original.items():
            _config(self.model, key)._attn_implementation_internal = implementation
        self.original = {}


def _config(model, key: str):
    return model.config if key == "" else getattr(model.config, key)


def _layer_prehook(index: int):
    def prehook(module, args, kwargs):
        plan = ACTIVE_PLAN.get()
        hooks = plan.layer_hooks(module) if plan is not None else ()
        if not hooks:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        for _, hook in hooks:
            replaced = hook.before_layer(index, hidden, kwargs)
            if replaced is not None:
                hidden, kwargs = replaced
        return ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
    return prehook


def _inputs_prehook(watcher):
    def prehook(module, args, kwargs):
        plan = ACTIVE_PLAN.get()
        if plan is not None:
            watcher.see_inputs(plan, kwargs)
    return prehook


def _pixels_prehook(watcher):
    def prehook(module, args, kwargs):
        plan = ACTIVE_PLAN.get()
        if plan is not None:
            watcher.see_pixels(plan, args[0] if args else kwargs["pixel_values"])
    return prehook


_INSTALLS: "weakref.WeakKeyDictionary[torch.nn.Module, _Installation]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@contextmanager
def installed(model, config_keys: Sequence[str], layers: Sequence[torch.nn.Module], watcher=None):
    """Route ``model``'s attention through the seam for the duration of the block.

    ``watcher.see_inputs(plan, kwargs)`` is called before every top-level forward, and
    ``watcher.see_pixels(plan, pixel_values)`` before every call of ``watcher.letterbox_tower``
    when the watcher has one.
    """
    with _LOCK:
        inst = _INSTALLS.setdefault(model, _Installation(model, config_keys, layers, watcher))
        inst.enter()
    try:
        yield
    finally:
        with _LOCK:
            inst.exit()
            if inst.count == 0:  # the next block installs anew, with its own watcher
                del _INSTALLS[model]


@contextmanager
def activate(plan: Plan) -> Iterator[Plan]:
    """Make ``plan`` the active plan of this thread / task for the block."""
    token = ACTIVE_PLAN.set(plan)
    try:
        yield plan
    finally:
        ACTIVE_PLAN.reset(token)
