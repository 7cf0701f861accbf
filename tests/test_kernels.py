"""The user's attention kernel is kept: inside a ``use`` block every unplanned call runs the implementation the
model was loaded with (eager, flex_attention, FlashAttention), with the mask that implementation reads.

Guards the bug where every call inside a block ran transformers' SDPA with an SDPA mask whatever the model was
loaded with (eager and flex logits then moved by about 2e-7 in an empty block; FlashAttention users got SDPA with
an explicit L x L padding mask on every layer), also for another thread using the model outside any block.

On a CPU, flex runs uncompiled (:func:`uncompiled_flex`) and FlashAttention through a torch reference of its
kernels (:func:`torch_flash`): the seam's own part (the registry names, the mask, the padding-free inputs after a
drop, the rows it recomputes) is the same as with the real kernels, which the CUDA tests at the end run.
"""
from __future__ import annotations

import re
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.flex_attention as hf_flex
import transformers.masking_utils as hf_masks
import transformers.modeling_flash_attention_utils as hf_flash
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.utils import is_flash_attn_2_available

import vlmtools
from tests.test_drop import hidden_then_pruned, keep_every_other_visual, tail_model
from tests.test_seam import AddToLastRow
from vlmtools.adapters.base import UnsupportedModel
from vlmtools.attention import SERVED, _row_groups, block_mask_rows, flash_rows, seam_name
from vlmtools.drop import DropTokens, _gather_inputs, packed_lengths
from vlmtools.plan import AttentionHook
from vlmtools.testing.vlm import BUILDERS, tiny_llava, tiny_qwen2_vl

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU_KERNELS = ["eager", "flex_attention", "flash_attention_2"]
NO_CUDA_FLASH = "FlashAttention needs a CUDA GPU with flash_attn installed; on a GPU these run, as do " \
                "benchmarks/seam.py --full --attn flash_attention_2 and benchmarks/pruning.py --full --attn flash_attention_2"
COMPILED_FLEX = "compiled flex recompiles per shape (over a minute each on a 2-core CPU) and its cached decoding " \
                "fails to compile on a CPU; the CPU tests run flex uncompiled"


# -- the kernels on a CPU -----------------------------------------------------------------------------------------


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers' flex attention and its BlockMasks, run without torch.compile."""
    from torch.nn.attention import flex_attention as torch_flex

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda query, key, value, training=False, **kwargs: torch_flex.flex_attention(
                            query, key, value, **kwargs))
    monkeypatch.setattr(hf_masks, "create_block_mask",
                        lambda *args, _compile=False, **kwargs: torch_flex.create_block_mask(*args, **kwargs))


def _reference(q, k, v, scale, causal):
    """One sequence, ``(L, H, D)``, as FlashAttention computes it (GQA; causal aligned bottom-right)."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0]) if causal else None
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    """``flash_attn_func`` in torch: ``(B, L, H, D)``."""
    return torch.stack([_reference(*qkv, softmax_scale, causal) for qkv in zip(q, k, v)])


def reference_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """``flash_attn_varlen_func`` in torch: sequences packed along dim 0, each attending within itself."""
    out = q.new_zeros(*q.shape[:2], v.shape[-1])
    bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k.tolist(), cu_seqlens_k[1:].tolist())
    for q0, q1, k0, k1 in bounds:
        if q1 > q0:
            out[q0:q1] = _reference(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal)
    return out


@pytest.fixture
def torch_flash(monkeypatch):
    """transformers' FlashAttention path with the torch reference kernels; each call checks that the kernel is
    loaded by the implementation's own name (inside a block the config names the seam)."""
    loaded = []

    def lazy_import(implementation, *args, **kwargs):
        loaded.append(implementation)
        assert implementation in ("flash_attention_2", "flash_attention_3"), implementation
        functions = (reference_flash, reference_flash_varlen, None, hf_flash._pad_input, hf_flash._unpad_input)
        return functions, (hf_flash._lazy_define_process_function(reference_flash_varlen), dict)

    monkeypatch.setattr(hf_flash, "lazy_import_flash_attention", lazy_import)
    return loaded


