"""Independent references for the language-model pruning hosts.

Each reference recomputes a host's choice from the paper's / released code's formulas on an
*unwrapped* copy of the model (``copy.deepcopy``, eager attention): plain torch forward hooks
capture what it needs (hidden states entering a layer, the rotary tables and mask the model passes
each layer, ``k_proj`` / ``k_norm`` outputs, eager attention probabilities), and a decoder loop
written here (:func:`drop_loop`) runs the layers on the kept tokens, each at its original position
(the model's own rotary rows and mask rows and columns: causal, padding, sliding windows,
bidirectional image blocks) with whatever the model adds between layers (Qwen3-VL's DeepStack) kept
at its positions. Nothing goes through vlmtools' seam (``vlm.use``, the registered attention
function, ``DropTokens``) or through ``pruning``'s code. What a reference shares with the hosts is
the layout (which positions are visual, the text after the image, padding), which has its own
tests, and the documented conventions below.

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
attention probabilities, post-rotary keys, rotary tables and masks of one plain forward) and
:func:`run_with_drops` / :func:`drop_loop` (a decoder loop that drops tokens where a chooser says).
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
    """The decoder stack: the module holding the token embeddings (``embed_tokens``), its ``layers`` and ``norm``."""
    for module in model.modules():
        if hasattr(module, "embed_tokens") and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return module
    raise LookupError(f"no decoder stack with embed_tokens and layers in {type(model).__name__}")


def has_attention(block: torch.nn.Module) -> bool:
    """A softmax-attention layer (hybrid families also have linear-attention layers)."""
    return hasattr(block, "self_attn")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, heads, n, d)``, tables ``(B, n, r)``: ``x cos + rotate_half(x) sin`` on the leading ``r``
    dimensions (RoFormer's rotation as Llama / Qwen / Gemma apply it; ``r < d``: partial rotary, the rest as is)."""
    width = cos.shape[-1]
    rotated = x[..., :width] * cos[:, None] + rotate_half(x[..., :width]) * sin[:, None]
    return torch.cat([rotated, x[..., width:]], dim=-1)


