"""RefAM on tiny random FLUX / SD3 transformers and pipelines.

The probe parity test guards against a RefAM map that drifts from the attention the
model computes (wrong text/image order, a chunk written to the wrong rows, heads
mixed up); the others check the steps, the settings and the refusals.
"""

import argparse
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

import vlmtools
import vlmtools.attention
from grounding import RefAM, RefAMSettings
from grounding.refam import EncodedPrompt, MapAccumulator, RecordImageText, build_prompt
from grounding.refam.maps import word_maps
from grounding.refam.prompt import PromptTokens, Segment, head_phrase, token_roles
from grounding.refam.source import source_for
from tests.test_dit import BUILDERS, attention_inputs, explicit_probs
from vlmtools.testing.pipelines import SIZE, tiny_flux_pipeline, tiny_sd3_pipeline
from vlmtools.masks import iou
from vlmtools.text import _load_spacy, content_words

GRID = (3, 4)
EXPRESSION = "the red circle"
PROMPT = "the red circle . a with"
# word-level offsets of PROMPT, one EOS-like special token, two pads
OFFSETS = [(0, 3), (4, 7), (8, 14), (15, 16), (17, 18), (19, 23), (0, 0), (0, 0), (0, 0)]
REAL = [1] * 7 + [0, 0]
PIPELINES = {"flux": lambda: tiny_flux_pipeline(), "sd3": tiny_sd3_pipeline}


def tiny(family):
    model, inputs = BUILDERS[family](grid=GRID, text=len(OFFSETS))
    prompt = EncodedPrompt(
        inputs["encoder_hidden_states"][:1], inputs["pooled_projections"][:1], [Segment(OFFSETS, REAL)]
    )
    return model, inputs["hidden_states"][:1], prompt


def image(size=SIZE, mode="RGB"):
    return Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)).convert(mode)


def processors(dit):
    return [site.module.processor for site in dit.sites]


@pytest.mark.parametrize("family,name", [("flux", "dit.double.1"), ("flux", "dit.single.0"), ("sd3", "dit.joint.1")])
@pytest.mark.parametrize("heads", [None, (1,)])
def test_chunked_probe_and_word_maps_equal_explicit_attention(family, name, heads, monkeypatch):
    monkeypatch.setattr(vlmtools.attention, "CHUNK_BYTES", 4 * 2 * 5 * 21)  # 5 rows per chunk: several chunks
    model, latents, prompt = tiny(family)
    refam = RefAM(model, RefAMSettings(blocks=(name,), heads=heads, sinks="none"))
    site, layout = refam.dit.site(name), refam.dit.layout(len(OFFSETS), GRID)

    def explicit(kwargs):
        with torch.no_grad():
            probs = explicit_probs(site, kwargs, family)[0]  # (H, L, L), the full attention
        probs = probs if heads is None else probs[list(heads)]
        return probs.mean(0)[layout.image.positions][:, layout.text.indices()]

    seen, handle = attention_inputs(site)
    with refam.dit.use(RecordImageText([name], heads)) as trace, torch.no_grad():
        model(**refam.source.call(latents, 0.5, prompt, GRID))
    tokens = token_roles(EXPRESSION, PROMPT, prompt.segments, content_words(EXPRESSION))
    maps, _ = refam.probe(latents, GRID, prompt, tokens)
    handle.remove()
    assert (trace[f"{name}.image_text"][0][0] - explicit(seen[0])).abs().max() <= 1e-5
    block = explicit(seen[1])
    budget = block.sum(-1)  # padding="budget": every text key, pads included
    assert (maps["1:red"] - block[:, 1] / budget).abs().max() <= 1e-5
    assert (maps["2:circle"] - block[:, 2] / budget).abs().max() <= 1e-5
    assert (maps["heatmap"] - (block[:, 1] + block[:, 2]) / 2 / budget).abs().max() <= 1e-5


