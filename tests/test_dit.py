"""The diffusers side of the seam on tiny random FLUX and SD3 transformers.

Parity with the plain transformer guards against a probe that drifts from diffusers'
own processor (projections, qk-norm, rotary, text/image order, output split).
"""
import threading

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

import vlmtools
from vlmtools.testing.dit import GRID, TEXT, tiny_flux, tiny_sd3
from vlmtools.adapters.dit import Probe

BUILDERS = {"flux": tiny_flux, "sd3": tiny_sd3}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def processors(dit):
    return [site.module.processor for site in dit.sites]


def explicit_probs(site, kwargs, family):
    """softmax(q k^T / sqrt(d)) of the joint sequence, q and k computed here from the module's weights."""
    attn, image, text = site.module, kwargs["hidden_states"], kwargs.get("encoder_hidden_states")

    def heads(x):  # (B, L, H * D) -> (B, L, H, D)
        return x.unflatten(-1, (attn.heads, -1))

    query, key = attn.norm_q(heads(attn.to_q(image))), attn.norm_k(heads(attn.to_k(image)))
    if text is not None:
        text_query = attn.norm_added_q(heads(attn.add_q_proj(text)))
        text_key = attn.norm_added_k(heads(attn.add_k_proj(text)))
        if family == "flux":  # text first
            query, key = torch.cat([text_query, query], 1), torch.cat([text_key, key], 1)
        else:
            query, key = torch.cat([query, text_query], 1), torch.cat([key, text_key], 1)
    if family == "flux":
        query, key = rotate(query, kwargs["image_rotary_emb"]), rotate(key, kwargs["image_rotary_emb"])
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    return (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)


def rotate(x, rotary):
    """FLUX rotary on interleaved (real, imaginary) pairs of each head's channels."""
    cos, sin = (t[None, :, None, :] for t in rotary)
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack([-imag, real], -1).flatten(3) * sin


