"""ZeroTuning (Han et al., 2025, arXiv 2505.11739, "ZeroTuning: Unlocking the Initial Token's Power to Enhance
Large Language Models Without Training"): scale the attention to the initial token in chosen heads.

Why: the initial token is the model's main attention sink; multiplying its attention by ``gamma`` and
renormalising keeps the proportions among the other tokens and flattens (``gamma > 1``) or sharpens
(``gamma < 1``) them, and heads differ in which direction helps, so the heads come from a calibration
(:func:`tuning.calibrate`).

The released code (FeijiangHan/ZeroTuning, ``ZeroTuning_Attention``) multiplies column 0 of the post-softmax
map by ``gamma`` in the target (layer, head)s and divides each row by its new sum, on every forward (prefill
and decoding steps). That equals adding ``log(gamma)`` to the initial token's logit before the softmax:
``gamma a_0 / ((gamma - 1) a_0 + 1)`` either way. Here it is that bias (the seam's ``logit_bias``: the fused
kernel adds it, with no explicit attention map and no renormalisation pass; in bf16 the kernel adds it in bf16),
and the initial token is each sample's first real token by position (with left padding the first position that
is not padding; column 0 of the released code would be a pad there).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from vlmtools.plan import AttentionHook, key_positions

from .selection import HeadSelection, heads_source, resolve_heads


class ZeroTuning:
    """Initial-token attention times ``gamma`` in the heads of a calibration (or given).

    ``heads``: ``{layer: [head, ...]}`` or a :class:`~tuning.HeadSelection`; None loads the selection stored
    for the wrapped model (``directory``, default the calibration folder) and refuses when there is none.
    ``gamma`` > 0; None takes the selection's (a mapping of heads needs one). What a block ran with is
    ``trace[zt]`` (:class:`ZeroTuningRun`):

    >>> zt = ZeroTuning()                           # the heads and gamma tuning.calibrate stored
    >>> with vlm.use(zt) as trace:
    ...     out = model.generate(**inputs, max_new_tokens=8)
    >>> trace[zt].settings["gamma"], trace[zt].initial    # the factor, each sample's initial position
    """

    name = "zerotuning"

    def __init__(self, heads=None, gamma: float | None = None, directory: str | Path | None = None):
        if gamma is not None and not gamma > 0:
            raise ValueError(f"ZeroTuning gamma must be positive (1 changes nothing), got {gamma}")
        if gamma is None and heads is not None and not isinstance(heads, HeadSelection):
            raise ValueError("ZeroTuning(heads={...}) needs gamma (e.g. 1.5 to raise, 0.5 to lower the initial "
                             "token's attention)")
        self.heads, self.gamma, self.directory = heads, gamma, directory

    @property
    def settings(self) -> dict:
        return {"gamma": self.gamma}

    def with_heads(self, heads, gamma: float | None = None) -> ZeroTuning:
        return ZeroTuning(heads, self.gamma if gamma is None else gamma, self.directory)

    def attach(self, vlm, plan) -> ZeroTuningRun:
        run = plan.trace[self] = ZeroTuningRun(self, vlm, plan)
        return run


class ZeroTuningRun(AttentionHook):
    """One block of :class:`ZeroTuning` (``trace[zt]``): ``initial`` (each sample's initial-token position at
    the latest prompt) and ``settings``."""

    def __init__(self, zt: ZeroTuning, vlm, plan):
        self.heads, selection = resolve_heads("ZeroTuning", zt.heads, vlm, zt.directory)
        gamma = zt.gamma if zt.gamma is not None else selection.gamma
        if gamma is None or not gamma > 0:
            raise ValueError(f"ZeroTuning: the head selection for {selection.model} holds no gamma; pass one")
        self.gamma, self.log_gamma, self.state = gamma, math.log(gamma), plan.state
        self.settings = {"method": "ZeroTuning", "gamma": gamma, "log_gamma": math.log(gamma), "heads": self.heads,
                         "heads_source": heads_source(zt.heads), "edit": "log(gamma) added to the initial logit"}
        self._index = {layer: torch.tensor(heads) for layer, heads in self.heads.items()}
        for layer in self.heads:
            plan.attention(vlm.site(f"text.{layer}"), self)

    @property
    def initial(self) -> list[int]:
        return [sample.first for sample in self.state.layout.samples]

    def observe(self, call):
        self._index[call.site.index] = self._index[call.site.index].to(call.query.device)

    def _initial_columns(self, call) -> torch.Tensor:
        """Each sample's initial-token key column at this call, -1 where its keys no longer hold it (a sliding
        window's decoding steps)."""
        layer = call.site.index
        first = torch.tensor(self.initial)
        positions = key_positions(self.state, layer, call.k_len)
        if positions is None:
            return first.to(call.query.device)
        found = positions.cpu() == first[:, None]  # a token drop's kept keys, or a sliding window's latest
        if call.is_prefill and not found.any(-1).all():
            raise ValueError(f"ZeroTuning: a token drop removed a sample's initial token before layer {layer}")
        return torch.where(found.any(-1), found.int().argmax(-1), -1).to(call.query.device)

    def logit_bias(self, call):
        layer = call.site.index
        columns = self._initial_columns(call)
        bias = call.query.new_zeros(len(columns), call.query.shape[1], 1, call.k_len, dtype=torch.float32)
        held = (columns >= 0).nonzero()[:, 0]
        bias[held[:, None], self._index[layer][None], 0, columns[held][:, None]] = self.log_gamma
        return bias
