"""The seam's contract on a tiny random LLaVA: routing, recording, editing, lifetimes."""
import threading

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

import vlmtools
from vlmtools.plan import AttentionHook, StopForward
from vlmtools.testing.vlm import tiny_llava


@pytest.fixture()
def llava():
    model, inputs = tiny_llava()
    return model, inputs, vlmtools.wrap(model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def eager_attentions(model, inputs):
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def test_column_mass_is_mean_over_visible_queries(llava):
    model, inputs, vlm = llava
    with torch.no_grad(), vlm.use(vlmtools.RecordColumnMass(["text.1"])) as trace:
        model(**inputs)
    mass = trace["text.1.column_mass"][0]
    attn = eager_attentions(model, inputs)[1].float()
    keep = inputs["attention_mask"].bool()
    n = keep.shape[1]
    causal = torch.ones(n, n).tril().bool()
    for b in range(attn.shape[0]):
        visible = causal & keep[b][:, None] & keep[b][None, :]  # query i sees key k
        expected = (attn[b] * visible).sum(1) / visible.sum(0).clamp(min=1)
        torch.testing.assert_close(mass.mean[b], expected, atol=1e-5, rtol=0)


class AddToLastRow(AttentionHook):
    """Adds ``bias`` to the last query row's logits on ``keys``; scales those probabilities by ``scale``."""

    def __init__(self, keys, bias=0.0, scale=None):
        self.keys, self.bias, self.scale = keys, bias, scale

    def rows(self, call):
        return torch.tensor([call.q_len - 1])

    def edit_logits(self, call, rows, logits):
        logits = logits.clone()
        logits[..., self.keys] += self.bias
        return logits

    def edit_probs(self, call, rows, probs):
        if self.scale is None:
            return probs
        probs = probs.clone()
        probs[..., self.keys] *= self.scale
        return probs

    def attach(self, vlm, plan):
        plan.attention(vlm.site("text.1"), self)


def reference_with_edit(model, inputs, keys, bias, scale):
    """The same edit written directly into a full eager attention function."""
    def edited_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if module.layer_idx != 1:
            return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        from transformers.integrations.sdpa_attention import repeat_kv
        k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        z = (query @ k.transpose(2, 3)) * scaling + attention_mask
        z[:, :, -1, keys] += bias
        p = z.softmax(-1)
        if scale is not None:
            p[:, :, -1, keys] *= scale
        return (p @ v).transpose(1, 2).contiguous(), p

    AttentionInterface.register("edited_eager", edited_eager)
    AttentionMaskInterface.register("edited_eager", eager_mask)
    model.set_attn_implementation({"text_config": "edited_eager"})
    try:
        return logits(model, inputs)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


@pytest.mark.parametrize("bias,scale", [(2.0, None), (0.0, 0.25), (-1.0, 3.0)])
def test_edits_match_a_direct_eager_implementation(llava, bias, scale):
    model, inputs, vlm = llava
    keys = [4, 5, 6, 10]
    plain = logits(model, inputs)
    with vlm.use(AddToLastRow(keys, bias, scale)):
        edited = logits(model, inputs)
    expected = reference_with_edit(model, inputs, keys, bias, scale)
    real = inputs["attention_mask"].bool()  # padding rows are undefined in eager and SDPA alike
    torch.testing.assert_close(edited[real], expected[real], atol=1e-5, rtol=0)
    # only the last position can change: layer 1 edits only the last query row
    torch.testing.assert_close(edited[:, :-1], plain[:, :-1], atol=1e-5, rtol=0)
    assert (edited[:, -1] - plain[:, -1]).abs().max() > 1e-4


def test_records_every_decoding_step_and_matches_eager(llava):
    model, inputs, vlm = llava
    with torch.no_grad(), vlm.use(vlmtools.RecordRows(["text.2"], "last")) as trace:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    rows = trace["text.2.rows"]
    assert len(rows) == 3  # prefill + two cached steps
    # recompute the whole final sequence with eager attention: the last row of each prefix
    full = {"input_ids": out, "attention_mask": torch.cat(
        [inputs["attention_mask"], torch.ones(out.shape[0], 3, dtype=torch.long)], 1),
        "pixel_values": inputs["pixel_values"]}
    attn = eager_attentions(model, full)[2]
    prompt = inputs["input_ids"].shape[1]
    for step, row in enumerate(rows):
        q = prompt - 1 + step
        torch.testing.assert_close(row[:, :, 0], attn[:, :, q, : q + 1], atol=1e-5, rtol=0)


def test_exception_inside_use_leaves_model_unchanged(llava):
    model, inputs, vlm = llava
    before = logits(model, inputs)
    hooks_before = [len(layer._forward_pre_hooks) for layer in vlm.layers]
    with pytest.raises(KeyError):
        with vlm.use(vlmtools.RecordRows(["text.0"]), AddToLastRow([3], 5.0)):
            logits(model, inputs)
            raise KeyError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert [len(layer._forward_pre_hooks) for layer in vlm.layers] == hooks_before
    assert not model._forward_pre_hooks
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)


