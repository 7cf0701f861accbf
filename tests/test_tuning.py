"""tuning: ACT and ZeroTuning against the released formulas on planted attention, and the head search."""
import pytest
import torch

import vlmtools
from tuning import ACT, HeadSelection, ZeroTuning, calibrate
from vlmtools.testing import tiny_llava
from vlmtools.testing.vlm import BUILDERS

LAYER, HEAD = 2, 1


def only_head_matters(model, layers=(1, 2), keep=(LAYER, HEAD), boost=30.0):
    """Zero every head's output projection in ``layers`` but ``keep``'s (boosted): editing any other head
    there changes nothing at all."""
    text = model.model.language_model
    width = text.config.hidden_size // text.config.num_attention_heads
    with torch.no_grad():
        for layer in layers:
            weight = text.layers[layer].self_attn.o_proj.weight
            for head in range(text.config.num_attention_heads):
                part = weight[:, head * width:(head + 1) * width]
                part.mul_(boost if (layer, head) == keep else 0.0)
    return model


def plant_sinks(model, layer=LAYER, head=HEAD, tokens=(1, 3), strength=1.0):
    """Make ``tokens`` sinks of (``layer``, ``head``): their embeddings share one direction ``e`` that the head's
    keys read on a slowly rotating dimension (rotary barely turns it over the prompt), and the head's query is
    a constant on that dimension; ``strength`` sets the sink logit, about ``8 * strength / 4`` above the rest."""
    text = model.model.language_model
    config = text.config
    width = config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    slow = width // 2 - 1  # the last rotary pair's first dimension: the lowest frequency
    generator = torch.Generator().manual_seed(1)
    e = torch.randn(config.hidden_size, generator=generator)
    e = e / e.norm()
    attention = text.layers[layer].self_attn
    with torch.no_grad():
        for token in tokens:
            text.embed_tokens.weight[token] = 40 * e
        attention.k_proj.weight[(head // groups) * width + slow] = e
        attention.q_proj.weight[head * width:(head + 1) * width] = 0
        bias = torch.zeros(attention.q_proj.out_features)
        bias[head * width + slow] = strength
        attention.q_proj.bias = torch.nn.Parameter(bias)
    return model


def planted_labels(vlm, inputs, method):
    """The answers (argmax after one prefill) with ``method`` in use, and how many differ from the unedited."""
    with torch.no_grad():
        plain = vlm.model(**inputs).logits[:, -1].argmax(-1)
        with vlm.use(method):
            edited = vlm.model(**inputs).logits[:, -1].argmax(-1)
    return edited.tolist(), int((edited != plain).sum())


@pytest.mark.parametrize("kind", ["act", "zerotuning"])
def test_search_picks_the_planted_head(kind, tmp_path):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(only_head_matters(plant_sinks(model)))
    planted = (ACT({LAYER: [HEAD]}, beta=0.0) if kind == "act" else ZeroTuning({LAYER: [HEAD]}, gamma=1.5))
    answers, changed = planted_labels(vlm, inputs, planted)
    assert changed >= 1  # the planted head's edit changes an answer: only it can fix that sample
    method = ACT(beta=0.0) if kind == "act" else ZeroTuning()
    grid = {"gamma_grid": (1.25, 1.5, 0.5)} if kind == "zerotuning" else {}
    selection = calibrate(vlm, method, [(inputs, answers)], layers=[1, 2], heads=[0, 1], directory=tmp_path,
                          progress=False, **grid)
    assert selection.heads == {LAYER: [HEAD]}
    assert selection.baseline == 1 - changed / 2 and selection.samples == 2  # one sample of two prompts
    if kind == "zerotuning":
        assert selection.gamma == 1.5 and selection.groups["up"] == {LAYER: [HEAD]}
        assert [g for g, _ in selection.settings["gamma_grid"]] == [1.25, 1.5]  # the grid on the group's side
        assert dict(selection.settings["gamma_grid"])[1.5] == 1.0
    stored = HeadSelection.stored(vlm, kind, tmp_path)
    assert stored == selection
    if kind == "act":
        with pytest.warns(UserWarning, match="chosen with"), torch.no_grad(), vlm.use(ACT(directory=tmp_path)):
            model(**inputs)  # beta 0.4 on heads chosen with beta 0
    # the unedited answers: nothing can beat them
    with pytest.warns(UserWarning, match=r"no head beat the unedited accuracy \(1.000 on 2 prompts\)"):
        empty = calibrate(vlm, method, [(inputs, planted_labels(vlm, inputs, ACT({1: [3]}))[0])], layers=[2],
                          heads=[0], save=False, progress=False)
    assert empty.heads == {}
    loaded = ACT(directory=tmp_path, beta=0.0) if kind == "act" else ZeroTuning(directory=tmp_path)
    assert planted_labels(vlm, inputs, loaded)[0] == answers  # the stored heads are what ACT() / ZeroTuning() edit


def test_missing_selection_is_refused(tmp_path):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    for method in (ACT(directory=tmp_path), ZeroTuning(directory=tmp_path)):
        with pytest.raises(ValueError, match="tuning.calibrate"), torch.no_grad(), vlm.use(method):
            model(**inputs)


class AttentionIO:
    """The hidden states, rotary tables and output of the first call (the prefill) of a text attention module."""

    def __init__(self, model, layer):
        self.module = model.model.language_model.layers[layer].self_attn
        self.calls = []

    def __enter__(self):
        self.handle = self.module.register_forward_hook(
            lambda module, args, kwargs, out: self.calls.append((kwargs["hidden_states"], kwargs["position_embeddings"],
                                                                 out[0])), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def eager_probs(attention, hidden, rotary, mask):
    """Eager attention by hand: ``(B, H, L, L)`` fp32 probabilities (causal, padded keys hidden) and values."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, length, _ = hidden.shape
    width = attention.head_dim
    q, k, v = (proj(hidden).view(batch, length, -1, width).transpose(1, 2)
               for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *rotary)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = (q @ k.transpose(-1, -2)).float() * width**-0.5
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    probs = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return probs.nan_to_num(0.0), v.float()


def released_act(a, beta, thres):
    """``atten_process_eval`` of GATECH-EIC/ACT on one head's map of one unpadded sample, as released."""
    n = a.shape[0]
    indices = torch.nonzero(torch.where(a.sum(0) / torch.arange(n, 0, -1) > thres, 1, 0))[1:, 0]
    copied = a.clone()
    available = a[:, indices].sum(1, keepdim=True) * (1 - beta)
    out = a.clone()
    out[:, indices] *= beta
    copied[1:, indices] = 0
    out = out + available * copied / copied.sum(1, keepdim=True)
    out[0, 0] = 1
    return out, indices


def released_zerotuning(a, gamma):
    """``ZeroTuning_Attention`` on one head's map of one unpadded sample: column 0 times gamma, rows renormalised."""
    scale = torch.ones_like(a)
    scale[:, 0] = gamma
    out = a * scale
    return out / out.sum(-1, keepdim=True)


def reference_output(model, layer, io, mask, edit, heads=(HEAD,)):
    """The layer's attention output with ``edit(map, b, h)`` applied to each sample's unpadded map of
    each of ``heads`` in ``layer``."""
    attention = model.model.language_model.layers[layer].self_attn
    hidden, rotary, _ = io
    probs, v = eager_probs(attention, hidden, rotary, mask)
    for b in range(len(mask)):
        real = mask[b].nonzero()[:, 0]
        for h in heads:
            block = probs[b, h][real][:, real]
            probs[b, h, real[:, None], real[None]] = edit(block, b, h)
    out = (probs @ v).transpose(1, 2).reshape(*hidden.shape[:2], -1)
    return attention.o_proj(out.to(hidden.dtype)), probs


@pytest.mark.parametrize("kind", ["act", "zerotuning"])
def test_against_released_formula_on_planted_sinks(kind):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(plant_sinks(model))
    mask = inputs["attention_mask"]
    method = ACT({LAYER: [HEAD]}) if kind == "act" else ZeroTuning({LAYER: [HEAD]}, gamma=3.0)
    with torch.no_grad(), AttentionIO(model, LAYER) as io, vlm.use(method) as trace:
        model(**inputs)
    found = {}

    def edit(block, b, h):
        if kind == "zerotuning":
            return released_zerotuning(block, 3.0)
        edited, indices = released_act(block, 0.4, 0.1)
        found[b] = mask[b].nonzero()[indices, 0]  # unpadded index -> prompt position
        return edited

    with torch.no_grad():
        expected, _ = reference_output(model, LAYER, io.calls[0], mask, edit)
        plain, _ = reference_output(model, LAYER, io.calls[0], mask, lambda block, b, h: block)
    got = io.calls[0][2]
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)
    assert not torch.allclose(plain[real], expected[real], atol=1e-3)  # a no-op edit would fail the check above
    if kind == "act":  # the planted second sink (token 3), per sample; the first sink (token 1) is kept
        assert [t.tolist() for t in trace[method].sinks[(LAYER, HEAD)]] == [found[0].tolist(), found[1].tolist()]
        assert [t.tolist() for t in found.values()] == [[18], [19]]
    else:
        assert trace[method].initial == [0, 2]


def test_logit_bias_equals_scaled_probabilities():
    logits = torch.randn(3, 7)
    gamma = 0.3
    biased = logits.clone()
    biased[:, 0] += torch.log(torch.tensor(gamma))
    assert torch.allclose(biased.softmax(-1), released_zerotuning(logits.softmax(-1), gamma), atol=1e-6)


def test_act_keeps_the_prefill_sinks_at_decoding_steps():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(plant_sinks(model))
    act = ACT({LAYER: [HEAD]})
    record = vlmtools.RecordRows([f"text.{LAYER}"])
    with torch.no_grad(), vlm.use(act, record) as trace:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    step = trace[f"text.{LAYER}.rows"][1][:, HEAD, -1]  # the first decoding step's row, after ACT
    sinks = trace[act].sinks[(LAYER, HEAD)]
    longer = dict(inputs, input_ids=out[:, :-1], attention_mask=torch.cat([inputs["attention_mask"],
                                                                           torch.ones(2, 1, dtype=torch.long)], 1))
    with torch.no_grad(), vlm.use(vlmtools.RecordRows([f"text.{LAYER}"])) as plain:
        model(**longer)  # layers before LAYER are unedited: the same row, before any edit
    row = plain[f"text.{LAYER}.rows"][0][:, HEAD, -1]
    for b in range(2):
        sink = torch.zeros_like(row[b], dtype=torch.bool)
        sink[sinks[b]] = True
        freed = 0.6 * row[b][sink].sum()
        expected = torch.where(sink, 0.4 * row[b], row[b] + freed * row[b] / row[b][~sink].sum())
        assert torch.allclose(step[b], expected, atol=1e-5)
        assert not torch.allclose(step[b], row[b], atol=1e-4)


def test_with_a_pruning_host_the_kept_keys_are_edited_as_released():
    from pruning import FastV

    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(plant_sinks(model))
    host, act, zt = FastV(keep=4, layer=LAYER), ACT({LAYER: [HEAD]}), ZeroTuning({LAYER: [0]}, gamma=3.0)
    with torch.no_grad(), AttentionIO(model, LAYER) as io, vlm.use(host, act, zt) as trace:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    kept = trace[host].kept_at(LAYER)
    assert kept.shape == (2, 21 - 12)  # 16 visual tokens each, 4 kept: the layer's keys are fewer
    mask = inputs["attention_mask"].gather(1, kept)
    found = {}

    def edit(block, b, h):
        if h == 0:  # ZeroTuning's head: the first kept real key is the sample's initial token
            return released_zerotuning(block, 3.0)
        edited, indices = released_act(block, 0.4, 0.1)
        found[b] = kept[b][mask[b].nonzero()[indices, 0]]
        return edited

    with torch.no_grad():
        expected, _ = reference_output(model, LAYER, io.calls[0], mask, edit, heads=(0, HEAD))
    assert torch.allclose(io.calls[0][2][mask.bool()], expected[mask.bool()], atol=1e-5)
    sinks = [t.tolist() for t in trace[act].sinks[(LAYER, HEAD)]]
    assert sinks == [found[0].tolist(), found[1].tolist()]  # prompt positions: the planted one and a kept visual
    assert 18 in sinks[0] and 19 in sinks[1]


def test_left_padding_equals_unbatched_and_composes_with_var():
    from hallucination import VAR

    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(plant_sinks(model))
    alone = {"input_ids": inputs["input_ids"][1:, 2:], "attention_mask": inputs["attention_mask"][1:, 2:],
             "pixel_values": inputs["pixel_values"][1:]}
    act, zt = ACT({LAYER: [HEAD, 0]}), ZeroTuning({1: [0, 3], LAYER: [HEAD]}, gamma=0.5)
    var = VAR(variant="released", tau=2.0, dims=(0, 1, 2, 3))
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        with vlm.use(act, zt) as trace:
            batched = model(**inputs).logits[:, -1]
        with vlm.use(act, zt):
            single = model(**alone).logits[:, -1]
        with vlm.use(var, act, zt) as composed:
            with_var = model(**inputs).logits[:, -1]
        with vlm.use(var):
            var_alone = model(**inputs).logits[:, -1]
    assert torch.allclose(batched[1], single[0], atol=1e-4)
    assert not torch.allclose(batched, plain, atol=1e-3)
    assert composed[var].settings["status"] == "sinks found"
    assert not torch.allclose(with_var, var_alone, atol=1e-3) and not torch.allclose(with_var, batched, atol=1e-3)
    sinks = [t.tolist() for t in trace[act].sinks[(LAYER, HEAD)]]
    assert [t.tolist() for t in composed[act].sinks[(LAYER, HEAD)]] == sinks


def test_bf16_finds_the_same_sinks():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(plant_sinks(model).to(torch.bfloat16))
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    act, zt = ACT({LAYER: [HEAD]}), ZeroTuning({LAYER: [HEAD]}, gamma=3.0)
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        with vlm.use(act, zt) as trace:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    assert torch.isfinite(out.logits[0]).all() and not torch.equal(out.logits[0], plain)
    assert [t.tolist() for t in trace[act].sinks[(LAYER, HEAD)]] == [[18], [19]]


def test_bad_settings_are_refused(tmp_path):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    for make, message in ((lambda: ACT(beta=1.5), "beta"), (lambda: ACT(beta=-0.1), "beta"),
                          (lambda: ZeroTuning({2: [0]}, gamma=0.0), "gamma"),
                          (lambda: ZeroTuning({2: [0]}, gamma=-1.0), "gamma"),
                          (lambda: ZeroTuning({2: [0]}), "needs gamma")):
        with pytest.raises(ValueError, match=message):
            make()
    empty = HeadSelection("act", model="m", heads={})
    for method, message in ((ACT({LAYER: [4]}), "head 4 in layer 2 does not exist"),
                            (ZeroTuning({5: [0]}, gamma=2.0), "layer 5 has no attention"),
                            (ACT(empty), "holds no head")):
        with pytest.raises(ValueError, match=message), vlm.use(method):
            pass
    with pytest.raises(ValueError, match="layers \\[7\\]"):
        calibrate(vlm, ACT(), [(inputs, [1, 2])], layers=[7], directory=tmp_path)


def test_qwen2_vl_left_padding_equals_unbatched():
    from vlmtools.testing import tiny_qwen2_vl

    model, inputs = tiny_qwen2_vl()
    vlm = vlmtools.wrap(model)
    pad = int((inputs["attention_mask"][0] == 0).sum())
    patches = int(inputs["image_grid_thw"][0].prod())
    alone = {key: inputs[key][:1, pad:] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    alone.update(pixel_values=inputs["pixel_values"][:patches], image_grid_thw=inputs["image_grid_thw"][:1])
    act, zt = ACT({1: [0, 1], 2: [2]}, eps=0.05), ZeroTuning({1: [3], 2: [0, 2]}, gamma=4.0)
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        with vlm.use(act, zt) as trace:
            batched = model(**inputs).logits[:, -1]
        with vlm.use(act, zt) as single_trace:
            single = model(**alone).logits[:, -1]
    assert torch.allclose(batched[0], single[0], atol=1e-4) and not torch.allclose(batched, plain, atol=1e-3)
    assert trace[zt].initial == [pad, 0] and single_trace[zt].initial == [0]
    assert [int(t.min()) for t in trace[act].sinks[(1, 0)]][0] >= pad  # never a padded key
    assert (trace[act].sinks[(1, 0)][0] - pad).tolist() == single_trace[act].sinks[(1, 0)][0].tolist()


def test_labelled_samples_from_a_pope_file(tmp_path):
    import json

    from PIL import Image

    from tuning import labelled_samples
    from tuning.calibrate import _answer_ids
    from vlmtools.data import read_pope
    from vlmtools_zoo.llava import build_processor

    processor = build_processor()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), "red").save(tmp_path / name)
    rows = [{"question_id": 1, "image": "a.png", "text": "Is there a circle?", "label": "yes"},
            {"question_id": 2, "image": "b.png", "text": "Is there a square?", "label": "no"}]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = labelled_samples(processor, read_pope(tmp_path / "pope.jsonl", tmp_path))
    assert [answer for _, answer in pairs] == ["yes", "no"]
    assert all(inputs["input_ids"].shape[0] == 1 and "pixel_values" in inputs for inputs, _ in pairs)
    tokenizer = processor.tokenizer
    assert _answer_ids(tokenizer, "yes") == {tokenizer("yes", add_special_tokens=False)["input_ids"][0],
                                             tokenizer(" yes", add_special_tokens=False)["input_ids"][0]}


def test_greedy_scoring_reads_the_first_word():
    from types import SimpleNamespace

    from tuning import accuracy

    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(plant_sinks(model))
    words = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: [" ".join(f"W{i}." for i in row.tolist())
                                                                          for row in ids])
    vlm.processor = SimpleNamespace(tokenizer=words)  # a tokenizer whose tokens are words "W<id>."
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1].tolist()
    samples = [(inputs, [f"w{out[0]}", f"W{out[1]} and more"])]
    assert accuracy(vlm, samples, score="greedy") == 1.0
    assert accuracy(vlm, [(inputs, [f"w{out[0]}", "other"])], score="greedy") == 0.5
    with pytest.raises(ValueError, match="needs the processor's tokenizer"):
        accuracy(vlmtools.wrap(model), samples)
    with pytest.raises(ValueError, match="2 prompts and 1 answers"):
        accuracy(vlm, [(inputs, "w1")])


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_zerotuning_in_the_kernel_equals_the_explicit_path_on_every_family(family, monkeypatch):
    """The bias inside SDPA (with each family's own masks: padding, Gemma 3's sliding and bidirectional image
    masks, a hybrid's attention layers) against the explicit path's biased logits (a mask budget of 8 bytes)."""
    import vlmtools.attention as seam

    model, inputs = BUILDERS[family]()
    vlm = vlmtools.wrap(model)
    sliding = [i for i in vlm.attention_layers if getattr(vlm.site(f"text.{i}").module, "sliding_window", None)]
    full = [i for i in vlm.attention_layers if i not in sliding]
    layers = [full[-1]] + sliding[-1:]  # Gemma 3: a sliding layer too, whose window loses the initial token
    zt = ZeroTuning({layer: [0, vlm.site(f"text.{layer}").heads - 1] for layer in layers}, gamma=4.0)
    out = {}
    for budget in (seam.CHUNK_BYTES, 8):
        monkeypatch.setattr(seam, "CHUNK_BYTES", budget)
        with torch.no_grad(), vlm.use(zt):
            out[budget] = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                         output_logits=True).logits
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                               output_logits=True).logits
    fused, explicit = out.values()
    for a, b, c in zip(fused, explicit, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert max((a - c).abs().max() for a, c in zip(fused, plain)) > 1e-4


@pytest.mark.parametrize("kind", ["act", "zerotuning"])
def test_a_sliding_window_layers_decoding_steps_read_the_keys_it_holds(kind):
    """Gemma 3's sliding layer holds only the latest keys at a decoding step: ACT edits the prefill's sinks among
    them (the released formula on the step's row, by position), ZeroTuning biases the initial token only while it
    is held (here it is not: the row is the unedited one)."""
    model, inputs = BUILDERS["gemma3"]()
    vlm = vlmtools.wrap(model)
    layer = max(i for i in vlm.attention_layers if getattr(vlm.site(f"text.{i}").module, "sliding_window", None))
    heads = list(range(vlm.site(f"text.{layer}").heads))
    method = ACT({layer: heads}, eps=0.05) if kind == "act" else ZeroTuning({layer: heads}, gamma=4.0)
    with torch.no_grad(), vlm.use(method, vlmtools.RecordRows([f"text.{layer}"], "last")) as trace:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    step = trace[f"text.{layer}.rows"][1][:, :, -1]  # the first decoding step's row over the held keys, edited
    length = out.shape[1] - 1  # the prompt and the first generated token: the keys of that step
    held = torch.arange(length - step.shape[-1], length)
    assert held[0] > 0  # the window has dropped the earliest keys, the initial token among them
    longer = dict(inputs, input_ids=out[:, :-1], attention_mask=torch.cat([inputs["attention_mask"],
                                                                           torch.ones(2, 1, dtype=torch.long)], 1))
    with torch.no_grad(), vlm.use(vlmtools.RecordRows([f"text.{layer}"], "last")) as plain:
        model(**longer)  # the layers before it are unedited: the same row before any edit, over every key
    row = plain[f"text.{layer}.rows"][0][:, :, -1][..., held]
    if kind == "zerotuning":
        torch.testing.assert_close(step, row, atol=1e-5, rtol=0)
        return
    moved = 0
    for b in range(2):
        for h in heads:
            sink = torch.isin(held, trace[method].sinks[(layer, h)][b])
            freed = 0.6 * row[b, h][sink].sum()
            expected = torch.where(sink, 0.4 * row[b, h], row[b, h] + freed * row[b, h] / row[b, h][~sink].sum())
            torch.testing.assert_close(step[b, h], expected, atol=1e-5, rtol=0)
            moved += int(sink.any())
    assert moved  # some prefill sink is still held: the check above edits something
