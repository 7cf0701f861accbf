"""ACT (Yu et al., ICML 2024, "Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention
Calibration for Enhancing Large Language Models"): take attention off the sinks beyond the first token,
in the heads where that helps, and give it to the other tokens.

Why: besides the first token, a few other tokens (punctuation, delimiters, an image's background patch)
collect much attention while adding little; in some heads scaling them down and spreading the freed mass
over the rest of the row improves accuracy, in others it hurts, so the heads come from a calibration search
(:func:`tuning.calibrate`).

The released code (GATECH-EIC/ACT, ``atten_process_eval``) computes, per edited head on the post-softmax map
``A`` (rows = queries): the column score ``s_k = sum_i A[i, k] / #queries that see k``, the sinks
``{k : s_k > eps}`` without the first one found (normally the first token), sink columns times ``beta``, and
each row's freed mass ``(1 - beta) * sum_{k in sinks} A[i, k]`` given to its other keys (the first token
among them) in proportion to their attention. The score is the shared detector's column-mass criterion
(:class:`vlmtools.sinks.ColumnMassSink` on a :class:`vlmtools.record.ColumnMass`), per sample over the rows
and keys its mask lets it see, so left padding counts for nothing.

Deviation: on a cached decoding step the released code recomputes the sinks from the one new row (every key
that row gives more than ``eps``) and then sets that row's first-token attention to 1 (its ``A[0, 0] = 1``
meant for the prompt's first row); here the sinks found at the prefill stay for the decoding steps (as VAR
keeps its sinks), so that a generated token's row is edited with the prompt's sinks and is still a
distribution.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vlmtools.plan import ALL, AttentionHook, key_positions
from vlmtools.record import ColumnMass
from vlmtools.sinks import ColumnMassSink
from vlmtools.sinks.base import SinkTensors, plain_layout

from .selection import heads_source, resolve_heads

TINY = 1e-12
CHUNK_BYTES = 32 * 2**20
"""fp32 logits held at once while the sinks are found."""


def column_mass(call, heads: torch.Tensor) -> ColumnMass:
    """The column mass ``(B, len(heads), Lk)`` of a prefill call's unedited attention in ``heads``, row chunk by
    row chunk with the call's visibility (the seam's own softmax of ``q k^T * scaling``)."""
    query = call.query.index_select(1, heads).float()
    key_t = call.key.index_select(1, heads).float().transpose(-1, -2)
    batch, count = query.shape[:2]
    mass = ColumnMass(query.new_zeros(batch, count, call.k_len), query.new_zeros(batch, 1, call.k_len))
    chunk = max(1, CHUNK_BYTES // (4 * batch * count * call.k_len))
    for rows in torch.arange(call.q_len, device=query.device).split(chunk):
        logits = (query[:, :, rows] @ key_t) * call.scaling
        visible = call.visible_rows(rows)
        if visible is not None:
            logits.masked_fill_(~visible, torch.finfo(logits.dtype).min)
        mass.add(logits.softmax(-1), visible)
    return mass


def sink_columns(mass: ColumnMass, eps: float) -> torch.Tensor:
    """``(B, heads, Lk)`` bool: ACT's sinks, the detector's column-mass sinks above ``eps`` but the first of each
    (sample, head)."""
    batch, heads, keys = mass.total.shape
    tensors = SinkTensors(plain_layout(batch, keys), 1, column_mass={0: mass})
    found = torch.zeros(batch, heads, keys, dtype=torch.bool)
    for finding in ColumnMassSink(eps=eps, layers=(0,)).evaluate(tensors).findings:
        found[finding.sample, finding.head, finding.token] = True
    first = found.int().argmax(-1, keepdim=True)  # the lowest sink position of each (sample, head)
    return found.scatter(-1, first, False)


def calibrate_rows(probs: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """ACT's edit of rows ``probs`` ``(B, h, R, K)`` given the sink columns ``sinks`` ``(B, h, K)``.

    A row with sink mass ``S`` keeps ``beta`` of each sink's attention and gives the freed ``(1 - beta) S`` to its
    other keys in proportion to theirs: each of them is multiplied by ``(1 - beta S) / (1 - S)``.
    """
    sink = sinks[:, :, None]
    mass = probs.masked_fill(~sink, 0).sum(-1, keepdim=True)
    rest = 1 - mass
    factor = torch.where(sink, beta, (1 - beta * mass) / rest.clamp(min=TINY))
    return torch.where(rest > TINY, probs * factor, probs)  # a row that sees only sinks keeps its attention


class ACT:
    """Attention calibration on the heads of a calibration search (or given).

    ``heads``: ``{layer: [head, ...]}`` or a :class:`~tuning.HeadSelection`; None loads the selection stored
    for the wrapped model (``directory``, default the calibration folder) and refuses when there is none.
    ``beta`` (released: 0.4) is the share of a sink's attention kept, ``eps`` (released ``THRES``: 0.1) the
    column score above which a key is a sink. What a block found is ``trace[act]`` (:class:`ACTRun`):

    >>> act = ACT()                                 # the heads tuning.calibrate stored for this model
    >>> with vlm.use(act) as trace:
    ...     out = model.generate(**inputs, max_new_tokens=8)
    >>> trace[act].sinks[(4, 2)]                    # per sample, the sinks ACT scaled in layer 4, head 2
    """

    name = "act"

    def __init__(self, heads=None, beta: float = 0.4, eps: float = 0.1, directory: str | Path | None = None):
        if not 0 <= beta <= 1:
            raise ValueError(f"ACT beta (the share of a sink's attention kept) must be in [0, 1], got {beta}")
        if not 0 <= eps < 1:
            raise ValueError(f"ACT eps (a mean attention) must be in [0, 1), got {eps}")
        self.heads, self.beta, self.eps, self.directory = heads, beta, eps, directory

    @property
    def settings(self) -> dict:
        return {"beta": self.beta, "eps": self.eps}

    def with_heads(self, heads) -> ACT:
        return ACT(heads, self.beta, self.eps, self.directory)

    def attach(self, vlm, plan) -> ACTRun:
        run = plan.trace[self] = ACTRun(self, vlm, plan)
        return run


class ACTRun(AttentionHook):
    """One block of :class:`ACT` (``trace[act]``): ``sinks`` ((layer, head) -> each sample's sink positions
    found at the latest prefill, as prompt positions) and ``settings``."""

    def __init__(self, act: ACT, vlm, plan):
        self.heads, selection = resolve_heads("ACT", act.heads, vlm, act.directory)
        chosen_with = {k: selection.settings.get(k) for k in ("beta", "eps")} if selection is not None else {}
        if chosen_with and chosen_with != act.settings:
            warnings.warn(f"ACT: these heads were chosen with {chosen_with}, and run with {act.settings}")
        self.beta, self.eps, self.state = act.beta, act.eps, plan.state
        self.settings = {"method": "ACT", "beta": act.beta, "eps": act.eps, "heads": self.heads,
                         "heads_source": heads_source(act.heads),
                         "decoding": "sinks found at the prefill, kept for the cached steps"}
        self.sinks: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._index = {layer: torch.tensor(heads) for layer, heads in self.heads.items()}
        self._every_head = {layer: list(heads) == list(range(vlm.site(f"text.{layer}").heads))
                            for layer, heads in self.heads.items()}
        self._sinks: dict[int, torch.Tensor] = {}
        self._edits: dict[int, bool] = {}
        for layer in self.heads:
            plan.attention(vlm.site(f"text.{layer}"), self)

    def observe(self, call):
        if not call.is_prefill:
            return
        layer = call.site.index
        heads = self._index[layer] = self._index[layer].to(call.query.device)
        found = sink_columns(column_mass(call, heads), self.eps)
        self._sinks[layer] = found.to(call.query.device)
        self._edits[layer] = bool(found.any())  # read at every call: kept off the device
        positions = key_positions(self.state, layer, call.k_len)
        for h, head in enumerate(self.heads[layer]):
            at = [row.nonzero()[:, 0] for row in found[:, h]]
            self.sinks[(layer, head)] = at if positions is None else [positions[b].cpu()[k] for b, k in enumerate(at)]

    def rows(self, call):
        return ALL if self._edits.get(call.site.index) else None

    def edit_probs(self, call, rows, probs):
        layer = call.site.index
        found = self._sinks[layer]
        if found.shape[-1] != call.k_len:
            found = self._at_keys(layer, found, call.k_len)
        heads = self._index[layer]
        if self._every_head[layer]:
            return calibrate_rows(probs, found, self.beta)
        return probs.index_copy(1, heads, calibrate_rows(probs.index_select(1, heads), found, self.beta))

    def _at_keys(self, layer: int, found: torch.Tensor, k_len: int) -> torch.Tensor:
        """The prefill's sinks at a decoding step's ``k_len`` keys: the generated keys are no sinks, and a cache
        that drops keys (a sliding window, a sink cache) holds only some (:func:`~vlmtools.plan.key_positions`)."""
        positions = key_positions(self.state, layer, k_len)
        if positions is None:  # the prompt's keys in place, then the generated ones
            return torch.nn.functional.pad(found, (0, k_len - found.shape[-1]))
        kept = self.state.kept_keys.get(layer)
        if kept is not None:  # a token drop's kept keys were the prefill's columns: the sinks by prompt position
            kept = kept.to(found.device)[:, None].expand(-1, found.shape[1], -1)
            found = found.new_zeros(*found.shape[:2], self.state.layout.seq_len).scatter(-1, kept, found)
        positions = positions.to(found.device)
        index = positions.clamp(max=found.shape[-1] - 1)[:, None].expand(-1, found.shape[1], -1)
        return found.gather(-1, index) & (positions < found.shape[-1])[:, None]
