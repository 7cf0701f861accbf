"""RefAM on the bare transformers of FLUX.2, Qwen-Image, Mochi and Wan, and its video path.

The map parity test guards against a RefAM map that drifts from the attention the model
computes (text at the wrong offset: Wan's cross-attention keys are the text alone; a Mochi pad
counted; a chunk written to the wrong rows). The video tests check the one-pass path: a heatmap
per latent frame, a mask per video frame from the latent frame that holds it, sinks named by
frame and grid cell, and ``segment_video`` choosing that path on a video DiT. Random weights:
these check mechanics, not quality.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmtools
import vlmtools.attention
from grounding import RefAM, RefAMSettings
from grounding.refam import EncodedPrompt
from grounding.refam.prompt import Segment
from grounding.refam.source import register_source
from grounding.refam.video import segment_video
from tests.test_refam import EXPRESSION, OFFSETS, PROMPT, REAL
from vlmtools.adapters.dit_source import token_segment
from vlmtools.adapters.wan import WanTransformerSource
from vlmtools.testing.dit import FRAMES, GRID, tiny_flux2, tiny_mochi, tiny_qwen_image, tiny_wan
from vlmtools.testing.pipelines import tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")

BUILDERS = {"flux2": tiny_flux2, "qwen_image": tiny_qwen_image, "mochi": tiny_mochi, "wan": tiny_wan}
VIDEO = ("mochi", "wan")


def tiny(family, **kw):
    model, inputs = BUILDERS[family](text=len(OFFSETS), **kw)
    prompt = EncodedPrompt(inputs["encoder_hidden_states"][:1], None, [Segment(OFFSETS, REAL)])
    latents = inputs["hidden_states"][:1]
    grid = (latents.shape[2], latents.shape[3] // 2, latents.shape[4] // 2) if family in VIDEO else GRID
    return model, latents, prompt, grid


@pytest.mark.parametrize("family,name", [("flux2", "dit.double.1"), ("flux2", "dit.single.0"),
                                         ("qwen_image", "dit.joint.1"), ("mochi", "dit.joint.1"),
                                         ("wan", "dit.cross.1")])
def test_word_maps_are_the_text_share_of_the_recorded_attention(family, name, monkeypatch):
    monkeypatch.setattr(vlmtools.attention, "CHUNK_BYTES", 4 * 2 * 7 * 40)  # a few rows per chunk
    model, latents, prompt, grid = tiny(family)
    refam = RefAM(model, RefAMSettings(blocks=(name,), sinks="none"))
    frames, rows, cols = (1, *grid) if len(grid) == 2 else grid
    layout = refam.dit.layout(len(OFFSETS), (frames * rows, cols))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    x_t = 0.7 * latents + 0.3 * noise  # RefAM's default t = 0.3, seed 0
    with refam.dit.use(vlmtools.RecordRows([name], "all")) as trace, torch.no_grad():
        model(**refam.source.call(x_t, 0.3, prompt, grid))
    probs = torch.cat(trace[f"{name}.rows"], 2)[0].mean(0)  # (queries, keys), heads averaged
    keys = slice(None) if family == "wan" else layout.text.indices()  # Wan's cross keys are the text alone
    block = probs[layout.image.positions][:, keys]
    budget = block.sum(-1)  # padding="budget"; Mochi and Qwen-Image mask their pads (they take nothing)
    expected = (block[:, 1] + block[:, 2]) / 2 / budget
    if len(grid) == 2:
        seg = refam.segment_encoded(latents, grid, prompt, EXPRESSION)
        heatmap = seg.grid_heatmap
    else:
        heatmap = np.stack([seg.grid_heatmap for seg in refam.segment_clip_encoded(latents, grid, prompt, EXPRESSION)])
    assert np.abs(heatmap.reshape(-1) - expected.numpy()).max() <= 1e-5
    if family in ("mochi", "qwen_image"):
        assert block[:, -2:].abs().max() == 0


@pytest.mark.parametrize("family,blocks", [("flux2", ("dit.single.0",)), ("qwen_image", ("dit.joint.0",)),
                                           ("mochi", ("dit.joint.0",)), ("wan", ("dit.cross.0",))])
def test_default_blocks_per_family(family, blocks):
    model, *_ = tiny(family)
    refam = RefAM(model)
    assert refam.blocks == blocks and refam.source.family == family


def frames_of(count, size=(32, 24)):
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("family", VIDEO)
def test_one_pass_over_a_clip_gives_a_mask_per_frame(family):
    model, latents, prompt, grid = tiny(family)
    refam = RefAM(model)
    per_latent = refam.segment_clip_encoded(latents, grid, prompt, EXPRESSION)
    assert len(per_latent) == FRAMES and all(seg.mask.shape == GRID for seg in per_latent)
    count = 1 + refam.source.temporal * (FRAMES - 1)  # Mochi 7 frames, Wan 5: the first alone, then a group
    frames = frames_of(count)
    segs = refam.segment_clip_encoded(latents, grid, prompt, EXPRESSION, frames=frames)
    assert [seg.settings["latent_frame"] for seg in segs] == [0] + [1] * refam.source.temporal
    assert [seg.settings["frame"] for seg in segs] == list(range(count))
    assert all(seg.mask.shape == (24, 32) and seg.settings["path"] == "clip" for seg in segs)
    for seg in segs:
        assert np.array_equal(seg.grid_heatmap, per_latent[seg.settings["latent_frame"]].grid_heatmap)
    assert np.abs(per_latent[0].grid_heatmap - per_latent[1].grid_heatmap).max() > 0
    with pytest.raises(ValueError, match="latent frames"):
        refam.segment_clip_encoded(latents, grid, prompt, EXPRESSION, frames=frames[:1])
    with pytest.raises(ValueError, match="segment_clip_encoded"):
        refam.segment_encoded(latents, grid, prompt, EXPRESSION)


@pytest.mark.parametrize("family", VIDEO)
def test_video_sinks_name_their_frame_and_grid_cell(family):
    model, latents, prompt, grid = tiny(family)
    settings = RefAMSettings(sink_ratio=0.0, sink_max_cv=float("inf"))  # every key fires
    refam = RefAM(model, settings)
    segs = refam.segment_clip_encoded(latents, grid, prompt, EXPRESSION)
    sinks = segs[0].sinks
    image = [s for s in sinks if s["role"] == "image"]
    frames, rows, cols = grid
    assert len(image) == frames * rows * cols  # one per video token
    assert sorted((s["frame"], s["row"], s["col"]) for s in image) == [
        (f, r, c) for f in range(frames) for r in range(rows) for c in range(cols)]
    assert all(s["position"] == s["frame"] * rows * cols + s["row"] * cols + s["col"] for s in image)
    assert {s["role"] for s in sinks} >= {"content", "magnet", "image"}
    assert not segs[0].grid_heatmap.any() and not segs[0].mask.any()
    if family == "wan":  # text sinks from the cross-attention read, video sinks from the same block's self-attention
        assert {s["site"] for s in image} == {"dit.self.0"}
        assert {s["site"] for s in sinks if s["role"] != "image"} == {"dit.cross.0"}
        assert refam.sink_sites == ("dit.cross.0", "dit.self.0")


class ClipPipeline:
    """Stands in for a video pipeline: a Wan transformer, frames pooled to latents, a word-level tokenizer."""

    def __init__(self):
        self.transformer, _ = tiny_wan(text=12)
        self.tokenizer = tiny_tokenizer(12)
        self.embeds = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(1))


class ClipSource(WanTransformerSource):
    def __init__(self, pipe):
        super().__init__(pipe.transformer)
        self.pipe, self.multiple = pipe, 8

    def clip_latents(self, frames):
        pixels = torch.stack([torch.from_numpy(np.asarray(f, dtype=np.float32) / 255).permute(2, 0, 1) for f in frames])
        groups = [pixels[:1]] + [g for g in pixels[1:].split(self.temporal) if len(g)]  # the first alone, then 4s
        latent = torch.stack([g.mean(0) for g in groups])  # (F, 3, H, W)
        latent = torch.cat([latent, latent.mean(1, keepdim=True)], 1)  # 4 channels
        latent = torch.nn.functional.avg_pool2d(latent, 4).permute(1, 0, 2, 3)[None]  # (1, 4, F, H / 4, W / 4)
        return latent, (latent.shape[2], latent.shape[3] // 2, latent.shape[4] // 2)

    def prompt(self, text):
        return EncodedPrompt(self.pipe.embeds, None, [token_segment(self.pipe.tokenizer, text, 12)])


register_source("ClipPipeline", lambda pipe, **options: ClipSource(pipe))


def test_segment_video_takes_the_one_pass_path_on_a_video_dit_and_scores_jf():
    from grounding.metrics import SegmentationScores

    refam = RefAM(ClipPipeline())
    frames = frames_of(5)
    segs = segment_video(refam, frames, EXPRESSION)
    assert len(segs) == 5 and all(seg.settings["path"] == "clip" for seg in segs)
    assert all(seg.settings["smoothing"] == 0.0 and seg.mask.shape == (24, 32) for seg in segs)
    assert segs[1].settings["latent_frame"] == segs[4].settings["latent_frame"] == 1
    baseline = segment_video(refam, frames, EXPRESSION, path="frames", smoothing=0.0)  # each frame a clip of one
    assert all(seg.settings["path"] == "frames" and seg.settings["latent_frame"] == 0 for seg in baseline)
    assert np.abs(baseline[1].grid_heatmap - segs[1].grid_heatmap).max() > 0
    # J&F against planted truths: frames 0, 1 exact, 2 empty (J = 0, F = 0), 3 and 4 exact: 4/5
    assert all(seg.mask.any() for seg in segs)
    scores = SegmentationScores()
    truths = [segs[0].mask, segs[1].mask, np.zeros((24, 32), bool), segs[3].mask, segs[4].mask]
    for seg, truth in zip(segs, truths):
        scores.add(seg.mask, truth, sequence="clip/object")
    assert scores.summary()["J&F"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="1 \\+ 4 k frames"):
        segment_video(refam, frames[:4], EXPRESSION)


@pytest.mark.parametrize("family", VIDEO)
def test_video_pipelines_encode_a_clip_with_their_own_pieces(family):
    from vlmtools.testing.pipelines import VIDEO_SIZE, tiny_mochi_pipeline, tiny_wan_pipeline

    pipe = (tiny_wan_pipeline if family == "wan" else tiny_mochi_pipeline)()
    refam = RefAM(pipe, max_sequence_length=12)
    count = 1 + refam.source.temporal  # two latent frames
    frames = frames_of(count, VIDEO_SIZE)
    latents, grid = refam.source.clip_latents(frames)
    with torch.no_grad():
        video = pipe.video_processor.preprocess_video(frames)
        raw = pipe.vae.encode(video).latent_dist.mode()
    scale = 1.0 if family == "wan" else pipe.vae.config.scaling_factor  # latents_mean 0, latents_std 1 here
    assert torch.allclose(latents, raw * scale, atol=1e-6)
    assert grid == (2, VIDEO_SIZE[1] // 16, VIDEO_SIZE[0] // 16) and latents.shape[2] == 2
    prompt = refam.source.prompt(refam.prompt(EXPRESSION))
    tokens = refam.tokens(prompt, EXPRESSION)
    assert prompt.embeds.shape[1] == 12 and tokens.positions("content") == [1, 2]
    segs = segment_video(refam, frames, EXPRESSION)
    assert len(segs) == count and all(seg.mask.shape == (VIDEO_SIZE[1], VIDEO_SIZE[0]) for seg in segs)
    assert segs[0].settings["family"] == family and segs[-1].settings["latent_frame"] == 1
    single = refam.segment(frames[0], EXPRESSION)  # an image: a clip of one frame
    assert single.mask.shape == (VIDEO_SIZE[1], VIDEO_SIZE[0]) and single.grid_heatmap.shape == grid[1:]
    with pytest.raises(ValueError, match=f"1 \\+ {refam.source.temporal} k frames"):
        refam.segment_clip(frames[:-1], EXPRESSION)


def test_the_forward_stops_after_the_last_site_read_in_execution_order():
    from grounding.refam.method import execution_order

    model, latents, prompt, grid = tiny("wan")
    refam = RefAM(model, RefAMSettings(blocks=("dit.cross.0",)))
    assert execution_order(refam.dit) == ["dit.self.0", "dit.cross.0", "dit.self.1", "dit.cross.1"]
    assert refam.last_block == "dit.cross.0" and refam.sink_sites == ("dit.cross.0", "dit.self.0")
    ran = []
    handles = [model.blocks[0].attn1.register_forward_pre_hook(lambda *a: ran.append("self.0")),
               model.blocks[1].attn1.register_forward_pre_hook(lambda *a: ran.append("self.1"))]
    segs = refam.segment_clip_encoded(latents, grid, prompt, EXPRESSION)
    for handle in handles:
        handle.remove()
    assert ran == ["self.0"] and len(segs) == FRAMES
    with pytest.raises(ValueError, match="dit.self.1 attends over the image alone.*dit.cross.0, dit.cross.1"):
        RefAM(model, RefAMSettings(blocks=("dit.self.1",)))


# FLUX.2 and Qwen-Image pipelines: the prompt inside a chat template

CHAT = ("flux2", "flux2_klein", "qwen_image")
CHAT_OPTIONS = {"flux2": {"max_sequence_length": 80, "text_encoder_out_layers": (1, 2, 3)},
                "flux2_klein": {"max_sequence_length": 24, "text_encoder_out_layers": (1, 2, 3)}, "qwen_image": {}}


@pytest.fixture(scope="module")
def chat_pipelines():
    from vlmtools.testing import pipelines

    assert CHAT_OPTIONS["flux2"]["text_encoder_out_layers"] == pipelines.FLUX2_LAYERS
    return {family: getattr(pipelines, f"tiny_{family}_pipeline")() for family in CHAT}


def chat_ids(pipe, family):
    """The token ids of PROMPT's templated text that the pipeline's text encoder reads, and their mask."""
    if family == "flux2":
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        enc = pipe.tokenizer.apply_chat_template(
            format_input([PROMPT], system_message=pipe.system_message), add_generation_prompt=False, tokenize=True,
            return_dict=True, padding="max_length", truncation=True, max_length=80)
        return enc["input_ids"][0].tolist(), enc["attention_mask"][0].tolist()
    if family == "flux2_klein":
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        enc = pipe.tokenizer(text, padding="max_length", truncation=True, max_length=24)
        return enc["input_ids"], enc["attention_mask"]
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(PROMPT))["input_ids"][34:]  # the pipeline drops 34
    return ids, [1] * len(ids)


def hand_segment(pipe, family):
    """The positions of PROMPT's six words located by their ids in the templated ids; every other real
    position is a template token (empty span)."""
    ids, mask = chat_ids(pipe, family)
    words = (pipe.tokenizer.tokenizer if family == "flux2" else pipe.tokenizer)(PROMPT, add_special_tokens=False)
    words = words["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(words)] == words)
    offsets = [(0, 0)] * len(ids)
    offsets[start:start + len(words)] = OFFSETS[:len(words)]
    return Segment(offsets, mask), start


def test_chat_template_positions_map_back_to_the_expression(chat_pipelines):
    for family in CHAT:
        pipe = chat_pipelines[family]
        refam = RefAM(pipe, **CHAT_OPTIONS[family])
        prompt = refam.source.prompt(PROMPT)
        expected, start = hand_segment(pipe, family)
        # FLUX.2: left pads, the system turn, then [INST] PROMPT [/INST] at the end of 80; [klein]: <|im_start|>
        # user \n PROMPT, the rest of the template, right pads to 24; Qwen-Image: the pipeline drops its template's
        # 34 leading tokens, so PROMPT comes first, then the template's 5 closing tokens
        assert start == {"flux2": 80 - 1 - 6, "flux2_klein": 3, "qwen_image": 0}[family]
        length = {"flux2": 80, "flux2_klein": 24, "qwen_image": 11}[family]
        assert prompt.embeds.shape[1] == len(expected.offsets) == length
        assert list(prompt.segments[0].offsets) == expected.offsets
        assert list(prompt.segments[0].real) == list(expected.real)
        tokens = refam.tokens(prompt, EXPRESSION)
        assert tokens.positions("content") == [start + 1, start + 2]
        assert tokens.positions("stop", "content", "magnet") == list(range(start, start + 6))


def hand_latents(pipe, family, picture):
    """Clean packed latents of ``picture`` by the pipelines' formulas, written out here."""
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        if family.startswith("flux2"):  # 2 x 2 patches (channel-major), then the VAE's batch norm, then raster order
            z = pipe.vae.encode(pixels).latent_dist.mode()
            b, c, h, w = z.shape
            z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
            bn = pipe.vae.bn
            z = (z - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
            return z.flatten(2).transpose(1, 2), (h // 2, w // 2)
        z = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]  # one frame
        mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, -1, 1, 1)  # as planted by the builder
        std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, -1, 1, 1)
        z = (z - mean) / std
        b, c, h, w = z.shape  # 2 x 2 patches packed (row, col, channel, dy, dx)
        return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c), (h // 2, w // 2)


def test_pipeline_heatmap_equals_segment_encoded_with_the_pipelines_prompt(chat_pipelines):
    from vlmtools.testing.pipelines import SIZE

    picture = frames_of(1, (SIZE, SIZE))[0]
    for family in ("flux2", "qwen_image"):  # [klein] differs from FLUX.2 in its template only (the test above)
        pipe = chat_pipelines[family]
        seg = RefAM(pipe, **CHAT_OPTIONS[family]).segment(picture, EXPRESSION)
        latents, grid = hand_latents(pipe, family, picture)
        with torch.no_grad():
            embeds = pipe.encode_prompt(PROMPT, **CHAT_OPTIONS[family])[0]
        prompt = EncodedPrompt(embeds, None, [hand_segment(pipe, family)[0]])
        expected = RefAM(pipe.transformer).segment_encoded(latents, grid, prompt, EXPRESSION)
        assert seg.settings["family"] == family and seg.grid_heatmap.shape == grid == (4, 4)
        assert sorted(seg.word_maps) == ["1:red", "2:circle"]
        assert np.abs(seg.grid_heatmap - expected.grid_heatmap).max() <= 1e-6
        assert seg.grid_heatmap.std() > 0


def test_chat_pipelines_refuse_prompts_they_would_cut(chat_pipelines):
    from vlmtools.adapters.flux2 import Flux2Source
    from vlmtools.adapters.qwen_image import QwenImageSource

    flux2, qwen = chat_pipelines["flux2"], chat_pipelines["qwen_image"]
    _, mask = chat_ids(flux2, "flux2")
    with pytest.raises(ValueError, match=f"takes {sum(mask)} tokens, more than the {sum(mask) - 1}"):
        Flux2Source(flux2, max_sequence_length=sum(mask) - 1, text_encoder_out_layers=(1, 2, 3)).prompt(PROMPT)
    with pytest.raises(ValueError, match="takes 11 tokens, more than the 10"):
        QwenImageSource(qwen, max_sequence_length=10).prompt(PROMPT)
    drop = qwen.prompt_template_encode_start_idx
    try:
        qwen.prompt_template_encode_start_idx = drop + 1  # a tokenizer that splits the template otherwise
        with pytest.raises(ValueError, match="reach into the prompt"):
            QwenImageSource(qwen).prompt(PROMPT)
    finally:
        qwen.prompt_template_encode_start_idx = drop


def test_wan22_reads_the_expert_that_denoises_at_each_timestep():
    from vlmtools.testing.pipelines import VIDEO_SIZE, tiny_wan_pipeline

    pipe = tiny_wan_pipeline(boundary_ratio=0.5)
    high, low = pipe.transformer, pipe.transformer_2
    ran = []  # (timestep, expert) of each transformer call of the pipeline's own denoising loop
    handles = [model.register_forward_pre_hook(lambda m, args, kw: ran.append((float(kw["timestep"][0]), m)),
                                               with_kwargs=True) for model in (high, low)]
    with torch.no_grad():
        pipe(EXPRESSION, height=VIDEO_SIZE[1], width=VIDEO_SIZE[0], num_frames=5, num_inference_steps=3,
             guidance_scale=1.0, max_sequence_length=12, output_type="latent")
    for handle in handles:
        handle.remove()
    refam = RefAM(pipe, max_sequence_length=12)
    assert [(round(t, 1), m is low) for t, m in ran] == [(1000, False), (500.5, False), (1, True)]
    assert all(refam.source.transformer_at(timestep / 1000) is model for timestep, model in ran)

    generator = torch.Generator().manual_seed(2)
    latents, grid = torch.randn(1, 4, 2, 6, 8, generator=generator), (2, 3, 4)  # two latent frames of 3 x 4 patches
    prompt = EncodedPrompt(torch.randn(1, 12, 32, generator=generator), None,
                           [token_segment(tiny_tokenizer(12), PROMPT, 12)])

    def heatmaps(model, *timesteps):
        segs = RefAM(model, RefAMSettings(timesteps=timesteps)).segment_clip_encoded(latents, grid, prompt, EXPRESSION)
        return np.stack([seg.grid_heatmap for seg in segs])

    at_low, at_high = heatmaps(pipe, 0.3), heatmaps(pipe, 0.7)
    assert np.abs(at_low - heatmaps(low, 0.3)).max() <= 1e-6  # below the boundary: the low-noise expert's maps
    assert np.abs(at_low - heatmaps(high, 0.3)).max() > 1e-3  # ... not the high-noise one's
    assert np.abs(at_high - heatmaps(high, 0.7)).max() <= 1e-6
    both = heatmaps(pipe, 0.3, 0.7)  # one pass per timestep, each on its expert, averaged
    assert np.abs(both - (at_low + at_high) / 2).max() <= 1e-6


def test_chat_sources_call_the_transformer_as_their_pipeline_does(chat_pipelines):
    """The pipeline's own first denoising call (t = 1) on the source's text features, and the source's call on
    the same noisy latents: the transformer gives the same output (timestep scale, ids, guidance, text mask)."""
    from vlmtools.testing.pipelines import SIZE

    for family in CHAT:
        pipe = chat_pipelines[family]
        source = RefAM(pipe, **CHAT_OPTIONS[family]).source
        with torch.no_grad():
            prompt = source.prompt(PROMPT)
        calls = []
        handle = pipe.transformer.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out[0])),
                                                        with_kwargs=True)
        mask = {} if family.startswith("flux2") else {"prompt_embeds_mask": torch.ones(1, prompt.embeds.shape[1])}
        try:
            with torch.no_grad():
                pipe(prompt_embeds=prompt.embeds, **mask, height=SIZE, width=SIZE, num_inference_steps=1,
                     output_type="latent")
        finally:
            handle.remove()
        (kwargs, out), = calls
        assert float(kwargs["timestep"][0]) == 1.0
        with torch.no_grad():
            ours = pipe.transformer(**source.call(kwargs["hidden_states"], 1.0, prompt, (4, 4)))[0]
            other = pipe.transformer(**source.call(kwargs["hidden_states"], 0.5, prompt, (4, 4)))[0]
        assert (ours - out).abs().max() <= 1e-5
        assert (other - out).abs().max() > 1e-3  # the output depends on t
