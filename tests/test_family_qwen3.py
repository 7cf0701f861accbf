"""Qwen3-VL and Qwen3.5 (and their MoE classes) on tiny random-weight models of the real classes, batches of two
with left padding.

Qwen3-VL: DeepStack adds vision features to the visual tokens after LM layers 0 and 1, outside the layers; a
token drop before or among them must add the kept tokens' features only (checked against transformers' own
text model run on the kept tokens). Videos are one placeholder run per frame after a timestamp.
Qwen3.5: Gated DeltaNet in layers 0-2 and 4-6, gated full attention in 3 and 7 (the tiny model keeps the real
3:1 pattern); sites are the attention layers only, a token drop runs the kept tokens through the linear
layers too, and cached decoding (their conv and recurrent states) equals recomputing on the kept tokens.
The weights are random: what the sink detector finds here is mechanics, not a claim about trained models
(the Gated Attention paper's finding that output gating removes the first-token sink is only reported)."""
import copy

import pytest
import torch
from transformers import (
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

import vlmtools
from hallucination import GIFT, PAINT, VAR
from pruning import HOSTS, DART, FasterVLM, FastV, PDrop, RandomPrune, SparseVLM, UniformGrid, VisionZip
from tests.test_pruning import SPECIAL, frozen, generate
from vlmtools.adapters import UnsupportedModel
from vlmtools.adapters.qwen3_5 import NO_ATTENTION
from vlmtools.drop import DropTokens, PrunedLinearCacheLayer
from vlmtools.plan import LayerHook
from vlmtools.sinks import ColumnMassSink, SinkDetector, SinkReport, ValueDrain
from vlmtools.testing.vlm import (IMAGE, VIDEO, VISION_END, VISION_START, _QWEN_IDS, _images, _qwen_inputs, _ready,
                                  left_padded, tiny_qwen3_5, tiny_qwen3_vl)
from transformers import Qwen2VLImageProcessor

FAMILIES = {"qwen3_vl": tiny_qwen3_vl, "qwen3_5": tiny_qwen3_5}
ATTENTION = {"qwen3_vl": [0, 1, 2], "qwen3_5": [3, 7]}
_BUILT = {}


def tiny(family):
    if family not in _BUILT:
        _BUILT[family] = FAMILIES[family]()
    return _BUILT[family]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def drop_three_visual(state, hidden, kept):
    """A fixed chooser: each sample drops its 2nd, 4th and 6th visual tokens (equal lengths across the batch)."""
    rows = []
    for sample, present in zip(state.layout.samples, kept):
        rows.append(present[~torch.isin(present, sample.visual_positions()[1::2][:3].to(present.device))])
    return torch.stack(rows)


class Entering(LayerHook):
    """The residual stream entering one decoder layer in an unpruned forward."""

    def __init__(self, layer):
        self.layer, self.hidden = layer, None

    def attach(self, vlm, plan):
        plan.layer(self.layer, vlm.layers[self.layer], self)

    def before_layer(self, index, hidden, kwargs):
        self.hidden = hidden


def kept_alone(model, start, hidden, kept, inputs):
    """Decoder layers ``start..`` of transformers' own text model run on the kept tokens alone: their hidden
    states, all three M-RoPE rows, the padding mask, and (Qwen3-VL) the DeepStack features of the kept visual
    tokens for the layers left; then the final norm and the LM head."""
    text = copy.deepcopy(model.model.language_model)
    text.layers = text.layers[start:]
    text.config.num_hidden_layers = len(text.layers)
    if getattr(text.config, "layer_types", None):
        text.config.layer_types = text.config.layer_types[start:]
    with torch.no_grad():
        rope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        extra = {}
        if hasattr(model.model.visual, "deepstack_merger_list"):
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            visual = inputs["input_ids"] == model.config.image_token_id
            present = torch.zeros_like(visual).scatter_(1, kept, True)
            extra = {"visual_pos_masks": visual.gather(1, kept),
                     "deepstack_visual_embeds": [torch.cat(f)[present[visual]] for f in features.deepstack_features][start:]
                     or None}
        out = text(inputs_embeds=hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1])),
                   position_ids=rope.gather(2, kept[None].expand(3, -1, -1)),
                   attention_mask=inputs["attention_mask"].gather(1, kept), use_cache=False, **extra)
        return model.lm_head(out.last_hidden_state)