def test_roles_of_expression_magnets_special_and_padding():
    tokens = token_roles(EXPRESSION, PROMPT, [Segment(OFFSETS, REAL)], content_words(EXPRESSION))
    assert tokens.roles == ["stop", "content", "content", "magnet", "magnet", "magnet", "special", "padding", "padding"]
    assert tokens.word_of[:3] == [0, 1, 2] and tokens.positions("content") == [1, 2]
    assert build_prompt("the red circle", (".",), colour="green") == "the red circle . green"


RELATION = "the circle left of the square"
# word-level offsets of RELATION + magnets: the circle left of the square . a with, EOS, two pads
RELATION_OFFSETS = [(0, 3), (4, 10), (11, 15), (16, 18), (19, 22), (23, 29), (30, 31), (32, 33), (34, 38)]
RELATION_OFFSETS += [(0, 0)] * 3
needs_spacy = pytest.mark.skipif(_load_spacy() is None, reason="the parse of the head noun phrase needs spaCy")


@pytest.mark.parametrize(
    "expression,tagger,head",
    [
        pytest.param("the red mug on the left of the plate", "auto", ["the", "red", "mug"], marks=needs_spacy),
        pytest.param(RELATION, "auto", ["the", "circle"], marks=needs_spacy),
        pytest.param("left red circle", "auto", ["red", "circle"], marks=needs_spacy),  # root "left" is a verb
        ("the red mug on the left of the plate", "stopwords", ["the", "red", "mug"]),
        (RELATION, "stopwords", ["the", "circle", "left"]),  # the stop-word rule cannot see "left" relates
        ("it on the left", "stopwords", ["it", "on", "the", "left"]),  # no content word up front: every word
    ],
)
def test_head_noun_phrase(expression, tagger, head):
    words = content_words(expression, tagger=tagger)
    assert [words[i].word for i in head_phrase(expression, words)] == head


@pytest.mark.parametrize(
    "tagger,head",
    [pytest.param("auto", [1], marks=needs_spacy), ("stopwords", [1, 2])],  # circle; circle, left
)
def test_head_words_heatmap_is_the_mean_of_the_head_phrase_content_maps(tagger, head):
    model, inputs = BUILDERS["flux"](grid=GRID, text=len(RELATION_OFFSETS))
    real = [1] * 10 + [0, 0]
    prompt = EncodedPrompt(
        inputs["encoder_hidden_states"][:1], inputs["pooled_projections"][:1], [Segment(RELATION_OFFSETS, real)]
    )
    latents = inputs["hidden_states"][:1]
    name = "dit.single.0"
    heatmaps, seen = {}, None
    for words in ("head", "content"):
        refam = RefAM(model, RefAMSettings(blocks=(name,), sinks="none", words=words, tagger=tagger))
        seen, handle = attention_inputs(refam.dit.site(name))
        seg = refam.segment_encoded(latents, GRID, prompt, RELATION)
        handle.remove()
        heatmaps[words] = seg.grid_heatmap.reshape(-1)
    site, layout = refam.dit.site(name), refam.dit.layout(len(RELATION_OFFSETS), GRID)
    with torch.no_grad():
        probs = explicit_probs(site, seen[0], "flux")[0].mean(0)  # (L, L), heads averaged
    block = probs[layout.image.positions][:, layout.text.indices()]  # (N_image, 12 text keys)
    budget = block.sum(-1)  # padding="budget": every text key
    # text positions: 0 the, 1 circle, 2 left, 3 of, 4 the, 5 square; content words by either tagger: 1, 2, 5
    expected_head = (block[:, head].mean(-1) / budget).numpy()
    expected_content = (block[:, [1, 2, 5]].mean(-1) / budget).numpy()
    assert np.abs(heatmaps["head"] - expected_head).max() <= 1e-5
    assert np.abs(heatmaps["content"] - expected_content).max() <= 1e-5
    assert np.abs(heatmaps["head"] - heatmaps["content"]).max() > 1e-3


