"""VAR, GIFT and PAINT in one block with a pruning host that drops visual tokens from a decoder layer on
(FastV at layer 1): each edit acts on the keys whose ORIGINAL positions are its targets, read from the
post-edit attention rows of a layer after the drop against the formula applied by hand at the positions the
host kept; cached decoding runs; what cannot compose is refused clearly."""
import pytest
import torch

import vlmtools
from hallucination import GIFT, PAINT, VAR
from hallucination.common import key_mask, visual_mask
from hallucination.gift import enhance
from hallucination.paint import boost, visual_sensitivity
from hallucination.var import redistribute
from pruning import FastV
from vlmtools.plan import AttentionHook, key_positions
from vlmtools.testing import vlm as tiny

LAYER = 3  # after FastV's drop at layer 1, edited by all three methods


@pytest.fixture(autouse=True)
def five_layers(monkeypatch):
    monkeypatch.setitem(tiny._LLAMA, "num_hidden_layers", 5)


class Probe(AttentionHook):
    """The last query row of one text layer at prefill: raw logits (from q, k and the mask) and the probabilities
    the model used (after every edit of the block)."""

    def __init__(self, layer):
        self.layer, self.calls = layer, []

    def attach(self, vlm, plan):
        plan.attention(vlm.site(f"text.{self.layer}"), self)
        return self

    def rows(self, call):
        return torch.tensor([call.q_len - 1], device=call.query.device) if call.is_prefill else None

    def record(self, call, rows, probs):
        z = (call.query[:, :, rows].float() @ call.key.float().transpose(2, 3)) * call.scaling
        visible = call.visible_rows(rows)
        if visible is not None:
            z = z.masked_fill(~visible, torch.finfo(z.dtype).min)  # as the seam masks
        self.calls.append((z, probs.float()))


def run_with_fastv(method):
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    fastv, probe = FastV(keep=4, layer=1), Probe(LAYER)
    with vlm.use(fastv, method, probe) as trace, torch.no_grad():
        model(**inputs)
    (z, got), = probe.calls
    kept = trace[fastv].kept_at(LAYER)  # original positions of the layer's keys, as the host reports them
    assert z.shape[-1] == kept.shape[1] < inputs["input_ids"].shape[1]
    return vlm, inputs, trace, kept, z, got


def at(mask, kept):
    """A (B, L) mask over original positions read at the kept keys (the reference's own gather)."""
    return torch.stack([mask[b, kept[b]] for b in range(len(kept))])


def test_key_positions_are_the_kept_prompt_positions_then_the_generated_ones():
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    fastv = FastV(keep=4, layer=1)
    with vlm.use(fastv) as trace, torch.no_grad():
        model(**inputs)
        state = vlmtools.plan.ACTIVE_PLAN.get().state
        kept = trace[fastv].kept_at(2)
        length = inputs["input_ids"].shape[1]
        torch.testing.assert_close(key_positions(state, 2, kept.shape[1] + 2),
                                   torch.cat([kept, torch.tensor([[length, length + 1]] * 2)], 1))
        assert key_positions(state, 0, length) is None  # before the drop: positions are the key indices
    with vlm.use(VAR(tau=2.0, dims=(0, 1, 2, 3))), torch.no_grad():
        model(**inputs)
        assert vlmtools.plan.ACTIVE_PLAN.get().state.kept_keys == {}  # no drop, nothing recorded


def test_paint_boosts_the_keys_at_its_original_local_and_summary_positions():
    paint = PAINT()
    vlm, inputs, trace, kept, z, got = run_with_fastv(paint)
    run = trace[paint]
    local, summary, visual = at(run.local, kept), at(run.summary, kept), at(run.visual, kept)
    assert local.any() and not torch.equal(local, run.local[:, :kept.shape[1]])  # widening alone would misplace it
    scale = visual_sensitivity(z, visual)
    want = boost(z, local, summary, paint.alpha, paint.beta, scale).softmax(-1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (got - z.softmax(-1)).abs().max() > 1e-4


def test_var_takes_mass_off_the_sinks_at_their_original_positions():
    var = VAR(rho=0.3, tau=2.5, dims=(0, 1, 2, 3))  # one of the 4 kept visual tokens of sample 1 is a sink here
    vlm, inputs, trace, kept, z, got = run_with_fastv(var)
    run = trace[var]
    sinks = key_mask(run.sinks[LAYER], inputs["input_ids"].shape[1])
    assert sinks.any(), "the tiny model has visual sinks in this layer"
    present = torch.zeros_like(sinks).scatter_(1, kept, True)
    assert not (sinks & ~present).any()  # sinks are found among the tokens still present, by original position
    visual = at(visual_mask(vlm.layout(inputs)), kept)
    want = redistribute(z.softmax(-1), visual, at(sinks, kept), var.moved, var.rho, var.min_image,
                        torch.ones(2, 1, dtype=torch.bool))[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    columns = at(sinks, kept)[:, None, None].expand_as(got)
    assert (got[columns] <= z.softmax(-1)[columns] + 1e-7).all() and (got - z.softmax(-1)).abs().max() > 1e-4


def test_gift_enhances_the_keys_at_its_original_visual_and_question_positions():
    gift = GIFT(alpha=5.0, saliency_layer=0, layers=[2, 3])  # saliency read before the drop, edits after it
    vlm, inputs, trace, kept, z, got = run_with_fastv(gift)
    run = trace[gift]
    want = enhance(z.softmax(-1), at(run.factor, kept), at(run.visual, kept), at(run.question, kept))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (got - z.softmax(-1)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["var", "paint", "gift"])
def test_generate_with_fastv_runs_the_cached_steps(name):
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    method = {"var": VAR(rho=0.3, tau=2.5, dims=(0, 1, 2, 3)), "paint": PAINT(),
              "gift": GIFT(alpha=5.0, saliency_layer=0, layers=[2, 3])}[name]
    with torch.no_grad():
        with vlm.use(FastV(keep=4, layer=1)):
            plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        with vlm.use(FastV(keep=4, layer=1), method):
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)
    edited, before = torch.stack(out.logits, 1), torch.stack(plain.logits, 1)
    assert torch.isfinite(edited).all() and (edited - before).abs().max() > 1e-6


def test_gift_refuses_a_saliency_layer_the_drop_shortened():
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    with pytest.raises(ValueError, match="saliency layer 1 .* token drop"), torch.no_grad():
        with vlm.use(FastV(keep=4, layer=1), GIFT(alpha=5.0, saliency_layer=1, layers=[2, 3])):
            model(**inputs)


def test_gift_refuses_a_layer_0_drop_before_its_second_prefill():
    from pruning import VisionZip
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    with pytest.raises(ValueError, match="token drop at layer 0"), torch.no_grad():
        with vlm.use(VisionZip(4), GIFT(alpha=5.0, layers=[2, 3])):
            model(**inputs)