def recompute(model, vlm, inputs, replay, scores, steps=3):
    """Greedy decoding without a cache under ``replay`` (the prefill's choice, generated tokens kept): each
    step's scores equal ``scores`` (cached ``generate``'s)."""
    images = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    sequence, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad(), vlm.use(replay):
        for step in range(steps):
            out = model(input_ids=sequence, attention_mask=mask, use_cache=False, **images,
                        mm_token_type_ids=(sequence == IMAGE).int()).logits[:, -1]
            out[:, SPECIAL] = -float("inf")
            torch.testing.assert_close(out, scores[step], atol=1e-4, rtol=0)
            sequence = torch.cat([sequence, out.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return sequence


# -- the adapters ------------------------------------------------------------------------------------


def test_qwen3_5_sites_are_its_attention_layers_and_the_others_are_refused_with_the_adapters_reason():
    model, _ = tiny("qwen3_5")
    vlm = vlmtools.wrap(model)
    assert vlm.layer_kinds == ["linear"] * 3 + ["gated_attention"] + ["linear"] * 3 + ["gated_attention"]
    assert vlm.attention_layers == vlm.gated_layers == [3, 7] and vlm.num_layers == len(vlm.layers) == 8
    assert [s.name for s in vlm.sites] == ["text.3", "text.7", "vision.0", "vision.1"]
    for name in ("text.0", "text.6"):
        with pytest.raises(UnsupportedModel, match="Gated DeltaNet") as refusal:
            vlm.site(name)
        assert NO_ATTENTION in str(refusal.value) and "text.3, text.7" in str(refusal.value)
    with pytest.raises(LookupError, match="text.3, text.7"):
        vlm.site("text.9")
    with pytest.raises(UnsupportedModel, match="Gated DeltaNet"), vlm.use(vlmtools.RecordRows(["text.2"])):
        pass
    qwen3_vl = vlmtools.wrap(tiny("qwen3_vl")[0])
    assert qwen3_vl.attention_layers == [0, 1, 2] and qwen3_vl.gated_layers == []
    assert [(a.module, a.method) for a in qwen3_vl.adapter.residual_adds] == [("model.language_model",
                                                                               "_deepstack_process")]


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_planned_is_the_plain_model_also_after_an_exception(family):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    plain = logits(model, inputs)
    with torch.no_grad():
        plain_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vlm.use():
            torch.testing.assert_close(logits(model, inputs), plain, atol=1e-5, rtol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), plain_tokens)
    site = f"text.{ATTENTION[family][-1]}"
    with pytest.raises(KeyError, match="boom"):
        with vlm.use(vlmtools.RecordRows([site]), DropTokens({0: drop_three_visual})):
            logits(model, inputs)
            raise KeyError("boom")
    assert "_deepstack_process" not in vars(model.model.language_model)  # the class's own method again
    assert model.config.text_config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model, inputs), plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), plain_tokens)


# -- dropping tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,layer", [("qwen3_vl", 0), ("qwen3_vl", 1), ("qwen3_vl", 2),
                                          ("qwen3_5", 0), ("qwen3_5", 3), ("qwen3_5", 5)])
def test_dropping_tokens_equals_the_kept_tokens_alone(family, layer):
    """Qwen3-VL: a drop before (0) or among (1) the DeepStack layers adds only the kept tokens' features (after
    them, 2: nothing left to add); Qwen3.5: a drop before a linear layer (0, 5) or the attention layer (3)."""
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    entering, drop = Entering(layer), DropTokens({layer: drop_three_visual})
    with torch.no_grad():
        with vlm.use(entering):
            model(**inputs)
        with vlm.use(drop) as trace:
            pruned = model(**inputs).logits
    kept = trace[drop].kept_at(layer)
    assert pruned.shape[1] == kept.shape[1] == inputs["input_ids"].shape[1] - 3
    real = inputs["attention_mask"].gather(1, kept).bool()
    torch.testing.assert_close(pruned[real], kept_alone(model, layer, entering.hidden, kept, inputs)[real],
                               atol=1e-5, rtol=0)