def test_head_words_setting_is_recorded_and_refused_without_a_head():
    model, latents, prompt = tiny("flux")
    seg = RefAM(model, RefAMSettings(words="head", tagger="stopwords")).segment_encoded(
        latents, GRID, prompt, EXPRESSION
    )
    assert seg.settings["words"] == "head" and seg.settings["head_phrase"] == ["the", "red", "circle"]
    assert sorted(seg.word_maps) == ["1:red", "2:circle"]
    with pytest.raises(ValueError, match="head noun phrase"):
        word_maps(torch.ones(2, 2), _tokens(["content", "content"]), [], words="head")


def _tokens(roles, words=("red", "circle")):
    ws = content_words(" ".join(words))
    return PromptTokens("", "", ws, roles, [i if r == "content" else None for i, r in enumerate(roles)])


def test_sink_modes_and_padding_budget():
    block = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.2, 0.2]])  # 2 image queries x (red, circle, magnet, pad)
    tokens = _tokens(["content", "content", "magnet", "padding"])
    plain = word_maps(block, tokens, [], sink_mode="none")
    assert torch.allclose(plain["0:red"], block[:, 0] / block.sum(-1))
    # "circle" is a sink: none keeps its map; redirect drops it and keeps its mass; suppress also renormalises
    assert set(word_maps(block, tokens, [1], sink_mode="none")) == {"0:red", "1:circle"}
    redirect = word_maps(block, tokens, [1], sink_mode="redirect")
    suppress = word_maps(block, tokens, [1], sink_mode="suppress")
    assert set(redirect) == set(suppress) == {"0:red"}
    assert torch.allclose(redirect["0:red"], plain["0:red"])
    assert torch.allclose(suppress["0:red"], block[:, 0] / (block.sum(-1) - block[:, 1]))
    excluded = word_maps(block, tokens, [], padding="exclude")
    assert torch.allclose(excluded["0:red"], block[:, 0] / block[:, :3].sum(-1))
    assert set(word_maps(block, tokens, [], words="all")) == {"0:red", "1:circle", "2:magnet"}


def test_accumulator_averages_and_resets():
    acc = MapAccumulator()
    acc.add({"h": torch.ones(2)})
    acc.add({"h": torch.zeros(2)})
    assert torch.equal(acc.mean()["h"], torch.full((2,), 0.5)) and acc.calls == 2
    acc.reset()
    with pytest.raises(RuntimeError, match="nothing"):
        acc.mean()


def test_several_timesteps_and_seeds_average_the_single_runs():
    model, latents, prompt = tiny("flux")
    runs = [
        RefAM(model, RefAMSettings(timesteps=(t,), seeds=(s,))).segment_encoded(latents, GRID, prompt, EXPRESSION)
        for t in (0.3, 0.6)
        for s in (0, 1)
    ]
    both = RefAM(model, RefAMSettings(timesteps=(0.3, 0.6), seeds=(0, 1))).segment_encoded(
        latents, GRID, prompt, EXPRESSION
    )
    expected = np.mean([r.grid_heatmap for r in runs], 0)
    assert np.abs(both.grid_heatmap - expected).max() <= 1e-6


def test_forward_stops_after_the_last_block_read():
    model, latents, prompt = tiny("flux")
    calls = []
    handle = model.single_transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    RefAM(model, RefAMSettings(blocks=("dit.double.0",))).segment_encoded(latents, GRID, prompt, EXPRESSION)
    handle.remove()
    assert calls == []


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_pipeline_end_to_end_and_save(family, tmp_path):
    pipe = PIPELINES[family]()
    dit = vlmtools.wrap(pipe.transformer)
    before = processors(dit)
    options = {"max_sequence_length": 12} if family == "flux" else {}
    seg = RefAM(pipe, **options).segment(image(), "the large red circle on the left")
    assert seg.mask.shape == seg.heatmap.shape == (SIZE, SIZE) and seg.mask.dtype == bool
    row, col = np.unravel_index(np.argmax(seg.heatmap), seg.heatmap.shape)  # the peak, first in raster order
    assert seg.point == (col, row) and seg.heatmap[row, col] > seg.heatmap.min()
    assert seg.settings["prompt"] == "the large red circle on the left . a with"
    assert seg.settings["family"] == family and seg.settings["sinks"] == "suppress"
    assert sorted(seg.word_maps) == ["1:large", "2:red", "3:circle", "6:left"]
    assert all(a is b for a, b in zip(processors(dit), before))
    paths = seg.save(tmp_path)
    assert Image.open(paths["mask.png"]).size == (SIZE, SIZE) and paths["segmentation.json"].read_text()


