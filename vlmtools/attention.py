"""The one attention seam: fused kernel everywhere, an explicit path only where planned.

Routing. transformers dispatches attention through a registry keyed by
``config._attn_implementation``. We register one function under :data:`SEAM`
with ``AttentionInterface`` *and* the SDPA mask builder under the same name with
``AttentionMaskInterface`` (without the latter the causal mask silently
disappears). While at least one ``use`` block is open on a model, its text and
vision sub-configs point at :data:`SEAM`; the function looks up the active
:class:`~vlmtools.plan.Plan` (a context variable) and

* returns straight to transformers' own SDPA function for every module nobody
  planned (same kernel, same numerics);
* for a planned module, runs the fused kernel too and then recomputes, in fp32,
  only the query rows that some hook asked for (chunked when all rows are asked
  for, so no ``L x L`` tensor is ever held), lets hooks edit and record them, and
  writes back the rows that were edited.

diffusers processors reuse :func:`run_planned` (see ``vlmtools.adapters.dit``).

Lifetimes. :func:`installed` switches the implementation and adds the decoder-layer
pre-hooks on first entry and restores both on last exit (reference-counted per model,
so two threads may each hold their own plan on one model); everything is undone in
``finally`` blocks, also when the forward raises.

``torch.compile``: the context-variable lookup is a Python call, so a compiled model
graph-breaks at planned sites; unplanned sites trace to plain SDPA.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .plan import ACTIVE_PLAN, ALL, AttentionCall, AttentionHook, AttentionSite, Plan

SEAM = "vlmtools"
CHUNK_BYTES = 32 * 2**20  # fp32 logits held at once by the explicit path


def run_planned(call: AttentionCall, hooks: Sequence[AttentionHook], fused: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    """Attention output ``(B, H, Lq, D)`` for a planned call.

    ``fused`` computes the unedited output with the fast kernel; it is skipped when
    the hooks edit every row anyway.
    """
    for hook in hooks:
        hook.observe(call)
    wanted = [(hook, rows) for hook in hooks if (rows := hook.rows(call)) is not None]
    editing_all = any(hook.edits and rows is ALL for hook, rows in wanted)
    q = call.query
    if fused is not None and not editing_all:
        out = fused()
    else:
        out = q.new_empty(*q.shape[:3], call.value.shape[-1])
    if not wanted:
        return out
    key_t = call.key.float().transpose(-1, -2)
    value = call.value.float()
    for group in _row_groups(wanted, call):
        logits = q.index_select(2, group).float() @ key_t
        logits.mul_(call.scaling)
        visible = call.visible_rows(group)
        if visible is not None:
            logits.masked_fill_(~visible, torch.finfo(logits.dtype).min)
        selected = [(hook, pos) for hook, rows in wanted if (pos := _positions(group, rows)) is None or pos.numel()]
        for hook, pos in selected:
            if hook.edits_logits:
                _put(logits, pos, hook.edit_logits(call, _take(group, pos, 0), _take(logits, pos)))
        probs = _softmax_(logits)
        for hook, pos in selected:
            if hook.edits_probs:
                _put(probs, pos, hook.edit_probs(call, _take(group, pos, 0), _take(probs, pos)))
        for hook, pos in selected:
            hook.record(call, _take(group, pos, 0), _take(probs, pos))
        edited = [pos for hook, pos in selected if hook.edits]
        if edited:
            pos = None if any(p is None for p in edited) else torch.unique(torch.cat(edited))
            out[:, :, _take(group, pos, 0)] = (_take(probs, pos) @ value).to(out.dtype)
    return out


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
    """Boolean visibility from what transformers passes (bool mask, float mask or None)."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        # SDPA's is_causal aligns the upper-left corner: query i sees keys 0..i
        return (torch.arange(q_len, device=device)[:, None] >= torch.arange(k_len, device=device))[None, None]
    if mask.dtype == torch.bool:
        return mask
    lowest = torch.finfo(mask.dtype).min / 2
    if ((mask != 0) & (mask > lowest)).any():
        raise NotImplementedError("vlmtools: additive attention biases (e.g. ALiBi) are not supported on planned layers")
    return mask > lowest


def seam_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention function registered under :data:`SEAM`."""
    plan = ACTIVE_PLAN.get()
    hooks = plan.attention_hooks(module) if plan is not None else ()

    def fused():
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, is_causal=is_causal, **kwargs)
        return out.transpose(1, 2)

    if not hooks:
        return fused().transpose(1, 2), None
    plan.mark_fired(module)
    n_rep = query.shape[1] // key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    call = AttentionCall(
        site=_site_of(module),
        query=query,
        key=repeat_kv(key, n_rep),
        value=repeat_kv(value, n_rep),
        visible=visibility(attention_mask, query.shape[2], key.shape[2], causal, query.device),
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        kv_heads=key.shape[1],
    )
    out = run_planned(call, hooks, fused)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEAM, seam_attention)
AttentionMaskInterface.register(SEAM, sdpa_mask)

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
                self.original = {key: _config(self.model, key)._attn_implementation for key in self.config_keys}
                if self.config_keys:  # diffusers models have no registry: their probes are processors
                    self.model.set_attn_implementation(_impl_dict(self.config_keys, SEAM))
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
        if self.original:
            self.model.set_attn_implementation(self.original if self.config_keys != ("",) else self.original[""])
        self.original = {}


def _config(model, key: str):
    return model.config if key == "" else getattr(model.config, key)


def _impl_dict(keys, impl):
    return impl if tuple(keys) == ("",) else {key: impl for key in keys}


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
