"""Built-in recorders: what a forward can be asked to keep.

Each is an intervention for ``vlm.use``; what it keeps lands in the block's trace
under ``{site}.{what}`` (``text.3.rows``, ``text.3.column_mass``, ``dit.double.1.block``,
``text.5.resid_pre``, ``text.5.value_norms``), one list entry per forward call.
A recorder holds settings only; each block gets its own hook (:class:`Recording`) that
writes into that block's trace, so one recorder may serve two blocks at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch

from .layout import Span
from .plan import ALL, AttentionCall, AttentionHook, AttentionSite, Chunks, ForwardState, LayerHook, Plan, Rows

Sites = Iterable[Union[str, AttentionSite]]
Queries = Union[str, Span, torch.Tensor, Callable[[AttentionCall, ForwardState], torch.Tensor]]


def last_row(call: AttentionCall) -> torch.Tensor:
    """The row index of the call's last query: at prefill the last prompt token, then the one being decoded."""
    return torch.tensor([call.q_len - 1], device=call.query.device)


def resolve_rows(queries: Queries, call: AttentionCall, state: ForwardState):
    """Turn a query selector into row indices of this call (or ALL)."""
    if isinstance(queries, str):
        if queries == "last":
            return last_row(call)
        if queries == "all":
            return ALL
        raise ValueError(f"unknown query selector {queries!r}: use 'last', 'all', a Span, indices or a callable")
    if isinstance(queries, Span):
        return queries.indices().to(call.query.device)
    if callable(queries):
        return queries(call, state)
    return queries


class SiteRecorder:
    """Base of the recorders of attention sites: what to keep at ``sites``, under ``{site}.{what}``.

    Subclasses define ``rows`` / ``observe`` / ``record`` as an :class:`AttentionHook` does, with
    the block's :class:`Recording` first: it holds the block's trace and forward state.
    """

    what = ""

    def __init__(self, sites: Sites):
        self.site_names = list(sites)

    def attach(self, vlm, plan: Plan) -> Recording:
        block = Recording(self, plan)
        for name in self.site_names:
            plan.attention(vlm.site(name), block)
        return block

    def rows(self, block: Recording, call: AttentionCall) -> Rows | None:
        return None

    def observe(self, block: Recording, call: AttentionCall) -> None:
        pass

    def record(self, block: Recording, call: AttentionCall, rows: torch.Tensor, probs: torch.Tensor) -> None:
        pass


class Recording(AttentionHook):
    """One block of a :class:`SiteRecorder`: the hook that writes its entries into the block's trace."""

    def __init__(self, recorder: SiteRecorder, plan: Plan):
        self.recorder, self.trace, self.state = recorder, plan.trace, plan.state

    def entries(self, call: AttentionCall) -> list:
        """This call's site's entries in the trace (created empty)."""
        return self.trace.setdefault(f"{call.site.name}.{self.recorder.what}", [])

    def rows(self, call):
        return self.recorder.rows(self, call)

    def observe(self, call):
        self.recorder.observe(self, call)

    def record(self, call, rows, probs):
        self.recorder.record(self, call, rows, probs)


class _RowRecorder(SiteRecorder):
    """Keeps (a function of) the probability rows of its queries, one joined tensor per call."""

    def __init__(self, sites: Sites, queries: Queries):
        super().__init__(sites)
        self.queries = queries

    def rows(self, block, call):
        return resolve_rows(self.queries, call, block.state)

    def observe(self, block, call):
        block.entries(call).append(Chunks())

    def record(self, block, call, rows, probs):
        block.entries(call)[-1].append(self.keep(probs).detach())

    def keep(self, probs: torch.Tensor) -> torch.Tensor:
        return probs


class RecordRows(_RowRecorder):
    """Post-softmax attention rows ``(B, H, rows, Lk)`` for chosen queries (default: the last)."""

    what = "rows"

    def __init__(self, sites: Sites, queries: Queries = "last"):
        super().__init__(sites, queries)