@pytest.mark.parametrize("expression,match", [("", "empty"), ("   ", "empty"), ("this and that .", "no content")])
def test_bad_expressions_are_refused(expression, match):
    pipe = tiny_flux_pipeline()
    dit = vlmtools.wrap(pipe.transformer)
    before = processors(dit)
    with pytest.raises(ValueError, match=match):
        RefAM(pipe, max_sequence_length=12).segment(image(), expression)
    assert all(a is b for a, b in zip(processors(dit), before))


@pytest.mark.parametrize(
    "picture,error,match",
    [
        (image(mode="L"), ValueError, "convert"),
        (image(mode="RGBA"), ValueError, "convert"),
        (image(size=18), ValueError, "multiples of 4"),
        (np.zeros((16, 16, 3), np.uint8), TypeError, "fromarray"),
    ],
)
def test_bad_images_are_refused(picture, error, match):
    with pytest.raises(error, match=match):
        RefAM(tiny_flux_pipeline(), max_sequence_length=12).segment(picture, EXPRESSION)


def test_too_long_prompt_is_refused():
    with pytest.raises(ValueError, match="more than the 12"):
        RefAM(tiny_flux_pipeline(), max_sequence_length=12).segment(image(), "the red circle " * 4)


@pytest.mark.parametrize(
    "model",
    [
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 8),
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        ),
        object(),
    ],
)
def test_unsupported_family_names_the_supported_ones(model):
    with pytest.raises(TypeError, match="unsupported model class.*flux.*sd3"):
        RefAM(model)


def test_bare_transformer_needs_encoded_inputs_and_bad_settings_are_named():
    model, latents, prompt = tiny("sd3")
    refam = RefAM(model)
    with pytest.raises(TypeError, match="segment_encoded"):
        refam.segment(image(), EXPRESSION)
    with pytest.raises(LookupError, match="dit.joint"):
        RefAM(model, RefAMSettings(blocks=("dit.double.0",)))
    with pytest.raises(ValueError, match="heads"):
        RefAM(model, RefAMSettings(heads=(5,))).segment_encoded(latents, GRID, prompt, EXPRESSION)
    with pytest.raises(ValueError, match="timesteps"):
        RefAMSettings(timesteps=(1.5,))
    with pytest.raises(ValueError, match="sinks"):
        RefAMSettings(sinks="drop")


def test_source_for_a_pipeline_reads_its_tokenizer():
    source = source_for(tiny_flux_pipeline(), max_sequence_length=12)
    encoded = source.prompt(PROMPT)
    assert encoded.embeds.shape[1] == 12 and len(encoded.segments[0].offsets) == 12


