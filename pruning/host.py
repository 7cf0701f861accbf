"""What every pruning host shares: score, debias, keep the top R, drop the rest for real.

A host is an intervention for ``vlm.use``. At prefill its hooks record what its score
needs (attention rows at one site, keys); at each of its stage layers a
:class:`~vlmtools.drop.DropTokens` chooser ranks the visual tokens still present per
sample by the (debiased) score, keeps the top ``R`` and always keeps every non-visual
token (text, layout tokens such as NeXT newlines, padding). Hosts differ only in
:meth:`Host.score` (and, for merging hosts, :meth:`Host.select`).

A host holds settings only: each block gets its own :class:`HostRun` (its scorers, trends
and drop runtime), read after the block as ``trace[host]`` (``trace[host].kept_at(layer)``),
so one host may serve several blocks, also at once on two threads.

Batches: every sample keeps the same number of tokens (``DropTokens`` slices one
tensor). Left-padding tokens are masked keys, so dropping or keeping them changes no
output: a row shorter than the batch's widest keeps its padding tokens first, then its
next-ranked visual tokens (when budgets differ: letterbox padding, fractions of
different visual counts).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch

from vlmtools.drop import DropTokens
from vlmtools.layout import TokenLayout
from vlmtools.plan import AttentionCall, AttentionHook, Plan
from vlmtools.sinks import model_signature, visual_sink_positions

from .debias import Debias, Trend, debiased, model_key


class SiteRows(AttentionHook):
    """The latest prefill's head-mean attention rows (and keys) at one site, for a host's score.

    Unlike :class:`vlmtools.RecordRows` it keeps only the latest prefill (a host reads it
    once per stage) and asks for no rows during cached decoding.
    """

    def __init__(self, select: Callable[[AttentionCall], torch.Tensor | None] | None = None, keys: bool = False):
        self.select, self.want_keys = select, keys
        self.rows_seen: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.keys: torch.Tensor | None = None

    def observe(self, call):
        if call.is_prefill:
            self.rows_seen, self.probs = [], []
            if self.want_keys:
                self.keys = call.key.detach()

    def rows(self, call):
        return self.select(call) if self.select is not None and call.is_prefill else None

    def record(self, call, rows, probs):
        self.rows_seen.append(rows)
        self.probs.append(probs.detach().mean(1))

    def latest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(r,)`` and head-mean attention ``(B, r, Lk)`` of the latest prefill."""
        if not self.probs:
            raise RuntimeError("pruning: the scoring site did not record this prefill")
        return torch.cat(self.rows_seen), torch.cat(self.probs, 1)


