"""Hosts that rank inside the language model: FastV, PDrop, SparseVLM, DART, and the baselines.

Each is a :class:`~pruning.host.Host` with a small scorer. Layer numbers are 0-indexed
decoder layers at whose *input* tokens are dropped. FastV ranks by the attention of the
layer just before (the last one that saw every token); PDrop and SparseVLM by the drop
layer's own queries and keys recomputed on its input; DART by the keys of the layer before
and the hidden states entering the drop layer.
"""
from __future__ import annotations

from functools import partial

import torch

from vlmtools.plan import LayerHook
from vlmtools.record import last_row

from .host import Host, SiteRows, at_present, lattice


class _LastQuery(Host):
    """Ranks by the last prompt token's head-mean attention in the layer before each drop."""

    reads_previous_layer = True

    def scorers(self, run, vlm, plan):
        return [plan.attention(vlm.site(f"text.{layer - 1}"), SiteRows(last_row)) for layer in self.layers]

    def score(self, run, stage, hidden, kept, layout, targets):
        return run.scorers[stage].latest()[1][:, -1]


class FastV(_LastQuery):
    """FastV: at layer ``K`` rank by the last prompt token's head-mean attention in layer ``K - 1``.

    >>> with vlm.use(FastV(keep=64, layer=2, debias=True)):
    ...     out = model.generate(**inputs)
    """

    name = "fastv"

    def __init__(self, keep: int | float = 64, layer: int = 2, **kwargs):
        super().__init__(keep, (layer,), **kwargs)

    def options(self):
        return {"query": "last prompt token (paper and released code)", "heads": "mean",
                "K": f"{self.layers[0]} (paper: 2 for LLaVA-1.5-7B)"}


class PDrop(Host):
    """PyramidDrop: stages at ``layers`` (0-indexed drop layers; paper and released code: 8/16/24 of 32).

    At each drop layer, before it runs, as the released code does: that layer's ``input_layernorm``,
    ``q_proj``, ``k_proj`` and rotary embedding applied to the hidden states entering it (the tokens
    still present, at their original positions), the last prompt token's softmax row over them
    (fp32, padding masked), mean over heads; the image keys are ranked by it and the top ones kept.

    ``rank="previous"`` ranks by the last prompt token's attention in the layer *before* each drop
    instead (FastV's reading, which this host used before; its drop layers must be >= 1).

    The released code keeps half at each stage (576 -> 288 -> 144 -> 72); here ``keep`` is the final
    count and every stage keeps the same fraction ``(keep / N)^(1/stages)`` (0.5 at 576 -> 72).
    """

    name = "pdrop"

    def __init__(self, keep: int | float = 72, layers: tuple[int, ...] = (8, 16, 24), rank: str = "layer",
                 **kwargs):
        if rank not in ("layer", "previous"):
            raise ValueError(f"PDrop rank must be 'layer' (the drop layer's own q/k, released code) or "
                             f"'previous' (the attention of the layer before), got {rank!r}")
        self.rank = rank
        self.reads_previous_layer = rank == "previous"
        super().__init__(keep, tuple(layers), **kwargs)

    def scorers(self, run, vlm, plan):
        if self.rank == "previous":
            return [plan.attention(vlm.site(f"text.{layer - 1}"), SiteRows(last_row)) for layer in self.layers]
        for layer in self.layers:
            vlm.site(f"text.{layer}")  # its own q/k: an attention layer (a hybrid family refuses the others)
        return [plan.layer(layer, vlm.layers[layer], _RotaryTables(run.state)) for layer in self.layers]

    def score(self, run, stage, hidden, kept, layout, targets):
        if self.rank == "previous":
            return run.scorers[stage].latest()[1][:, -1]
        layer = run.vlm.layers[self.layers[stage]]
        padding = torch.stack([torch.isin(present, sample.padding.to(kept.device))
                               for present, sample in zip(kept, layout.samples)])
        return last_query_attention(layer, getattr(layer, run.vlm.adapter.attn), hidden, kept,
                                    run.scorers[stage].tables, padding, mask=run.scorers[stage].mask)

    def options(self):
        return {"rank": "the drop layer's own q/k on its input (released code)" if self.rank == "layer"
                else "attention of the layer before each drop (FastV's reading; not the released code's)",
                "query": "last prompt token (the released code's last instruction token at inference)",
                "heads": "mean", "positions": "original (the released code renumbers the kept tokens)",
                "schedule": "equal fraction per stage (paper: lambda = 0.5)"}