def tiny_sam():
    """A random SamModel on 64 px inputs with its processor (no files needed)."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    vision = SamVisionConfig(
        hidden_size=16,
        output_channels=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        mlp_dim=32,
        global_attn_indexes=[0],
        window_size=2,
        num_pos_feats=8,
    )
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
    )
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    return model.eval(), SamProcessor(
        SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    )


def tiny_sam2():
    """A random Sam2Model (4-stage Hiera, 64 px) with its processor."""
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2Processor,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    torch.manual_seed(0)
    hiera = Sam2HieraDetConfig(
        hidden_size=8,
        num_attention_heads=1,
        image_size=[64, 64],
        patch_kernel_size=[7, 7],
        patch_stride=[4, 4],
        patch_padding=[3, 3],
        query_stride=[2, 2],
        window_positional_embedding_background_size=[2, 2],
        num_query_pool_stages=3,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
    )
    vision = Sam2VisionConfig(
        backbone_config=hiera,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=16,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(
        hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16
    )
    model = Sam2Model(Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    return model.eval(), Sam2Processor(Sam2ImageProcessor(size={"height": 64, "width": 64}))


@pytest.mark.parametrize("build", [tiny_sam, tiny_sam2])
def test_sam_and_sam2_models_from_transformers_run_behind_refam(build):
    seg = RefAM(tiny_flux_pipeline(), sam=build(), max_sequence_length=12).segment(image(), EXPRESSION)
    assert seg.settings["mask_from"] == "sam" and seg.mask.shape == (SIZE, SIZE) and seg.mask.dtype == bool


class StubSamProcessor:
    """Takes what ``refine`` passes a transformers SAM processor; its masks are already at image size."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, return_tensors, **prompt):
        from transformers import BatchFeature

        self.calls.append(prompt)
        size = torch.tensor([[images.height, images.width]])
        return BatchFeature({"original_sizes": size, "reshaped_input_sizes": size})

    def post_process_masks(self, masks, original_sizes, reshaped_input_sizes=None):
        return [masks[0] > 0]


def stub_sam(name, masks, scores):
    """``(model, processor)``: a model class named ``name`` that proposes the planted ``masks`` (k, H, W) with
    predicted IoUs ``scores`` (k,), whatever the point."""

    def forward(self, multimask_output, **inputs):
        assert multimask_output
        logits = torch.where(torch.from_numpy(masks), 1.0, -1.0)
        return argparse.Namespace(pred_masks=logits[None, None], iou_scores=torch.tensor(scores)[None, None])

    model = type(name, (), {"device": torch.device("cpu"), "__call__": forward})()
    return model, StubSamProcessor()


@pytest.mark.parametrize(
    "name,prompt",
    [
        ("StubSamModel", {"input_points": [[[20.0, 3.0]]]}),  # SAM: (image, point batch, xy)
        # SAM 2: (image, object, point, xy), with labels
        ("StubSam2Model", {"input_points": [[[[20.0, 3.0]]]], "input_labels": [[[1]]]}),
    ],
)
def test_sam_is_prompted_with_the_heatmap_peak_and_keeps_its_best_scored_mask(name, prompt):
    height, width = 16, 24  # not square: x and y cannot be swapped unseen
    masks = np.zeros((3, height, width), bool)
    masks[0, :8], masks[1, :, 16:], masks[2, 4:12, 4:12] = True, True, True
    model, processor = sam = stub_sam(name, masks, [0.2, 0.9, 0.5])
    refam = RefAM(tiny_flux_pipeline(), sam=sam, max_sequence_length=12)
    heatmap = np.zeros((height, width))
    heatmap[3, 20], heatmap[10, 2] = 1.0, 0.7  # the peak: row 3, column 20, i.e. (x, y) = (20, 3)
    picture = Image.new("RGB", (width, height))
    mask, point = refam.mask(heatmap, picture)
    assert point == (20, 3) and processor.calls == [prompt]
    assert np.array_equal(mask, masks[1])  # the highest predicted IoU (0.9)
    # through segment: SAM gets the peak of the full-size heatmap (the first maximum in raster order)
    masks = np.zeros((2, SIZE, SIZE), bool)
    masks[0, 2:5, 3:9] = True
    model, processor = sam = stub_sam(name, masks, [0.8, 0.1])
    seg = RefAM(tiny_flux_pipeline(), sam=sam, max_sequence_length=12).segment(image(), EXPRESSION)
    row, col = np.unravel_index(np.argmax(seg.heatmap), seg.heatmap.shape)
    (x, y), = np.array(processor.calls[0]["input_points"]).reshape(-1, 2)
    assert seg.point == (col, row) == (x, y) and seg.settings["mask_from"] == "sam"
    assert np.array_equal(seg.mask, masks[0])