@dataclass
class ColumnMass:
    """Attention each key receives, summed over the queries that can see it."""

    total: torch.Tensor  # (B, H, Lk)
    queries: torch.Tensor  # (B, 1, Lk) number of visible queries per key

    @property
    def mean(self) -> torch.Tensor:
        """``alpha[b, h, k]``: mean attention on key k over the queries that see it."""
        return self.total / self.queries.clamp(min=1)

    def add(self, probs: torch.Tensor, visible: torch.Tensor | None) -> None:
        """Accumulate the rows ``probs`` ``(B, H, R, Lk)`` whose visibility is ``visible`` (None: all keys)."""
        if visible is None:
            visible = torch.ones(1, 1, probs.shape[2], probs.shape[3], dtype=torch.bool, device=probs.device)
        # rows that see no key at all (left-padding queries) hold no attention
        visible = visible & visible.any(-1, keepdim=True)
        self.total += (probs * visible).sum(2)
        self.queries += visible[:, :1].float().sum(2)


class RecordColumnMass(SiteRecorder):
    """Column mass over all visible queries, accumulated chunk by chunk (no L x L tensor kept)."""

    what = "column_mass"

    def rows(self, block, call):
        return ALL

    def observe(self, block, call):
        batch, heads = call.query.shape[:2]
        zeros = call.query.new_zeros
        block.entries(call).append(ColumnMass(zeros(batch, heads, call.k_len, dtype=torch.float32),
                                              zeros(batch, 1, call.k_len, dtype=torch.float32)))

    def record(self, block, call, rows, probs):
        block.entries(call)[-1].add(probs, call.visible_rows(rows))


class RecordBlock(_RowRecorder):
    """A query-span x key-span block ``(B, H, nq, nk)``, optionally head-averaged or keys on a grid.

    ``name`` sets the trace key (``{site}.{name}``), so several blocks of one site can be kept.
    """

    def __init__(self, sites: Sites, queries: Queries, keys: Span | torch.Tensor,
                 grid: tuple[int, int] | None = None, mean_heads: bool = False, name: str = "block"):
        super().__init__(sites, queries)
        self.keys, self.grid, self.mean_heads, self.what = keys, grid, mean_heads, name

    def keep(self, probs):
        keys = self.keys.indices() if isinstance(self.keys, Span) else self.keys
        block = probs[..., keys.to(probs.device)]
        if self.mean_heads:
            block = block.mean(1, keepdim=True)
        if self.grid is not None:
            block = block.reshape(*block.shape[:3], *self.grid)
        return block

    @staticmethod
    def collect(trace, site: str, name: str = "block") -> list[torch.Tensor]:
        """The recorded blocks of ``site``: one ``(B, H, nq, ...)`` tensor per call."""
        return trace[f"{site}.{name}"]


class RecordValueNorms(SiteRecorder):
    """L2 norm of each key's value vector per head, ``(B, H, Lk)``: value-drain sinks."""

    what = "value_norms"

    def observe(self, block, call):
        block.entries(call).append(call.value.detach().float().norm(dim=-1))


class RecordHidden:
    """The residual stream entering each chosen decoder layer, ``text.{i}.resid_pre``."""

    def __init__(self, layers: Iterable[int] | None = None):
        self.layer_indices = None if layers is None else list(layers)

    def attach(self, vlm, plan: Plan) -> HiddenRecording:
        block = HiddenRecording(plan.trace)
        indices = range(vlm.num_layers) if self.layer_indices is None else self.layer_indices
        for index in indices:
            plan.layer(index, vlm.layers[index], block)
        return block


class HiddenRecording(LayerHook):
    """One block of :class:`RecordHidden`: the layer hook that writes into the block's trace."""

    def __init__(self, trace):
        self.trace = trace

    def before_layer(self, index, hidden, kwargs):
        self.trace.setdefault(f"text.{index}.resid_pre", []).append(hidden.detach())
        return None
