"""Every DiT family at its published block width (``vlmtools.testing.dit.published_dit``: random weights, one
or two blocks, reduced latents, a batch of two): every row recomputed by the seam equals the plain forward,
recording leaves it bit for bit, RefAM's word maps are the text share of the recorded attention, the global-sink
columns count what each call has, and a bf16 forward through the probe is finite."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import vlmtools
from grounding import RefAM, RefAMSettings
from grounding.refam import EncodedPrompt
from grounding.refam.prompt import Segment
from tests.test_dit_families import Identity, names, run
from vlmtools.testing.dit import FRAMES, PUBLISHED, published_dit

pytestmark = [pytest.mark.real_width, pytest.mark.filterwarnings("ignore:In CPU autocast")]
VIDEO = ("mochi", "wan")
TEXT = 16
EXPRESSION = "the red circle"
# word offsets of "the red circle . a with", an end token, then pads
OFFSETS = [(0, 3), (4, 7), (8, 14), (15, 16), (17, 18), (19, 23), (0, 0)] + [(0, 0)] * (TEXT - 7)
REAL = [1] * 7 + [0] * (TEXT - 7)


@pytest.fixture(params=list(PUBLISHED))
def family(request):
    yield request.param
    gc.collect()


def test_probe_parity_refam_maps_and_bf16_at_published_width(family):
    model, inputs = published_dit(family, text=TEXT)
    dit = vlmtools.wrap(model)
    plain = run(model, inputs)
    with dit.use(Identity(names(dit))):
        edited = run(model, inputs)
    assert (edited - plain).abs().max() <= 1e-5 * max(1.0, plain.abs().max())
    with dit.use(vlmtools.RecordRows([dit.sites[0].name], "all")):
        assert torch.equal(run(model, inputs), plain)

    # RefAM on the first block it would read: the text share of the recorded attention
    name = next((s.name for s in dit.sites if getattr(s, "keys", "joint") == "text"), dit.sites[-1].name)
    refam = RefAM(model, RefAMSettings(blocks=(name,), sinks="none"))
    latents = inputs["hidden_states"][:1]
    embeds = inputs["encoder_hidden_states"][:1]
    pooled = inputs.get("pooled_projections")
    prompt = EncodedPrompt(embeds, None if pooled is None else pooled[:1], [Segment(OFFSETS, REAL)])
    text, grid = dit.adapter.sizes(model, inputs)
    frames = dit.adapter.frames(model, inputs) if dit.adapter.frames else 1
    grid3 = (frames, grid[0] // frames, grid[1])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    x_t = 0.7 * latents + 0.3 * noise
    with dit.use(vlmtools.RecordRows([name], "all")) as trace, torch.no_grad():
        model(**refam.source.call(x_t, 0.3, prompt, grid3 if family in VIDEO else grid))
    probs = torch.cat(trace[f"{name}.rows"], 2)[0].mean(0)
    layout = dit.layout(text, grid)
    keys = slice(None) if family == "wan" else layout.text.indices()
    block = probs[layout.image.positions][:, keys]
    expected = ((block[:, 1] + block[:, 2]) / 2 / block.sum(-1)).numpy()
    if family in VIDEO:
        segs = refam.segment_clip_encoded(latents, grid3, prompt, EXPRESSION)
        heatmap = np.stack([seg.grid_heatmap for seg in segs]).reshape(-1)
        assert len(segs) == FRAMES
    else:
        heatmap = refam.segment_encoded(latents, grid, prompt, EXPRESSION).grid_heatmap.reshape(-1)
    assert np.abs(heatmap - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())

    model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with dit.use(Identity(names(dit))):
        out16 = run(model, inputs).float()
    assert torch.isfinite(out16).all()