def test_video_smoothing_is_a_moving_average_of_normalised_heatmaps():
    from grounding.metrics import SegmentationScores
    from grounding.refam.video import segment_video

    refam = RefAM(tiny_flux_pipeline(), max_sequence_length=12)
    frames = [image(), image().rotate(90), image().rotate(180)]
    single = segment_video(refam, frames, EXPRESSION, smoothing=0.0)
    smooth = segment_video(refam, frames, EXPRESSION, smoothing=0.5)
    expected = 0.5 * single[1].grid_heatmap + 0.5 * single[0].grid_heatmap
    assert np.abs(smooth[1].grid_heatmap - expected).max() <= 1e-6
    assert smooth[2].settings["smoothing"] == 0.5 and smooth[2].mask.shape == (SIZE, SIZE)
    # J&F of the smoothed masks against planted truths: frames 0 and 2 exact (J = F = 1), frame 1 against an
    # empty truth (J = 0: the union is the non-empty prediction; F = 0: no true boundary), so J = F = 2/3
    assert all(seg.mask.any() for seg in smooth)
    scores = SegmentationScores()
    for seg, truth in zip(smooth, [smooth[0].mask, np.zeros((SIZE, SIZE), bool), smooth[2].mask]):
        scores.add(seg.mask, truth, sequence="clip/object")
    summary = scores.summary()
    assert summary["J"] == pytest.approx(2 / 3) and summary["F"] == pytest.approx(2 / 3)
    assert summary["J&F"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="smoothing"):
        segment_video(refam, frames, EXPRESSION, smoothing=1.0)


def test_baselines_and_scores():
    from grounding.refam.evaluate import Sample, baseline, score, table

    mask, point = baseline("centre box", (8, 8))
    assert mask.sum() == 16 and mask[2:6, 2:6].all() and point == (4, 4)
    gt = np.zeros((8, 8), bool)
    gt[:4, :4] = True
    scores, _ = score(lambda s: baseline("whole image", s.mask.shape), [Sample(None, "x", gt)])
    assert scores.summary()["miou"] == 0.25 and scores.summary()["point_acc"] == 0.0
    assert "| whole image | 0.250 | 0.250 | 0.000 | - |" in table({"whole image": scores})
    with pytest.raises(ValueError, match="centre box"):
        baseline("corner", (8, 8))


def test_cli_segment_and_bench(tmp_path, monkeypatch, capsys):
    import vlmtools_app.segment
    from grounding.refam.evaluate import Sample

    def build_parser():  # as vlmtools_app.cli does, with only this package's commands
        parser = argparse.ArgumentParser(prog="vlmtools")
        vlmtools_app.segment.register(parser.add_subparsers(dest="command", required=True))
        return parser

    monkeypatch.setattr(vlmtools_app.segment, "load_model", lambda name: tiny_flux_pipeline())
    path = tmp_path / "in.png"
    image(size=20).save(path)
    args = build_parser().parse_args(
        [
            "segment",
            str(path),
            EXPRESSION,
            "--out",
            str(tmp_path / "a"),
            "--resize",
            "16",
            "16",
            "--sinks",
            "redirect",
            "--magnets",
            ".",
        ]
    )
    assert args.run(args) == 0 and Image.open(tmp_path / "a" / "mask.png").size == (20, 20)
    image().save(path)
    args = build_parser().parse_args(
        ["segment", str(path), EXPRESSION, "--out", str(tmp_path / "b"), "--words", "head"]
    )
    assert args.run(args) == 0
    info = json.loads((tmp_path / "b" / "segmentation.json").read_text())["settings"]
    assert info["sinks"] == "suppress" and info["words"] == "head" and info["head_phrase"] == ["the", "red", "circle"]
    gt = np.zeros((SIZE, SIZE), bool)
    gt[4:12, 4:12] = True
    monkeypatch.setattr("vlmtools_zoo.refam.zoo_samples", lambda n, split: [Sample(image(), EXPRESSION, gt)] * n)
    args = build_parser().parse_args(["segment-bench", "--n", "1", "--out", str(tmp_path / "table.md")])
    assert args.run(args) == 0
    text = (tmp_path / "table.md").read_text()
    assert all(name in text for name in ("| full |", "| no magnets |", "| all words |", "| centre box |"))
    capsys.readouterr()
    args = build_parser().parse_args(["segment", "--out", str(tmp_path / "c")])  # the zoo scene, scored
    assert args.run(args) == 0 and (tmp_path / "c" / "mask.png").exists()
    out = capsys.readouterr().out
    mask = np.array(Image.open(tmp_path / "c" / "mask.png")) > 0
    assert f"{EXPRESSION!r}" in out and f"IoU with the referent's true mask: {iou(mask, gt):.3f}" in out
    args = build_parser().parse_args(["segment", str(path)])
    with pytest.raises(ValueError, match="give an image and its referring expression"):
        args.run(args)