class Host:
    """Base class of the pruning hosts.

    ``keep``: visual tokens kept per sample, a count (``64``) or a fraction of the
    sample's visual tokens (``0.11``). ``layers``: decoder layers at whose input tokens
    are dropped (several = stages; stage ``j`` of ``S`` keeps ``N (R/N)^((j+1)/S)``).
    ``debias``: False, True (= :class:`Debias`) or a :class:`Debias`. ``padding``: an
    ``(images, tokens)`` bool mask of letterbox padding (:func:`letterbox_padding`),
    else the layout's ``ImageTokens.padding`` (flagged when the model was wrapped with a
    processor that letterboxes).
    """

    name: ClassVar[str] = ""
    attention_based: ClassVar[bool] = True
    reads_previous_layer: ClassVar[bool] = False
    """The score reads the layer before each drop layer (which must then be >= 1)."""
    positions: str = "original"
    """Position ids from the first drop on: ``"original"`` (each kept token keeps its own) or ``"compact"``
    (kept tokens renumbered to consecutive ids, as a shortened input sequence; :class:`~vlmtools.drop.DropTokens`)."""
    def __init__(self, keep: int | float, layers: tuple[int, ...], debias: bool | Debias = False,
                 padding: torch.Tensor | None = None):
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0 or (
                isinstance(keep, float) and keep > 1):
            raise ValueError(f"keep must be a positive token count or a fraction in (0, 1], got {keep!r}")
        lowest = 1 if self.reads_previous_layer else 0
        if not layers or min(layers) < lowest:
            raise ValueError(f"{self.name}: layers must be decoder-layer indices >= {lowest}, got {layers!r}"
                             + (" (the score reads the layer before each drop)" if lowest else ""))
        self.keep, self.layers = keep, tuple(sorted(layers))
        self.debias = Debias() if debias is True else (debias or None)
        if self.debias is not None and not self.attention_based:
            raise ValueError(f"{self.name} ranks without attention; debiasing applies to attention-based hosts "
                             "(FastV, PDrop, SparseVLM, VisionZip, FasterVLM)")
        self.padding = padding
        self.collect = False
        """Calibration (:func:`pruning.calibrate`): drop nothing and keep each stage's raw scores
        of real patches in ``trace[host].collected``."""

    # -- what a host defines ------------------------------------------------------------
    def scorers(self, run: HostRun, vlm, plan: Plan) -> list[SiteRows]:
        """Add the hooks :meth:`score` reads to ``plan``; they become ``run.scorers``."""
        return []

    def score(self, run: HostRun, stage: int, hidden: torch.Tensor, kept: torch.Tensor, layout: TokenLayout,
              targets: list[int]) -> torch.Tensor:
        """Raw score ``a`` of every present token, ``(B, n)`` aligned with ``kept`` (only visual ones are read)."""
        raise NotImplementedError

    def select(self, run: HostRun, sample: int, scores: torch.Tensor, columns: torch.Tensor, hidden: torch.Tensor,
               target: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Columns (of ``kept``) of the candidates to keep and, when merging, their new hidden states.

        ``scores`` and ``columns`` list the sample's visual candidates in visual order.
        """
        return columns[scores.argsort(descending=True, stable=True)[:target]], None

    def options(self) -> dict:
        """Host-specific settings and where they come from (paper or released code)."""
        return {}

    # -- shared ----------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        """Every setting this host ran with, for results tables."""
        return {"host": self.name, "keep": self.keep, "layers": list(self.layers),
                "debias": self.debias.settings() if self.debias else False, "positions": self.positions,
                **self.options()}

    def calibration_key(self, vlm, stage: int) -> str:
        """``<model>__<host>__L<layer>``, with ``__previous`` when the host reads the layer before each drop and its
        default does not (PDrop ``rank="previous"``, SparseVLM ``votes="previous"``): another reading, another trend."""
        key = f"{model_key(vlm)}__{self.name}__L{self.layers[stage]}"
        return key + "__previous" if self.reads_previous_layer and not type(self).reads_previous_layer else key

    def check(self, vlm) -> None:
        """Raise ValueError if this host cannot run on ``vlm`` (its family, its drop layers)."""
        refusal = self.refusal(vlm)
        if refusal:
            raise ValueError(refusal)
        if self.layers[-1] >= vlm.num_layers:
            raise ValueError(f"{self.name}: drop layer {self.layers[-1]} >= the model's {vlm.num_layers} layers")

    def attach(self, vlm, plan: Plan) -> HostRun:
        self.check(vlm)
        run = plan.trace[self] = HostRun(self, vlm, plan)
        return run

    @classmethod
    def refusal(cls, vlm) -> str | None:
        """Why this host cannot run on ``vlm``; None when it can (LM-side hosts read only the layout, so run
        on every VLM; a host that needs more of the family asks its adapter and refuses with its reason)."""
        if vlm.adapter.kind != "vlm":
            return f"{cls.name} prunes a VLM's visual tokens; {vlm.family} is a {vlm.adapter.kind}"
        return None

    def budget(self, sample: int, count: int, padded: int) -> int:
        wanted = self.keep if isinstance(self.keep, int) else max(1, round(self.keep * count))
        if wanted > count:
            raise ValueError(f"{self.name}: keep={self.keep} exceeds the {count} visual tokens of sample {sample}")
        if self.debias is not None and self.debias.padding and padded:
            wanted = min(wanted, max(1, count - padded))
        return wanted

    def stage_target(self, stage: int, count: int, budget: int) -> int:
        if stage == len(self.layers) - 1:
            return budget
        return round(count * (budget / count) ** ((stage + 1) / len(self.layers)))

    def _padded(self, layout, device) -> list[torch.Tensor]:
        out, image_index = [], 0
        for sample in layout.samples:
            found = []
            for image in sample.images:
                flags = self.padding[image_index] if self.padding is not None else image.padding
                image_index += 1
                if flags is None:
                    continue
                if len(flags) != len(image):
                    raise ValueError(f"padding mask of image {image_index - 1} has {len(flags)} entries for "
                                     f"{len(image)} visual tokens")
                found.append(image.positions[flags.bool().cpu()])
            out.append(torch.cat(found).to(device) if found else torch.empty(0, dtype=torch.long, device=device))
        return out


class HostRun:
    """One block of a host (``trace[host]``): its scorers, the trends it debiases by, and the
    :class:`~vlmtools.drop.DropRun` whose choosers rank and keep.

    ``kept_at(layer)``: original positions present in ``layer`` at the latest prefill;
    ``collected`` (calibration only): per stage, ``(sample layout, visual indices, raw scores,
    visual count)`` of each sample's real patches.
    """

    def __init__(self, host: Host, vlm, plan: Plan):
        self.host, self.vlm, self.state = host, vlm, plan.state
        stages = range(len(host.layers))
        self.trends: dict[int, Trend | None] = {
            stage: host.debias.trend_for(host.calibration_key(vlm, stage)) if host.debias else None for stage in stages}
        self.collected: dict[int, list] | None = {stage: [] for stage in stages} if host.collect else None
        self.scorers = host.scorers(self, vlm, plan)
        self.padded: list[torch.Tensor] = []
        self.present: torch.Tensor | None = None
        """While a stage chooses: per sample, the letterbox-padding positions whose ``m`` is 0 (empty when
        debiasing leaves padding alone), and the positions present ``(B, n)``; :meth:`Host.select` may read them."""
        self.drop = DropTokens({layer: partial(self._choose, stage) for stage, layer in enumerate(host.layers)},
                               positions=host.positions).attach(vlm, plan)

    def kept_at(self, layer: int) -> torch.Tensor:
        """Original positions present in ``layer`` (at or after the first drop) at the latest prefill, ``(B, n)``."""
        return self.drop.kept_at(layer)

    def present_at(self, layer: int, batch: int, length: int, device) -> torch.Tensor:
        """Original positions present in ``layer`` during the current prefill, ``(B, n)``."""
        if layer < self.host.layers[0]:
            return torch.arange(length, device=device).expand(batch, -1)
        return self.drop.kept_at(layer)

    def _choose(self, stage: int, state, hidden: torch.Tensor, kept: torch.Tensor):
        host, layout = self.host, state.layout
        layout.require_images()
        visual = [sample.visual_positions().to(kept.device) for sample in layout.samples]
        suppress = self._suppressed(stage, hidden, kept, layout)
        self.padded, self.present = [padded for padded, _ in suppress], kept
        budgets = [host.budget(b, len(v), len(suppress[b][0])) for b, v in enumerate(visual)]
        targets = [host.stage_target(stage, len(v), r) for v, r in zip(visual, budgets)]
        raw = host.score(self, stage, hidden, kept, layout, targets)
        chosen = []
        for b, present in enumerate(kept):
            columns = torch.isin(present, visual[b]).nonzero().squeeze(1)
            index = torch.searchsorted(visual[b], present[columns])
            if self.collected is not None:  # calibration: raw scores of real (non-padding) patches
                real = ~torch.isin(present[columns], host._padded(layout, kept.device)[b])
                self.collected[stage].append((layout.samples[b], index[real].cpu(),
                                              raw[b, columns[real]].detach().float().cpu(), len(visual[b])))
                continue
            padded, sinks = suppress[b]
            flags = torch.isin(present[columns], torch.cat([padded, sinks])) if host.debias else None
            scores = debiased(raw[b, columns], index, len(visual[b]), self.trends[stage], flags)
            keep, merged = host.select(self, b, scores, columns, hidden[b], min(targets[b], len(columns)))
            is_pad = torch.isin(present, layout.samples[b].padding.to(present.device))
            others = ~is_pad
            others[columns] = False
            ranked = columns[scores.argsort(descending=True, stable=True)]
            chosen.append((others.nonzero().squeeze(1), keep, merged, ranked, is_pad.nonzero().squeeze(1)))
        if self.collected is not None:
            return kept
        return self._assemble(kept, hidden, chosen)

    @staticmethod
    def _assemble(kept, hidden, chosen):
        """Equal-length rows. Masked padding tokens are dropped unless a row needs them to reach the
        batch's width; then its next-ranked candidates fill the rest."""
        width = max(len(others) + len(keep) for others, keep, *_ in chosen)
        positions, states, merging = [], [], any(merged is not None for _, _, merged, _, _ in chosen)
        for b, (others, keep, merged, ranked, pads) in enumerate(chosen):
            missing = width - len(others) - len(keep)
            extra = pads[:missing]
            extra = torch.cat([extra, ranked[~torch.isin(ranked, keep)][:missing - len(extra)]])
            columns = torch.cat([others, keep, extra])
            positions.append(kept[b][columns])
            if merging:
                rows = hidden[b][columns].clone()
                if merged is not None:
                    rows[len(others):len(others) + len(keep)] = merged.to(rows.dtype)
                states.append(rows)
        positions = torch.stack(positions)
        return (positions, torch.stack(states)) if merging else positions

    def _suppressed(self, stage, hidden, kept, layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample, the (padding, sink) visual positions whose ``m`` is 0."""
        host, empty = self.host, torch.empty(0, dtype=torch.long, device=kept.device)
        padded = host._padded(layout, kept.device) if host.debias and host.debias.padding else [empty] * len(layout)
        if not (host.debias and host.debias.sinks):
            return [(p, empty) for p in padded]
        full = hidden.new_zeros(hidden.shape[0], layout.seq_len, hidden.shape[-1])
        full.scatter_(1, kept[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
        layer = host.layers[stage]
        sinks = visual_sink_positions({layer: full}, layout, signature=model_signature(self.vlm.model.config),
                                      num_layers=self.vlm.num_layers, layers=(layer,),
                                      **host.debias.sink_settings)
        return [(p, s.to(kept.device)) for p, s in zip(padded, sinks)]


def at_present(values: list[torch.Tensor], layout: TokenLayout, kept: torch.Tensor) -> torch.Tensor:
    """Per-sample values in visual order -> ``(B, n)`` aligned with ``kept`` (0 at non-visual tokens)."""
    out = torch.zeros(kept.shape, dtype=torch.float32, device=kept.device)
    for b, (sample, present) in enumerate(zip(layout.samples, kept)):
        visual = sample.visual_positions().to(kept.device)
        columns = torch.isin(present, visual).nonzero().squeeze(1)
        out[b, columns] = values[b].to(out)[torch.searchsorted(visual, present[columns])]
    return out


def merge_into(hidden: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor, features: torch.Tensor,
               mode: str) -> torch.Tensor:
    """Merge each source token into its most similar target (cosine of ``features``).

    ``hidden``/``features`` are one sample's rows; ``targets``/``sources`` index them.
    ``mode="sum"``: target + mean of its sources (VisionZip's released code);
    ``"mean"``: mean of the target and its sources (a cluster centre).
    """
    merged = hidden[targets].float()
    if not len(sources):
        return merged
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    assign = (normed[sources] @ normed[targets].T).argmax(-1)
    total = torch.zeros_like(merged).index_add_(0, assign, hidden[sources].float())
    count = torch.zeros(len(targets), device=hidden.device).index_add_(0, assign, torch.ones_like(assign,
                                                                                                   dtype=torch.float))
    if mode == "sum":
        return merged + total / count.clamp(min=1)[:, None]
    return (merged + total) / (count + 1)[:, None]


def lattice(grids: list[tuple[int, int]], target: int) -> torch.Tensor:
    """1 on an evenly spaced 2-D lattice of ~``target`` points over the grids (raster order), else 0."""
    total = sum(h * w for h, w in grids)
    flags = []
    for h, w in grids:
        share = max(1, round(target * h * w / total))
        rows = max(1, min(h, round(math.sqrt(share * h / w))))
        cols = max(1, min(w, math.ceil(share / rows)))
        r = ((torch.arange(rows) + 0.5) * h / rows).long()
        c = ((torch.arange(cols) + 0.5) * w / cols).long()
        flag = torch.zeros(h, w)
        flag[r[:, None], c[None, :]] = 1
        flags.append(flag.flatten())
    return torch.cat(flags)
