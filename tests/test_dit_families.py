"""The probes of today's DiT families on tiny random models of the real diffusers classes: FLUX.2,
Qwen-Image, Mochi (joint attention over video and text), Wan (cross-attention to the text), and the
fused-q/k/v processors of every family.

Parity: with every query row recomputed by the seam and written back (an identity edit of the
probabilities at every row of every site), the transformer's output equals the plain forward's
within 1e-5 (fp32, a batch of two): the probe's q/k/v, masks, rotary, kernel inputs and output
order are the processor's. A recorder that only reads leaves the output bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import vlmtools
from tests.test_dit import explicit_probs
from vlmtools.adapters.dit import Probe
from vlmtools.testing.dit import (
    FRAMES,
    GRID,
    TEXT,
    tiny_flux,
    tiny_flux2,
    tiny_mochi,
    tiny_qwen_image,
    tiny_sd3,
    tiny_wan,
)

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")

BUILDERS = {"flux2": tiny_flux2, "qwen_image": tiny_qwen_image, "mochi": tiny_mochi, "wan": tiny_wan,
            "wan_i2v": lambda **kw: tiny_wan(image=True, **kw)}
VIDEO = {"mochi", "wan", "wan_i2v"}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def processors(dit):
    return [site.module.processor for site in dit.sites]


class Identity(vlmtools.AttentionHook):
    """Asks for every row and hands the probabilities back unchanged: the seam recomputes every row
    from the probe's q/k/v and writes it back, so the output is the probe's own attention."""

    def __init__(self, names):
        self.names, self.calls = names, 0

    def attach(self, vlm, plan):
        for name in self.names:
            plan.attention(vlm.site(name), self)

    def rows(self, call):
        return vlmtools.ALL

    def edit_probs(self, call, rows, probs):
        self.calls += 1
        return probs


def names(dit):
    return [site.name for site in dit.sites]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_row_recomputed_equals_the_plain_forward(family):
    model, inputs = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    plain, before = run(model, inputs), processors(dit)
    hook = Identity(names(dit))
    with dit.use(hook):
        assert all(isinstance(p, Probe) for p in processors(dit))
        edited = run(model, inputs)
    assert hook.calls > 0 and all(a is b for a, b in zip(processors(dit), before))
    assert (edited - plain).abs().max() <= 1e-5
    with dit.use(vlmtools.RecordRows(names(dit), "all")) as trace:
        recorded = run(model, inputs)
    assert torch.equal(recorded, plain)  # reading only: the processor's own kernel output
    for name in names(dit):
        rows = torch.cat(trace[f"{name}.rows"], 2)
        assert torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-5) and rows.shape[0] == 2


@pytest.mark.parametrize("family,text,grid", [("flux2", 7, (2, 5)), ("qwen_image", 7, (2, 5)),
                                              ("mochi", 7, (2 * FRAMES, 5)), ("wan", 7, (2 * FRAMES, 5))])
def test_sizes_and_layout_of_a_call(family, text, grid):
    model, inputs = BUILDERS[family](grid=(2, 5), text=text)
    dit = vlmtools.wrap(model)
    assert dit.adapter.sizes(model, inputs) == (text, grid)
    layout = dit.layout(text, grid)
    if family in ("flux2", "qwen_image"):  # text first
        assert (layout.text, layout.image.span) == (vlmtools.Span(0, text), vlmtools.Span(text, text + 10))
    else:  # video first (Wan: its virtual joint sequence)
        n = grid[0] * grid[1]
        assert (layout.image.span, layout.text) == (vlmtools.Span(0, n), vlmtools.Span(n, n + text))
        assert dit.adapter.frames(model, inputs) == FRAMES


def test_wan_sites_say_where_their_keys_are():
    model, inputs = tiny_wan()
    dit = vlmtools.wrap(model)
    layout = dit.layout(TEXT, (FRAMES * GRID[0], GRID[1]))
    self_site, cross = dit.site("dit.self.1"), dit.site("dit.cross.1")
    assert self_site.module is model.blocks[1].attn1 and cross.module is model.blocks[1].attn2
    assert (self_site.keys, cross.keys, self_site.block, cross.block) == ("image", "text", "blocks.1", "blocks.1")
    assert (self_site.key_offset(layout), cross.key_offset(layout)) == (0, layout.text.start)


def wan_cross_probs(site, kwargs):
    """softmax over the text of Wan's cross-attention, q and k from the module's weights (no rotary)."""
    attn, video, text = site.module, kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    query = attn.norm_q(attn.to_q(video)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    key = attn.norm_k(attn.to_k(text)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    return (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)


def test_wan_cross_attention_maps_are_the_text_attention_of_each_video_token():
    from grounding.refam import RecordImageText

    model, inputs = tiny_wan()
    dit = vlmtools.wrap(model)
    site = dit.site("dit.cross.1")
    seen = []
    handle = site.module.register_forward_pre_hook(lambda m, args, kw: seen.append(args), with_kwargs=True)
    with dit.use(RecordImageText(["dit.cross.1"]), vlmtools.RecordRows(["dit.cross.1"], "all")) as trace:
        run(model, inputs)
    handle.remove()
    with torch.no_grad():
        probs = wan_cross_probs(site, {"hidden_states": seen[0][0], "encoder_hidden_states": seen[0][1]})
    image_text = trace["dit.cross.1.image_text"][0]
    assert image_text.shape == (2, FRAMES * GRID[0] * GRID[1], TEXT)
    assert (image_text - probs.mean(1)).abs().max() <= 1e-5
    assert (torch.cat(trace["dit.cross.1.rows"], 2) - probs).abs().max() <= 1e-5


def test_mochi_padding_takes_no_attention_and_its_rows_are_the_processors():
    model, inputs = tiny_mochi()
    dit = vlmtools.wrap(model)
    n = FRAMES * GRID[0] * GRID[1]
    with dit.use(vlmtools.RecordRows(["dit.joint.0"], "all")) as trace:
        run(model, inputs)
    rows = torch.cat(trace["dit.joint.0.rows"], 2)  # (2, H, n + T, n + T)
    assert rows[1, :, :, n + TEXT - 2:].abs().max() == 0  # sample 1's two pads: no query attends to them
    assert rows[0, :, :, n + TEXT - 2:].min() > 0


@pytest.mark.parametrize("family", list(BUILDERS))
def test_an_unknown_processor_is_refused_and_nothing_stays_installed(family):
    model, _ = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    site = dit.sites[-1]
    if hasattr(site.module, "set_processor"):
        site.module.set_processor(AttnProcessor2_0())
    else:
        site.module.processor = AttnProcessor2_0()
    before = processors(dit)
    with pytest.raises(TypeError, match=f"{site.name} runs AttnProcessor2_0"), \
            dit.use(vlmtools.RecordRows([dit.sites[0].name, site.name])):
        pass
    assert all(a is b for a, b in zip(processors(dit), before))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_bf16_probe_runs_diffusers_bf16_numerics(family):
    model, inputs = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    site = dit.sites[0].name  # the first block: its inputs differ only by the embeddings' rounding
    with dit.use(vlmtools.RecordRows([site], "all")) as trace:
        out32 = run(model, inputs)
    rows32 = torch.cat(trace[f"{site}.rows"], 2)
    model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    plain16 = run(model, inputs).float()
    with dit.use(vlmtools.RecordRows([site], "all")) as trace:
        out16 = run(model, inputs).float()
    rows16 = torch.cat(trace[f"{site}.rows"], 2)
    assert torch.equal(out16, plain16) and rows16.dtype == torch.float32 and torch.isfinite(rows16).all()
    assert (out16 - out32).abs().max() <= 0.05 * out32.abs().max()
    assert (rows16 - rows32).abs().max() <= 0.03
    with dit.use(Identity(names(dit))):
        edited16 = run(model, inputs).float()
    assert (edited16 - plain16).abs().max() <= 0.05 * plain16.abs().max()


def tiny_sd3_single_attention(**kw):
    """SD3 without dual attention or qk-norm: diffusers' fused SD3 processor cannot run SD3.5's image-only
    ``attn2`` and skips the qk-norms (so only without them is the fused model the unfused one)."""
    from diffusers import SD3Transformer2DModel

    model, inputs = tiny_sd3(**kw)
    torch.manual_seed(0)
    config = {**model.config, "dual_attention_layers": (), "qk_norm": None}
    return SD3Transformer2DModel.from_config(config).eval(), inputs


FUSABLE = {"flux": tiny_flux, "sd3": tiny_sd3_single_attention, "flux2": tiny_flux2, "qwen_image": tiny_qwen_image,
           "wan": tiny_wan, "wan_i2v": lambda **kw: tiny_wan(image=True, **kw)}


@pytest.mark.parametrize("family", list(FUSABLE))
def test_fused_qkv_projections_are_served(family):
    model, inputs = FUSABLE[family]()
    unfused = run(model, inputs)
    model.fuse_qkv_projections()
    dit = vlmtools.wrap(model)
    plain, before = run(model, inputs), processors(dit)
    assert (plain - unfused).abs().max() <= 1e-4 * max(1.0, unfused.abs().max())
    if family == "sd3":
        assert type(before[0]).__name__ == "FusedJointAttnProcessor2_0"
    elif family != "qwen_image":  # Qwen-Image's processor reads the separate projections: fusing is a no-op there
        assert any(getattr(site.module, "fused_projections", False) for site in dit.sites)
    with dit.use(Identity(names(dit))):
        edited = run(model, inputs)
    assert (edited - plain).abs().max() <= 1e-5
    with dit.use(vlmtools.RecordRows(names(dit), "all")):
        assert torch.equal(run(model, inputs), plain)
    assert all(a is b for a, b in zip(processors(dit), before))


def test_sd3_fused_probe_matches_explicit_attention_without_qk_norm():
    """diffusers' fused SD3 processor skips SD3.5's qk-norms: the probe does as it does."""
    from diffusers import SD3Transformer2DModel

    model, inputs = tiny_sd3_single_attention()
    model = SD3Transformer2DModel.from_config({**model.config, "qk_norm": "rms_norm"}).eval()
    model.fuse_qkv_projections()
    dit = vlmtools.wrap(model)
    site = dit.site("dit.joint.1")
    seen = []
    handle = site.module.register_forward_pre_hook(lambda m, args, kw: seen.append(kw), with_kwargs=True)
    with dit.use(vlmtools.RecordRows(["dit.joint.1"], "all")) as trace:
        run(model, inputs)
    handle.remove()
    site.module.norm_q = site.module.norm_k = torch.nn.Identity()
    site.module.norm_added_q = site.module.norm_added_k = torch.nn.Identity()
    with torch.no_grad():
        probs = explicit_probs(site, seen[0], "sd3")
    assert (torch.cat(trace["dit.joint.1.rows"], 2) - probs).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["flux2", "qwen_image", "mochi", "wan"])
def test_global_sinks_on_every_new_family_name_frame_and_cell_on_video(family, tmp_path):
    from vlmtools.sinks import GlobalSink, SinkDetector, SinkReport

    model, inputs = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    detector = SinkDetector([GlobalSink(ratio=0.0, max_cv=float("inf"))])  # every key a call has fires
    report = detector.detect(dit, inputs)
    text, grid = dit.adapter.sizes(model, inputs)
    layout = dit.layout(text, grid)
    frames = dit.adapter.frames(model, inputs) if dit.adapter.frames else 1
    rows = grid[0] // frames
    for layer, site in enumerate(dit.sites):
        found = {f.token for f in report.sinks(layer=layer, sample=0)}
        if getattr(site, "keys", "joint") == "text":  # Wan's cross-attention: its keys are the text
            assert found == set(layout.text.indices().tolist())
        elif family == "wan":  # its self-attention: the video
            assert found == set(layout.image.positions.tolist())
        else:
            assert found == set(range(len(layout.text) + len(layout.image)))
            # the second sample's two pads (masked keys in Mochi and Qwen-Image) take no part
            pads = {layout.text.stop - 2, layout.text.stop - 1} if family in ("mochi", "qwen_image") else set()
            assert {f.token for f in report.sinks(layer=layer, sample=1)} == found - pads
    visual = report.sinks(role="visual", sample=0)
    assert visual and all(f.row < rows and f.col < grid[1] for f in visual)
    for f in visual:
        raster = f.token - layout.image.span.start
        if frames > 1:
            assert (f.frame, f.row, f.col) == (raster // (rows * grid[1]), raster % (rows * grid[1]) // grid[1],
                                               raster % grid[1])
            assert f.image == f.frame
        else:
            assert f.frame is None and (f.row, f.col) == (raster // grid[1], raster % grid[1])
    table = report.table()
    assert ("visual frame 1:(" in table) == (frames > 1)
    assert report.grids[0] == [(rows, grid[1])] * frames
    again = SinkReport.from_json(report.to_json())
    assert [f.frame for f in again.findings] == [f.frame for f in report.findings]
    report.plot(tmp_path / "sinks.png")