def test_deepstack_is_what_a_drop_must_gather():
    """Without the kept tokens' DeepStack features the reference differs: the check above is not vacuous."""
    model, inputs = tiny("qwen3_vl")
    vlm = vlmtools.wrap(model)
    entering, drop = Entering(0), DropTokens({0: drop_three_visual})
    with torch.no_grad():
        with vlm.use(entering):
            model(**inputs)
        with vlm.use(drop) as trace:
            pruned = model(**inputs).logits
    kept = trace[drop].kept_at(0)
    bare = copy.deepcopy(model)
    del bare.model.visual.deepstack_merger_list  # the reference then adds nothing between layers
    real = inputs["attention_mask"].gather(1, kept).bool()
    assert (pruned[real] - kept_alone(bare, 0, entering.hidden, kept, inputs)[real]).abs().max() > 1e-2


@pytest.mark.parametrize("family,pruner", [("qwen3_vl", FastV(keep=4, layer=1)), ("qwen3_vl", DART(keep=4, layer=2)),
                                           ("qwen3_5", FastV(keep=4, layer=4)),
                                           ("qwen3_5", SparseVLM(keep=4, layers=(3,), budget="schedule", recycle=0)),
                                           ("qwen3_5", PDrop(keep=4, layers=(7,)))], ids=lambda p: getattr(p, "name", p))
def test_a_pruned_forward_equals_the_kept_tokens_alone(family, pruner):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    start = pruner.layers[0]
    entering = Entering(start)
    with torch.no_grad():
        with vlm.use(entering):
            model(**inputs)
        with vlm.use(pruner) as trace:
            pruned = model(**inputs).logits
    kept = trace[pruner].kept_at(start)
    for b, sample in enumerate(vlm.layout(inputs).samples):
        assert int(torch.isin(kept[b], sample.visual_positions()).sum()) >= 4
    real = inputs["attention_mask"].gather(1, kept).bool()
    assert pruned.shape[1] == kept.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(pruned[real], kept_alone(model, start, entering.hidden, kept, inputs)[real],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,pruner", [("qwen3_vl", FastV(keep=4, layer=1)), ("qwen3_5", FastV(keep=4, layer=4)),
                                           ("qwen3_5", PDrop(keep=4, layers=(3, 7)))],
                         ids=lambda p: getattr(p, "name", p))
def test_cached_greedy_generate_equals_recomputation(family, pruner):
    """Qwen3.5: the linear layers after the drop decode from conv and recurrent states built on the kept tokens."""
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    with torch.no_grad(), vlm.use(pruner) as trace:
        out = generate(model, inputs, output_scores=True, return_dict_in_generate=True)
    sequence = recompute(model, vlm, inputs, frozen(pruner, trace[pruner], inputs["input_ids"].shape[1]), out.scores)
    assert torch.equal(sequence, out.sequences)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_drop_at_layer_0_decodes_with_the_cache_as_recomputation(family):
    """Qwen3-VL: before every DeepStack layer; Qwen3.5: at its first linear layer, whose cache length is the one
    transformers reads for new tokens' positions (it reports the unpruned length)."""
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    with torch.no_grad(), vlm.use(DropTokens({0: drop_three_visual})):
        out = generate(model, inputs, output_scores=True, return_dict_in_generate=True)
    sequence = recompute(model, vlm, inputs, DropTokens({0: drop_three_visual}), out.scores)
    assert torch.equal(sequence, out.sequences)
    cache = out.past_key_values
    assert int(cache.get_seq_length()) == out.sequences.shape[1] - 1  # the virtual length: every token but the last
    if family == "qwen3_5":
        assert isinstance(cache.layers[0], PrunedLinearCacheLayer) and cache.layers[0].dropped == 3


