"""VAR, GIFT and PAINT: each formula against a direct loop on planted attention, each hook
against an eager attention that applies the formula by hand, and each method under
``generate`` on the tiny families (batch 2, left padding)."""
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlavaConfig
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import eager_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

import vlmtools
from hallucination import GIFT, PAINT, VAR, NoSinksWarning
from hallucination.common import key_mask, visual_mask
from hallucination.gift import enhance, gaze_shift, question_tokens, saliency_factor
from hallucination.paint import boost, token_sets, visual_sensitivity
from hallucination.var import redistribute
from vlmtools.sinks.dims import model_signature
from vlmtools.testing import vlm as tiny

LAYERS = 5  # VAR's layers 2 .. L-2 need more than the builders' 3


@pytest.fixture(autouse=True)
def five_layers(monkeypatch):
    monkeypatch.setitem(tiny._LLAMA, "num_hidden_layers", LAYERS)
    monkeypatch.setitem(tiny._QWEN_TEXT, "num_hidden_layers", LAYERS)


def planted(batch=2, heads=4, rows=3, keys=10, seed=0):
    """Random rows with a strong sink column (key 3) in heads 0-1 and an image-blind head 3."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, heads, rows, keys, generator=g)
    z[:, :2, :, 3] += 3.0
    z[:, 3, :, 2:8] -= 6.0
    visual = torch.zeros(batch, keys, dtype=torch.bool)
    visual[:, 2:8] = True
    return z, visual


# ---------------------------------------------------------------- VAR formula
def var_loop(probs, visual, sinks, moved, rho, min_image, rows):
    out = probs.clone()
    batch, heads, n_rows, keys = probs.shape
    for b in range(batch):
        image_keys = [k for k in range(keys) if visual[b, k]]
        sink_keys = [k for k in image_keys if sinks[b, k]]
        rest = [k for k in image_keys if not sinks[b, k]]
        for h in range(heads):
            for r in range(n_rows):
                row = probs[b, h, r].tolist()
                image = sum(row[k] for k in image_keys)
                sink = sum(row[k] for k in sink_keys)
                if not rows[b, r] or image < min_image or image - sink < rho * image or image - sink <= 0:
                    continue
                for k in sink_keys:
                    out[b, h, r, k] = row[k] * (1 - moved)
                for k in rest:
                    out[b, h, r, k] = row[k] + moved * sink * row[k] / (image - sink)
    return out


@pytest.mark.parametrize("rho,moved", [(0.5, 0.6), (0.8, 0.4), (0.0, 1.0)])
def test_var_redistribution_matches_a_direct_loop(rho, moved):
    z, visual = planted()
    probs = z.softmax(-1)
    sinks = torch.zeros_like(visual)
    sinks[0, 3] = sinks[1, [3, 6]] = True
    rows = torch.tensor([[True, True, False], [False, True, True]])
    edited, selected = redistribute(probs, visual, sinks, moved, rho, 0.2, rows)
    torch.testing.assert_close(edited, var_loop(probs, visual, sinks, moved, rho, 0.2, rows), atol=1e-6, rtol=0)
    torch.testing.assert_close(edited.sum(-1), probs.sum(-1), atol=1e-6, rtol=0)  # mass preserved
    changed = (edited - probs).abs().amax(-1) > 0
    assert changed.any() and not (changed & ~selected).any()
    assert not changed[:, 3].any()  # the image-blind head is never image-centric
    assert not changed[~rows[:, None].expand_as(changed)].any()
    outside = ~visual[:, None, None].expand_as(probs)
    assert torch.equal(edited[outside], probs[outside])


# ---------------------------------------------------------------- GIFT formulas
def top_half_loop(values):
    keep = max(1, len(values) // 2)
    return set(sorted(range(len(values)), key=lambda h: -values[h])[:keep])


def test_gaze_shift_and_factor_match_a_direct_loop():
    z, visual = planted(rows=4)
    attn, previous = z.softmax(-1), (z + torch.randn_like(z)).softmax(-1)
    rows = torch.tensor([[True, True, False, True], [True, False, True, True]])
    saliency, total = gaze_shift(attn, previous, rows, visual)
    factor = saliency_factor(saliency, visual, alpha=5.0)
    batch, heads, n_rows, keys = attn.shape
    for b in range(batch):
        shift = [[sum(max(attn[b, h, r, k].item() - previous[b, h, r, k].item(), 0.0) for r in range(n_rows)
                      if rows[b, r]) if visual[b, k] else 0.0 for k in range(keys)] for h in range(heads)]
        kept = top_half_loop([sum(s) for s in shift])
        expected = [sum(shift[h][k] for h in kept) / len(kept) for k in range(keys)]
        torch.testing.assert_close(saliency[b], torch.tensor(expected), atol=1e-6, rtol=0)
        assert math.isclose(total[b].item(), sum(map(sum, shift)), abs_tol=1e-5)
        values = [expected[k] for k in range(keys) if visual[b, k]]
        mean, sd = statistics.fmean(values), statistics.pstdev(values)
        values = [min(max(v, mean - 3 * sd), mean + 3 * sd) for v in values]
        low, high = min(values), max(values)
        scaled = iter([(v - low) / (high - low) for v in values])
        for k in range(keys):
            want = math.exp(5.0 * next(scaled)) if visual[b, k] else 1.0
            assert math.isclose(factor[b, k].item(), want, rel_tol=1e-5)


def test_gift_enhancement_matches_a_direct_loop():
    z, visual = planted(heads=6, rows=1)
    probs = z.softmax(-1)
    factor = torch.where(visual, torch.rand(visual.shape) * 4 + 1, torch.ones(visual.shape))
    question = torch.zeros_like(visual)
    question[:, 8:] = True
    edited = enhance(probs, factor, visual, question)
    batch, heads, _, keys = probs.shape
    for b in range(batch):
        rows = probs[b, :, 0].tolist()
        image = [sum(row[k] for k in range(keys) if visual[b, k]) for row in rows]
        asked = [sum(row[k] for k in range(keys) if question[b, k]) for row in rows]
        on_image, on_question = top_half_loop(image), top_half_loop(asked)
        for h, row in enumerate(rows):
            ratio = sum(row[k] * factor[b, k].item() for k in range(keys) if visual[b, k]) / image[h]
            new = [p * (factor[b, k].item() if h in on_image and visual[b, k] else 1.0)
                   * (ratio if h in on_question and question[b, k] else 1.0) for k, p in enumerate(row)]
            total = sum(new)
            torch.testing.assert_close(edited[b, h, 0], torch.tensor([p / total for p in new]), atol=1e-6, rtol=0)
    torch.testing.assert_close(edited.sum(-1), torch.ones(batch, heads, 1), atol=1e-6, rtol=0)


def test_question_tokens_map_content_words():
    words = {11: "Is", 12: "there", 13: "a", 14: "red", 15: "car?", 16: "ASSISTANT:"}

    class WordTokenizer:  # one word per token, joined by spaces
        def decode(self, ids):
            return " ".join(words[i] for i in ids)

    ids = [11, 12, 13, 14, 15, 16]
    inside, content, tagger = question_tokens(ids, 30, WordTokenizer(), "Is there a red car?", "stopwords")
    assert inside == list(range(30, 35)) and content == [33, 34] and tagger == "stopwords"
    assert question_tokens(ids, 30, None, None, "auto") == (list(range(30, 36)), list(range(30, 36)), "none")
    with pytest.raises(ValueError, match="not in the prompt"):
        question_tokens(ids, 30, WordTokenizer(), "Is there a dog?", "stopwords")


# ---------------------------------------------------------------- PAINT formulas
def test_paint_token_sets_match_numpy():
    g = torch.Generator().manual_seed(1)
    first, penultimate = torch.rand(36, generator=g), torch.rand(36, generator=g)
    penultimate[[4, 20]] = 5.0
    local, summary = token_sets(first, penultimate)
    q1, q3 = np.percentile(penultimate.numpy(), [25, 75])
    assert summary.nonzero()[:, 0].tolist() == [4, 20] == list(np.flatnonzero(penultimate.numpy() > q3 + 1.5 * (q3 - q1)))
    top = set(np.argsort(-first.numpy())[:9].tolist())
    assert set(local.nonzero()[:, 0].tolist()) == top - {4, 20}


@pytest.mark.parametrize("modulate", [False, True])
def test_paint_boost_matches_a_direct_loop(modulate):
    z, visual = planted(rows=1)
    local, summary = torch.zeros_like(visual), torch.zeros_like(visual)
    local[:, [2, 5]] = True
    summary[:, 7] = True
    scale = visual_sensitivity(z, visual) if modulate else None
    edited = boost(z, local, summary, 0.7, 0.4, scale)
    batch, heads, _, keys = z.shape
    for b in range(batch):
        probs = z[b, :, 0].softmax(-1).tolist()
        image = [sum(p[k] for k in range(keys) if visual[b, k]) for p in probs]
        for h in range(heads):
            alpha = 0.7 * (image[h] / statistics.fmean(image) if modulate else 1.0)
            for k in range(keys):
                x = z[b, h, 0, k].item()
                want = x + alpha * abs(x) if local[b, k] else x + 0.4 * abs(x) if summary[b, k] else x
                assert math.isclose(edited[b, h, 0, k].item(), want, rel_tol=1e-5, abs_tol=1e-6)


# ---------------------------------------------------------------- hooks vs eager attention edited by hand
def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def eager_edited(model, inputs, edit):
    """Logits with every text layer on eager attention and ``edit(layer, z)`` -> probs applied by hand."""
    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        z = (query.float() @ k.float().transpose(2, 3)) * scaling + attention_mask
        p = edit(module.layer_idx, z)
        return (p @ v.float()).to(query.dtype).transpose(1, 2).contiguous(), p

    AttentionInterface.register("hand_edited", attention)
    AttentionMaskInterface.register("hand_edited", eager_mask)
    model.set_attn_implementation({"text_config": "hand_edited"})
    try:
        return logits(model, inputs)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def assert_same_on_real_tokens(got, want, inputs):
    real = inputs["attention_mask"].bool()  # padding rows are undefined in eager and SDPA alike
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=0)


def test_var_hook_applies_the_formula_in_its_layers_and_rows():
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    var = VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3))
    with vlm.use(var) as trace:
        got = logits(model, inputs)
    run = trace[var]
    layout = vlm.layout(inputs)
    visual, image_end = visual_mask(layout), torch.tensor([int(s.visual_positions().max()) for s in layout.samples])
    assert run.layers == [2, 3] and any(s.numel() for sinks in run.sinks.values() for s in sinks)

    def edit(layer, z):
        p = z.softmax(-1)
        if layer in run.layers:
            sinks = key_mask(run.sinks[layer], z.shape[-1])
            rows = torch.arange(z.shape[2])[None] > image_end[:, None]
            p = redistribute(p, visual, sinks, var.moved, var.rho, var.min_image, rows)[0]
        return p

    assert_same_on_real_tokens(got, eager_edited(model, inputs, edit), inputs)
    assert (got - logits(model, inputs)).abs().max() > 1e-4


# GIFT's hook: tests/test_hallucination_reference.py (saliency, factor and edit from eager rows by hand)


@pytest.mark.parametrize("modulate", [True, False])
def test_paint_hook_applies_the_formula_to_the_last_row(modulate):
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    paint = PAINT(head_modulation=modulate)
    with vlm.use(paint) as trace:
        got = logits(model, inputs)
    assert trace["vision.0.rows"][0].shape == (2, 4, 1, 17)  # the CLS row of each image
    run = trace[paint]
    assert run.local.any() and run.settings["variant"] == ("paper" if modulate else "released")

    def edit(layer, z):
        if layer >= 2:
            scale = visual_sensitivity(z[:, :, -1:], run.visual) if modulate else None
            z = z.clone()
            z[:, :, -1:] = boost(z[:, :, -1:], run.local, run.summary, 0.7, 0.4, scale)
        return z.softmax(-1)

    assert_same_on_real_tokens(got, eager_edited(model, inputs, edit), inputs)


# ---------------------------------------------------------------- under generate, every family
def methods(family):
    # Qwen3.5's tiny model has attention at layers 3 and 7 only (its Gated DeltaNet layers have none to edit)
    gift = GIFT(alpha=5.0, saliency_layer=3, layers=[7]) if family == "qwen3_5" else \
        GIFT(alpha=5.0, saliency_layer=1, layers=[2, 3])
    return {"var": VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3)), "var_released": VAR(tau=2.0, dims=(0, 1, 2, 3),
                                                                                   rho=0.3, variant="released"),
            "gift": gift, "paint": PAINT()}


def generate(model, inputs, steps=3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


EXPECTED_SITES = {"var": ["text.2", "text.3"], "var_released": ["text.2", "text.3", "text.4"],
                  "gift": ["text.1", "text.2", "text.3"], "paint": ["text.2", "text.3", "text.4", "vision.0"]}
HYBRID_SITES = {"qwen3_5": {"var": ["text.3"], "var_released": ["text.3", "text.7"], "gift": ["text.3", "text.7"],
                            "paint": ["text.3", "text.7", "vision.0"]}}
"""Qwen3.5's tiny model (8 layers, attention at 3 and 7): the methods' layers that have attention."""


@pytest.mark.parametrize("family", sorted(tiny.BUILDERS))
def test_methods_change_generate_and_leave_the_model_as_it_was(family):
    model, inputs = tiny.BUILDERS[family]()
    vlm = vlmtools.wrap(model)
    before = logits(model, inputs)
    _, plain = generate(model, inputs)
    for name, method in methods(family).items():
        plan = vlmtools.Plan()
        method.attach(vlm, plan)
        assert plan.unfired() == HYBRID_SITES.get(family, EXPECTED_SITES)[name]  # every other layer keeps its kernel
        with vlm.use(method) as trace:
            sequences, edited = generate(model, inputs)
        assert sequences.shape == (2, inputs["input_ids"].shape[1] + 3)
        assert (edited - plain).abs().amax((0, 2)).min() > 1e-6, name  # every step changes
        assert trace[method].settings["method"] == name.split("_")[0].upper()
    assert model.config.text_config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)


def test_var_settings_say_which_variant_and_dims():
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    paper, released = VAR(p=0.6), VAR(p=0.6, variant="released")
    with pytest.warns(NoSinksWarning, match="cannot exceed sqrt"), vlm.use(paper) as trace:
        generate(model, inputs, 2)
    with pytest.warns(NoSinksWarning), vlm.use(released) as released_trace:
        generate(model, inputs, 2)
    paper_settings, released_settings = trace[paper].settings, released_trace[released].settings
    assert paper_settings["moved"] == pytest.approx(0.6) and released_settings["moved"] == pytest.approx(0.4)
    assert paper_settings["layers"] == [2, 3] and released_settings["layers"] == [2, 3, 4]
    assert paper_settings["head_rule"] != released_settings["head_rule"] and released_settings["moves_text_sinks"]
    # tau 20 on a 64-wide LM: one discovery over the middle layers finds no dimension, and says so
    assert paper_settings["dims"] == [] and paper_settings["dims_source"].startswith("discovered (not cached")
    assert paper_settings["dims_discovery"]["layers"] == [2, 3, 4]
    assert paper_settings["status"] == "no sinks found" and "no sink dimension" in paper_settings["status_detail"]
    with pytest.raises(ValueError, match="variant"):
        VAR(variant="code")


@pytest.mark.parametrize(("method", "settings", "refusal"), [
    ("VAR", {"p": 1.2}, "p must be in"), ("VAR", {"rho": 2}, "rho must be in"),
    ("VAR", {"min_image": -0.1}, "min_image must be in"), ("VAR", {"tau": 0}, "tau must be positive"),
    ("PAINT", {"top": 0}, "top must be in"), ("PAINT", {"top": 1.5}, "top must be in"),
    ("PAINT", {"whisker": -1}, "whisker must not be negative")])
def test_settings_out_of_range_are_refused_at_construction(method, settings, refusal):
    with pytest.raises(ValueError, match=refusal):
        {"VAR": VAR, "PAINT": PAINT}[method](**settings)


def test_gift_presets_and_auto_layer(monkeypatch):
    assert GIFT.preset("llava-1.5-7b").layers == tuple(range(12, 23))
    assert GIFT.preset("qwen2-vl-7b", alpha=3.0).alpha == 3.0
    with pytest.raises(KeyError, match="presets are"):
        GIFT.preset("llava-2")
    seven_b = LlavaConfig(text_config=LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008))
    assert GIFT.preset_for(SimpleNamespace(family="llava", model=SimpleNamespace(config=seven_b))) == "llava-1.5-7b"
    assert GIFT.preset_for(SimpleNamespace(family="llava_next", model=SimpleNamespace(config=seven_b))) is None
    # a model with a preset gets its layers and alpha unless given; "preset" takes its saliency layer
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    monkeypatch.setitem(GIFT.PRESETS, "tiny", {"saliency_layer": 1, "layers": (2, 3), "alpha": 3.0})
    monkeypatch.setitem(GIFT.SIGNATURES, ("llava", model_signature(model.config)), "tiny")
    gift = GIFT(saliency_layer="preset")
    with vlm.use(gift) as trace:
        generate(model, inputs, 2)
    settings = trace[gift].settings
    assert (settings["preset"], settings["layers"], settings["alpha"]) == ("tiny", [2, 3], 3.0)
    assert settings["chosen_layer"] == [1, 1] and not settings["second_prefill"] and settings["variant"] == "released"
    monkeypatch.delitem(GIFT.SIGNATURES, ("llava", model_signature(model.config)))
    with pytest.raises(ValueError, match="no preset"):
        GIFT(saliency_layer="preset").attach(vlm, vlmtools.Plan())
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    gift = GIFT(layers=[3, 4])
    with vlm.use(gift) as trace:
        generate(model, inputs, 2)
    settings = trace[gift].settings
    # the paper's "auto" searches every layer, in a second prefill
    assert settings["candidates"] == [0, 1, 2, 3, 4] and set(settings["chosen_layer"]) <= {0, 1, 2, 3, 4}
    assert settings["second_prefill"] and settings["preset"] is None and settings["alpha"] == 5.0
    assert settings["variant"] == "paper"  # the released code fixes the saliency layer per model
    assert settings["tagger"] == "none"  # no tokenizer: every text token is a question word


def test_qwen2_5_adapter_maps_window_order_back_to_each_image():
    model, inputs = tiny.tiny_qwen2_5_vl()
    visual, config = model.model.visual, model.config.vision_config
    grid = inputs["image_grid_thw"]
    order, _ = get_vision_window_index(grid, config.spatial_merge_size, config.window_size, config.patch_size)
    patches = int(grid.prod(-1).sum())
    raster = torch.arange(patches, dtype=torch.float32)  # a patch's score = its place in the processor's order
    in_window_order = visual.permute_input_for_window_attn(raster[:, None], order, seq_len=patches)[:, 0]
    vlm = vlmtools.wrap(model)
    images = vlm.layout(inputs).images()
    got = vlm.adapter.vision.to_lm(model, in_window_order, images)
    want = raster.view(-1, config.spatial_merge_size**2).mean(-1).split([len(image) for image in images])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_methods_state_is_reset_per_prompt():
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    gift = GIFT(alpha=5.0, saliency_layer=1, layers=[2, 3])
    with vlm.use(gift):
        _, first = generate(model, inputs)
        _, again = generate(model, inputs)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)
