"""Every family at its most used published size (``vlmtools.testing.published``: the published LM width and
vision tower, three LM layers, a cut tower, random weights): the layout at the published resolution (LLaVA-1.5 at
336 px, LLaVA-NeXT 672 x 672 anyres, Qwen2-VL / Qwen2.5-VL / Qwen3-VL at 1280 x 720, OneVision anyres-max-9 with its
grid resized, Gemma 3 at 896 px with pan-and-scan crops, InternVL in 6 tiles and a thumbnail, SmolVLM in 3 x 4 crops
and its global view) against the model's own packing; then, at a reduced resolution that keeps the token structure,
the seam with nothing planned is the plain model in fp32, FastV's cached ``generate`` keeps its budget in every
sample (Qwen3.5: PDrop at its attention layer), and one bf16 forward under it is finite. About a minute a family on two CPU cores."""
from __future__ import annotations

import gc

import pytest
import torch

import vlmtools
from pruning import FastV, PDrop
from vlmtools.testing.published import FAMILIES, _model_class, full_width, published_config, published_inputs

pytestmark = pytest.mark.real_width

WIDTHS = {  # hidden, heads, KV heads, head size, MLP; vision hidden, heads, MLP (the published checkpoints')
    "llava": (4096, 32, 32, 128, 11008, 1024, 16, 4096),
    "llava_next": (4096, 32, 8, 128, 14336, 1024, 16, 4096),
    "qwen2_vl": (3584, 28, 4, 128, 18944, 1280, 16, 5120),
    "qwen2_5_vl": (3584, 28, 4, 128, 18944, 1280, 16, 3420),
    "qwen3_vl": (4096, 32, 8, 128, 12288, 1152, 16, 4304),
    "qwen3_5": (4096, 16, 4, 256, 12288, 1152, 16, 4304),
    "gemma3": (2560, 8, 4, 256, 10240, 1152, 16, 4304),
    "llava_onevision": (3584, 28, 4, 128, 18944, 1152, 16, 4304),
    "internvl": (3584, 28, 4, 128, 18944, 1024, 16, 4096),
    "smolvlm": (2048, 32, 32, 64, 8192, 1152, 16, 4304),
}


def widths(config) -> tuple[int, ...]:
    text, vision = config.get_text_config(), config.vision_config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision_mlp = getattr(vision, "intermediate_size", None) or vision.embed_dim * vision.mlp_ratio
    vision_hidden = getattr(vision, "embed_dim", None) or vision.hidden_size
    vision_heads = getattr(vision, "num_attention_heads", None) or vision.num_heads
    return (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, head, text.intermediate_size,
            vision_hidden, vision_heads, vision_mlp)


def shell(config):
    """The model on the meta device: its config, module names and ``pack_image_features``, nothing allocated."""
    with torch.device("meta"):
        return _model_class(config)(config)


