"""A family defined in one file (here) runs every method unchanged, or the method refuses it with the
reason its adapter gives: LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``, images only)
with every pruning host, VAR, GIFT, PAINT and the sink detector; the same family reading two encoder
layers, where the [CLS] hosts refuse; and a DiT family with its own RefAM source."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

import vlmtools
from grounding import RefAM, RefAMSettings
from hallucination import GIFT, PAINT, VAR
from pruning import HOSTS
from tests.test_pruning import make
from tests.test_refam import EXPRESSION, GRID, tiny
from vlmtools.adapters import Adapter, UnsupportedModel, flux, register, unregister
from vlmtools.adapters.flux import FluxTransformerSource
from vlmtools.adapters.llava import clip_cls_layer
from vlmtools.adapters.llava_next import llava_next_layout, tiles_to_lm
from vlmtools.adapters.vision import VisionEncoder
from vlmtools.sinks import SinkDetector
from vlmtools.testing.vlm import IMAGE, VIDEO, tiny_llava_next

LLAVA_NEXT_VIDEO = Adapter(
    family="llava_next_video",
    classes=("LlavaNextVideoForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=llava_next_layout,  # images are packed as LLaVA-NeXT packs them
    vision=VisionEncoder(to_lm=tiles_to_lm, cls=True, cls_layer=clip_cls_layer),
)
CLS_HOSTS = ("visionzip", "fastervlm")


@pytest.fixture
def family():
    register(LLAVA_NEXT_VIDEO)
    yield LLAVA_NEXT_VIDEO
    unregister(LLAVA_NEXT_VIDEO)


def tiny_next_video(feature_layer=-2):
    """LLaVA-NeXT-Video on the tiny LLaVA-NeXT's sizes and batch (a wide and a tall image), 5 LM layers."""
    next_model, inputs = tiny_llava_next()
    torch.manual_seed(0)
    config = LlavaNextVideoConfig(
        vision_config=next_model.config.vision_config.to_dict(),
        text_config=next_model.config.text_config.to_dict() | {"num_hidden_layers": 5},
        image_token_id=IMAGE, video_token_id=VIDEO, image_grid_pinpoints=next_model.config.image_grid_pinpoints,
        vision_feature_layer=feature_layer)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model, inputs


def generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return torch.stack(out.logits, 1)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_every_pruning_host_keeps_its_budget_on_the_new_family(family, host):
    model, inputs = tiny_next_video()
    vlm = vlmtools.wrap(model)
    assert vlm.family == "llava_next_video"
    pruner = make(host, 4)
    with torch.no_grad(), vlm.use(pruner) as trace:
        logits = model(**inputs).logits
    kept = trace[pruner].kept_at(vlm.num_layers - 1)
    for b, sample in enumerate(vlm.layout(inputs).samples):
        assert int(torch.isin(kept[b], sample.visual_positions()).sum()) == 4
    assert logits.shape[1] == kept.shape[1] < inputs["input_ids"].shape[1] and logits.isfinite().all()


def test_var_gift_paint_and_the_sink_detector_run_on_the_new_family(family):
    model, inputs = tiny_next_video()
    vlm = vlmtools.wrap(model)
    plain = generate(model, inputs)
    for method in (VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3)), GIFT(alpha=5.0, saliency_layer=1, layers=[2, 3]),
                   PAINT()):
        with vlm.use(method) as trace:
            edited = generate(model, inputs)
        assert (edited - plain).abs().amax((0, 2)).min() > 1e-6, method  # every step changes
    assert trace[method].local.any() and trace[method].settings["scores"] == "CLS attention"
    report = SinkDetector(["positional", "sink_dims"]).detect(vlm, inputs)
    first = [f.token for f in report.findings if f.role == "first"]
    assert first == [sample.first for sample in vlm.layout(inputs).samples]  # left padding read from the layout
    assert any(f.role == "visual" and f.image == 0 for f in report.findings)


def test_cls_hosts_refuse_a_projector_over_two_layers_with_the_adapters_reason(family):
    model, inputs = tiny_next_video(feature_layer=[-2, -1])
    vlm = vlmtools.wrap(model)
    with pytest.raises(UnsupportedModel) as reason:
        family.vision.cls_block(model)
    assert "several encoder layers" in str(reason.value)
    for host in CLS_HOSTS:
        assert str(reason.value) in HOSTS[host].refusal(vlm)
        with pytest.raises(ValueError, match="vision_feature_layer=\\[-2, -1\\]"), vlm.use(make(host, 4)):
            model(**inputs)
    assert all(HOSTS[host].refusal(vlm) is None for host in HOSTS if host not in CLS_HOSTS)
    paint = PAINT()
    with vlm.use(paint) as trace:  # PAINT reads the [CLS] rows of layers of its own: it still runs
        generate(model, inputs)
    assert trace[paint].local.any()


def test_a_family_that_says_nothing_of_its_encoder_is_refused_by_the_methods_that_read_it():
    quiet = dataclasses.replace(LLAVA_NEXT_VIDEO, vision=None)
    register(quiet)
    try:
        model, _ = tiny_next_video()
        vlm = vlmtools.wrap(model)
        with pytest.raises(UnsupportedModel) as reason:
            quiet.vision_encoder()
        for host in CLS_HOSTS:
            assert str(reason.value) in HOSTS[host].refusal(vlm)
        with pytest.raises(UnsupportedModel, match="Adapter.vision"), vlm.use(PAINT()):
            pass
    finally:
        unregister(quiet)


class RenamedFlux(FluxTransformer2DModel):
    """A DiT class no built-in family knows (FLUX's blocks under another name)."""


class RenamedFluxSource(FluxTransformerSource):
    family = "renamed_flux"
    blocks = ("dit.double.1",)

    def __init__(self, transformer):
        super().__init__(transformer)
        self.blocks = type(self).blocks  # this family's own default, not FLUX's


RENAMED_FLUX = dataclasses.replace(flux.ADAPTER, family="renamed_flux", classes=("RenamedFlux",),
                                   sources=(("RenamedFlux", RenamedFluxSource),))


def test_refam_reads_a_new_dit_family_through_the_source_its_adapter_names():
    model, latents, prompt = tiny("flux")
    renamed = RenamedFlux.from_config(model.config).eval()
    renamed.load_state_dict(model.state_dict())
    register(RENAMED_FLUX)
    try:
        seg = RefAM(renamed).segment_encoded(latents, GRID, prompt, EXPRESSION)
    finally:
        unregister(RENAMED_FLUX)
    assert seg.settings["family"] == "renamed_flux" and seg.settings["blocks"] == ["dit.double.1"]
    same = RefAM(model, RefAMSettings(blocks=("dit.double.1",))).segment_encoded(latents, GRID, prompt, EXPRESSION)
    assert seg.grid_heatmap.any()
    np.testing.assert_array_equal(seg.grid_heatmap, same.grid_heatmap)  # the same weights read the same map
