"""Adapters on tiny real configs of every family: discovery, layout, parity with SDPA and eager."""

import sys
from contextlib import contextmanager

import pytest
import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.masking_utils import eager_mask

import vlmtools
from vlmtools.testing.vlm import BUILDERS
from vlmtools.adapters import builtin_families
from vlmtools.plan import AttentionHook

IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")


def build(family):
    model, inputs = BUILDERS[family]()
    return family, model, inputs, vlmtools.wrap(model)


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request):
    return build(request.param)


@contextmanager
def implementation(model, text: str | None = None, vision: str | None = None):
    """Switch the text and/or vision attention of ``model`` for the block, back to SDPA after."""
    keys = {k: v for k, v in (("text_config", text), ("vision_config", vision)) if v is not None}
    model.set_attn_implementation(keys)
    try:
        yield
    finally:
        model.set_attn_implementation({key: "sdpa" for key in keys})


def real_rows(inputs):
    """(B, 1, L, 1) mask of non-padding query rows."""
    return inputs["attention_mask"].bool()[:, None, :, None]


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False, **kwargs)


# -- discovery and sites ------------------------------------------------------------------------


def test_wrap_finds_the_family(built):
    family, model, _, vlm = built
    assert vlm.family == family
    vision = vlm.adapter.blocks(model, "vision")
    assert len(vision) == model.config.vision_config.num_hidden_layers > 0
    assert [s.name for s in vlm.sites] == (  # a hybrid family's layers without attention have no site
        [f"text.{i}" for i in vlm.attention_layers] + [f"vision.{i}" for i in range(len(vision))]
    )


def test_unsupported_model_names_the_families():
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=10
    )
    with pytest.raises(TypeError) as error:
        vlmtools.wrap(LlamaForCausalLM(config))
    assert "LlamaForCausalLM" in str(error.value)
    for family in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"):
        assert family in str(error.value)
    assert set(builtin_families()) >= set(BUILDERS)