def packed_newlines(model_class, config, inputs, sample: int) -> tuple[list[int], torch.Tensor, int]:
    """Offsets of ``image_newline`` in the sample's packed image features, the packed values of index-valued tile
    features (tile * patches + patch) as the model's own ``pack_image_features`` packs them, and the tile count."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    size = inputs["image_sizes"][sample]
    tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, vision.image_size)
    features = torch.arange(tiles * side * side, dtype=torch.float32).view(tiles, side * side, 1)
    marker = torch.full((1,), -1.0)
    holder = type("Shell", (), {"config": config})()
    if "Onevision" in model_class.__name__:
        packed, _ = model_class.pack_image_features(holder, [features], size[None], marker, config.vision_aspect_ratio)
    else:
        packed, _ = model_class.pack_image_features(holder, [features], size[None], "default", marker)
    values = packed[0][:, 0]
    return (values == -1).nonzero().squeeze(1).tolist(), values[values != -1], tiles


def check_published_layout(family, config, inputs, layout, model):
    samples = layout.samples
    first, second = samples[0].images, samples[1].images
    if family == "llava":
        assert [(len(i), i.grid) for i in first + second] == [(576, (24, 24))] * 2
    elif family in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        expected = {"llava_next": ((24, 24), (48, 48)), "llava_onevision": ((27, 27), (66, 99))}[family]
        assert tuple(first[0].tiles) == expected  # NeXT: 2 x 2 tiles; OneVision: 4 x 6 tiles resized to 66 x 99
        encoder = vlmtools.wrap(model).adapter.vision
        cls = LlavaNextModel if family == "llava_next" else LlavaOnevisionModel
        for b, sample in enumerate(samples):
            (image,) = sample.images
            newlines, values, tiles = packed_newlines(cls, config, inputs, b)
            assert (image.layout - image.span.start).tolist() == newlines
            side = config.vision_config.image_size // config.vision_config.patch_size
            index = torch.arange(tiles * side * side, dtype=torch.float32)
            placed = encoder.to_lm(model, index, [image])[0]  # where the adapter puts encoder values (PAINT)
            torch.testing.assert_close(placed.float(), values, atol=1e-3, rtol=0)
    elif family.startswith("qwen"):
        merge = config.vision_config.spatial_merge_size
        for image, thw in zip(first + second, inputs["image_grid_thw"].tolist()):
            assert image.thw == (thw[0], thw[1] // merge, thw[2] // merge) and len(image) == thw[0] * thw[1] * thw[2] // 4
        assert first[0].grid == ((26, 46) if family in ("qwen2_vl", "qwen2_5_vl") else (22, 40))  # 1280 x 720
    elif family == "gemma3":
        assert [(len(i), i.grid) for i in first + second] == [(256, (16, 16))] * 4
        assert len(second) == 3  # the 600 x 1400 image and its 2 pan-and-scan crops
    elif family == "internvl":
        assert [(len(i), i.grid) for i in first] == [(256, (16, 16))] * 7  # 6 tiles (3 x 2) and the thumbnail
    elif family == "smolvlm":
        assert len(first) == 1 and first[0].tiles == [(9, 9)] * 13 and len(first[0]) == 13 * 81  # 3 x 4 crops + view
        assert samples[0].layout.numel() == 12 * 2 + 3 + 3 + 1  # fake + row/col a crop, 3 row ends, 4 around the view


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_at_its_published_width(family):
    config = published_config(family)
    assert widths(config) == WIDTHS[family]
    inputs = published_inputs(family, config, reduced=False)
    meta = shell(config)
    check_published_layout(family, config, inputs, vlmtools.wrap(meta).layout(inputs), meta)
    del meta

    torch.manual_seed(0)
    model, batch = full_width(family)
    vlm = vlmtools.wrap(model)
    # three LM layers; Qwen3.5 one period of its pattern (Gated DeltaNet x3, then attention)
    assert widths(model.config) == WIDTHS[family] and vlm.num_layers == (4 if family == "qwen3_5" else 3)
    layout = vlm.layout(batch)
    with torch.no_grad():
        plain = model(**batch).logits
        with vlm.use():
            seamed = model(**batch).logits
    torch.testing.assert_close(seamed, plain, atol=1e-5, rtol=0)
    del plain, seamed

    keep = min(len(s.visual_positions()) for s in layout.samples) // 2
    stage = vlm.attention_layers[-1] if family == "qwen3_5" else 1  # PDrop ranks by its own layer's attention
    pruner = PDrop(keep=keep, layers=(stage,)) if family == "qwen3_5" else FastV(keep=keep, layer=stage)
    with torch.no_grad(), vlm.use(pruner) as trace:
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    kept = trace[pruner].kept_at(stage)
    assert [int(torch.isin(row, s.visual_positions()).sum()) for row, s in zip(kept, layout.samples)] == [keep] * 2
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 2 and all(s.isfinite().all() for s in out.scores)

    model.to(torch.bfloat16)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad(), vlm.use(PDrop(keep=keep, layers=(stage,)) if family == "qwen3_5"
                                  else FastV(keep=keep, layer=stage)):
        logits = model(**half).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    del model, out, logits
    gc.collect()


PUBLISHED_TOTALS = {  # parameters of the published checkpoint, its vocabulary size, and 2 if its LM head is untied
    "llava": (7.06e9, 32064, 2), "llava_next": (7.57e9, 32064, 2), "qwen2_vl": (8.29e9, 152064, 2),
    "qwen2_5_vl": (8.29e9, 152064, 2), "qwen3_vl": (8.77e9, 151936, 2), "qwen3_5": (9.41e9, 248320, 2),
    "gemma3": (4.30e9, 262208, 1), "llava_onevision": (8.03e9, 152128, 2), "internvl": (7.94e9, 151674, 2),
    "smolvlm": (2.25e9, 49280, 2),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layer_counts_the_published_parameters(family):
    """With every layer (the benchmarks' ``--full``), the model has the published checkpoint's parameters but for
    the cut vocabulary, within 0.5% (counted on the meta device)."""
    from vlmtools.testing.published import VOCAB, parameter_count

    total, vocab, copies = PUBLISHED_TOTALS[family]
    hidden = published_config(family, layers=None).get_text_config().hidden_size
    assert parameter_count(family, layers=None) == pytest.approx(total - (vocab - VOCAB) * hidden * copies, rel=5e-3)