@pytest.mark.parametrize("family,pruner", [("qwen3_vl", FastV(keep=0.5, layer=1)), ("qwen3_5", FastV(keep=0.5, layer=4))],
                         ids=lambda p: getattr(p, "name", p))
def test_a_padded_batch_prunes_each_sample_as_if_alone(family, pruner):
    """Half of each sample's visual tokens (3 of 6, 8 of 16): the shorter row fills the batch's width with its
    padding, masked, so each row is its sample alone (Qwen3.5: padding enters the linear layers as zeros)."""
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    pixels = inputs["pixel_values"].split(patches)
    with torch.no_grad(), vlm.use(pruner):
        batch = model(**inputs).logits[:, -1]
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            alone = {"input_ids": inputs["input_ids"][b:b + 1, real],
                     "attention_mask": inputs["attention_mask"][b:b + 1, real],
                     "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, real],
                     "pixel_values": pixels[b], "image_grid_thw": inputs["image_grid_thw"][b:b + 1]}
            torch.testing.assert_close(model(**alone).logits[0, -1], batch[b], atol=1e-5, rtol=0)


HOST_LAYERS = {"qwen3_vl": {"fastv": 1, "pdrop": (1, 2), "sparsevlm": (1, 2), "dart": 1, "random": 1, "grid": 1},
               "qwen3_5": {"fastv": 4, "pdrop": (3, 7), "sparsevlm": (3, 7), "dart": 4, "random": 1, "grid": 2}}
"""Where each LM-side host runs: Qwen3.5's hosts that read attention read an attention layer (3 or 7)."""


def host_at(name, layers, keep=4):
    one = layers if isinstance(layers, int) else None
    return {"fastv": lambda: FastV(keep=keep, layer=one), "pdrop": lambda: PDrop(keep=keep, layers=layers),
            "sparsevlm": lambda: SparseVLM(keep=keep, layers=layers, budget="schedule", recycle=0),
            "dart": lambda: DART(keep=keep, layer=one, pivots=2), "random": lambda: RandomPrune(keep=keep, layer=one),
            "grid": lambda: UniformGrid(keep=keep, layer=one), "fastervlm": lambda: FasterVLM(keep=keep),
            "visionzip": lambda: VisionZip(keep=keep)}[name]()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("host", sorted(HOSTS))
def test_every_pruning_host_runs_or_refuses_with_the_adapters_reason(family, host):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    if host in ("fastervlm", "visionzip"):  # no [CLS] in the Qwen vision tower
        assert vlm.adapter.vision.no_cls in HOSTS[host].refusal(vlm)
        with pytest.raises(ValueError, match="no \\[CLS\\] token"), vlm.use(host_at(host, None)):
            model(**inputs)
        return
    assert HOSTS[host].refusal(vlm) is None
    pruner = host_at(host, HOST_LAYERS[family][host])
    with torch.no_grad(), vlm.use(pruner) as trace:
        out = generate(model, inputs, output_scores=True, return_dict_in_generate=True)
    assert all(s[:, :min(SPECIAL)].isfinite().all() for s in out.scores)
    kept = trace[pruner].kept_at(vlm.num_layers - 1)
    for b, sample in enumerate(vlm.layout(inputs).samples):
        assert int(torch.isin(kept[b], sample.visual_positions()).sum()) >= 4
    wrong = {"fastv": 1, "pdrop": (1, 3), "sparsevlm": (1, 3), "dart": 1}  # each reads layer 0 or 1 there
    if family == "qwen3_5" and host in wrong:
        with pytest.raises(UnsupportedModel) as refusal, vlm.use(host_at(host, wrong[host])):
            pass
        assert NO_ATTENTION in str(refusal.value)


@pytest.mark.parametrize("family,pruner", [("qwen3_vl", FastV(keep=4, layer=1)), ("qwen3_vl", DropTokens({0: drop_three_visual})),
                                           ("qwen3_5", FastV(keep=4, layer=4)), ("qwen3_5", DropTokens({0: drop_three_visual}))],
                         ids=lambda p: "drop" if isinstance(p, DropTokens) else getattr(p, "name", p))
