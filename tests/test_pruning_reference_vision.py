"""SparseVLM, VisionZip and FasterVLM keep exactly what independent references of their released code keep.

The references are written here from the released code's formulas and computed on an *unwrapped*
copy of the model (``reference_pruning.unwrapped``: a deep copy with eager attention, read with plain
torch hooks, never through vlmtools' seam or ``pruning``'s code):

* FasterVLM: the [CLS] query row of the encoder block whose output the projector reads (the released
  code's ``attentions[-2]`` with ``hidden_states[-2]``), eager probabilities averaged over heads, patches
  only; each sample keeps its ``keep`` best.
* VisionZip: the same row summed over heads picks the dominant tokens; the others in LM order, every
  ``len // contextual``-th from the first a target, each other one joins the target of largest cosine
  of the block's head-mean keys, and a target's LM input embedding becomes ``target + mean(joined)``.
* SparseVLM: raters from the LM input embeddings (``mean over image v of softmax over text t (e_v . e_t)``
  above its mean); each stage layer's eager probabilities on the tokens present (``votes="previous"``: the
  layer before's, as it ran on the same tokens), head mean, the raters' rows over the visual columns
  (``P``); score = mean over raters; budget ``min(int(scale rank(P) + bias), n - 1)`` (at least ``keep``)
  or the equal-fraction schedule; recycling: the ``int(recycle dropped) + 1``
  best dropped, density-peak clusters (written out below), each cluster's mean at its centre's place.

Encoder tokens land where transformers itself puts them: LLaVA-NeXT's ``pack_image_features`` is run on
index-valued features. The layout (visual positions, text after the image, padding) is shared with the
hosts and has its own tests; the batch rule is ``reference_pruning.assemble`` (a shorter row keeps its
padding, then its next-ranked tokens). Ties go to the lower position (stable sorts), equal densities to
the earlier token. The hidden rows entering the layer after the drop (a plain forward pre-hook on the
wrapped model's layer, registered inside the block so that it runs after the seam's) must equal the
reference's, merged rows included. A trivial score fails every check.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vlmtools
from pruning import Debias, FasterVLM, SparseVLM, VisionZip
from tests import reference_pruning as reference
from vlmtools.testing.vlm import BUILDERS, IMAGE

NEAR_TIE = 1e-6
"""A score gap below this at a budget boundary could flip between two correct fp32 computations."""
CLS_FAMILIES = ("llava", "llava_next")
LM_FAMILIES = tuple(BUILDERS)
_MODELS = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = BUILDERS[family]()
    return _MODELS[family]


def attention_layers(family, count: int) -> tuple[int, ...]:
    """The first ``count`` decoder layers from 1 on that have softmax attention (SparseVLM's stages; a hybrid
    family's linear-attention layers have no attention rows to vote with)."""
    model, _ = tiny(family)
    blocks = reference.language_model(model).layers
    return tuple(i for i, block in enumerate(blocks) if i >= 1 and hasattr(block, "self_attn"))[:count]


def agree(got, expected, margins):
    closest = min(margins, default=math.inf)
    assert got == expected, ("a numerical near-tie at a budget boundary (score gap %.2g)" % closest
                             if closest < NEAR_TIE else f"the host kept {got}, the reference {expected}")


# ---------------------------------------------------------------------------------------------
# Through vlmtools
# ---------------------------------------------------------------------------------------------


def through_vlmtools(model, inputs, host, layer: int):
    """Per stage layer, each sample's kept visual positions; the kept positions, hidden rows and position ids
    entering ``layer`` after its drop."""
    vlm = vlmtools.wrap(model)
    layout = vlm.layout(inputs)
    seen = {}

    def entering(module, args, kwargs):
        if "hidden" not in seen:
            seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
            seen["ids"] = kwargs.get("position_ids")

    with torch.no_grad(), vlm.use(host) as trace:
        handle = reference.language_model(model).layers[layer].register_forward_pre_hook(entering, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    kept = {}
    for index in host.layers:
        kept[index] = [sorted(p for p in row.tolist() if p in set(sample.visual_positions().tolist()))
                       for row, sample in zip(trace[host].kept_at(index), layout.samples)]
    return kept, trace[host].kept_at(layer), seen


def same_rows(hidden, positions, expected, mask):
    """The host's rows ``hidden`` ``(B, n, D)`` at ``positions`` ``(B, n)`` equal the reference's ``(B, L, D)`` at
    the real tokens (``mask``: the attention mask; a padding row is a fully masked query, which kernels fill
    differently)."""
    want = torch.stack([expected[b, p] for b, p in enumerate(positions)])
    real = mask.gather(1, positions).bool()
    torch.testing.assert_close(hidden[real], want[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The vision encoder, read with plain hooks
# ---------------------------------------------------------------------------------------------


def cls_block(ref):
    """The [CLS] block of the released code: ``attentions[-2]``, the block whose output is ``hidden_states[-2]``
    (LLaVA's ``vision_feature_layer``)."""
    blocks = ref.model.vision_tower.encoder.layers
    return blocks[len(blocks) + ref.config.vision_feature_layer]


def encoder_rows(ref, inputs):
    """Eager [CLS] probabilities ``(sequences, heads, patches)`` and head-mean keys ``(sequences, patches, d)``
    of the [CLS] block, per encoder sequence in the order the model encodes them."""
    block, seen = cls_block(ref), {}
    handles = [block.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("probs", o[1].detach())),
               block.self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("keys", o.detach()))]
    try:
        with torch.no_grad():
            ref(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    sequences, length, _ = seen["keys"].shape
    keys = seen["keys"].view(sequences, length, block.self_attn.num_heads, -1).mean(2)
    return seen["probs"][:, :, 0, 1:], keys[:, 1:]


def encoder_slots(ref, inputs) -> list[dict[int, int]]:
    """Per sample: LM position -> index of the encoder token shown there (encoder sequences concatenated,
    [CLS] left out); LLaVA-NeXT's image newlines are left out. Where transformers puts each encoder token:
    LLaVA-1.5 in order; LLaVA-NeXT by its own ``pack_image_features`` run on index-valued features."""
    config = ref.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    placeholders = [(row == IMAGE).nonzero().squeeze(1).tolist() for row in inputs["input_ids"]]
    if "image_sizes" not in inputs:
        order = [torch.arange(b * patches, (b + 1) * patches) for b in range(len(placeholders))]
    else:
        features, start = [], 0
        for size in inputs["image_sizes"]:
            tiles = image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
            features.append(torch.arange(start, start + tiles * patches, dtype=torch.float).view(tiles, patches, 1))
            start += tiles * patches
        packed, _ = ref.model.pack_image_features(features, inputs["image_sizes"], "default",
                                                  image_newline=torch.tensor([-1.0]))
        order = [p[:, 0].long() for p in packed]  # one (slots, 1) tensor per image
    return [{p: int(e) for p, e in zip(slots, index) if e >= 0} for slots, index in zip(placeholders, order)]


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def fastervlm_reference(model, inputs, layout, keep):
    ref = reference.unwrapped(model)
    probs, _ = encoder_rows(ref, inputs)
    score = probs.mean(1).flatten()  # released: image_attentions.mean(dim=1), [CLS] row, patches
    rankings, targets, margins = [], [], []
    for sample, slots in zip(layout.samples, encoder_slots(ref, inputs)):
        assert sorted(slots) == sample.visual_positions().tolist()
        scores = {p: float(score[e]) for p, e in slots.items()}
        order = reference.ranked(scores)
        target = reference.budget(keep, len(order))
        margins.append(reference.margin(scores, order, target))
        rankings.append(order)
        targets.append(target)
    length = inputs["input_ids"].shape[1]
    _, kept = reference.assemble(torch.arange(length).expand(len(rankings), -1), layout, rankings, targets)
    return kept, margins


def visionzip_reference(model, inputs, layout, keep, dominant, padded=None):
    """Kept visual positions, the LM input embeddings after the merge ``(B, L, D)``, and the score margins.
    ``padded``: per sample, letterbox-padding positions with ``m = 0`` (debiasing): scored 0, the budget
    lowered to the real count, neither targets nor merged."""
    ref = reference.unwrapped(model)
    probs, keys = encoder_rows(ref, inputs)
    score = probs.sum(1).flatten()  # released: cls_attention.sum(dim=1)
    metric = keys.flatten(0, 1)
    embeddings = reference.capture_inputs(ref, inputs)["hidden"]
    rows = embeddings.clone()
    rankings, targets, margins = [], [], []
    for b, slots in enumerate(encoder_slots(ref, inputs)):
        pads = set(padded[b]) if padded else set()
        scores = {p: 0.0 if p in pads else float(score[e]) for p, e in slots.items()}
        order = reference.ranked(scores)
        target = reference.budget(keep, len(order))
        if pads:
            target = min(target, max(1, len(order) - len(pads)))
        count = max(1, min(target, round(target * dominant)))
        margins.append(reference.margin(scores, order, count))
        rest = sorted(p for p in order[count:] if p not in pads)
        contextual = min(target - count, len(rest))
        chosen = order[:count]
        if contextual:
            step = max(1, len(rest) // contextual)
            aims = [rest[i] for i in range(0, len(rest), step)][:contextual]
            unit = {p: metric[slots[p]] / metric[slots[p]].norm() for p in rest}
            joined = {t: [] for t in aims}
            for source in (p for p in rest if p not in aims):
                cosines = [float(unit[source] @ unit[t]) for t in aims]
                joined[aims[cosines.index(max(cosines))]].append(source)  # ties: the first target
            for t, sources in joined.items():
                if sources:
                    rows[b, t] = embeddings[b, t] + torch.stack([embeddings[b, s] for s in sources]).mean(0)
            chosen = chosen + aims
        rankings.append(chosen + [p for p in order if p not in chosen])
        targets.append(len(chosen))
    length = inputs["input_ids"].shape[1]
    _, kept = reference.assemble(torch.arange(length).expand(len(rankings), -1), layout, rankings, targets)
    return kept, rows, margins


def text_raters(embeddings, layout) -> list[list[int]]:
    """SparseVLM's raters (released code, on the LM input): text after the image whose mean over the image's
    tokens of the softmax over text of ``e_v . e_t`` exceeds the mean; all of the text if none does."""
    out = []
    for b, sample in enumerate(layout.samples):
        text, visual = sample.text.indices().tolist(), sample.visual_positions().tolist()
        relevance = torch.softmax(embeddings[b, visual] @ embeddings[b, text].T, dim=1).mean(0)
        raters = [t for t, r in zip(text, relevance.tolist()) if r > float(relevance.mean())]
        out.append(raters or text)
    return out


def votes(probs, present, raters, visual):
    """``P`` (raters x visual, head-mean probabilities ``probs`` ``(n, n)`` over the tokens at ``present``)."""
    column = {p: c for c, p in enumerate(present)}
    return probs[[column[r] for r in raters]][:, [column[p] for p in visual]]


def attention_chosen(probs, present, text, visual):
    """The text tokens whose attention to ``visual`` (summed) is above the text tokens' mean; all if none is."""
    relevance = votes(probs, present, text, visual).sum(1)
    chosen = [t for t, r in zip(text, relevance.tolist()) if r > float(relevance.mean())]
    return chosen or text


def sparse_count(rank, n, floor, scale, bias):
    """The released rank budget: all when ``rank(P) == n``, else ``min(int(scale rank + bias), n - 1)``; at least ``floor``."""
    adaptive = n if rank >= n else min(int(rank * scale + bias), n - 1)
    return min(n, max(floor, adaptive))


def sparsevlm_reference(model, inputs, layout, keep, layers, budget, scale=13.5, bias=0.0, reading="layer",
                        chosen_by="embeddings"):
    """Multi-stage, no recycling: per stage layer, each sample's kept visual positions (``run_with_drops``).
    ``chosen_by="attention"``: the raters at each stage are the text tokens whose rows in ``probs`` give the
    present visual tokens more than their mean (the former raters)."""
    ref = reference.unwrapped(model)
    raters = text_raters(reference.capture_inputs(ref, inputs)["hidden"], layout)
    margins = []

    def chooser(stage):
        def choose(step):
            if reading == "previous":
                before, probs = step.run.probs[step.layer - 1]
                assert torch.equal(before, step.present)  # the layer before saw what the stage layer sees
            else:
                probs = step.attention()
            probs = probs.mean(1)
            rankings, targets = [], []
            for b, sample in enumerate(layout.samples):
                visual = [p for _, p in reference.visual_present(step, b, sample)]
                mine = raters[b] if chosen_by == "embeddings" else attention_chosen(
                    probs[b], step.present[b].tolist(), sample.text.indices().tolist(), visual)
                block = votes(probs[b], step.present[b].tolist(), mine, visual)
                scores = dict(zip(visual, block.mean(0).tolist()))
                order = reference.ranked(scores)
                total = len(sample.visual_positions())
                final = reference.budget(keep, total)
                if budget == "rank":
                    target = sparse_count(int(torch.linalg.matrix_rank(block)), len(visual), final, scale, bias)
                else:
                    target = min(reference.stage_target(stage, len(layers), total, final), len(visual))
                margins.append(reference.margin(scores, order, target))
                rankings.append(order)
                targets.append(target)
            return rankings, targets
        return choose

    stages = {layer: chooser(stage) for stage, layer in enumerate(layers)}
    return reference.run_with_drops(ref, inputs, layout, stages), margins


def density_peaks(x, clusters):
    """SparseVLM's released clustering, written out: pairwise ``||x_i - x_j|| / sqrt(D)``; density
    ``exp(-mean d^2 over the k = clusters nearest, itself included)``; ``delta`` the distance to the nearest
    denser token (equal density: the earlier one is denser), the largest distance for the densest; centres
    the largest ``delta * density``; each token to its nearest centre, a centre to itself; means."""
    m = len(x)
    distance = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / x.shape[-1] ** 0.5
    density = torch.exp(-(distance.sort(dim=1).values[:, :clusters] ** 2).mean(1)).tolist()
    delta = []
    for i in range(m):
        denser = [j for j in range(m) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(float(distance[i, j]) for j in denser) if denser else float(distance.max()))
    centres = sorted(range(m), key=lambda i: (-delta[i] * density[i], i))[:clusters]
    assign = [min(range(clusters), key=lambda c: (float(distance[centres[c], i]), c)) for i in range(m)]
    for c, centre in enumerate(centres):
        assign[centre] = c
    merged = [x[[i for i in range(m) if assign[i] == c]].mean(0) for c in range(clusters)]
    return merged, centres


def sparsevlm_recycling_reference(model, inputs, layout, keep, layer, budget, scale, recycle, per_cluster):
    """One stage at ``layer`` with recycling: kept visual positions, the hidden states entering ``layer`` after
    the merge ``(B, L, D)``, and the margins."""
    ref = reference.unwrapped(model)
    seen = reference.capture(ref, inputs)
    raters = text_raters(seen.hidden[0], layout)
    probs, hidden = seen.probs[layer].mean(1), seen.hidden[layer]
    rows, rankings, targets, margins = hidden.clone(), [], [], []
    length = inputs["input_ids"].shape[1]
    for b, sample in enumerate(layout.samples):
        visual = sample.visual_positions().tolist()
        block = votes(probs[b], list(range(length)), raters[b], visual)
        scores = dict(zip(visual, block.mean(0).tolist()))
        order, n = reference.ranked(scores), len(visual)
        final = reference.budget(keep, n)

        def clusters_for(dropped):  # released: int(0.3 * dropped) + 1 recycled, int(recycled / 10) + 1 clusters
            return (int(dropped * recycle) + 1) // per_cluster + 1 if dropped > 0 else 0

        if budget == "rank":
            count = sparse_count(int(torch.linalg.matrix_rank(block)), n, final, scale, 0.0)
            clusters = clusters_for(n - count)
        else:
            count = max(1, final - clusters_for(n - final))
            clusters = final - count
        margins.append(reference.margin(scores, order, count))
        chosen = order[:count]
        if clusters:
            dropped = order[count:]
            recycled = dropped[:int(len(dropped) * recycle) + 1]
            merged, centres = density_peaks(hidden[b, recycled], clusters)
            for centre, state in zip(centres, merged):
                rows[b, recycled[centre]] = state
            chosen = chosen + [recycled[c] for c in centres]
        rankings.append(chosen + [p for p in order if p not in chosen])
        targets.append(len(chosen))
    _, kept = reference.assemble(torch.arange(length).expand(len(rankings), -1), layout, rankings, targets)
    return kept, rows, margins


# ---------------------------------------------------------------------------------------------
# Checks (each raises AssertionError on a mismatch)
# ---------------------------------------------------------------------------------------------


def check_fastervlm(family, keep, host_class=FasterVLM):
    model, inputs = tiny(family)
    layout = vlmtools.wrap(model).layout(inputs)
    expected, margins = fastervlm_reference(model, inputs, layout, keep)
    got, _, _ = through_vlmtools(model, inputs, host_class(keep=keep), 0)
    agree(got[0], expected, margins)


def check_visionzip(family, keep, dominant=0.6, padded=None, **options):
    model, inputs = tiny(family)
    layout = vlmtools.wrap(model).layout(inputs)
    expected, rows, margins = visionzip_reference(model, inputs, layout, keep, dominant, padded)
    host = VisionZip(keep=keep, dominant=dominant, **options)
    got, positions, seen = through_vlmtools(model, inputs, host, 0)
    agree(got[0], expected, margins)
    same_rows(seen["hidden"], positions, rows, inputs["attention_mask"])
    return positions, seen


def check_sparsevlm(family, keep, budget, votes="layer", raters="embeddings"):
    model, inputs = tiny(family)
    layers = attention_layers(family, 2)
    layout = vlmtools.wrap(model).layout(inputs)
    expected, margins = sparsevlm_reference(model, inputs, layout, keep, layers, budget, scale=3.0, reading=votes,
                                            chosen_by=raters)
    got, _, _ = through_vlmtools(model, inputs, SparseVLM(keep=keep, layers=layers, budget=budget, scale=3.0,
                                                          recycle=0, votes=votes, raters=raters), layers[0])
    agree(got, expected, margins)
    return got


def check_sparsevlm_recycling(family, keep, budget):
    model, inputs = tiny(family)
    layer = attention_layers(family, 2)[-1]
    layout = vlmtools.wrap(model).layout(inputs)
    settings = {"budget": budget, "scale": 3.0, "recycle": 0.5, "per_cluster": 2}
    expected, rows, margins = sparsevlm_recycling_reference(model, inputs, layout, keep, layer, **settings)
    got, positions, seen = through_vlmtools(model, inputs, SparseVLM(keep=keep, layers=(layer,), **settings), layer)
    agree(got[layer], expected, margins)
    same_rows(seen["hidden"], positions, rows, inputs["attention_mask"])
    return expected


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [5, 0.5])
@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_fastervlm_keeps_the_released_codes_cls_choice(family, keep):
    check_fastervlm(family, keep)


@pytest.mark.parametrize("keep", [10, 0.5])
@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_visionzip_keeps_and_merges_as_the_released_code(family, keep):
    """Dominant and contextual tokens, the merged embeddings, and the compacted positions (the released code
    hands the LM a shorter sequence: real kept tokens at consecutive ids from the first real one)."""
    model, inputs = tiny(family)
    positions, seen = check_visionzip(family, keep)
    real = inputs["attention_mask"].gather(1, positions).bool()
    for ids, row, mask in zip(seen["ids"].expand(len(positions), -1), positions, real):
        first = int(row[mask][0])  # plain forward: the original id of a token is its position
        assert ids[mask].tolist() == list(range(first, first + int(mask.sum())))


def test_visionzip_original_positions_are_a_named_option():
    positions, seen = check_visionzip("llava", 10, positions="original")
    assert torch.equal(seen["ids"].expand(len(positions), -1), positions)
    assert VisionZip(keep=4, positions="original").settings["positions"] == "original"
    assert VisionZip(keep=4).settings["positions"] == FasterVLM(keep=4).settings["positions"] == "compact"
    with pytest.raises(ValueError, match="positions"):
        VisionZip(keep=4, positions="renumbered")


def test_visionzip_never_merges_into_or_from_debiased_padding():
    """Letterbox padding (the last six tokens of each image here) scored 0 with debias on: the budget drops to
    the real tokens, and the strided contextual targets and the merged tokens come from real ones only."""
    model, inputs = tiny("llava")
    layout = vlmtools.wrap(model).layout(inputs)
    flags = torch.zeros(2, 16, dtype=torch.bool)
    flags[:, -6:] = True
    padded = [sample.images[0].positions[f].tolist() for sample, f in zip(layout.samples, flags)]
    positions, seen = check_visionzip("llava", 8, dominant=0.5, padded=padded,
                                      debias=Debias(trend=None, sinks=False), padding=flags)
    for row, pads in zip(positions, padded):
        assert not set(row.tolist()) & set(pads)


@pytest.mark.parametrize("family,budget,keep", [(f, "rank", 2) for f in LM_FAMILIES]
                         + [(f, "schedule", 0.5) for f in ("llava", "qwen2_vl")])
def test_sparsevlm_keeps_what_its_raters_vote_for_at_each_stage(family, budget, keep):
    """Two stages (layers 1 and 2, or a hybrid family's first attention layers), each voted by the stage layer's
    own attention on the tokens present."""
    check_sparsevlm(family, keep, budget)


@pytest.mark.parametrize("family,budget", [("llava", "rank"), ("qwen2_vl", "schedule")])
def test_sparsevlm_votes_previous_reads_the_layer_before_each_stage(family, budget):
    """``votes="previous"`` (the reading this host used before): the released raters vote with the layer before
    each stage as it ran, which keeps other tokens than the stage layer's own attention."""
    got = check_sparsevlm(family, 0.5, budget, votes="previous")
    model, inputs = tiny(family)
    layout = vlmtools.wrap(model).layout(inputs)
    own, _ = sparsevlm_reference(model, inputs, layout, 0.5, attention_layers(family, 2), budget, scale=3.0)
    assert got != own
    assert SparseVLM(votes="previous").settings["votes"].startswith("the recorded attention of the layer before")
    with pytest.raises(ValueError, match=">= 1"):
        SparseVLM(layers=(0, 2), votes="previous")
    with pytest.raises(ValueError, match="votes"):
        SparseVLM(votes="mean")


@pytest.mark.parametrize("family,budget", [("llava", "schedule"), ("qwen2_vl", "rank")])
def test_sparsevlm_attention_raters_are_chosen_at_each_stage(family, budget):
    """``raters="attention"`` (the former raters, with the former votes): at each stage, the text rows of the layer
    before that give the image above-mean attention; not what the embedding raters keep."""
    got = check_sparsevlm(family, 0.5, budget, votes="previous", raters="attention")
    assert got != check_sparsevlm(family, 0.5, budget, votes="previous")
    assert SparseVLM(votes="previous", raters="attention").settings["raters"].startswith("text after the image whose")
    with pytest.raises(ValueError, match="raters"):
        SparseVLM(raters="attention")  # the released votes read no rows to choose from


@pytest.mark.parametrize("family,budget,keep", [(f, "rank", 2) for f in LM_FAMILIES]
                         + [(f, "schedule", 0.5) for f in ("llava_next", "qwen2_5_vl")])
def test_sparsevlm_recycles_the_best_dropped_tokens_into_cluster_means(family, budget, keep):
    kept = check_sparsevlm_recycling(family, keep, budget)
    model, inputs = tiny(family)
    if budget == "schedule":  # merged tokens count towards the budget: exactly keep per sample (plus batch fill)
        layout = vlmtools.wrap(model).layout(inputs)
        assert min(len(k) - reference.budget(keep, len(s.visual_positions())) for k, s in zip(kept, layout.samples)) == 0


@pytest.mark.parametrize("scale,keep,count", [(100.0, 1, 15), (0.0, 1, 1), (0.0, 4, 4)])
def test_the_rank_budget_is_capped_below_every_token_and_floored_at_keep(scale, keep, count):
    """``min(int(scale rank(P) + bias), n - 1)``: a large scale still drops one of the 16 tokens (the released
    cap), a zero scale keeps ``keep`` (the floor; the released code's is 1). The ranks are in the trace."""
    model, inputs = tiny("llava")
    host = SparseVLM(keep=keep, layers=(2,), scale=scale, recycle=0)
    got, _, _ = through_vlmtools(model, inputs, host, 2)
    assert [len(k) for k in got[2]] == [count, count]
    assert host.settings["budget"].startswith("rank")
    with pytest.raises(ValueError, match="budget"):
        SparseVLM(budget="fixed")


def _earliest_first(original):
    """A trivial score: the earliest tokens first (the host's own bookkeeping still runs)."""
    def score(self, run, stage, hidden, kept, layout, targets):
        original(self, run, stage, hidden, kept, layout, targets)
        return -kept.float()
    return score


CHECKS = {"sparsevlm": (SparseVLM, lambda: check_sparsevlm("llava", 2, "rank")),
          "sparsevlm_previous": (SparseVLM, lambda: check_sparsevlm("llava", 0.5, "rank", votes="previous")),
          "sparsevlm_recycling": (SparseVLM, lambda: check_sparsevlm_recycling("llava", 2, "rank")),
          "visionzip": (VisionZip, lambda: check_visionzip("llava", 10)),
          "fastervlm": (FasterVLM, lambda: check_fastervlm("llava", 5))}


@pytest.mark.parametrize("name", list(CHECKS))
def test_a_trivial_score_fails_the_reference_check(name, monkeypatch):
    host_class, check = CHECKS[name]
    monkeypatch.setattr(host_class, "score", _earliest_first(host_class.score))
    with pytest.raises(AssertionError):
        check()


@pytest.mark.parametrize("name", ["sparsevlm_recycling", "visionzip"])
def test_a_selection_without_its_merge_fails_the_reference_check(name, monkeypatch):
    """The same tokens kept, their merged rows left out: the hidden-row comparison catches it."""
    host_class, check = CHECKS[name]
    original = host_class.select

    def unmerged(self, run, sample, scores, columns, hidden, target):
        return original(self, run, sample, scores, columns, hidden, target)[0], None

    monkeypatch.setattr(host_class, "select", unmerged)
    with pytest.raises(AssertionError, match="not close"):
        check()