class _RotaryTables(LayerHook):
    """The rotary ``(cos, sin)`` tables entering one decoder layer at the latest prefill (full prompt length:
    registered before the drop runtime, which gathers them to the kept positions after this hook)."""

    def __init__(self, state):
        self.state, self.tables, self.mask = state, None, None

    def before_layer(self, index, hidden, kwargs):
        if self.state.step == 0:
            self.tables, self.mask = kwargs.get("position_embeddings"), kwargs.get("attention_mask")
        return None


def last_query_attention(layer: torch.nn.Module, attention: torch.nn.Module, hidden: torch.Tensor,
                         kept: torch.Tensor, tables, padding: torch.Tensor,
                         rows: torch.Tensor | None = None, mask=None) -> torch.Tensor:
    """The last token's head-mean softmax row of ``layer`` over the tokens ``kept`` (``(B, n)``), recomputed in
    fp32 from the layer's own ``input_layernorm``, ``q_proj``, ``k_proj`` (and ``q_norm``/``k_norm`` where the
    family has them) and rotary tables on ``hidden`` (``(B, n, D)``, the residual stream entering it).

    ``tables``: the ``(cos, sin)`` the model passes the layer, over the full prompt (gathered here to ``kept``);
    ``padding``: ``(B, n)`` masked keys. Grouped-query heads share their key head. Returns ``(B, n)``.
    ``rows``: ``(B, r)`` columns of other query tokens (SparseVLM's raters) instead of the last; each sees the
    keys up to its own column (causal). Returns ``(B, r, n)`` then.
    ``mask``: the mask the model passes the layer over the full prompt (a 4-D mask, a flex ``BlockMask``): each
    query then sees the kept keys that mask lets it see at their original positions (a sliding window, Gemma 3's
    bidirectional image tokens); without one (FlashAttention's 2-D padding mask, or none), causality, padding and
    the layer's ``sliding_window``.
    """
    if tables is None:
        raise ValueError("pruning: the drop layer received no rotary position_embeddings; PDrop's default "
                         "ranking recomputes them (use rank='previous' on this family)")
    norm = getattr(layer, "input_layernorm", None)
    if norm is None:
        raise ValueError(f"pruning: {type(layer).__name__} has no input_layernorm to recompute its queries and keys "
                         "(use PDrop(rank='previous') on this family)")
    batch, count, _ = hidden.shape
    cos, sin = (_gather_rows(table, kept) for table in tables)
    with torch.no_grad():
        normed = norm(hidden)
        head_dim = getattr(attention, "head_dim", None) or cos.shape[-1]
        last = rows is None
        if last:
            rows = torch.full((batch, 1), count - 1, dtype=torch.long, device=hidden.device)
        take = lambda t: t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        query = attention.q_proj(take(normed))
        heads = getattr(getattr(attention, "config", None), "num_attention_heads", None)
        # a gated query projection (Qwen3.5) puts each head's output gate after its query: keep the query
        query = query.view(batch, rows.shape[1], heads, -1)[..., :head_dim] if heads \
            else query.view(batch, rows.shape[1], -1, head_dim)
        key = attention.k_proj(normed).view(batch, count, -1, head_dim)
        if getattr(attention, "q_norm", None) is not None:
            query, key = attention.q_norm(query), attention.k_norm(key)
        query = _rotate(query.float(), take(cos).float(), take(sin).float())  # (B, r, H, d)
        key = _rotate(key.float(), cos.float(), sin.float())  # (B, n, KV, d)
        heads, kv_heads = query.shape[2], key.shape[2]
        key = key.repeat_interleave(heads // kv_heads, dim=2)
        scaling = getattr(attention, "scaling", None) or head_dim ** -0.5
        logits = torch.einsum("brhd,bnhd->bhrn", query, key) * scaling
        hidden_keys = _hidden_keys(mask, kept, rows, padding, getattr(attention, "sliding_window", None))  # (B, r, n)
        logits = logits.masked_fill(hidden_keys[:, None], float("-inf"))
        probs = logits.softmax(-1).mean(1)  # (B, r, n)
        return probs[:, 0] if last else probs


def _hidden_keys(mask, kept: torch.Tensor, rows: torch.Tensor, padding: torch.Tensor,
                 window: int | None) -> torch.Tensor:
    """``(B, r, n)`` True where query column ``rows`` may not see key column of ``kept`` (original positions)."""
    queries = kept.gather(1, rows)  # (B, r) original positions
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        full = mask.expand(kept.shape[0], *mask.shape[1:])[:, 0]  # (B, L, L)
        picked = full.gather(1, queries[..., None].expand(-1, -1, full.shape[-1]))
        picked = picked.gather(2, kept[:, None, :].expand(-1, rows.shape[1], -1))
        visible = picked if picked.dtype == torch.bool else picked > torch.finfo(picked.dtype).min / 2
        return ~visible
    if mask is not None and not isinstance(mask, torch.Tensor):  # flex's BlockMask: its mask_mod at those positions
        batch = torch.arange(kept.shape[0], device=kept.device)[:, None, None]
        head = torch.zeros(1, dtype=torch.long, device=kept.device)
        return ~mask.mask_mod(batch, head, queries[..., None], kept[:, None, :]).expand(-1, rows.shape[1], -1)
    ahead = queries[..., None] - kept[:, None, :]
    hidden = padding[:, None, :] | (ahead < 0)
    return hidden | (ahead >= window) if window else hidden


def _gather_rows(table: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(1|B, L, d)`` -> ``(B, n, d)`` at the original positions ``kept``."""
    table = table.expand(kept.shape[0], *table.shape[1:])
    return table.gather(1, kept[..., None].expand(-1, -1, table.shape[-1]))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of ``x`` ``(B, n, heads, d)`` with ``(B, n, d_rot)`` tables;
    a table narrower than the head (partial rotary) rotates the leading ``d_rot`` dimensions only."""
    width = cos.shape[-1]
    rotated, rest = x[..., :width], x[..., width:]
    first, second = rotated.chunk(2, dim=-1)
    halved = torch.cat([-second, first], dim=-1)
    out = rotated * cos[:, :, None] + halved * sin[:, :, None]
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


class SparseVLM(Host):
    """SparseVLM, as its released code (the paper's version, v1) computes it.

    Raters, once per prompt on the LM's input embeddings ``e``: each text token ``t`` after the image
    gets ``m_t = mean over the image's tokens v of softmax over t (e_v . e_t)``; the raters are the
    text tokens with ``m_t`` above the mean of ``m`` (all of them if none is).

    At each stage layer (paper and released code: 2/6/15 of 32) the raters vote with THAT layer's
    attention: its head-mean softmax rows of the raters over the tokens present, recomputed from the
    layer's ``input_layernorm``, ``q_proj``, ``k_proj`` and rotary tables on the hidden states entering
    it (causal, padding masked: :func:`last_query_attention`). ``P`` is the raters x visual block; a
    visual token's score is the mean of its column.

    ``votes="previous"`` (the reading this host used before, not the released code's): the same raters vote
    with the head-mean softmax rows of the layer *before* each stage as it ran (its recorded attention over
    the tokens present there, which are those entering the stage layer); its stage layers must be >= 1.
    ``raters="attention"`` (with ``votes="previous"``; the former raters too): at each stage the raters are
    the text tokens after the image whose rows there give the image more attention than the mean of those
    rows (all of them if none does), instead of the once-per-prompt embedding raters.

    ``budget="rank"`` (released code): each sample keeps ``min(int(scale * rank(P) + bias), n - 1)`` of
    its ``n`` present visual tokens (all when ``rank(P) == n``), and never fewer than ``keep`` (the
    released code has no floor: ``keep=1``). Released settings: ``scale`` 13.5 (its default and MME
    script; POPE 9, TextVQA 0.8), ``bias`` 0. ``budget="schedule"`` (ours): the equal fraction per stage
    of :class:`PDrop` down to exactly ``keep`` tokens (merged ones included), for comparisons at a matched
    count. The rows of a batch keep the same number of tokens: a sample with a smaller count keeps its
    next-ranked tokens up to the batch's largest (:class:`~pruning.host.HostRun`).

    Recycling (``recycle``, released: 0.3): of the tokens a stage drops, the ``int(recycle * dropped) + 1``
    best-scored are clustered (density peaks over their hidden states, ``recycled // per_cluster + 1``
    clusters, released ``per_cluster`` 10: :func:`density_peak_merge`) and each cluster's mean is kept as
    one more token, at its centre's position. ``recycle=0`` drops without merging.

    Differences from the released code: it runs each stage layer on every token and drops from that
    layer's output (its next layer is the first on the kept tokens; the merged tokens are means of
    that layer's outputs); here the stage layer already runs on the kept tokens and the merged tokens
    are means of the hidden states entering it (the scores are the same). The released code
    renumbers the kept tokens' positions and puts the merged tokens after the kept visual ones; here
    each token keeps its original position (every family, M-RoPE included). Density ties go to the
    earlier token (the released code adds 1e-6 of uniform noise). The released v1 code also prunes at
    layer 19 (``layers=(2, 6, 15, 19)``); its later version (SparseVLM+) uses fixed per-layer counts.
    """

    name = "sparsevlm"

    def __init__(self, keep: int | float = 64, layers: tuple[int, ...] = (2, 6, 15), budget: str = "rank",
                 scale: float = 13.5, bias: float = 0.0, recycle: float = 0.3, per_cluster: int = 10,
                 votes: str = "layer", raters: str = "embeddings", **kwargs):
        if votes not in ("layer", "previous"):
            raise ValueError(f"SparseVLM votes must be 'layer' (the stage layer's own q/k, released code) or "
                             f"'previous' (the attention of the layer before), got {votes!r}")
        if raters not in ("embeddings", "attention") or (raters == "attention" and votes != "previous"):
            raise ValueError(f"SparseVLM raters must be 'embeddings' (released code) or 'attention' (with "
                             f"votes='previous': the rows it reads), got raters={raters!r}, votes={votes!r}")
        if budget not in ("rank", "schedule"):
            raise ValueError(f"budget must be 'rank' (released code) or 'schedule', got {budget!r}")
        if not 0 <= recycle <= 1 or per_cluster < 1 or scale < 0:
            raise ValueError("recycle must be in [0, 1], per_cluster >= 1 and scale >= 0")
        self.votes, self.raters = votes, raters
        self.reads_previous_layer = votes == "previous"
        super().__init__(keep, tuple(layers), **kwargs)
        self.budget_mode, self.scale, self.bias = budget, scale, bias
        self.recycle, self.per_cluster = recycle, per_cluster

    def scorers(self, run, vlm, plan):
        raters = plan.layer(0, vlm.layers[0], _Raters(run.state))
        if self.votes == "previous":
            return [raters] + [plan.attention(vlm.site(f"text.{layer - 1}"),
                                              SiteRows(partial(self.rater_rows, run, layer - 1)))
                               for layer in self.layers]
        for layer in self.layers:
            vlm.site(f"text.{layer}")  # its raters' rows: an attention layer (a hybrid family refuses the others)
        return [raters] + [plan.layer(layer, vlm.layers[layer], _RotaryTables(run.state)) for layer in self.layers]

    def rater_rows(self, run, layer: int, call) -> torch.Tensor:
        """Rows (indices into the tokens present in ``layer``) of any sample's raters (``raters="attention"``: of
        its text after the image, the candidates)."""
        present = run.present_at(layer, call.query.shape[0], call.q_len, call.query.device)
        rows = [torch.isin(present[b], chosen.to(present.device)) for b, chosen in enumerate(self._candidates(run))]
        return torch.stack(rows).any(0).nonzero().squeeze(1)

    def calibration_key(self, vlm, stage: int) -> str:
        key = super().calibration_key(vlm, stage)
        return key + "__attention_raters" if self.raters == "attention" else key

    def _candidates(self, run) -> list[torch.Tensor]:
        """Each sample's raters, or (``raters="attention"``) the text tokens they are chosen from at each stage."""
        if self.raters == "attention":
            return [sample.text.indices() for sample in run.state.layout.samples]
        return run.scorers[0].raters

    def score(self, run, stage, hidden, kept, layout, targets):
        """Mean rater attention of each present visual token; the rank of ``P`` per sample goes to
        ``trace[host].scorers[0].ranks[stage]``."""
        raters = run.scorers[0]
        if self.votes == "previous":  # the layer before saw the tokens entering this one: its keys are ``kept``
            rows, probs = run.scorers[1 + stage].latest()
            mine = [torch.isin(present[rows], chosen.to(kept.device))
                    for present, chosen in zip(kept, self._candidates(run))]
            if self.raters == "attention":
                mine = [attention_raters(probs[b], m, torch.isin(kept[b], sample.visual_positions().to(kept.device)))
                        for b, (m, sample) in enumerate(zip(mine, layout.samples))]
        else:
            rows = [torch.searchsorted(present, chosen.to(kept.device))
                    for present, chosen in zip(kept, raters.raters)]
            probs = self._own_votes(run, stage, hidden, kept, layout, rows)
            mine = [slice(len(r)) for r in rows]
        out = torch.zeros(kept.shape, dtype=torch.float32, device=kept.device)
        ranks = []
        for b, sample in enumerate(layout.samples):
            visual = torch.isin(kept[b], sample.visual_positions().to(kept.device))
            relation = probs[b, mine[b]][:, visual].float()  # P: raters x present visual tokens
            ranks.append(int(torch.linalg.matrix_rank(relation)))
            out[b, visual] = relation.mean(0)
        raters.ranks[stage] = raters.current = ranks
        return out

    def _own_votes(self, run, stage, hidden, kept, layout, rows) -> torch.Tensor:
        """The raters' head-mean rows ``(B, r, n)`` of the stage layer, recomputed on its input."""
        width = max(len(r) for r in rows)
        padded_rows = torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])
        padding = torch.stack([torch.isin(present, sample.padding.to(kept.device))
                               for present, sample in zip(kept, layout.samples)])
        layer = run.vlm.layers[self.layers[stage]]
        return last_query_attention(layer, getattr(layer, run.vlm.adapter.attn), hidden, kept,
                                    run.scorers[1 + stage].tables, padding, padded_rows,
                                    mask=run.scorers[1 + stage].mask)

    def stage_target(self, stage, count, budget):
        return budget if self.budget_mode == "rank" else super().stage_target(stage, count, budget)

    def select(self, run, sample, scores, columns, hidden, target):
        n = len(columns)
        order = scores.argsort(descending=True, stable=True)
        if self.budget_mode == "rank":
            rank = run.scorers[0].current[sample]
            adaptive = n if rank >= n else min(int(rank * self.scale + self.bias), n - 1)
            count = min(n, max(target, adaptive))
            clusters = self._clusters(n - count)
        else:
            clusters = self._clusters(n - target)
            count = max(1, target - clusters)
            clusters = target - count
        if not clusters:
            return columns[order[:count]], None
        dropped = order[count:]
        recycled = dropped[:int(self.recycle * len(dropped)) + 1]
        merged, centres = density_peak_merge(hidden[columns[recycled]], clusters)
        keep = torch.cat([columns[order[:count]], columns[recycled[centres]]])
        return keep, torch.cat([hidden[columns[order[:count]]].float(), merged])

    def _clusters(self, dropped: int) -> int:
        """Merged tokens for ``dropped`` tokens (released code: ``int(0.3 * dropped) + 1`` recycled, one
        cluster per ten of them and one more)."""
        if not self.recycle or dropped <= 0:
            return 0
        return (int(self.recycle * dropped) + 1) // self.per_cluster + 1

    def options(self):
        return {"raters": "text after the image, above-mean relevance on the input embeddings (released code)"
                if self.raters == "embeddings" else "text after the image whose rows in the layer before each stage "
                "give the image above-mean attention (not the released code's)",
                "votes": ("the stage layer's own attention (q/k recomputed on its input), head mean, rater mean "
                          "(released code)") if self.votes == "layer" else
                         ("the recorded attention of the layer before each stage, head mean, rater mean (not the "
                          "released code's)"),
                "budget": (f"rank: min(int({self.scale} * rank(P) + {self.bias}), n - 1), at least keep "
                           "(released code)") if self.budget_mode == "rank" else "equal fraction per stage to keep (ours)",
                "recycle": (f"top {self.recycle} of the dropped (+1), density-peak clusters of {self.per_cluster} "
                            "(+1), merged at the centre's position (released code)") if self.recycle else None}