def test_pruning_decodes_in_bf16(family, pruner):
    model, inputs = FAMILIES[family]()
    model, inputs = model.to(torch.bfloat16), {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                               for k, v in inputs.items()}
    with torch.no_grad(), vlmtools.wrap(model).use(pruner) as trace:
        out = generate(model, inputs, output_scores=True, return_dict_in_generate=True)
    assert all(s[:, :min(SPECIAL)].isfinite().all() for s in out.scores)
    assert trace[pruner].kept_at(vlmtools.wrap(model).num_layers - 1).shape[1] < inputs["input_ids"].shape[1]


def test_compact_positions_are_refused_under_m_rope():
    model, inputs = tiny("qwen3_vl")
    with pytest.raises(NotImplementedError, match="use positions=.original."):
        with torch.no_grad(), vlmtools.wrap(model).use(DropTokens({1: drop_three_visual}, positions="compact")):
            model(**inputs)


# -- hallucination methods ------------------------------------------------------------------------------


def steps_changed(model, inputs, vlm, method):
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        with vlm.use(method) as trace:
            edited = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    diff = (torch.stack(edited.logits, 1) - torch.stack(plain.logits, 1)).abs().amax((0, 2))
    return diff, trace[method]


def test_var_gift_paint_edit_the_attention_layers_of_qwen3_5_through_generate():
    model, inputs = tiny("qwen3_5")
    vlm = vlmtools.wrap(model)
    for method, layers in ((VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3)), [3]),
                           (VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3), variant="released"), [3, 7]),
                           (GIFT(alpha=5.0, saliency_layer=3, layers=[7]), [7]), (PAINT(), [3, 7])):
        diff, run = steps_changed(model, inputs, vlm, method)
        assert run.settings["layers"] == layers and diff.min() > 1e-6, run.settings["method"]
    assert run.settings["scores"] == "mean attention received"  # PAINT: no [CLS] in the tower
    with pytest.raises(UnsupportedModel, match="Gated DeltaNet"), vlm.use(GIFT(saliency_layer=3, layers=[5])):
        pass
    with pytest.raises(ValueError, match="mixes attention types"), vlm.use(GIFT()):  # its second prefill
        pass


def test_var_gift_paint_run_on_qwen3_vl_through_generate_and_gift_refuses_a_prefill_without_deepstack():
    model, inputs = tiny("qwen3_vl")
    vlm = vlmtools.wrap(model)
    for method in (VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3), variant="released"),
                   GIFT(alpha=5.0, saliency_layer=0, layers=[1, 2]), PAINT()):
        diff, run = steps_changed(model, inputs, vlm, method)
        assert diff.min() > 1e-6, run.settings["method"]
    with pytest.raises(ValueError, match="DeepStack"), vlm.use(GIFT()):
        pass


# -- the sink detector ---------------------------------------------------------------------------------