def take(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows ``positions`` ``(B, n)`` of ``t`` ``(1|B, L, ...)`` along dim 1."""
    t = t.expand(positions.shape[0], *t.shape[1:])
    return torch.stack([row[p] for row, p in zip(t, positions)])


def take_mask(mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """The model's own mask over the full prompt restricted to the tokens at ``positions`` ``(B, n)``: a 4-D mask's
    query rows and key columns, a 2-D padding mask's columns."""
    if mask is None:
        return None
    mask = mask.expand(positions.shape[0], *mask.shape[1:])
    if mask.dim() == 2:
        return torch.stack([row[p] for row, p in zip(mask, positions)])
    return torch.stack([row[:, p][:, :, p] for row, p in zip(mask, positions)])


def key_heads(output: torch.Tensor, count: int, head_dim: int) -> torch.Tensor:
    """A ``k_proj`` (``(B, n, KV*d)``) or ``k_norm`` (``(B, n, KV, d)`` or ``(B, KV, n, d)``) output as ``(B, KV, n, d)``."""
    if output.dim() == 3:
        return output.view(output.shape[0], count, -1, head_dim).transpose(1, 2)
    return output.transpose(1, 2) if output.shape[1] == count else output


def key_module(block: torch.nn.Module) -> torch.nn.Module:
    """Where a layer's keys are final but for rotary: ``k_norm`` where the family has one, else ``k_proj``."""
    attention = block.self_attn
    return attention.k_norm if getattr(attention, "k_norm", None) is not None else attention.k_proj


@dataclass
class Capture:
    """One plain forward of an unwrapped model, recorded per decoder layer (index = layer)."""

    hidden: list[torch.Tensor]
    """Residual stream entering each layer ``(B, L, D)``; one more entry: the last layer's output (before the final norm)."""
    probs: list[torch.Tensor | None]
    """Eager attention probabilities of each layer ``(B, H, L, L)`` (None: a linear-attention layer)."""
    keys: list[torch.Tensor | None]
    """Keys of each attention layer after rotary ``(B, KV, L, d)``: its ``k_proj`` (or ``k_norm``) output rotated here."""
    tables: list[tuple[torch.Tensor, torch.Tensor]]
    """The rotary ``(cos, sin)`` the model passes each layer ``(B, L, r)``."""
    masks: list[torch.Tensor | None]
    """The mask the model passes each layer (eager: 4-D additive; a linear-attention layer's 2-D padding mask)."""
    deltas: list[torch.Tensor]
    """What the model adds to the residual stream between layer ``i``'s output and layer ``i+1``'s input
    (Qwen3-VL's DeepStack features at visual positions; zero elsewhere), ``(B, L, D)``."""
    real: torch.Tensor
    """``(B, L)`` True at real (non-padding) tokens."""

    @property
    def cos(self) -> torch.Tensor:
        return self.tables[0][0]

    @property
    def sin(self) -> torch.Tensor:
        return self.tables[0][1]


def capture(model: torch.nn.Module, inputs: dict) -> Capture:
    """Run the unwrapped ``model`` (eager attention) once on ``inputs``, hooks on every decoder layer."""
    lm = language_model(model)
    entering, leaving, probs, raw_keys, tables, masks = {}, {}, {}, {}, {}, {}
    handles = []
    for i, block in enumerate(lm.layers):
        def before(module, args, kwargs, i=i):
            entering[i] = (args[0] if args else kwargs["hidden_states"]).detach()
            tables[i], masks[i] = kwargs.get("position_embeddings"), kwargs.get("attention_mask")

        def after(module, args, kwargs, output, i=i):
            leaving[i] = (output[0] if isinstance(output, tuple) else output).detach()

        handles += [block.register_forward_pre_hook(before, with_kwargs=True),
                    block.register_forward_hook(after, with_kwargs=True)]
        if has_attention(block):
            handles += [block.self_attn.register_forward_hook(lambda m, a, o, i=i: probs.__setitem__(i, o[1].detach())),
                        key_module(block).register_forward_hook(lambda m, a, o, i=i: raw_keys.__setitem__(i, o.detach()))]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    batch, length = inputs["input_ids"].shape
    layers = range(len(lm.layers))
    full = {i: tuple(t.expand(batch, -1, -1) for t in tables[i]) for i in layers}
    keys = [apply_rotary(key_heads(raw_keys[i], length, lm.layers[i].self_attn.head_dim), *full[i])
            if i in raw_keys else None for i in layers]
    deltas = [entering[i + 1] - leaving[i] for i in layers if i + 1 in entering]
    return Capture(hidden=[entering[i] for i in layers] + [leaving[len(lm.layers) - 1]],
                   probs=[probs.get(i) for i in layers], keys=keys, tables=[full[i] for i in layers],
                   masks=[masks[i] for i in layers], deltas=deltas, real=inputs["attention_mask"].bool())


def capture_inputs(model: torch.nn.Module, inputs: dict) -> dict:
    """The embeddings entering decoder layer 0 and its rotary tables (a pre-hook; the forward stops there)."""
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


# ---------------------------------------------------------------------------------------------
# A decoder loop that drops tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """The decoder layers, what the model passes them over the full prompt, and what each latest run saw."""

    layers: torch.nn.ModuleList
    full: Capture
    probs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Layer -> (present positions, eager probabilities) of the latest run of that (attention) layer."""
    keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Layer -> (present positions, post-rotary keys ``(B, KV, n, d)``)."""

    @property
    def real(self) -> torch.Tensor:
        return self.full.real

    def inputs(self, index: int, present: torch.Tensor) -> dict:
        """Layer ``index``'s keyword inputs for the tokens at ``present``: its rotary tables' rows and its mask's
        rows and columns (each token keeps its original position and what it may see)."""
        cos, sin = self.full.tables[index]
        return {"position_embeddings": (take(cos, present), take(sin, present)),
                "attention_mask": take_mask(self.full.masks[index], present)}


@dataclass
class Step:
    """What a chooser sees at a drop layer (every tensor over the tokens present there)."""

    layer: int
    hidden: torch.Tensor
    """``(B, n, D)`` entering the drop layer."""
    present: torch.Tensor
    """``(B, n)`` their original positions."""
    run: Loop

    def attention(self, layer: int | None = None) -> torch.Tensor:
        """Eager probabilities ``(B, H, n, n)`` of ``layer`` (default: the drop layer) run on these tokens."""
        index = self.layer if layer is None else layer
        block = self.run.layers[index]
        with torch.no_grad():
            _, probs = block.self_attn(hidden_states=block.input_layernorm(self.hidden),
                                       **self.run.inputs(index, self.present))
        return probs


Chooser = Callable[[Step], tuple[list[list[int]], list[int]]]
"""``chooser(step)`` -> per sample, its present visual positions ranked best first, and its target count."""


@dataclass
class Dropped:
    kept: dict[int, list[list[int]]]
    """Per stage layer, each sample's kept visual positions (the batch rule of :func:`assemble` applied)."""
    hidden: torch.Tensor
    """``(B, n, D)`` leaving the last layer (before the final norm), at the positions ``present``."""
    present: torch.Tensor
    loop: Loop


def run_with_drops(model: torch.nn.Module, inputs: dict, layout, stages: dict[int, Chooser]
                   ) -> dict[int, list[list[int]]]:
    """Per stage layer, each sample's kept visual positions (:func:`drop_loop`)."""
    return drop_loop(model, inputs, layout, stages).kept


def drop_loop(model: torch.nn.Module, inputs: dict, layout, stages: dict[int, Chooser]) -> Dropped:
    """Run the unwrapped ``model``'s decoder layers, dropping visual tokens at the input of each stage layer.

    A plain forward first records what the model passes each layer over the full prompt (rotary tables, mask)
    and adds between layers; the loop then gives each layer those at the rows and columns of the tokens still
    present, so the kept tokens keep their original positions and visibility (causal, padding, sliding
    windows, bidirectional image blocks), and what the model adds between layers stays at its positions.
    """
    lm = language_model(model)
    loop = Loop(layers=lm.layers, full=capture(model, inputs))
    hidden = loop.full.hidden[0]
    batch, length = inputs["input_ids"].shape
    present = torch.arange(length).expand(batch, -1)
    kept: dict[int, list[list[int]]] = {}
    for index, block in enumerate(lm.layers):
        if index in stages:
            rankings, targets = stages[index](Step(index, hidden, present, loop))
            rows, kept[index] = assemble(present, layout, rankings, targets)
            present = torch.stack([present[b][r] for b, r in enumerate(rows)])
            hidden = torch.stack([hidden[b][r] for b, r in enumerate(rows)])
        seen, handles = {}, []
        if has_attention(block):
            handles = [block.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("probs", o[1].detach())),
                       key_module(block).register_forward_hook(lambda m, a, o: seen.__setitem__("keys", o.detach()))]
        inputs_here = loop.inputs(index, present)
        try:
            with torch.no_grad():
                out = block(hidden, position_ids=None, **inputs_here)
        finally:
            for handle in handles:
                handle.remove()
        hidden = out[0] if isinstance(out, tuple) else out
        if index < len(loop.full.deltas):
            hidden = hidden + take(loop.full.deltas[index], present)
        if seen:
            loop.probs[index] = (present, seen["probs"])
            keys = key_heads(seen["keys"], present.shape[1], block.self_attn.head_dim)
            loop.keys[index] = (present, apply_rotary(keys, *inputs_here["position_embeddings"]))
    return Dropped(kept, hidden, present, loop)


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