class _Raters(LayerHook):
    """SparseVLM's raters, chosen at each prefill from the hidden states entering layer 0 (the LM's input
    embeddings), and the rank of ``P`` per stage and sample (``ranks``; ``current``: the stage choosing now)."""

    def __init__(self, state):
        self.state = state
        self.raters: list[torch.Tensor] = []
        self.ranks: dict[int, list[int]] = {}
        self.current: list[int] = []

    def before_layer(self, index, hidden, kwargs):
        if self.state.step == 0:
            self.raters = [text_raters(hidden[b], sample) for b, sample in enumerate(self.state.layout.samples)]
            self.ranks = {}
        return None


def text_raters(embeddings: torch.Tensor, sample) -> torch.Tensor:
    """Positions of one sample's raters: text tokens after the image whose relevance ``m_t = mean over
    visual v of softmax over text t (e_v . e_t)`` is above the mean relevance (every text token if none is)."""
    text = sample.text.indices().to(embeddings.device)
    if not len(text):
        raise ValueError("SparseVLM needs text after the image in every prompt (its raters)")
    visual = embeddings[sample.visual_positions().to(embeddings.device)].float()
    relevance = (visual @ embeddings[text].float().T).softmax(-1).mean(0)
    above = relevance > relevance.mean()
    return text[above] if above.any() else text