def load(implementation: str, build=tiny_llava):
    """A tiny model as if loaded with ``attn_implementation=implementation`` (FlashAttention set on the configs
    directly: transformers would first look for the flash_attn package)."""
    model, inputs = build()
    if "flash" in implementation:
        for config in (model.config, model.config.text_config, model.config.vision_config):
            config._attn_implementation_internal = implementation
    else:
        model.set_attn_implementation(implementation)
    return model, inputs


def runnable(request, implementation: str) -> str:
    """``implementation``, made runnable here for the test."""
    if implementation == "flex_attention":
        request.getfixturevalue("uncompiled_flex")
    if "flash" in implementation:
        request.getfixturevalue("torch_flash")
    return implementation


@pytest.fixture(params=CPU_KERNELS)
def kernel(request):
    """The name of an implementation, runnable here."""
    return runnable(request, request.param)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# -- nothing planned: the plain model --------------------------------------------------------------------------------


def test_nothing_planned_is_the_plain_model_bitwise(kernel):
    model, inputs = load(kernel)
    vlm = vlmtools.wrap(model)
    plain = logits(model, inputs)
    with vlm.use():
        assert model.config.text_config._attn_implementation == seam_name(kernel)
        assert torch.equal(logits(model, inputs), plain)
    with vlm.use(vlmtools.RecordRows(["text.1", "vision.0"])):  # planned, nothing edited: the kernel's output
        assert torch.equal(logits(model, inputs), plain)
    with pytest.raises(KeyError):
        with vlm.use(AddToLastRow([4, 5], 2.0)):
            assert not torch.equal(logits(model, inputs), plain)
            raise KeyError("boom")
    assert model.config.text_config._attn_implementation == kernel
    assert model.config.vision_config._attn_implementation == kernel
    assert torch.equal(logits(model, inputs), plain)
    with vlm.use():
        assert torch.equal(logits(model, inputs), plain)


def test_sdpa_is_kept_too():
    model, inputs = load("sdpa")
    vlm = vlmtools.wrap(model)
    plain = logits(model, inputs)
    with vlm.use():
        assert torch.equal(logits(model, inputs), plain)


# -- planned rows: the same as under SDPA ---------------------------------------------------------------------------