def test_the_sink_detector_says_which_layers_each_criterion_read_and_reports_the_gated_layers(tmp_path):
    """Mechanics only: on random weights no finding says anything about trained Qwen3.5 models."""
    model, inputs = tiny("qwen3_5")
    vlm = vlmtools.wrap(model)
    report = SinkDetector([ColumnMassSink(eps=0.05), "positional", "massive", "sink_dims", ValueDrain(ratio=0.5)]
                          ).detect(vlm, inputs)
    assert report.layer_kinds == {"attention": [3, 7], "linear": [0, 1, 2, 4, 5, 6], "gated": [3, 7]}
    read = {s["criterion"]: s.get("read_layers") for s in report.settings}
    assert read == {"column_mass": [3, 7], "positional": None, "massive": list(range(8)),
                    "sink_dims": list(range(2, 8)), "value_drain": [3, 7]}
    assert {f.layer for f in report.sinks("column_mass")} <= {3, 7} and report.sinks("column_mass")
    assert report.scores["column_mass"][:, [0, 1, 2, 4, 5, 6]].isnan().all()
    assert report.sinks("positional", sample=1)[0].token == int((inputs["attention_mask"][1] == 0).sum())
    table = report.table()
    assert "note: gated attention" in table and "Qiu et al. 2025" in table and "column_mass read layers 3,7" in table
    figure = report.plot(tmp_path / "sinks.png")
    assert (tmp_path / "sinks.png").read_bytes()[:4] == b"\x89PNG"
    assert any("gated attention layers" in ax.get_title(loc="right") for ax in figure.axes)
    again = SinkReport.from_json(report.to_json())
    assert again.layer_kinds == report.layer_kinds and again.to_json() == report.to_json()
    with pytest.raises(ValueError, match=r"layers \[2\] have none"):
        SinkDetector([ColumnMassSink(layers=(2, 3))]).detect(vlm, inputs)
    plain = SinkDetector(["positional", ColumnMassSink(eps=0.05)]).detect(vlmtools.wrap(tiny("qwen3_vl")[0]), inputs)
    assert plain.layer_kinds == {} and not plain.notes() and plain.sinks("column_mass")


# -- videos ---------------------------------------------------------------------------------------------


def video_batch(model):
    """Sample 0: an image, then a two-frame video; sample 1 (left-padded): a two-frame video, then an image.
    Each frame of 4 merged tokens follows its timestamp (ids 6, 7: ``<t seconds>`` as text) and vision start."""
    processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64,
                                      max_pixels=32 * 32)
    images = processor(images=_images((16, 24), (32, 32)), return_tensors="pt")
    frame = lambda stamp: [6, stamp, VISION_START] + [VIDEO] * 4 + [VISION_END]  # noqa: E731
    video = frame(8) + frame(9)
    inputs = left_padded([[1, VISION_START] + [IMAGE] * 6 + [VISION_END, 3] + video + [4, 5],
                          [1, 2] + video + [VISION_START] + [IMAGE] * 16 + [VISION_END, 3]])
    ids = inputs["input_ids"]
    inputs["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    generator = torch.Generator().manual_seed(0)
    return {**inputs, "pixel_values": images["pixel_values"], "image_grid_thw": images["image_grid_thw"],
            "pixel_values_videos": torch.randn(2 * 32, 3 * 2 * 4 * 4, generator=generator),
            "video_grid_thw": torch.tensor([[2, 4, 4], [2, 4, 4]])}


@pytest.mark.parametrize("family", FAMILIES)
def test_video_frames_are_laid_out_where_the_model_puts_them_also_under_generate(family):
    model, _ = tiny(family)
    vlm = vlmtools.wrap(model)
    inputs = video_batch(model)
    layout = vlm.layout(inputs)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        _, video_mask = model.model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds)
    for sample, ids, mask in zip(layout.samples, inputs["input_ids"], video_mask[..., 0]):
        frames = [image for image in sample.images if image.frame is not None]
        assert [image.frame[1] for image in frames] == [0, 1] and all(image.grid == (2, 2) for image in frames)
        assert torch.equal(torch.cat([f.positions for f in frames]), mask.nonzero().squeeze(1))
        between = frames[1].layout  # the first frame's vision end, the second's timestamp and vision start
        assert ids[between].tolist() == [VISION_END, 6, 9, VISION_START]
        assert set(between.tolist()) <= set(sample.layout.tolist())
        assert [image.span.start for image in sample.images] == sorted(image.span.start for image in sample.images)
    assert [image.frame for image in layout.images()] == [None, (0, 0), (0, 1), (1, 0), (1, 1), None]
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert "video_grid_thw" not in seen[0] and seen[0]["mm_encoder_outputs"]["video"] is not None
    assert [(i.positions.tolist(), i.grid, i.frame, i.layout.tolist()) for i in vlm.layout(seen[0]).images()] == \
        [(i.positions.tolist(), i.grid, i.frame, i.layout.tolist()) for i in layout.images()]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_and_paint_read_video_frames(family):
    model, _ = tiny(family)
    vlm = vlmtools.wrap(model)
    inputs = video_batch(model)
    pruner = FastV(keep=6, layer={"qwen3_vl": 1, "qwen3_5": 4}[family])
    with torch.no_grad(), vlm.use(pruner) as trace:
        out = generate(model, inputs, output_scores=True, return_dict_in_generate=True)
    kept = trace[pruner].kept_at(vlm.num_layers - 1)
    visual = [int(torch.isin(kept[b], sample.visual_positions()).sum())  # of 6 + 8 and 8 + 16
              for b, sample in enumerate(vlm.layout(inputs).samples)]
    assert min(visual) == 6, visual  # rows keep equal lengths: where one keeps fewer others, it keeps more
    sequence = recompute_video(model, vlm, inputs, frozen(pruner, trace[pruner], inputs["input_ids"].shape[1]),
                               out.scores)
    assert torch.equal(sequence, out.sequences)
    paint = PAINT()
    with torch.no_grad(), vlm.use(paint) as trace:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert trace[paint].local[0].any() and trace[paint].local[1].any()