def test_planned_site_that_never_ran_raises(llava):
    model, inputs, vlm = llava
    with pytest.raises(RuntimeError, match="never ran"):
        with vlm.use(vlmtools.RecordRows(["text.1"])):
            pass
    assert model.config.text_config._attn_implementation == "sdpa"


def test_stop_forward_ends_a_probe_run_quietly(llava):
    model, inputs, vlm = llava

    class StopAfterRecording(vlmtools.RecordRows):
        def record(self, block, call, rows, probs):
            super().record(block, call, rows, probs)
            raise StopForward

    with vlm.use(StopAfterRecording(["text.0"])) as trace:
        model(**inputs)
    assert len(trace["text.0.rows"]) == 1
    assert "text.1.rows" not in trace


def test_reading_the_trace_mid_forward_changes_nothing_read_after(llava, monkeypatch):
    """A hook that reads ``text.1.rows`` while the seam still hands that call's rows over in chunks,
    and a layer hook that reads it before the next layer, leave the final read as it is without them
    (a read used to join the stored chunks in place, and the chunks after it then failed to land)."""
    model, inputs, vlm = llava
    monkeypatch.setattr(vlmtools.attention, "CHUNK_BYTES", 4000)  # a few query rows per chunk
    seen = []

    class Reader(AttentionHook, vlmtools.LayerHook):
        def attach(self, vlm, plan):
            self.trace = plan.trace  # a test hook: one block only
            plan.attention(vlm.site("text.1"), self)
            plan.layer(2, vlm.layers[2], self)

        def rows(self, call):
            return vlmtools.ALL

        def record(self, call, rows, probs):
            seen.append(self.trace["text.1.rows"][-1].shape[2])

        def before_layer(self, index, hidden, kwargs):
            seen.append(self.trace["text.1.rows"][-1].shape[2])

    record = vlmtools.RecordRows(["text.1"], "all")
    with torch.no_grad(), vlm.use(record) as plain:
        model(**inputs)
    with torch.no_grad(), vlm.use(record, Reader()) as read:
        model(**inputs)
    rows = inputs["input_ids"].shape[1]
    assert len(seen) > 2 and seen == sorted(seen) and seen[0] < rows and seen[-1] == rows  # read part-way
    assert len(read["text.1.rows"]) == 1
    torch.testing.assert_close(read["text.1.rows"][0], plain["text.1.rows"][0], atol=0, rtol=0)


def test_nested_plans_compose_and_unwind(llava):
    model, inputs, vlm = llava
    with vlm.use(vlmtools.RecordRows(["text.0"])) as outer:
        with vlm.use(vlmtools.RecordRows(["text.1"])) as inner:
            logits(model, inputs)
        logits(model, inputs)
    assert inner is outer
    assert len(outer["text.0.rows"]) == 2 and len(outer["text.1.rows"]) == 1
    assert model.config.text_config._attn_implementation == "sdpa"


def test_two_threads_see_only_their_own_plan(llava):
    model, inputs, vlm = llava
    barrier = threading.Barrier(2)
    traces, errors = {}, []

    def worker(site):
        try:
            with vlm.use(vlmtools.RecordRows([site])) as trace:
                barrier.wait()  # both blocks are open before either runs
                for _ in range(3):
                    logits(model, inputs)
                barrier.wait()  # neither closes (and restores) before the other is done
            traces[site] = dict(trace)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(s,)) for s in ("text.0", "text.2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(traces["text.0"]) == {"text.0.rows"} and len(traces["text.0"]["text.0.rows"]) == 3
    assert set(traces["text.2"]) == {"text.2.rows"} and len(traces["text.2"]["text.2.rows"]) == 3
    assert model.config.text_config._attn_implementation == "sdpa"


def test_bf16_records_and_edits(llava):
    model, inputs, vlm = llava
    model = model.to(torch.bfloat16)
    batch = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    plain = logits(model, batch)
    with vlm.use(vlmtools.RecordColumnMass(["text.1"]), vlmtools.RecordRows(["text.2"])) as trace:
        recorded = logits(model, batch)
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
    row = trace["text.2.rows"][0]
    assert row.dtype == torch.float32 and torch.isfinite(row).all()
    torch.testing.assert_close(row.sum(-1), torch.ones_like(row.sum(-1)), atol=1e-4, rtol=0)
    with vlm.use(AddToLastRow([4, 5], 3.0)):
        edited = logits(model, batch)
    assert torch.isfinite(edited).all() and (edited[:, -1] - plain[:, -1]).abs().max() > 0


def test_hidden_states_are_the_decoder_inputs(llava):
    model, inputs, vlm = llava
    with torch.no_grad(), vlm.use(vlmtools.RecordHidden()) as trace:
        out = model(**inputs, output_hidden_states=True)
    for index in range(vlm.num_layers):
        torch.testing.assert_close(trace[f"text.{index}.resid_pre"][0], out.hidden_states[index], atol=0, rtol=0)


def test_unknown_site_names_the_available_ones(llava):
    _, _, vlm = llava
    with pytest.raises(LookupError, match="text.0..text."):
        vlm.site("text.99")