def attention_inputs(site):
    """Captures the keyword inputs of every call of ``site``'s module."""
    seen = []
    handle = site.module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_nothing_planned_equals_plain_and_changes_no_processor(family):
    model, inputs = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    plain, before = run(model, inputs), processors(dit)
    with dit.use():
        assert processors(dit) == before
        out = run(model, inputs)
    assert (out - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("family,name", [("flux", "dit.double.1"), ("flux", "dit.single.0"), ("sd3", "dit.joint.0"),
                                         ("sd3", "dit.joint.2")])
def test_recorded_blocks_match_explicit_attention_and_leave_output(family, name):
    model, inputs = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    plain = run(model, inputs)
    site, joint = dit.site(name), dit.layout(TEXT, GRID)
    seen, handle = attention_inputs(site)
    # one RecordBlock per block: two at one site would share the trace key
    traces, outs = [], []
    for recorders in ((vlmtools.RecordRows([name], "all"),
                       vlmtools.RecordBlock([name], queries=joint.image.span, keys=joint.text)),
                      (vlmtools.RecordBlock([name], queries=joint.text, keys=joint.image.span, grid=GRID,
                                            mean_heads=True),)):
        with dit.use(*recorders) as trace:
            assert isinstance(site.module.processor, Probe)
            outs.append(run(model, inputs))
        traces.append(trace)
    handle.remove()
    assert max((out - plain).abs().max() for out in outs) <= 1e-5
    with torch.no_grad():
        probs = explicit_probs(site, seen[0], family)
    image, text = joint.image.positions, joint.text.indices()
    # RecordRows keeps one entry per chunk of rows: with "all", join them
    assert (torch.cat(traces[0][f"{name}.rows"], 2) - probs).abs().max() <= 1e-5
    image_by_text = vlmtools.RecordBlock.collect(traces[0], name)[0]
    assert (image_by_text - probs[:, :, image][..., text]).abs().max() <= 1e-5
    text_on_grid = vlmtools.RecordBlock.collect(traces[1], name)[0]
    expected = probs[:, :, text][..., image].mean(1, keepdim=True).unflatten(-1, GRID)
    assert (text_on_grid - expected).abs().max() <= 1e-5


def test_text_first_for_flux_image_first_for_sd3():
    flux, sd3 = vlmtools.wrap(tiny_flux()[0]), vlmtools.wrap(tiny_sd3()[0])
    assert (flux.layout(5, (3, 4)).text, flux.layout(5, (3, 4)).image.span) == (vlmtools.Span(0, 5),
                                                                                vlmtools.Span(5, 17))
    assert (sd3.layout(5, (3, 4)).text, sd3.layout(5, (3, 4)).image.span) == (vlmtools.Span(12, 17),
                                                                              vlmtools.Span(0, 12))


class LayoutSeen(vlmtools.AttentionHook):
    """Keeps the forward state's layout and step at every call of one site."""

    def __init__(self, name):
        self.name, self.seen = name, []

    def attach(self, vlm, plan):
        self.state = plan.state
        plan.attention(vlm.site(self.name), self)

    def observe(self, call):
        self.seen.append((self.state.layout, self.state.step))


@pytest.mark.parametrize("family,name", [("flux", "dit.single.1"), ("sd3", "dit.joint.1")])
def test_layout_of_each_call_reaches_the_hooks(family, name):
    model, inputs = BUILDERS[family](grid=(2, 5), text=7)
    dit, hook = vlmtools.wrap(model), LayoutSeen(name)
    with dit.use(hook):
        run(model, inputs)
        run(model, inputs)
    assert [step for _, step in hook.seen] == [0, 1]
    layout = hook.seen[0][0]
    assert (layout.text, layout.image.span, layout.image.grid) == (dit.layout(7, (2, 5)).text,
                                                                   dit.layout(7, (2, 5)).image.span, (2, 5))


def test_positional_call_inside_use_names_the_fix():
    model, inputs = tiny_flux()
    dit = vlmtools.wrap(model)
    with pytest.raises(TypeError, match="keyword arguments"), dit.use():
        model(inputs.pop("hidden_states"), **inputs)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_exception_inside_use_restores_processors_and_outputs(family):
    model, inputs = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    plain, before = run(model, inputs), processors(dit)
    with pytest.raises(ValueError, match="boom"), dit.use(vlmtools.RecordRows([s.name for s in dit.sites], "all")):
        run(model, inputs)
        raise ValueError("boom")
    assert all(a is b for a, b in zip(processors(dit), before))
    assert (run(model, inputs) - plain).abs().max() == 0


def test_planned_site_that_never_ran_raises():
    dit = vlmtools.wrap(tiny_sd3()[0])
    with pytest.raises(RuntimeError, match="dit.joint.1"), dit.use(vlmtools.RecordRows(["dit.joint.1"])):
        pass


class Stop(vlmtools.AttentionHook):
    def attach(self, vlm, plan):
        plan.attention(vlm.site("dit.double.1"), self)

    def observe(self, call):
        raise vlmtools.StopForward


def test_stop_forward_ends_a_probe_run_quietly_and_restores():
    model, inputs = tiny_flux()
    dit = vlmtools.wrap(model)
    before = processors(dit)
    with dit.use(vlmtools.RecordRows(["dit.double.0"]), Stop()) as trace:
        run(model, inputs)
        pytest.fail("the forward should have stopped")
    assert len(trace["dit.double.0.rows"]) == 1
    assert all(a is b for a, b in zip(processors(dit), before))


def test_nested_blocks_keep_the_probe_until_the_outer_exit():
    model, inputs = tiny_flux()
    dit = vlmtools.wrap(model)
    module, original = dit.site("dit.double.0").module, dit.site("dit.double.0").module.processor
    with dit.use(vlmtools.RecordRows(["dit.double.0"])) as trace:
        with dit.use(vlmtools.RecordColumnMass(["dit.double.0"])):
            run(model, inputs)
        assert isinstance(module.processor, Probe)
        run(model, inputs)
    assert module.processor is original
    assert len(trace["dit.double.0.rows"]) == 2 and len(trace["dit.double.0.column_mass"]) == 1


def test_another_thread_runs_through_the_probe_unplanned():
    model, inputs = tiny_flux()
    dit = vlmtools.wrap(model)
    plain, module = run(model, inputs), dit.site("dit.double.0").module
    installed, done, seen = threading.Event(), threading.Event(), {}

    def planned():
        with dit.use(vlmtools.RecordRows(["dit.double.0"])) as trace:
            installed.set()
            done.wait(60)
            run(model, inputs)
        seen["calls"] = len(trace["dit.double.0.rows"])

    def unplanned():
        installed.wait(60)
        seen["probe"] = isinstance(module.processor, Probe)
        seen["out"] = run(model, inputs)
        done.set()

    threads = [threading.Thread(target=planned), threading.Thread(target=unplanned)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert seen["probe"] and seen["calls"] == 1 and torch.equal(seen["out"], plain)


def test_unknown_processor_is_refused_and_nothing_stays_installed():
    dit = vlmtools.wrap(tiny_sd3()[0])
    dit.site("dit.joint.1").module.set_processor(AttnProcessor2_0())
    before, recorder = processors(dit), vlmtools.RecordRows(["dit.joint.0", "dit.joint.1"])
    with pytest.raises(TypeError, match="AttnProcessor2_0"), dit.use(recorder):
        pass
    assert all(a is b for a, b in zip(processors(dit), before))


@pytest.mark.parametrize("family,name", [("flux", "dit.double.0"), ("sd3", "dit.joint.0")])
def test_bf16_runs_close_to_fp32(family, name):
    model, inputs = BUILDERS[family]()
    dit = vlmtools.wrap(model)
    joint = dit.layout(TEXT, GRID)

    def recorded():
        with dit.use(vlmtools.RecordBlock([name], queries=joint.image.span, keys=joint.text)) as trace:
            out = run(model, inputs).float()
        return out, vlmtools.RecordBlock.collect(trace, name)[0]

    out32, block32 = recorded()
    model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    out16, block16 = recorded()
    assert torch.equal(out16, run(model, inputs).float())  # the probe runs diffusers' bf16 numerics
    assert torch.isfinite(out16).all() and block16.dtype == torch.float32
    assert (out16 - out32).abs().max() <= 0.03 * out32.abs().max()
    assert (block16 - block32).abs().max() <= 0.02


def test_wrap_takes_a_pipelines_transformer():
    from diffusers import FluxPipeline
    model, _ = tiny_flux()
    pipeline = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=model)
    dit = vlmtools.wrap(pipeline)
    assert isinstance(dit, vlmtools.WrappedDiT) and dit.model is model


@pytest.mark.parametrize("model", [
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")),
    torch.nn.Linear(2, 2),
])
def test_unsupported_model_names_the_supported_families(model):
    with pytest.raises(TypeError, match="unsupported model class.*Supported families: flux, .*sd3"):
        vlmtools.wrap(model)


def test_unknown_site_lists_the_dit_streams():
    dit = vlmtools.wrap(tiny_flux()[0])
    with pytest.raises(LookupError, match=r"dit\.double\.0\.\.dit\.double\.1, dit\.single\.0\.\.dit\.single\.1"):
        dit.site("dit.double.7")
