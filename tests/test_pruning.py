"""Pruning hosts: exact when keeping everything, equal to the kept tokens alone, decode with the cache,
on every family, batch of two with left padding; and clear errors that leave the model unchanged."""
import pytest
import torch

import vlmtools
from pruning import DART, FasterVLM, FastV, PDrop, RandomPrune, SparseVLM, UniformGrid, VisionZip
from vlmtools.testing.vlm import BUILDERS, IMAGE, VIDEO, VISION_END, VISION_START
from vlmtools.adapters import UnsupportedModel
from vlmtools.drop import DropTokens
from vlmtools.plan import LayerHook

SPECIAL = [IMAGE, VIDEO, VISION_START, VISION_END]
LM_HOSTS = {"fastv": lambda keep: FastV(keep=keep, layer=1), "pdrop": lambda keep: PDrop(keep=keep, layers=(1, 2)),
            "sparsevlm": lambda keep: SparseVLM(keep=keep, layers=(1, 2), budget="schedule", recycle=0),
            "sparsevlm_recycle": lambda keep: SparseVLM(keep=keep, layers=(1, 2)),  # rank budget, recycling
            "dart": lambda keep: DART(keep=keep, layer=1, pivots=2),
            "random": lambda keep: RandomPrune(keep=keep, layer=1), "grid": lambda keep: UniformGrid(keep=keep, layer=1)}
VISION_HOSTS = {"fastervlm": lambda keep: FasterVLM(keep=keep), "visionzip": lambda keep: VisionZip(keep=keep)}
CASES = [(family, host) for family in BUILDERS for host in LM_HOSTS] + [
    (family, host) for family in ("llava", "llava_next", "internvl") for host in VISION_HOSTS]
_MODELS = {}


def tiny(family):
    """Built once per family (the builders seed torch, so the weights are the same each time)."""
    if family not in _MODELS:
        _MODELS[family] = BUILDERS[family]()
    return _MODELS[family]


def make(host, keep):
    return {**LM_HOSTS, **VISION_HOSTS}[host](keep)


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SPECIAL, **kwargs)


def refused(vlm, pruner) -> bool:
    """Whether the family refuses ``pruner`` at its layers, with the family's own reason: a hybrid family's
    layer without attention (Qwen3.5's tiny model has attention at 3 and 7 only; tests/test_family_qwen3.py
    runs every host there at layers that have it)."""
    try:
        pruner.attach(vlm, vlmtools.Plan())
    except UnsupportedModel as refusal:
        assert vlm.adapter.no_attention and vlm.adapter.no_attention in str(refusal)
        return True
    return False


@pytest.mark.parametrize("family,host", CASES)
def test_keeping_every_token_changes_nothing(family, host):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    if refused(vlm, make(host, 1.0)):
        return
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**inputs).logits
        plain_gen = generate(model, inputs)
        with vlm.use(make(host, 1.0)):
            same = model(**inputs).logits
            same_gen = generate(model, inputs)
    torch.testing.assert_close(same[real], plain[real], atol=1e-5, rtol=0)
    assert torch.equal(same_gen, plain_gen)


class _LayerInputs(LayerHook):
    """The hidden states and rotary tables entering one decoder layer (the reference's inputs)."""

    def __init__(self, layer):
        self.index, self.seen = layer, {}

    def attach(self, vlm, plan):
        plan.layer(self.index, vlm.layers[self.index], self)

    def before_layer(self, index, hidden, kwargs):
        self.seen = {"hidden": hidden, "rotary": kwargs["position_embeddings"], "ids": kwargs.get("position_ids")}


def kept_alone(model, vlm, start, hidden, rotary, mask, kept):
    """Layers ``start..`` run on the kept tokens alone: gathered inputs, a fresh causal + padding mask."""
    take = lambda t: t.expand(len(kept), *t.shape[1:]).gather(1, kept.view(*kept.shape, *[1] * (t.dim() - 2))
                                                                  .expand(-1, -1, *t.shape[2:]))
    h, rotary, real = take(hidden), tuple(take(t) for t in rotary), mask.gather(1, kept).bool()
    n = kept.shape[1]
    visible = (torch.ones(n, n, dtype=torch.bool).tril()[None] & real[:, None, :])[:, None]
    for layer in vlm.layers[start:]:
        h = layer(h, attention_mask=visible, position_embeddings=rotary, position_ids=None)
    return model.lm_head(model.model.language_model.norm(h)), real


@pytest.mark.parametrize("family,pruner", [("llava", FastV(keep=4, layer=1)),
                                           ("llava_next", SparseVLM(keep=4, layers=(2,), recycle=0)),
                                           ("qwen2_vl", FastV(keep=4, layer=2)), ("qwen2_5_vl", DART(keep=4, layer=1)),
                                           ("llava", FasterVLM(keep=4, positions="original"))], ids=lambda p: getattr(p, "name", p))
def test_pruned_forward_equals_the_kept_tokens_alone(family, pruner):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    start = pruner.layers[0]
    probe = _LayerInputs(start)
    with torch.no_grad():
        with vlm.use(probe):
            model(**inputs)
        with vlm.use(pruner) as trace:
            pruned = model(**inputs).logits
        kept = trace[pruner].kept_at(start)
        expected, real = kept_alone(model, vlm, start, probe.seen["hidden"], probe.seen["rotary"],
                                    inputs["attention_mask"], kept)
    assert pruned.shape[1] == kept.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(pruned[real], expected[real], atol=1e-5, rtol=0)