def test_recorded_rows_equal_those_under_sdpa(kernel):
    """Prefill rows of a text and a vision site, and the last row of each cached decoding step."""
    record = vlmtools.RecordRows(["text.1", "vision.1"], "all")
    last = vlmtools.RecordRows(["text.2"], "last")
    traces = {}
    for name in (kernel, "sdpa"):
        model, inputs = load(name)
        vlm = vlmtools.wrap(model)
        with torch.no_grad(), vlm.use(record) as prefill:
            model(**inputs)
        with torch.no_grad(), vlm.use(last) as steps:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        traces[name] = prefill, steps
    real = inputs["attention_mask"].bool()
    (got, got_steps), (want, want_steps) = traces[kernel], traces["sdpa"]
    rows, expected = got["text.1.rows"][0], want["text.1.rows"][0]
    for b in range(real.shape[0]):  # padding rows and columns are undefined in every kernel
        torch.testing.assert_close(rows[b][:, real[b]][..., real[b]], expected[b][:, real[b]][..., real[b]],
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(got["vision.1.rows"][0], want["vision.1.rows"][0], atol=1e-5, rtol=0)
    assert len(got_steps["text.2.rows"]) == 3
    for row, expected in zip(got_steps["text.2.rows"], want_steps["text.2.rows"]):
        keep = torch.cat([real, real.new_ones(real.shape[0], row.shape[-1] - real.shape[1])], 1)[:, None, None]
        torch.testing.assert_close(row * keep, expected * keep, atol=1e-5, rtol=0)


def test_an_edit_equals_it_under_sdpa(kernel):
    results = {}
    for name in (kernel, "sdpa"):
        model, inputs = load(name)
        with vlmtools.wrap(model).use(AddToLastRow([4, 5, 6, 10], 2.0, 0.5)):
            results[name] = logits(model, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(results[kernel][real], results["sdpa"][real], atol=1e-5, rtol=0)


def test_flash_vision_rows_follow_cumulative_lengths(torch_flash):
    """Qwen2-VL's vision attention packs every image into one row for FlashAttention (``cu_seqlens``): a planned
    vision site sees only its own image, as under SDPA (where each image is its own call)."""
    traces = {}
    for name in ("flash_attention_2", "sdpa"):
        model, inputs = load(name, tiny_qwen2_vl)
        with torch.no_grad(), vlmtools.wrap(model).use(vlmtools.RecordRows(["vision.0"], "all")) as trace:
            model(**inputs)
        traces[name] = trace["vision.0.rows"]
    got = traces["flash_attention_2"][0]
    images = traces["sdpa"]  # one call per image
    assert len(images) == 2 and got.shape[2] == sum(image.shape[2] for image in images)
    start = 0
    for image in images:
        n = image.shape[2]
        torch.testing.assert_close(got[..., start:start + n, start:start + n], image, atol=1e-5, rtol=0)
        assert not got[..., start:start + n, :start].any() and not got[..., start:start + n, start + n:].any()
        start += n


def test_block_mask_rows_against_the_dense_mask(uncompiled_flex):
    """The rows of a BlockMask, from its mask_mod: one written on index tensors (as transformers' are) and
    one that works only under vmap (it indexes one dimension at a time)."""
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    rows = torch.tensor([1, 4, 5])
    expected = torch.ones(6, 6).bool().tril()[None, None] & padding[:, None, None]
    for mask_mod in (lambda b, h, q, kv: (kv <= q) & padding[b, kv],
                     lambda b, h, q, kv: (kv <= q) & padding[b][kv]):
        block_mask = hf_masks.create_block_mask(mask_mod, 2, None, 6, 6, device="cpu")
        assert torch.equal(block_mask_rows(block_mask)(rows), expected[:, :, rows])


def test_flash_rows_against_a_dense_reference():
    """Causal bottom-right alignment, padding, a sliding window and packed sequences, row by row."""
    q_len, k_len = 3, 7
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()
    rows = torch.tensor([0, 2])
    expected = torch.ones(q_len, k_len).bool().tril(k_len - q_len)[None, None] & padding[:, None, None]
    assert torch.equal(flash_rows(padding, q_len, k_len, True)(rows), expected[:, :, rows])
    window = torch.ones(q_len, k_len).bool().tril(k_len - q_len) & ~torch.ones(q_len, k_len).bool().tril(k_len - q_len - 2)
    assert torch.equal(flash_rows(None, q_len, k_len, True, window=2)(rows)[0, 0], window[rows])
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = torch.zeros(7, 7).bool()
    packed[:3, :3] = torch.ones(3, 3).bool().tril()
    packed[3:, 3:] = torch.ones(4, 4).bool().tril()
    assert torch.equal(flash_rows(None, 7, 7, True, cu_q=cu, cu_k=cu)(torch.arange(7))[0, 0], packed)
    assert flash_rows(None, 1, 7, True) is None and flash_rows(None, 7, 7, False) is None


# -- a logit bias: inside the kernel where it takes one ------------------------------------------------------------


class BiasKeys(AttentionHook):
    """A fixed logit bias per (sample, head, prompt key) at text.1, for every query row; generated keys get none."""

    def __init__(self, table, record=False):
        self.table, self.recorded = table, [] if record else None

    def logit_bias(self, call):
        bias = torch.zeros(*self.table.shape[:2], 1, call.k_len)
        width = min(call.k_len, self.table.shape[-1])
        bias[..., :width] = self.table[:, :, None, :width]
        return bias

    def rows(self, call):
        return "all" if self.recorded is not None else None

    def record(self, call, rows, probs):
        self.recorded.append(probs)

    def attach(self, vlm, plan):
        plan.attention(vlm.site("text.1"), self)


def bias_table(inputs, heads=4):
    return 3 * torch.randn(inputs["input_ids"].shape[0], heads, inputs["input_ids"].shape[1],
                           generator=torch.Generator().manual_seed(0))


def with_bias_written_in(model, inputs, table, steps):
    """Logits of the prefill and of ``steps`` greedy steps with the bias written into a full eager attention."""
    from transformers.masking_utils import eager_mask

    def biased_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import repeat_kv
        from transformers.models.llama.modeling_llama import eager_attention_forward

        if module.layer_idx != 1:
            return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        z = (query.float() @ k.float().transpose(2, 3)) * scaling + attention_mask
        z[..., :table.shape[-1]] += table[:, :, None]
        p = z.softmax(-1)
        return (p @ v.float()).to(query.dtype).transpose(1, 2).contiguous(), p

    AttentionInterface.register("biased_eager", biased_eager)
    AttentionMaskInterface.register("biased_eager", eager_mask)
    model.set_attn_implementation({"text_config": "biased_eager"})
    try:
        return generated_logits(model, inputs, steps)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def generated_logits(model, inputs, steps):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                              output_logits=True).logits


@pytest.mark.parametrize("name", ["sdpa", *CPU_KERNELS])
def test_a_logit_bias_equals_it_written_into_eager(name, request, monkeypatch):
    """Prefill and cached steps of a left-padded batch; SDPA, flex and eager add it inside the kernel (the explicit
    path never runs), FlashAttention's stand-in on the explicit path."""
    import vlmtools.attention as seam

    kernel = runnable(request, name)
    reference_model, inputs = tiny_llava()
    table = bias_table(inputs)
    expected = with_bias_written_in(reference_model, inputs, table, 3)
    plain = generated_logits(reference_model, inputs, 3)
    model, _ = load(kernel)
    explicit = []
    monkeypatch.setattr(seam, "_row_groups", lambda *a: explicit.append(1) or _row_groups(*a))
    with vlmtools.wrap(model).use(BiasKeys(table)):
        got = generated_logits(model, inputs, 3)
    assert bool(explicit) == ("flash" in kernel)
    for got_step, expected_step, plain_step in zip(got, expected, plain, strict=True):
        torch.testing.assert_close(got_step, expected_step, atol=1e-4, rtol=0)
        assert (plain_step - expected_step).abs().max() > 1e-3  # a no-op bias would fail the check above


def test_a_logit_bias_past_the_mask_budget_and_with_a_recorder(monkeypatch):
    """A combined mask larger than the explicit path's chunk goes to the explicit path; a recorder in the block
    reads the biased rows, while the kernel writes the output."""
    import vlmtools.attention as seam

    model, inputs = tiny_llava()
    table = bias_table(inputs)
    expected = with_bias_written_in(model, inputs, table, 1)[0]
    monkeypatch.setattr(seam, "CHUNK_BYTES", 64)
    recorder = BiasKeys(table, record=True)
    with vlmtools.wrap(model).use(recorder):
        got = generated_logits(model, inputs, 1)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    probs = torch.cat(recorder.recorded, 2)  # the prefill's rows, chunk after chunk
    real = inputs["attention_mask"].bool()
    b, last = 0, inputs["input_ids"].shape[1] - 1
    row = probs[b, :, last]
    assert torch.allclose(row.sum(-1), torch.ones(row.shape[0]), atol=1e-5)
    with torch.no_grad(), vlmtools.wrap(model).use(vlmtools.RecordRows(["text.1"], "last")) as plain:
        model(**inputs)
    unbiased = plain["text.1.rows"][0][b, :, 0].float()
    ratio = row[:, real[b]] / unbiased[:, real[b]]  # softmax(z + bias) / softmax(z) = exp(bias) / const per row
    scale = table[b][:, real[b]].exp()
    torch.testing.assert_close(ratio / ratio[:, :1], scale / scale[:, :1], atol=1e-3, rtol=1e-3)


def test_a_logit_bias_in_bf16(monkeypatch):
    model, inputs = tiny_llava()
    table = bias_table(inputs)
    expected = with_bias_written_in(model, inputs, table, 2)
    model = model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with vlmtools.wrap(model).use(BiasKeys(table)):
        got = generated_logits(model, inputs, 2)
    for got_step, expected_step in zip(got, expected, strict=True):
        torch.testing.assert_close(got_step.float(), expected_step, atol=0.1, rtol=0.05)


# -- dropping tokens --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
def test_pruned_forward_equals_the_kept_tokens_alone(kernel, layer):
    model, inputs = load(kernel)
    vlm = vlmtools.wrap(model)
    hidden, pruned, kept = hidden_then_pruned(vlm, inputs, layer, DropTokens({layer: keep_every_other_visual(None)}))
    with torch.no_grad():
        n = inputs["input_ids"].shape[1]
        positions = torch.arange(n).expand(2, -1).gather(1, kept)
        mask = inputs["attention_mask"].gather(1, kept)
        tail = tail_model(model.model.language_model, layer)
        reference = tail(inputs_embeds=hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1])),
                         position_ids=positions, attention_mask=mask, use_cache=False).last_hidden_state
        expected = model.lm_head(reference)
    assert tail.config._attn_implementation == kernel
    real = mask.bool()
    torch.testing.assert_close(pruned[real], expected[real], atol=1e-5, rtol=0)


