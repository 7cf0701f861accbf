"""Independent references for the language-model pruning hosts.

Each reference recomputes a host's choice from the paper's / released code's formulas on an
*unwrapped* copy of the model (``copy.deepcopy``, eager attention): plain torch forward hooks
capture what it needs (hidden states entering a layer, the rotary tables, ``k_proj`` outputs,
eager attention probabilities), and a decoder loop written here (:func:`run_with_drops`) runs the
layers on the kept tokens. Nothing goes through vlmtools' seam (``vlm.use``, the registered
attention function, ``DropTokens``) or through ``pruning``'s code. What a reference shares with the
hosts is the layout (which positions are visual, the text after the image, padding), which has
its own tests, and the documented conventions below.

Conventions (the hosts' documented rules):

* Ranking and ties: scores are sorted descending, ties to the lower position (a stable sort over
  visual tokens in ascending position order). ``margin`` reports the gap between the last kept and
  the first dropped score so that a test can tell a real mismatch from a numerical near-tie.
* Budgets: ``R = keep`` (a count) or ``max(1, round(keep * N))`` (a fraction of the sample's N
  visual tokens); stage ``j`` of ``S`` keeps ``round(N (R/N)^((j+1)/S))``, the last exactly ``R``.
* Batches: every row keeps the same number of tokens. A row whose real non-visual tokens plus its
  budget fall short of the batch's widest row first keeps masked padding tokens, then its next-ranked
  visual tokens (so such a row can keep more than ``R`` visual tokens: :func:`assemble`).

Other test modules may import :func:`unwrapped`, :func:`capture` (per-layer hidden states, eager
attention probabilities and post-rotary keys of one plain forward) and :func:`run_with_drops`
(a decoder loop that drops tokens where a chooser says).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------
# The unwrapped model, read with plain torch hooks
# ---------------------------------------------------------------------------------------------


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with eager attention (its attention modules return their probabilities)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``layers``, ``norm``) of the four test families."""
    return model.model.language_model


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, heads, n, d)``, tables ``(B, n, d)``: ``x cos + rotate_half(x) sin`` (RoFormer, as Llama/Qwen)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def take(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows ``positions`` ``(B, n)`` of ``t`` ``(1|B, L, ...)`` along dim 1."""
    t = t.expand(positions.shape[0], *t.shape[1:])
    return torch.stack([row[p] for row, p in zip(t, positions)])


@dataclass
class Capture:
    """One plain forward of an unwrapped model, recorded per decoder layer."""

    hidden: list[torch.Tensor]
    """Residual stream entering each layer ``(B, L, D)``; one more entry: the last layer's output (before the final norm)."""
    probs: list[torch.Tensor]
    """Eager attention probabilities of each layer ``(B, H, L, L)``."""
    keys: list[torch.Tensor]
    """Keys of each layer after rotary ``(B, KV, L, d)``: ``k_proj``'s output rotated here."""
    cos: torch.Tensor
    sin: torch.Tensor
    """The rotary tables the model passes its layers ``(B, L, d)``."""
    real: torch.Tensor
    """``(B, L)`` True at real (non-padding) tokens."""


def capture(model: torch.nn.Module, inputs: dict) -> Capture:
    """Run the unwrapped ``model`` (eager attention) once on ``inputs``, hooks on every decoder layer."""
    lm = language_model(model)
    hidden, probs, raw_keys, tables = {}, {}, {}, {}
    handles = []
    for i, layer in enumerate(lm.layers):
        def before(module, args, kwargs, i=i):
            hidden[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            tables[i] = kwargs["position_embeddings"]

        def after_layer(module, args, kwargs, output, i=i):
            hidden[i + 1] = (output[0] if isinstance(output, tuple) else output).detach()

        def attention(module, args, output, i=i):
            probs[i] = output[1].detach()

        def keys(module, args, output, i=i):
            raw_keys[i] = output.detach()

        handles += [layer.register_forward_pre_hook(before, with_kwargs=True),
                    layer.register_forward_hook(after_layer, with_kwargs=True),
                    layer.self_attn.register_forward_hook(attention),
                    layer.self_attn.k_proj.register_forward_hook(keys)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    batch, length = inputs["input_ids"].shape
    cos, sin = (t.expand(batch, -1, -1) for t in tables[0])
    head_dim = cos.shape[-1]
    keys = [apply_rotary(raw_keys[i].view(batch, length, -1, head_dim).transpose(1, 2), cos, sin)
            for i in range(len(lm.layers))]
    real = inputs["attention_mask"].bool()
    return Capture(hidden=[hidden[i] for i in range(len(lm.layers) + 1)], probs=[probs[i] for i in range(len(lm.layers))],
                   keys=keys, cos=cos, sin=sin, real=real)


def additive_mask(present: torch.Tensor, real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, n, n)`` eager mask over the tokens at original positions ``present``: a query sees the keys at
    or before its own position that are real tokens."""
    seen = (present[:, None, :] <= present[:, :, None]) & torch.gather(real, 1, present)[:, None, :]
    return torch.zeros(seen.shape, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------------------------------------
# A decoder loop that drops tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """What a chooser sees at a drop layer (every tensor over the tokens present there)."""

    layer: int
    hidden: torch.Tensor
    """``(B, n, D)`` entering the drop layer."""
    present: torch.Tensor
    """``(B, n)`` their original positions."""
    run: "Loop"

    def attention(self, layer: int | None = None) -> torch.Tensor:
        """Eager probabilities ``(B, H, n, n)`` of ``layer`` (default: the drop layer) run on these tokens."""
        index = self.layer if layer is None else layer
        block = self.run.layers[index]
        cos, sin = take(self.run.cos, self.present), take(self.run.sin, self.present)
        mask = additive_mask(self.present, self.run.real, self.hidden.dtype)
        with torch.no_grad():
            _, probs = block.self_attn(hidden_states=block.input_layernorm(self.hidden),
                                       position_embeddings=(cos, sin), attention_mask=mask)
        return probs


@dataclass
class Loop:
    layers: torch.nn.ModuleList
    cos: torch.Tensor
    sin: torch.Tensor
    real: torch.Tensor
    probs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Layer -> (present positions, eager probabilities) of the latest run of that layer."""
    keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Layer -> (present positions, post-rotary keys ``(B, KV, n, d)``)."""


Chooser = Callable[[Step], tuple[list[list[int]], list[int]]]
"""``chooser(step)`` -> per sample, its present visual positions ranked best first, and its target count."""


def run_with_drops(model: torch.nn.Module, inputs: dict, layout, stages: dict[int, Chooser]
                   ) -> dict[int, list[list[int]]]:
    """Run the unwrapped ``model``'s decoder layers, dropping visual tokens at the input of each stage layer.

    Per stage, the kept visual positions of each sample (the batch rule of :func:`assemble` applied).
    The layers see the kept tokens at their original rotary positions with a causal + padding mask.
    """
    lm = language_model(model)
    first = capture_inputs(model, inputs)
    loop = Loop(layers=lm.layers, cos=first["cos"], sin=first["sin"], real=inputs["attention_mask"].bool())
    hidden = first["hidden"]
    batch, length = inputs["input_ids"].shape
    present = torch.arange(length).expand(batch, -1)
    kept: dict[int, list[list[int]]] = {}
    for index, block in enumerate(lm.layers):
        if index in stages:
            rankings, targets = stages[index](Step(index, hidden, present, loop))
            rows, kept[index] = assemble(present, layout, rankings, targets)
            present = torch.stack([present[b][r] for b, r in enumerate(rows)])
            hidden = torch.stack([hidden[b][r] for b, r in enumerate(rows)])
        cos, sin = take(loop.cos, present), take(loop.sin, present)
        mask = additive_mask(present, loop.real, hidden.dtype)
        seen = {}
        handles = [block.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("probs", o[1].detach())),
                   block.self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("keys", o.detach()))]
        try:
            with torch.no_grad():
                out = block(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
        finally:
            for handle in handles:
                handle.remove()
        hidden = out[0] if isinstance(out, tuple) else out
        head_dim = cos.shape[-1]
        loop.probs[index] = (present, seen["probs"])
        loop.keys[index] = (present, apply_rotary(seen["keys"].view(batch, present.shape[1], -1, head_dim)
                                                  .transpose(1, 2), cos, sin))
    return kept


def capture_inputs(model: torch.nn.Module, inputs: dict) -> dict:
    """The embeddings entering decoder layer 0 and the rotary tables (a pre-hook; the forward stops there)."""
    lm = language_model(model)
    seen = {}

    class Stop(Exception):
        pass

    def before(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
        cos, sin = kwargs["position_embeddings"]
        batch = seen["hidden"].shape[0]
        seen["cos"], seen["sin"] = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        raise Stop

    handle = lm.layers[0].register_forward_pre_hook(before, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except Stop:
        pass
    finally:
        handle.remove()
    return seen


def assemble(present: torch.Tensor, layout, rankings: list[list[int]], targets: list[int]
             ) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Equal-width rows: per sample the real non-visual tokens, its ``target`` best-ranked visual tokens and, when
    the batch's widest row needs more, its padding tokens then its next-ranked visual tokens.

    Returns the row indices (into ``present``) each sample keeps, and its kept visual positions.
    """
    others, pads = [], []
    for b, sample in enumerate(layout.samples):
        row = present[b].tolist()
        visual, padding = set(sample.visual_positions().tolist()), set(sample.padding.tolist())
        others.append([p for p in row if p not in visual and p not in padding])
        pads.append([p for p in row if p in padding])
    width = max(len(o) + t for o, t in zip(others, targets))
    rows, kept = [], []
    for b in range(len(layout.samples)):
        missing = width - len(others[b]) - targets[b]
        filler = pads[b][:missing]
        chosen = rankings[b][:targets[b] + max(0, missing - len(filler))]
        positions = sorted(others[b] + filler + chosen)
        index = {p: i for i, p in enumerate(present[b].tolist())}
        rows.append(torch.tensor([index[p] for p in positions]))
        kept.append(sorted(chosen))
    return rows, kept


# ---------------------------------------------------------------------------------------------
# Budgets, rankings
# ---------------------------------------------------------------------------------------------


def budget(keep: int | float, count: int) -> int:
    return keep if isinstance(keep, int) else max(1, round(keep * count))


def stage_target(stage: int, stages: int, count: int, final: int) -> int:
    if stage == stages - 1:
        return final
    return round(count * (final / count) ** ((stage + 1) / stages))


def ranked(scores: dict[int, float]) -> list[int]:
    """Positions best first: larger score first, ties to the lower position."""
    return sorted(scores, key=lambda p: (-scores[p], p))


def margin(scores: dict[int, float], ranking: list[int], count: int) -> float:
    """Score gap between the last kept and the first dropped candidate (inf when nothing is dropped)."""
    if count >= len(ranking) or count == 0:
        return math.inf
    return scores[ranking[count - 1]] - scores[ranking[count]]


def visual_present(step: Step, b: int, sample) -> list[tuple[int, int]]:
    """``(column, position)`` of the sample's visual tokens present at this step."""
    visual = set(sample.visual_positions().tolist())
    return [(c, p) for c, p in enumerate(step.present[b].tolist()) if p in visual]


# ---------------------------------------------------------------------------------------------
# The hosts' references
# ---------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """Per stage layer, each sample's kept visual positions; and the smallest score margin seen."""

    kept: dict[int, list[list[int]]]
    margins: list[float]


def last_row_ranker(keep, layers: tuple[int, ...], layout, reading: str, margins: list[float]) -> dict[int, Chooser]:
    """FastV (``reading="previous"``: the last token's head-mean attention in the layer before each drop, as
    that layer ran) and PDrop (``"layer"``: the drop layer's own attention on its input, before dropping)."""
    stages = {}
    for stage, layer in enumerate(layers):
        def choose(step: Step, stage=stage):
            if reading == "previous":
                before, probs = step.run.probs[step.layer - 1]
                assert torch.equal(before, step.present)  # the layer before saw what the drop layer sees
            else:
                probs = step.attention()
            row = probs[:, :, -1, :].mean(1)  # the last prompt token; mean over heads
            rankings, targets = [], []
            for b, sample in enumerate(layout.samples):
                count = len(sample.visual_positions())
                scores = {p: float(row[b, c]) for c, p in visual_present(step, b, sample)}
                order = ranked(scores)
                target = min(stage_target(stage, len(layers), count, budget(keep, count)), len(order))
                margins.append(margin(scores, order, target))
                rankings.append(order)
                targets.append(target)
            return rankings, targets
        stages[layer] = choose
    return stages


def fastv(model, inputs, layout, keep, layer: int) -> Reference:
    margins = []
    kept = run_with_drops(unwrapped(model), inputs, layout, last_row_ranker(keep, (layer,), layout, "previous", margins))
    return Reference(kept, margins)


def pdrop(model, inputs, layout, keep, layers: tuple[int, ...], reading: str = "layer") -> Reference:
    margins = []
    kept = run_with_drops(unwrapped(model), inputs, layout, last_row_ranker(keep, layers, layout, reading, margins))
    return Reference(kept, margins)


def dart(model, inputs, layout, keep, layer: int, image_pivots: int, text_pivots: int) -> Reference:
    """The released code's procedure: pivots by the L1 norm of layer K-1's keys (after rotary, heads concatenated)
    among the image tokens and among the text after the image; per pivot (position order) its share of the budget
    of image tokens least similar (cosine of the hidden states entering layer K after the final norm) among those
    not yet kept. A row that must keep more takes the rest by least similarity to any pivot."""
    ref = unwrapped(model)
    norm = language_model(ref).norm
    margins = []

    def choose(step: Step):
        before, keys = step.run.keys[step.layer - 1]
        assert torch.equal(before, step.present)
        l1 = keys.abs().sum(dim=(1, 3))  # (B, n): every head's key concatenated, L1
        with torch.no_grad():
            states = norm(step.hidden)
        rankings, targets = [], []
        for b, sample in enumerate(layout.samples):
            column = {p: c for c, p in enumerate(step.present[b].tolist())}
            visual = [p for _, p in visual_present(step, b, sample)]
            after = [p for p in sample.text.indices().tolist() if p in column]
            target = min(budget(keep, len(sample.visual_positions())), len(visual))
            norms = {p: float(l1[b, column[p]]) for p in visual + after}
            image = ranked({p: norms[p] for p in visual})[:min(image_pivots, target)]
            text = ranked({p: norms[p] for p in after})[:text_pivots]
            margins.append(margin({p: norms[p] for p in visual}, ranked({p: norms[p] for p in visual}), len(image)))

            def cosine(p, q):
                return float(torch.nn.functional.cosine_similarity(states[b, column[p]], states[b, column[q]], dim=0))

            pivots = sorted(image + text)
            chosen, left = list(image), [p for p in visual if p not in image]
            per, extra = divmod(target - len(image), len(pivots))
            for j, pivot in enumerate(pivots):
                share = per + (1 if j < extra else 0)
                similarity = {p: -cosine(pivot, p) for p in left}  # least similar first
                picks = ranked(similarity)[:share]
                if share and share < len(left):
                    margins.append(margin(similarity, ranked(similarity), share))
                chosen += picks
                left = [p for p in left if p not in picks]
            rest = ranked({p: 1 - max(cosine(q, p) for q in pivots) for p in left})
            rankings.append(sorted(chosen) + rest)
            targets.append(target)
        return rankings, targets

    return Reference(run_with_drops(ref, inputs, layout, {layer: choose}), margins)


def random(model, inputs, layout, keep, layer: int, seed: int) -> Reference:
    """Uniform scores ``torch.rand`` over the ``(B, n)`` tokens present at the drop layer, from a generator seeded
    with ``seed`` at every call; the top ones kept."""
    def choose(step: Step):
        generator = torch.Generator().manual_seed(seed)
        uniform = torch.rand(step.present.shape, generator=generator)
        rankings, targets = [], []
        for b, sample in enumerate(layout.samples):
            order = ranked({p: float(uniform[b, c]) for c, p in visual_present(step, b, sample)})
            rankings.append(order)
            targets.append(min(budget(keep, len(sample.visual_positions())), len(order)))
        return rankings, targets

    return Reference(run_with_drops(unwrapped(model), inputs, layout, {layer: choose}), [])


def lattice_points(grids: list[tuple[int, int]], target: int) -> list[bool]:
    """An evenly spaced lattice over each grid (raster order, grids concatenated): grid ``(h, w)`` gets
    ``share = max(1, round(target h w / total))`` points as ``r x c`` rows and columns,
    ``r = clamp(round(sqrt(share h / w)), 1, h)``, ``c = clamp(ceil(share / r), 1, w)``, at the cell centres
    ``floor((i + 1/2) h / r)`` and ``floor((j + 1/2) w / c)``."""
    total = sum(h * w for h, w in grids)
    flags = []
    for h, w in grids:
        share = max(1, round(target * h * w / total))
        rows = min(h, max(1, round(math.sqrt(share * h / w))))
        cols = min(w, max(1, math.ceil(share / rows)))
        picked_rows = {math.floor((i + 0.5) * h / rows) for i in range(rows)}
        picked_cols = {math.floor((j + 0.5) * w / cols) for j in range(cols)}
        flags += [r in picked_rows and c in picked_cols for r in range(h) for c in range(w)]
    return flags


def grid(model, inputs, layout, keep, layer: int) -> Reference:
    """Lattice points first (visual order), then the others in visual order."""
    def choose(step: Step):
        rankings, targets = [], []
        for b, sample in enumerate(layout.samples):
            visual = sample.visual_positions().tolist()
            target = budget(keep, len(visual))
            grids = [g for image in sample.images for g in (image.tiles or [image.grid])]
            flags = lattice_points(grids, target)
            rankings.append(ranked({p: float(f) for p, f in zip(visual, flags)}))
            targets.append(target)
        return rankings, targets

    return Reference(run_with_drops(unwrapped(model), inputs, layout, {layer: choose}), [])