def frozen(host, run, prompt_len):
    """The host's prefill choice (``run``: its block's ``trace[host]``), replayed on longer sequences
    (generated tokens always kept).

    A language-model host ranks by the last query row, which changes as tokens are appended:
    recomputation without cache must reuse the prefill's choice to be the same computation.
    """
    chosen = {layer: run.drop.kept[layer].clone() for layer in host.layers}
    return DropTokens({layer: lambda state, hidden, kept, layer=layer: torch.cat(
        [chosen[layer], kept[kept >= prompt_len].view(len(kept), -1)], 1) for layer in host.layers})


@pytest.mark.parametrize("family,host", [(f, "fastv") for f in BUILDERS] + [("qwen2_vl", "pdrop"),
                                                                              ("llava", "visionzip"),
                                                                              ("llava_next", "fastervlm")])
def test_cached_greedy_decoding_equals_recomputation(family, host):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    steps = 3
    pruner = make(host, 4)
    if refused(vlm, pruner):
        return
    with torch.no_grad(), vlm.use(pruner) as trace:
        out = generate(model, inputs, output_scores=True, return_dict_in_generate=True)
    replay = make(host, 4) if host in VISION_HOSTS else frozen(pruner, trace[pruner], inputs["input_ids"].shape[1])
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    sequence, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad(), vlm.use(replay):
        for step in range(steps):
            extra = ({"mm_token_type_ids": (sequence == IMAGE).int()} if "mm_token_type_ids" in inputs
                     else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)})
            logits = model(input_ids=sequence, attention_mask=mask, use_cache=False, **images, **extra).logits[:, -1]
            logits[:, SPECIAL] = -float("inf")
            torch.testing.assert_close(logits, out.scores[step], atol=1e-4, rtol=0)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(sequence, out.sequences)


def test_a_batch_prunes_each_sample_as_if_alone():
    """No ``[0]`` indexing: each sample of a left-padded batch gets the logits it gets alone."""
    model, inputs = tiny("llava")
    vlm = vlmtools.wrap(model)
    with torch.no_grad(), vlm.use(FastV(keep=5, layer=1)):
        batch = model(**inputs).logits[:, -1]
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            alone = {"input_ids": inputs["input_ids"][b:b + 1, real], "attention_mask": inputs["attention_mask"][b:b + 1, real],
                     "pixel_values": inputs["pixel_values"][b:b + 1]}
            torch.testing.assert_close(model(**alone).logits[0, -1], batch[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("host", ["fastv", "visionzip", "sparsevlm_recycle"])
def test_each_sample_keeps_its_budget_and_every_non_visual_token(host):
    model, inputs = tiny("llava_next")
    vlm = vlmtools.wrap(model)
    pruner = make(host, 6)
    with torch.no_grad(), vlm.use(pruner) as trace:
        model(**inputs)
    kept = trace[pruner].kept_at(vlm.num_layers - 1)
    layout = vlm.layout(inputs)
    for sample, positions in zip(layout.samples, kept):
        visual = torch.isin(positions, sample.visual_positions())
        assert int(visual.sum()) >= 6
        real_non_visual = [p for p in range(layout.seq_len) if p not in sample.visual_positions().tolist()
                           and p not in sample.padding.tolist()]
        assert set(real_non_visual) <= set(positions.tolist())  # NeXT newlines and text always kept
        assert sample.layout.numel() and set(sample.layout.tolist()) <= set(positions.tolist())


def test_bad_input_is_a_clear_error_and_the_model_is_unchanged():
    model, inputs = tiny("llava")
    vlm = vlmtools.wrap(model)
    with torch.no_grad():
        plain = model(**inputs).logits
        for keep in (0, -3, 1.5, True):
            with pytest.raises(ValueError, match="keep must be"):
                FastV(keep=keep)
        with pytest.raises(ValueError, match="exceeds the 16 visual tokens"):
            with vlm.use(FastV(keep=17, layer=1)):
                model(**inputs)
        text_only = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
        with pytest.raises(ValueError, match="no image tokens"):
            with vlm.use(FastV(keep=4, layer=1)):
                model(**text_only)
        with pytest.raises(ValueError, match="debiasing applies to attention-based"):
            DART(keep=4, debias=True)
        with pytest.raises(ValueError, match=">= 1"):
            FastV(keep=4, layer=0)
        with pytest.raises(ValueError, match="layers"):
            with vlm.use(PDrop(keep=4, layers=(1, 9))):
                model(**inputs)
        assert torch.equal(model(**inputs).logits, plain)
        assert model.config.text_config._attn_implementation != "vlmtools"
    qwen, qwen_inputs = tiny("qwen2_vl")
    reason = vlmtools.wrap(qwen).adapter.vision.no_cls  # the family's own reason
    assert FastV.refusal(vlmtools.wrap(qwen)) is None and reason in VisionZip.refusal(vlmtools.wrap(qwen))
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        with vlmtools.wrap(qwen).use(VisionZip(keep=4)):
            qwen(**qwen_inputs)


def test_next_tiles_land_where_the_model_packs_them():
    """The LLaVA-NeXT adapter's ``to_lm`` puts per-tile values where the model packs each tile's features
    (base grid, then the stitched, unpadded grid without its newlines): checked on the features themselves."""
    model, inputs = tiny("llava_next")
    vlm = vlmtools.wrap(model)
    layout = vlm.layout(inputs)
    with torch.no_grad():
        tiles = torch.cat([pixels[:3] for pixels in inputs["pixel_values"]])  # 3 tiles per image here
        hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
        per_tile = model.model.multi_modal_projector(hidden)
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        ordered = vlm.adapter.vision.to_lm(model, per_tile.flatten(0, 1), layout.images())
    for sample, features, mine in zip(layout.samples, packed, ordered):
        newline = torch.isin(sample.images[0].span.indices(), sample.images[0].layout)
        torch.testing.assert_close(mine, features[~newline], atol=1e-5, rtol=0)