def recompute_video(model, vlm, inputs, replay, scores, steps=3):
    media = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    sequence, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad(), vlm.use(replay):
        for step in range(steps):
            types = (sequence == IMAGE).int() + 2 * (sequence == VIDEO).int()
            out = model(input_ids=sequence, attention_mask=mask, use_cache=False, mm_token_type_ids=types,
                        **media).logits[:, -1]
            out[:, SPECIAL] = -float("inf")
            torch.testing.assert_close(out, scores[step], atol=1e-4, rtol=0)
            sequence = torch.cat([sequence, out.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return sequence


def test_encoder_values_go_back_to_images_and_frames_in_layout_order():
    """The tower runs the batch's images, then its videos; ``to_lm`` puts each merged token's value where the
    layout places it (a patch's value = its place in the tower's order)."""
    model, _ = tiny("qwen3_vl")
    vlm = vlmtools.wrap(model)
    inputs = video_batch(model)
    images = vlm.layout(inputs).images()
    patches = int(inputs["image_grid_thw"].prod(-1).sum() + inputs["video_grid_thw"].prod(-1).sum())
    got = vlm.adapter.vision.to_lm(model, torch.arange(patches, dtype=torch.float32), images)
    merged = torch.arange(patches, dtype=torch.float32).view(-1, 4).mean(-1)
    image_tokens, frame_tokens = merged[:6 + 16], merged[6 + 16:]
    want = [image_tokens[:6], frame_tokens[:4], frame_tokens[4:8], frame_tokens[8:12], frame_tokens[12:],
            image_tokens[6:]]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# -- the MoE classes -------------------------------------------------------------------------------------


def tiny_moe(family):
    dense, inputs = tiny(family)
    torch.manual_seed(0)
    text = dense.config.text_config.to_dict() | {"num_experts": 4, "num_experts_per_tok": 2,
                                                 "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
    vision = dense.config.vision_config.to_dict()
    if family == "qwen3_vl":
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_QWEN_IDS))
    else:
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision, **_QWEN_IDS))
    return _ready(model), inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_the_moe_classes_are_their_family_with_experts(family):
    model, inputs = tiny_moe(family)
    vlm = vlmtools.wrap(model)
    assert vlm.family == f"{family}_moe" and vlm.attention_layers == ATTENTION[family]
    plain = logits(model, inputs)
    with torch.no_grad(), vlm.use():
        torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=0)
    layer = {"qwen3_vl": 1, "qwen3_5": 4}[family]
    entering, pruner = Entering(layer), FastV(keep=4, layer=layer)
    with torch.no_grad():
        with vlm.use(entering):
            model(**inputs)
        with vlm.use(pruner) as trace:
            pruned = model(**inputs).logits
    kept = trace[pruner].kept_at(layer)
    real = inputs["attention_mask"].gather(1, kept).bool()
    torch.testing.assert_close(pruned[real], kept_alone(model, layer, entering.hidden, kept, inputs)[real],
                               atol=1e-5, rtol=0)