def test_wrap_refuses_another_models_processor(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tests.zoo_folders import tiny_llava_folder
    from vlmtools_zoo import llava, qwen2vl

    folder = tiny_llava_folder(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    assert vlmtools.wrap(model, AutoProcessor.from_pretrained(folder)).processor is not None
    with pytest.raises(ValueError, match="Qwen2VLProcessor does not go with LlavaForConditionalGeneration"):
        vlmtools.wrap(model, qwen2vl.build_processor())
    other_token = llava.build_processor()
    other_token.image_token_id = model.config.image_token_id + 1
    with pytest.raises(ValueError, match="image token id"):
        vlmtools.wrap(model, other_token)


class CheckShapes(AttentionHook):
    """Asserts each call's q/k/v match the site's declared heads, kv_heads and head_dim."""

    def __init__(self):
        self.seen = set()

    def attach(self, vlm, plan):
        for site in vlm.sites:
            plan.attention(site, self)

    def observe(self, call):
        site = call.site
        assert call.query.shape[1] == site.heads and call.query.shape[-1] == site.head_dim, site
        assert call.kv_heads == site.kv_heads and call.key.shape[1] == site.heads, site
        self.seen.add(site.name)


def test_sites_declare_the_real_head_shapes(built):
    _, model, inputs, vlm = built
    check = CheckShapes()
    with torch.no_grad(), vlm.use(check):
        model(**inputs)
    assert check.seen == {s.name for s in vlm.sites}
    assert any(s.kv_heads < s.heads for s in vlm.sites)  # GQA is exercised


def test_seam_takes_over_text_and_vision(built):
    _, model, _, vlm = built
    with vlm.use():
        assert model.config.text_config._attn_implementation == vlmtools.attention.seam_name("sdpa")
        assert model.config.vision_config._attn_implementation == vlmtools.attention.seam_name("sdpa")
    assert model.config.vision_config._attn_implementation == "sdpa"


# -- layout -------------------------------------------------------------------------------------


def image_features(model, inputs):
    """Per-image feature rows, as the model itself computes them."""
    with torch.no_grad():
        out = model.model.get_image_features(**{k: inputs[k] for k in IMAGE_KEYS if k in inputs})
    return [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]


def placeholder_positions(model, inputs, features):
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = model.model.get_placeholder_mask(
            inputs["input_ids"], inputs_embeds=embeds, image_features=torch.cat(features)
        )
    mask = mask[0] if isinstance(mask, tuple) else mask
    return [row.nonzero().squeeze(1) for row in mask[..., 0]]


def test_layout_matches_the_model_features(built):
    _, model, inputs, vlm = built
    layout = vlm.layout(inputs)
    features = image_features(model, inputs)
    images = [image for sample in layout.samples for image in sample.images]
    assert [len(image) + image.layout.numel() for image in images] == [len(f) for f in features]
    for sample, placeholders in zip(layout.samples, placeholder_positions(model, inputs, features)):
        laid = torch.cat([sample.visual_positions()] + [image.layout for image in sample.images])
        assert torch.equal(laid.sort().values, placeholders)
    for image in images:
        tiles = image.tiles or [image.grid]
        assert sum(r * c for r, c in tiles) == len(image) and tiles[0] == image.grid
        assert image.span.start == int(image.positions[0]) and image.span.stop > int(image.positions[-1])
    for sample, keep in zip(layout.samples, inputs["attention_mask"]):
        assert torch.equal(sample.padding, (keep == 0).nonzero().squeeze(1))
        assert sample.first == int(sample.padding.numel())  # left padding
        assert sample.text.stop == layout.seq_len and sample.text.start > int(sample.visual_positions().max())


def test_llava_next_newlines_are_where_the_model_puts_image_newline():
    family, model, inputs, vlm = build("llava_next")
    newline = model.model.image_newline.detach()
    samples = vlm.layout(inputs).samples
    for sample in samples:  # newlines are the samples' only layout tokens
        assert torch.equal(sample.layout, torch.cat([image.layout for image in sample.images]))
    images = [image for sample in samples for image in sample.images]
    for image, feature in zip(images, image_features(model, inputs)):
        is_newline = (feature == newline).all(-1).nonzero().squeeze(1)
        assert is_newline.numel() == image.tiles[1][0] > 0
        assert torch.equal(image.layout, is_newline + image.span.start)
        assert len(image) == image.tiles[0][0] * image.tiles[0][1] + image.tiles[1][0] * image.tiles[1][1]
    assert images[0].tiles[1] != images[1].tiles[1]  # a wide and a tall image: unpadding is exercised


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_layout_has_grid_thw_and_vision_markers(family):
    family, model, inputs, vlm = build(family)
    layout = vlm.layout(inputs)
    thw = iter(inputs["image_grid_thw"].tolist())
    for sample, ids in zip(layout.samples, inputs["input_ids"]):
        markers = torch.isin(ids, torch.tensor([model.config.vision_start_token_id, model.config.vision_end_token_id]))
        assert torch.equal(sample.layout, markers.nonzero().squeeze(1))
        for image in sample.images:
            t, h, w = next(thw)
            assert image.thw == (t, h // 2, w // 2) and image.grid == (h // 2, w // 2)
    for video in ({"video_grid_thw": inputs["image_grid_thw"]}, {"mm_encoder_outputs": {"video": object()}}):
        with pytest.raises(NotImplementedError, match="video"):
            vlm.layout({**inputs, **video})


def describe(layout):
    """A layout as plain nested lists, for equality checks."""
    return [
        [(s.padding.tolist(), s.layout.tolist(), s.text, s.first)]
        + [(i.positions.tolist(), i.grid, i.span, i.thw, i.tiles, i.layout.tolist()) for i in s.images]
        for s in layout.samples
    ]


def test_layout_under_generate_matches_the_prompt_layout(built):
    """generate() encodes the images first and hands the model features instead of pixels and sizes."""
    _, model, inputs, vlm = built
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        generate(model, inputs)
    finally:
        handle.remove()
    prefill = seen[0]
    assert "mm_encoder_outputs" in prefill and not {"pixel_values", "image_sizes", "image_grid_thw"} & set(prefill)
    assert describe(vlm.layout(prefill)) == describe(vlm.layout(inputs))


def test_layout_rejects_placeholder_counts_that_do_not_match(built):
    _, model, inputs, vlm = built
    ids = inputs["input_ids"].clone()
    image = model.config.image_token_id
    ids[0, (ids[0] == image).nonzero()[0]] = 3  # one placeholder fewer
    with pytest.raises(ValueError, match="do not split"):
        vlm.layout({**inputs, "input_ids": ids})


# -- parity -------------------------------------------------------------------------------------


def test_empty_plan_matches_sdpa(built):
    _, model, inputs, vlm = built
    with torch.no_grad():
        plain = model(**inputs).logits
        plain_tokens = generate(model, inputs)
        with vlm.use():
            seamed = model(**inputs).logits
            seamed_tokens = generate(model, inputs)
    torch.testing.assert_close(seamed, plain, atol=1e-5, rtol=0)
    assert torch.equal(seamed_tokens, plain_tokens)


def test_recorded_rows_match_eager(built):
    _, model, inputs, vlm = built
    site = f"text.{vlm.attention_layers[1]}"  # the second layer with attention (transformers lists only those)
    with torch.no_grad(), vlm.use(vlmtools.RecordRows([site], "all")) as trace:
        model(**inputs)
    with torch.no_grad(), implementation(model, text="eager"):
        eager = model(**inputs, output_attentions=True).attentions[1]
    (rows,) = trace[f"{site}.rows"]
    assert rows.shape == eager.shape
    torch.testing.assert_close(rows * real_rows(inputs), eager * real_rows(inputs), atol=1e-5, rtol=0)


def test_recorded_decoding_rows_match_eager_generate(built):
    _, model, inputs, vlm = built
    site = f"text.{vlm.attention_layers[1]}"
    with vlm.use(vlmtools.RecordRows([site], "last")) as trace:
        tokens = generate(model, inputs)
    with implementation(model, text="eager"):
        eager = generate(model, inputs, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(eager.sequences, tokens)
    rows = trace[f"{site}.rows"]
    assert len(rows) == len(eager.attentions) == 3  # prefill + two cached steps
    for row, step in zip(rows, eager.attentions):
        torch.testing.assert_close(row, step[1][:, :, -1:], atol=1e-5, rtol=0)


# -- vision tower -------------------------------------------------------------------------------


def eager_vision_attentions(model, inputs):
    """Attention weights of ``vision.0``, one tensor per call, from the family's own eager function."""
    calls = []
    first = vlmtools.wrap(model).site("vision.0").module

    def capture(module, *args, **kwargs):
        out, weights = sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)
        if module is first:
            calls.append(weights)
        return out, weights

    AttentionInterface.register("capture_eager", capture)
    AttentionMaskInterface.register("capture_eager", eager_mask)
    with torch.no_grad(), implementation(model, vision="capture_eager"):
        model(**inputs)
    return calls


def test_vision_rows_match_eager(built):
    family, model, inputs, vlm = built
    with torch.no_grad(), vlm.use(vlmtools.RecordRows(["vision.0"], "all")) as trace:
        model(**inputs)
    eager = eager_vision_attentions(model, inputs)
    rows = trace["vision.0.rows"]
    # CLIP runs all images (tiles) as one batch; Qwen2-VL calls once per image; Qwen2.5-VL's block 0
    # once per window: 2x3 and 4x4 merged grids in 2x2 windows make 2 + 4; Qwen3-VL and Qwen3.5 once per image;
    # Gemma 3, OneVision, InternVL and SmolVLM run every image, tile, crop (and video frame) as one batch
    assert len(rows) == len(eager) == {"llava": 1, "llava_next": 1, "qwen2_vl": 2, "qwen2_5_vl": 6, "qwen3_vl": 2,
                                       "qwen3_5": 2, "gemma3": 1, "llava_onevision": 1, "internvl": 1,
                                       "smolvlm": 1}[family]
    for row, weights in zip(rows, eager):
        torch.testing.assert_close(row, weights, atol=1e-5, rtol=0)


def test_llava_full_strategy_keeps_cls_off_the_grid():
    model, inputs = BUILDERS["llava"]()
    model.config.vision_feature_select_strategy = "full"
    image = model.config.image_token_id
    ids = inputs["input_ids"]
    # one more placeholder per image: insert it before each run
    rows = [torch.cat([row[: int((row == image).nonzero()[0])], row.new_tensor([image]),
                       row[int((row == image).nonzero()[0]):]]) for row in ids]
    batch = {"input_ids": torch.stack(rows),
             "attention_mask": torch.cat([inputs["attention_mask"][:, :1], inputs["attention_mask"]], 1)}
    sample = vlmtools.wrap(model).layout(batch).samples[0]
    (img,) = sample.images
    assert img.positions.numel() == img.grid[0] * img.grid[1]
    assert img.layout.tolist() == [img.span.start] and img.span.start in sample.layout.tolist()