def test_refcoco_samples_are_scored_at_their_own_resolution(tmp_path):
    from grounding.refam.evaluate import refam_segmenter, refcoco_samples, score
    from tests.test_grounding_refcoco import write_dataset

    refs, instances = write_dataset(tmp_path)
    (tmp_path / "train2014").mkdir()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "train2014" / "COCO_train2014_000000000007.jpg")
    samples = list(refcoco_samples(refs, instances, tmp_path / "train2014", "val", n=2))
    assert [s.expression for s in samples] == ["man in the middle", "center guy"]
    segment = refam_segmenter(RefAM(tiny_flux_pipeline(), max_sequence_length=12), size=(16, 16))
    mask, point = segment(samples[0])
    assert mask.shape == (30, 40) and mask.dtype == bool and 0 <= point[0] < 40 and 0 <= point[1] < 30
    assert score(segment, samples)[0].summary()["n"] == 2


def test_cli_refuses_a_missing_model_path_and_a_vlm(tmp_path):
    from vlmtools_app.segment import load_model

    with pytest.raises(FileNotFoundError, match="flux-shapes"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="llava-shapes is a VLM"):
        load_model("llava-shapes")


def test_when_every_word_is_a_sink_the_heatmap_is_flat_and_the_mask_empty():
    model, latents, prompt = tiny("flux")
    settings = RefAMSettings(sink_ratio=0.0, sink_max_cv=float("inf"))  # every key fires
    seg = RefAM(model, settings).segment_encoded(latents, GRID, prompt, EXPRESSION)
    assert not seg.grid_heatmap.any() and not seg.mask.any() and seg.word_maps == {}
    assert {s["role"] for s in seg.sinks} >= {"content", "image"}


def test_blocks_come_from_the_settings_then_the_source_then_the_default(monkeypatch):
    from grounding.refam.method import default_blocks
    import vlmtools_zoo as zoo
    from vlmtools.adapters.flux import FluxTransformerSource
    from vlmtools_zoo.flux import REFAM_BLOCKS

    pipe = zoo.load("flux-shapes")
    assert RefAM(pipe).blocks == REFAM_BLOCKS
    monkeypatch.setattr("vlmtools_zoo.refam.REFAM_BLOCKS", ("dit.double.1",))  # the zoo source's, not FLUX's rule
    assert RefAM(pipe).blocks == ("dit.double.1",) != FluxTransformerSource(pipe.transformer).blocks
    assert RefAM(pipe, RefAMSettings(blocks=("dit.single.1",))).blocks == ("dit.single.1",)
    flux, _, _ = tiny("flux")  # FLUX's source: the first half of its 2 single-stream blocks
    assert RefAM(flux).blocks == ("dit.single.0",) != default_blocks(vlmtools.wrap(flux))
    sd3, _, _ = tiny("sd3")  # SD3's names none: the middle third of its 3 joint blocks
    assert RefAM(sd3).blocks == default_blocks(vlmtools.wrap(sd3)) == ("dit.joint.1",)
