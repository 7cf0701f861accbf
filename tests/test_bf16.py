"""bf16 weights and inputs, every family: each pruning host decodes with finite scores and keeps its
budget of visual tokens; VAR, GIFT and PAINT decode with finite scores and record their settings, and VAR
at a tau where sinks exist moves attention (its scores leave plain decoding's);
RefAM on a bf16 FLUX or SD3 pipeline gives the fp32 pipeline's heatmap."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlmtools
from grounding import RefAM
from hallucination import GIFT, PAINT, VAR
from tests.test_pruning import CASES, SPECIAL, make, refused
from vlmtools.testing.vlm import BUILDERS
from vlmtools.testing.pipelines import SIZE, tiny_flux_pipeline, tiny_sd3_pipeline

# VAR: phi = |h_d| / rms(h) <= sqrt(64) = 8 on these LMs, so tau 20 would find no sink and change nothing;
# at tau 2 on dims 0-3 most tiny families have visual sinks (test_var_moves_attention_in_bf16 picks, per
# family, a dimension and a tau at which one exists), and rho 0.8 (the paper's general setting) lets heads qualify
VAR_SETTINGS = {"variant": "released", "tau": 2.0, "dims": (0, 1, 2, 3), "rho": 0.8}
METHODS = {"var": lambda vlm: VAR(**VAR_SETTINGS), "paint": lambda vlm: PAINT(),
           # GIFT on the first two layers with attention (0 and 1; Qwen3.5's tiny model: 3 and 7)
           "gift": lambda vlm: GIFT(saliency_layer=vlm.attention_layers[0], layers=[vlm.attention_layers[1]])}
_MODELS = {}


def bf16(family):
    """The family's tiny model and batch of two, in bf16, built once."""
    if family not in _MODELS:
        model, inputs = BUILDERS[family]()
        _MODELS[family] = (model.to(torch.bfloat16), {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                                       for k, v in inputs.items()})
    return _MODELS[family]


def decode(family, intervention):
    """Decode three tokens in bf16 under ``intervention``; checks finite scores and returns the trace."""
    model, inputs = bf16(family)
    with torch.no_grad(), vlmtools.wrap(model).use(intervention) as trace:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SPECIAL,
                             output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all(torch.isfinite(s[:, :min(SPECIAL)]).all() for s in out.scores)  # past it: suppressed, -inf
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    return trace


@pytest.mark.parametrize("family,host", CASES)
def test_hosts_decode_in_bf16_keeping_their_budget(family, host):
    pruner = make(host, 4)
    if refused(vlmtools.wrap(bf16(family)[0]), pruner):
        return
    run = decode(family, pruner)[pruner]
    if host not in ("fastervlm", "visionzip"):  # those drop inside the vision tower
        kept = run.kept_at(pruner.layers[-1])
        visual = [int(torch.isin(kept[row], sample.visual_positions().to(kept.device)).sum())
                  for row, sample in enumerate(run.state.layout.samples)]
        # rows keep equal lengths (pruning.host): where a row cannot drop as many, another keeps more;
        # SparseVLM's released rank budget keeps as many as the raters' attention has rank, keep its floor
        if getattr(pruner, "budget_mode", None) == "rank":
            assert min(visual) >= 4, visual
        else:
            assert min(visual) == 4, visual


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_decode_in_bf16(family, method):
    edit = METHODS[method](vlmtools.wrap(bf16(family)[0]))
    assert decode(family, edit)[edit].settings["method"] == method.upper()


def scores(family, *interventions):
    """Three greedy tokens' scores ``(steps, B, V)`` in bf16 under ``interventions``, and the trace."""
    model, inputs = bf16(family)
    with torch.no_grad(), vlmtools.wrap(model).use(*interventions) as trace:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SPECIAL,
                             output_scores=True, return_dict_in_generate=True)
    return torch.stack(out.scores)[..., :min(SPECIAL)].float(), trace


def sink_settings(family):
    """VAR settings at which a visual sink exists in its first layer: the dimension and 0.9 x the ratio of
    the visual tokens' largest ``|h_d| / rms(h)`` entering that layer (random tiny LMs have no sink dims)."""
    model, inputs = bf16(family)
    vlm = vlmtools.wrap(model)
    first = VAR(**VAR_SETTINGS).attach(vlm, vlmtools.Plan()).layers[0]
    with torch.no_grad(), vlm.use(vlmtools.RecordHidden([first])) as trace:  # as VAR sees it (after DeepStack's adds)
        model(**inputs)
    hidden = trace[f"text.{first}.resid_pre"][0].float()
    ratios = hidden.abs() / hidden.pow(2).mean(-1, keepdim=True).sqrt()
    visual = torch.stack([torch.isin(torch.arange(hidden.shape[1]), s.visual_positions())
                          for s in vlm.layout(inputs).samples])
    peak = ratios[visual].amax(0)  # per dimension, over the visual tokens
    return {**VAR_SETTINGS, "dims": (int(peak.argmax()),), "tau": 0.9 * float(peak.max())}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_var_moves_attention_in_bf16(family, monkeypatch):
    text = bf16(family)[0].config.get_text_config()
    if getattr(text, "sliding_window", None):  # a tiny model's short window would hide the image from the text rows
        monkeypatch.setattr(text, "sliding_window", 4096)
    settings = sink_settings(family)
    var, still = VAR(**settings), VAR(**settings, p=1.0)  # p = 1 keeps all: the same rows, nothing moved
    edited, trace = scores(family, var)
    unmoved, _ = scores(family, still)
    plain, _ = scores(family)
    assert trace[var].settings["status"] == "sinks found"
    assert any(s.numel() for sinks in trace[var].sinks.values() for s in sinks)
    assert (edited - plain).abs().amax() > 0
    assert (edited - unmoved).abs().amax() > 0  # the change is the redistribution's, not the fp32 rows'


@pytest.mark.parametrize("build", [tiny_flux_pipeline, tiny_sd3_pipeline])
def test_refam_heatmap_in_bf16_follows_fp32(build):
    image = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    pipe = build()
    fp32 = RefAM(pipe).segment(image, "the red circle").heatmap
    seg = RefAM(pipe.to(torch.bfloat16)).segment(image, "the red circle")
    assert seg.mask.shape == (SIZE, SIZE) and np.isfinite(seg.heatmap).all()
    assert np.corrcoef(np.ravel(fp32), np.ravel(seg.heatmap))[0, 1] > 0.99