def attention_raters(probs: torch.Tensor, candidates: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """SparseVLM's former raters among one sample's rows ``probs`` ``(rows, n)``: of the ``candidates`` rows
    (bool), those whose attention to the ``visual`` keys (bool, ``(n,)``) is above the candidates' mean (all of
    them if none is); a bool mask over the rows."""
    index = candidates.nonzero()[:, 0]
    relevance = probs[index][:, visual].float().sum(-1)
    above = relevance > relevance.mean()
    chosen = torch.zeros_like(candidates)
    chosen[index[above] if above.any() else index] = True
    return chosen


def density_peak_merge(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's recycling clusters (density peaks with k nearest neighbours, as its released code):
    ``(merged (clusters, D) fp32, centre indices (clusters,))`` for ``tokens`` ``(m, D)``.

    Distances ``d = ||x_i - x_j|| / sqrt(D)``; density ``rho_i = exp(-mean of d^2 to its k = clusters
    nearest, itself included)``; ``delta_i`` = distance to the nearest denser token (the largest distance
    for the densest); centres = the ``clusters`` largest ``rho * delta``; every token joins its nearest
    centre (a centre its own cluster) and each cluster becomes the mean of its tokens. Ties: equal
    densities rank the earlier token denser, equal ``rho * delta`` and equal distances go to the earlier
    token / centre.
    """
    x = tokens.float()
    count = len(x)
    clusters = min(clusters, count)
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[-1] ** 0.5
    nearest = distance.sort(dim=-1).values[:, :clusters]
    density = (-(nearest ** 2).mean(-1)).exp()
    index = torch.arange(count, device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None])
                                                      & (index[None, :] < index[:, None]))
    delta = torch.where(denser, distance, distance.max()).amin(-1)
    centres = (delta * density).argsort(descending=True, stable=True)[:clusters]
    assign = distance[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    total = torch.zeros(clusters, x.shape[-1], device=x.device).index_add_(0, assign, x)
    sizes = torch.zeros(clusters, device=x.device).index_add_(0, assign, torch.ones(count, device=x.device))
    return total / sizes[:, None], centres


class DART(Host):
    """DART (duplication-aware reduction), as its released code computes it: no attention.

    At drop layer ``K`` (paper and released code: 2): the pivots are the image tokens with the
    largest L1 norm of their keys in layer ``K - 1`` (after rotary, every head concatenated;
    ``pivots``, released: 4) and the same among the text *after* the image (``text_pivots``,
    released: 4). Each pivot in turn (in position order) keeps its share of the budget: the image
    tokens least similar to it (cosine of the hidden states entering layer ``K`` after the LM's final
    norm, as the released code's ``self.norm``) among those no pivot has kept yet. The kept image
    tokens are the image pivots and those picks; text pivots are text and kept anyway.

    Budget: ``keep`` tokens exactly: the ``keep - pivots`` picks are split evenly over the pivots (the
    first ones in position order take one more when it does not divide). The released code gives each
    pivot ``T // (pivots + text_pivots)`` picks (``T = max_num_trunction``, 128 for 22% of LLaVA-1.5's
    576) and keeps the image pivots on top (132 tokens): ``keep = pivots + 8 * (T // 8)`` reproduces it.
    With ``keep < pivots`` only the ``keep`` top image pivots are kept.
    """

    name = "dart"
    attention_based = False
    reads_previous_layer = True

    def __init__(self, keep: int | float = 64, layer: int = 2, pivots: int = 4, text_pivots: int | None = None,
                 **kwargs):
        text_pivots = pivots if text_pivots is None else text_pivots
        if pivots < 1 or text_pivots < 0:
            raise ValueError(f"DART needs pivots >= 1 and text_pivots >= 0, got {pivots}, {text_pivots}")
        super().__init__(keep, (layer,), **kwargs)
        self.pivots, self.text_pivots = pivots, text_pivots

    def scorers(self, run, vlm, plan):
        return [plan.attention(vlm.site(f"text.{self.layers[0] - 1}"), SiteRows(keys=True))]

    def score(self, run, stage, hidden, kept, layout, targets):
        """3 for the kept image tokens; below, ``1 - max cosine to a pivot`` (read only where a row of the
        batch must keep more than its budget: the least duplicated of the rest)."""
        norms = run.scorers[0].keys.float().abs().sum((1, 3))  # (B, n): L1 over every head's key
        norm = final_norm(run.vlm)
        with torch.no_grad():
            states = norm(hidden) if norm is not None else hidden
        normed = torch.nn.functional.normalize(states.float(), dim=-1)
        out = []
        for b, sample in enumerate(layout.samples):
            visual = torch.isin(kept[b], sample.visual_positions().to(kept.device)).nonzero().squeeze(1)
            text = torch.isin(kept[b], sample.text.indices().to(kept.device)).nonzero().squeeze(1)
            chosen, pivots = duplication_choice(norms[b], normed[b], visual, text, targets[b], self.pivots,
                                                self.text_pivots)
            score = 1 - (normed[b] @ normed[b, pivots].T).amax(-1)
            score[chosen] = 3.0
            out.append(score)
        return torch.stack(out)

    def options(self):
        return {"pivots": f"{self.pivots} image + {self.text_pivots} text (text after the image) by L1 norm of "
                          "layer K-1's keys (released code: 4 + 4)",
                "similarity": "cosine of the hidden states entering layer K after the final norm (released code)",
                "budget": "split per pivot in position order, exactly keep tokens (released code: "
                          "keep // pivots each, plus the image pivots)"}


def duplication_choice(norms: torch.Tensor, normed: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
                       target: int, image_pivots: int, text_pivots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DART's choice for one sample: ``(kept image columns, pivot columns)``.

    ``norms``: ``(n,)`` key L1 norms; ``normed``: ``(n, D)`` unit hidden states; ``visual`` / ``text``: the
    candidate columns (ascending). Ties go to the lower position (stable sorts).
    """
    target = min(target, len(visual))
    image = _top(norms, visual, min(image_pivots, target))
    pivots = torch.cat([image, _top(norms, text, text_pivots)]).sort().values
    chosen, remaining = [image], visual[~torch.isin(visual, image)]
    share, extra = divmod(target - len(image), len(pivots))
    for j, pivot in enumerate(pivots.tolist()):
        take = share + (j < extra)
        if take:
            picked = remaining[(normed[remaining] @ normed[pivot]).argsort(stable=True)[:take]]
            chosen.append(picked)
            remaining = remaining[~torch.isin(remaining, picked)]
    return torch.cat(chosen), pivots


def final_norm(vlm) -> torch.nn.Module | None:
    """The language model's final norm (the module holding the decoder layers has it as ``norm``), or None."""
    parent = vlm.adapter.text_layers.rpartition(".")[0]
    return getattr(vlm.model.get_submodule(parent) if parent else vlm.model, "norm", None)


def _top(values: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` columns of ``allowed`` (ascending) with the largest ``values``; ties to the lower column."""
    return allowed[values[allowed].argsort(descending=True, stable=True)[:count]]


class RandomPrune(Host):
    """Baseline: keep a uniformly random subset of visual tokens (seeded, the same per call)."""

    name = "random"
    attention_based = False

    def __init__(self, keep: int | float = 64, layer: int = 2, seed: int = 0, **kwargs):
        super().__init__(keep, (layer,), **kwargs)
        self.seed = seed

    def score(self, run, stage, hidden, kept, layout, targets):
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(kept.shape, generator=generator).to(kept.device)

    def options(self):
        return {"seed": self.seed}


class UniformGrid(Host):
    """Baseline: keep an evenly spaced 2-D lattice of each image's (and tile's) token grid."""

    name = "grid"
    attention_based = False

    def __init__(self, keep: int | float = 64, layer: int = 2, **kwargs):
        super().__init__(keep, (layer,), **kwargs)

    def score(self, run, stage, hidden, kept, layout, targets):
        values = []
        for sample, target in zip(layout.samples, targets):
            grids = [grid for image in sample.images for grid in (image.tiles or [image.grid])]
            values.append(lattice(grids, target))
        return at_present(values, layout, kept)