def test_cached_decoding_equals_recomputation(kernel):
    model, inputs = load(kernel)
    vlm = vlmtools.wrap(model)
    steps, drop = 3, DropTokens({1: keep_every_other_visual(None)})
    with torch.no_grad(), vlm.use(drop):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    with torch.no_grad(), vlm.use(drop):
        sequence, mask = inputs["input_ids"], inputs["attention_mask"]
        for step in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            scores = model(input_ids=sequence, attention_mask=mask, position_ids=positions,
                           pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
            torch.testing.assert_close(scores, out.scores[step], atol=1e-4, rtol=0)
            sequence = torch.cat([sequence, scores.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(sequence, out.sequences)


def test_packed_lengths_after_a_drop():
    """Two sequences packed in one row (position ids restart); the drop takes the second one's first token."""
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    kept = torch.tensor([[0, 2, 3, 4, 6, 7, 9, 10]])
    got = _gather_inputs({"position_ids": positions}, kept)
    first, second = (kept < 5).sum(), (kept >= 5).sum()  # kept tokens of each sequence, counted directly
    expected = torch.stack([torch.tensor(0), first, first + second]).int()
    assert torch.equal(got["position_ids"], torch.tensor([[0, 2, 3, 4, 1, 2, 4, 5]]))
    assert torch.equal(got["cu_seq_lens_q"], expected) and torch.equal(got["cu_seq_lens_k"], expected)
    assert got["max_length_q"] == got["max_length_k"] == 4
    given = {"cu_seq_lens_q": torch.tensor([0, 5, 11], dtype=torch.int32)}
    assert torch.equal(packed_lengths({**given, "cu_seq_lens_k": given["cu_seq_lens_q"]}, kept)["cu_seq_lens_q"],
                       expected)
    assert packed_lengths({"position_ids": positions, "attention_mask": torch.ones(1, 11)}, kept) == {}
    assert packed_lengths({"position_ids": torch.arange(11)[None]}, kept) == {}  # one sequence: not packed


def test_packed_pruned_forward_equals_each_sequence_alone(torch_flash):
    """Padding-free FlashAttention input (two sequences in one row) pruned at layer 0: each sequence's output
    equals its kept tokens run alone at their original positions."""
    model, _ = load("flash_attention_2")
    vlm = vlmtools.wrap(model)
    lm = model.model.language_model
    ids = torch.tensor([[1, 2, 3, 4, 5, 3, 2, 1, 4, 5, 5]])
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    kept = torch.tensor([[0, 2, 3, 4, 6, 7, 9, 10]])
    with torch.no_grad(), vlm.use(DropTokens({0: lambda state, hidden, before: kept})):
        packed = lm(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    with torch.no_grad():
        first = lm(input_ids=ids[:, kept[0, :4]], position_ids=positions[:, kept[0, :4]], use_cache=False)
        second = lm(input_ids=ids[:, kept[0, 4:]], position_ids=positions[:, kept[0, 4:]], use_cache=False)
    expected = torch.cat([first.last_hidden_state, second.last_hidden_state], 1)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)


def drop_visual_halves(state, hidden, kept):
    """Every non-visual token, and the visual ones but for as many odd-indexed ones in every sample (half the
    fewest any sample has): rows of equal length whatever each sample's image tokens."""
    visual = [sample.visual_positions().to(kept.device) for sample in state.layout.samples]
    dropped = min(len(v) for v in visual) // 2
    return torch.stack([row[~torch.isin(row, v[1::2][:dropped])] for row, v in zip(kept, visual)])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_family_keeps_its_kernel_and_prunes_under_it(family, kernel):
    """Nothing planned: bitwise; a token drop's cached decoding gives what it gives under SDPA (slow: every
    family under every kernel, some seconds each; the LLaVA tests above are the fast ones)."""
    results = {}
    for name in (kernel, "sdpa"):
        try:
            model, inputs = load(name, BUILDERS[family])
            vlm = vlmtools.wrap(model)
        except (ValueError, UnsupportedModel) as refusal:  # e.g. transformers runs no Qwen2-VL with flex
            pytest.skip(f"{name} is refused for {family}: {str(refusal)[:100]}")
        plain = logits(model, inputs)
        with vlm.use():
            assert torch.equal(logits(model, inputs), plain)
        with torch.no_grad(), vlm.use(DropTokens({1: drop_visual_halves})):
            results[name] = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                           return_dict_in_generate=True)
    assert torch.equal(results[kernel].sequences, results["sdpa"].sequences)
    torch.testing.assert_close(torch.stack(results[kernel].scores), torch.stack(results["sdpa"].scores),
                               atol=1e-5, rtol=0)


# -- threads ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", *CPU_KERNELS])
def test_a_thread_outside_any_block_sees_the_plain_model(implementation, request):
    """While one thread is inside a block that drops tokens and records rows, another uses the same model outside
    any block: it gets the plain model's logits bit for bit, and the block's trace holds only its own calls."""
    kernel = runnable(request, implementation)
    model, inputs = load(kernel)
    vlm = vlmtools.wrap(model)
    plain = logits(model, inputs)
    drop = DropTokens({1: keep_every_other_visual(None)})
    with vlm.use(drop):
        pruned = logits(model, inputs)
    barrier = threading.Barrier(2, timeout=120)
    got, errors, calls = {}, [], 3

    def inside():
        try:
            with vlm.use(drop, vlmtools.RecordRows(["text.2"], "last")) as trace:
                barrier.wait()  # the block is open before the other thread runs
                got["inside"] = [logits(model, inputs) for _ in range(calls)]
                barrier.wait()  # and stays open until the other thread is done
            got["rows"] = trace["text.2.rows"]
        except Exception as error:  # pragma: no cover - reported below
            barrier.abort()
            errors.append(error)

    def outside():
        try:
            barrier.wait()
            got["outside"] = [logits(model, inputs) for _ in range(calls)]
            barrier.wait()
        except Exception as error:  # pragma: no cover - reported below
            barrier.abort()
            errors.append(error)

    threads = [threading.Thread(target=inside), threading.Thread(target=outside)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(torch.equal(out, plain) for out in got["outside"])
    assert all(torch.equal(out, pruned) for out in got["inside"])
    assert len(got["rows"]) == calls
    assert model.config.text_config._attn_implementation == kernel


# -- what is served, what is refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted({"eager", *AttentionInterface._global_mapping} - {seam_name(s) for s in SERVED}))
def test_every_registered_implementation_is_served_or_refused(name):
    model, _ = tiny_llava()
    model.config.text_config._attn_implementation_internal = name
    if name in SERVED:
        vlm = vlmtools.wrap(model)
        with vlm.use():
            assert model.config.text_config._attn_implementation == seam_name(name)
            assert model.config.vision_config._attn_implementation == seam_name("sdpa")
        assert model.config.text_config._attn_implementation == name
        return
    with pytest.raises(UnsupportedModel, match=re.escape(f"'{name}' for its text_config") + ".*"
                       + re.escape(f"served: {', '.join(SERVED)}")):
        vlmtools.wrap(model)


def test_a_kernel_switched_after_wrap_is_refused_at_use():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    AttentionInterface.register("my_kernel", AttentionInterface._global_mapping["sdpa"])
    model.set_attn_implementation({"vision_config": "my_kernel"})
    with pytest.raises(UnsupportedModel, match="'my_kernel' for its vision_config.*served: eager, sdpa"):
        with vlm.use():
            pass
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "my_kernel"
    model.set_attn_implementation({"vision_config": "sdpa"})
    with vlm.use():
        assert model.config.vision_config._attn_implementation == seam_name("sdpa")


# -- compiled flex, and the real FlashAttention, on a GPU -----------------------------------------------------------


def cuda_model(implementation: str):
    """The tiny LLaVA in bf16 on the GPU; flex on its text model only (the tiny CLIP's head size, 8, is below
    what compiled flex takes)."""
    model, inputs = tiny_llava()
    model = model.to("cuda", torch.bfloat16)
    model.set_attn_implementation({"text_config": implementation} if implementation == "flex_attention"
                                  else implementation)
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return model, inputs


def check_on_cuda(implementation: str):
    """Nothing planned: bitwise; a pruned generate with the cache equals recomputation; recorded rows follow SDPA."""
    model, inputs = cuda_model(implementation)
    vlm = vlmtools.wrap(model)
    plain = logits(model, inputs)
    with vlm.use():
        assert torch.equal(logits(model, inputs), plain)
    drop = DropTokens({1: keep_every_other_visual(None)})
    with torch.no_grad(), vlm.use(drop):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        sequence, mask = inputs["input_ids"], inputs["attention_mask"]
        for step in range(3):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            scores = model(input_ids=sequence, attention_mask=mask, position_ids=positions,
                           pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
            torch.testing.assert_close(scores, out.scores[step], atol=0.1, rtol=0.05)  # bf16, other kernel shapes
            sequence = torch.cat([sequence, out.sequences[:, sequence.shape[1]:sequence.shape[1] + 1]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    rows = {}
    for name in (implementation, "sdpa"):
        model, inputs = cuda_model(name)
        with torch.no_grad(), vlmtools.wrap(model).use(vlmtools.RecordRows(["text.1"], "last")) as trace:
            model(**inputs)
        rows[name] = trace["text.1.rows"][0]
    torch.testing.assert_close(rows[implementation], rows["sdpa"], atol=2e-2, rtol=0)


@pytest.mark.skipif(not (torch.cuda.is_available() and is_flash_attn_2_available()), reason=NO_CUDA_FLASH)
def test_flash_attention_2_on_cuda():
    check_on_cuda("flash_attention_2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=COMPILED_FLEX)
def test_compiled_flex_on_cuda():
    check_on_cuda("flex_attention")


@pytest.mark.slow
def test_compiled_flex_prefill_is_bitwise_on_cpu():
    """Compiled flex (as transformers runs it) with nothing planned, prefill only (see COMPILED_FLEX): over a
    minute on a 2-core CPU the first time, seconds once inductor's cache holds the kernels."""
    model, inputs = load("flex_attention")
    vlm = vlmtools.wrap(model)
    plain = logits(model, inputs)
    with vlm.use():
        assert torch.equal(logits(model, inputs), plain)
