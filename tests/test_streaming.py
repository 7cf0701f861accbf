"""StreamingLLM's sink cache against recomputation on the kept tokens (streaming/README.md)."""
import pytest
import torch
from transformers import DynamicCache

import vlmtools
from pruning import FastV
from streaming import SinkCache, SinkLayer, lasting_sinks, leading_sinks
from vlmtools.kv_cache import kv_bytes
from tests.test_kernels import load, runnable, torch_flash, uncompiled_flex  # noqa: F401 (fixtures)
from vlmtools.adapters.base import UnsupportedModel
from vlmtools.sinks import ColumnMassSink, SinkDetector
from vlmtools.testing.vlm import (
    IMAGE,
    left_padded,
    tiny_gemma3,
    tiny_llava,
    tiny_llava_onevision,
    tiny_qwen2_vl,
    tiny_qwen3_5,
)


def one_layer_llava():
    """tiny_llava cut to one decoder layer, eager attention: its keys and values are functions of each token's
    embedding alone, so a forward over the kept tokens recomputes exactly what the cache holds."""
    model, _ = tiny_llava()
    del model.model.language_model.layers[1:]
    model.config.text_config.num_hidden_layers = 1
    model.set_attn_implementation("eager")
    inputs = left_padded([[1, 2] + [IMAGE] * 16 + [3] + [IMAGE] * 16 + [4, 5, 6],
                          [1] + [IMAGE] * 16 + [7] + [IMAGE] * 16 + [8]])
    inputs["pixel_values"] = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, inputs


def streamed(model, inputs, cache, steps):
    """Greedy generate with ``cache``; the stream's embeddings (the prompt's as the LM got them, image features
    included) and every step's logits."""
    seen = {}
    lm = model.model.language_model
    def first_call(module, args, kwargs):
        seen.setdefault("prompt", kwargs["inputs_embeds"])

    hook = lm.register_forward_pre_hook(first_call, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, cache=cache, max_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    finally:
        hook.remove()
    prompt = seen["prompt"]
    generated = lm.embed_tokens(out.sequences[:, prompt.shape[1]:])
    return torch.cat([prompt, generated], 1), out.logits


def kept_forward(model, embeds, columns, positions):
    """A plain forward (no cache) over the tokens at ``columns`` at rotary ``positions``; the last one's logits."""
    with torch.no_grad():
        lm = model.model.language_model
        hidden = lm(inputs_embeds=embeds[None, columns], position_ids=positions[None]).last_hidden_state
        return model.lm_head(hidden[0, -1])


@pytest.mark.parametrize("lasting", [None, [[12], [13]]])
def test_next_logits_equal_a_plain_forward_over_the_kept_tokens_at_their_places_in_the_cache(lasting):
    model, inputs = one_layer_llava()
    vlm = vlmtools.wrap(model)
    sinks, window, steps = 4, 6, 12
    cache = SinkCache(vlm, window=window, sinks=sinks, lasting=lasting)
    embeds, logits = streamed(model, inputs, cache, steps)
    query = embeds.shape[1] - 2                       # the last step's input token; the cache held what came before
    for b, pads in enumerate((1 - inputs["attention_mask"]).sum(1).tolist()):
        real = torch.arange(pads, query)
        extra = torch.tensor(lasting[b] if lasting else [], dtype=torch.long)   # prompt columns kept as sinks
        kept = torch.cat([real[:sinks], extra, real[-window:], torch.tensor([query])])  # first k + latest window
        places = torch.arange(kept.numel())                                        # positions = places in the cache
        expected = kept_forward(model, embeds[b], kept, places)
        torch.testing.assert_close(logits[-1][b], expected, atol=1e-4, rtol=1e-4)
        at_stream_positions = kept_forward(model, embeds[b], kept, kept - pads)    # same keys, no re-placing
        assert not torch.allclose(at_stream_positions, expected, atol=1e-3)
    assert cache.layers[0].ring is not None              # the last steps ran in place
    _, full = streamed(model, inputs, DynamicCache(), steps)
    assert not torch.allclose(full[-1], logits[-1], atol=1e-3)                    # a plain cache keeps everything


def test_bf16_stream_matches_the_kept_tokens_forward_in_bf16():
    model, inputs = one_layer_llava()
    model.to(torch.bfloat16)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    cache = SinkCache(vlmtools.wrap(model), window=6, sinks=4)
    embeds, logits = streamed(model, inputs, cache, 10)
    assert cache.layers[0].keys.dtype == torch.bfloat16
    query, pads = embeds.shape[1] - 2, int((1 - inputs["attention_mask"][1]).sum())
    real = torch.arange(pads, query)
    kept = torch.cat([real[:4], real[-6:], torch.tensor([query])])
    expected = kept_forward(model, embeds[1], kept, torch.arange(kept.numel())).float()
    scale = expected.abs().max()
    assert (logits[-1][1].float() - expected).abs().max() < 0.02 * scale
    _, full = streamed(model, inputs, DynamicCache(), 10)
    assert (full[-1][1].float() - expected).abs().max() > 0.2 * scale


def test_memory_stays_bounded_over_a_long_generate_and_sinks_matter():
    model, inputs = tiny_llava()                      # three layers, left padding, a 21-token prompt
    vlm = vlmtools.wrap(model)
    cache = SinkCache.detect(vlm, inputs, window=8)   # the positional criterion: k = 4
    held = []

    def watch(ids, scores):
        held.append(cache.held)
        return scores

    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=16, do_sample=False, logits_processor=[watch])
    assert cache.sinks == 4 and held and max(held) == 12
    text = model.config.text_config
    per_key = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4   # fp32 K and V
    assert cache.peak_kv_bytes == cache.kv_bytes == 3 * 2 * (12 + 1) * per_key   # and the next token's slot
    full = DynamicCache()
    with torch.no_grad():
        plain = model.generate(**inputs, cache=full, max_new_tokens=16, do_sample=False)
        window = model.generate(**inputs, cache=SinkCache(vlm, window=12, sinks=0), max_new_tokens=16, do_sample=False)
    assert kv_bytes(full) == 3 * 2 * (out.shape[1] - 1) * per_key
    assert not torch.equal(window, out) and not torch.equal(plain, out)


def video():
    return tiny_llava_onevision(video=True)


@pytest.mark.parametrize(("build", "host"), [(tiny_llava, FastV(keep=4, layer=1)), (tiny_gemma3, None), (video, None)])
def test_a_window_longer_than_the_stream_is_the_plain_cache_and_a_short_one_bounds_it(build, host):
    """Under a pruning host, on Gemma 3 (its sliding layers keep their own window) and on video frames."""
    model, inputs = build()
    vlm = vlmtools.wrap(model)
    runs, short = [], SinkCache(vlm, window=6, sinks=4)
    for cache in (SinkCache(vlm, window=200, sinks=4), DynamicCache(), short):
        with torch.no_grad(), vlm.use(*[host] if host else []):
            runs.append(model.generate(**inputs, cache=cache, max_new_tokens=4, do_sample=False))
    assert torch.equal(runs[0], runs[1])
    sink_layers = [layer for layer in short.layers if isinstance(layer, SinkLayer)]
    assert sink_layers and all(layer.held == 10 for layer in sink_layers)
    assert all(layer.keys.shape[-2] < 12 for layer in short.layers if layer not in sink_layers)  # Gemma 3: window 12


def test_a_pruning_host_in_the_same_block_streams_past_the_window():
    model, inputs = tiny_llava()
    model.set_attn_implementation("eager")             # a 4-D float mask at every step
    vlm = vlmtools.wrap(model)
    cache = SinkCache(vlm, window=6, sinks=4)
    host = FastV(keep=4, layer=1)
    with torch.no_grad(), vlm.use(host) as trace:
        out = model.generate(**inputs, cache=cache, max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    kept = trace[host].kept_at(1)
    streamed_len = out.sequences.shape[1] - 1
    for index, layer in enumerate(cache.layers):
        assert layer.held == 10 and layer.get_seq_length() == streamed_len   # the virtual length
        assert layer.dropped == (0 if index == 0 else inputs["input_ids"].shape[1] - kept.shape[1])
    assert torch.isfinite(torch.stack(out.logits)).all()
    with torch.no_grad(), vlm.use(host):
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert not torch.equal(plain, out.sequences)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_a_pruning_host_under_flex_streams_as_under_eager(uncompiled_flex):
    """The token drop's decoding mask over an evicting cache's held keys as a BlockMask: the same logits as
    eager's 4-D mask at every step, past the window."""
    logits = {}
    for implementation in ("eager", "flex_attention"):
        model, inputs = load(implementation)
        vlm = vlmtools.wrap(model)
        with torch.no_grad(), vlm.use(FastV(keep=4, layer=1)):
            logits[implementation] = model.generate(**inputs, cache=SinkCache(vlm, window=6, sinks=4),
                                                    max_new_tokens=4, do_sample=False, output_logits=True,
                                                    return_dict_in_generate=True).logits
    for flex, eager in zip(logits["flex_attention"], logits["eager"], strict=True):
        torch.testing.assert_close(flex, eager, atol=1e-4, rtol=0)


def test_refusals():
    for build in (tiny_qwen2_vl, tiny_qwen3_5):
        model, _ = build()
        with pytest.raises(UnsupportedModel, match="M-RoPE"):
            SinkCache(vlmtools.wrap(model), window=8, sinks=4)
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    model.config.text_config.layer_types = ["full_attention", "linear_attention", "full_attention"]  # a hybrid LM
    with pytest.raises(UnsupportedModel, match="linear_attention layers hold a state, not a list of keys"):
        SinkCache(vlm, window=8, sinks=4)
    del model.config.text_config.layer_types
    with pytest.raises(ValueError, match="window must be >= 1"):
        SinkCache(vlm, window=0, sinks=4)
    report = SinkDetector([ColumnMassSink(eps=1.0)]).detect(vlm, inputs)   # no mean attention exceeds 1
    with pytest.raises(ValueError, match="found no sink at any sample's first token; pass sinks=k"):
        SinkCache.from_report(vlm, report, window=8)
    assert SinkCache.from_report(vlm, report, window=8, sinks=2).sinks == 2
    cache = SinkCache(vlm, window=8, sinks=4, lasting=[[5]])
    with pytest.raises(ValueError, match="lasting sinks are given for 1 samples, the batch has 2"), torch.no_grad():
        model.generate(**inputs, cache=cache, max_new_tokens=2)


def test_leading_and_lasting_sinks_read_the_report():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    report = SinkDetector([ColumnMassSink(eps=0.05)]).detect(vlm, inputs)
    found = [{f.token for f in report.sinks("column_mass", sample=b)} for b in range(2)]
    firsts = [int((1 - inputs["attention_mask"][b]).sum()) for b in range(2)]
    runs = []
    for first, tokens in zip(firsts, found):
        run = 0
        while first + run in tokens:
            run += 1
        runs.append(run)
    assert leading_sinks(report) == max(runs) >= 1
    assert lasting_sinks(report) == [sorted(t for t in tokens if t >= first + max(runs))
                                     for first, tokens in zip(firsts, found)]
    cache = SinkCache.from_report(vlm, report, window=8, lasting=True)
    assert (cache.sinks, cache.lasting) == (max(runs), lasting_sinks(report))


def test_a_second_turn_with_an_image_sees_the_kept_tokens_then_its_own_at_their_places():
    model, inputs = one_layer_llava()
    cache = SinkCache(vlmtools.wrap(model), window=6, sinks=4)
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["inputs_embeds"]), with_kwargs=True)
    turn = torch.tensor([[3, 9] + [IMAGE] * 16 + [4, 5]] * 2)
    try:
        with torch.no_grad():
            first = model.generate(**inputs, cache=cache, max_new_tokens=4, do_sample=False)
            ids = torch.cat([first, turn], 1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["input_ids"].shape[1]:])], 1)
            second = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32),
                                    cache=cache, max_new_tokens=1, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    finally:
        hook.remove()
    chunk = calls[-1]                                  # the unseen tail: the last answer token and the new turn
    stream = torch.cat([*calls[:-1], chunk], 1)        # every token the language model got, in order
    seen = stream.shape[1] - chunk.shape[1]
    assert chunk.shape[1] == turn.shape[1] + 1 and cache.get_seq_length() == stream.shape[1]
    for b, pads in enumerate((1 - inputs["attention_mask"]).sum(1).tolist()):
        real = torch.arange(pads, seen)
        kept = torch.cat([real[:4], real[-6:], torch.arange(seen, stream.shape[1])])
        expected = kept_forward(model, stream[b], kept, torch.arange(kept.numel()))
        torch.testing.assert_close(second.logits[0][b], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("implementation", ["eager", "flex_attention", "flash_attention_2"])
def test_each_served_kernel_reads_the_cache_as_sdpa_does(request, implementation):
    """A 4-D float mask (eager), a BlockMask (flex), the 2-D padding mask (FlashAttention: a torch reference)."""
    logits = []
    for name in ("sdpa", runnable(request, implementation)):
        model, inputs = load(name)
        with torch.no_grad():
            out = model.generate(**inputs, cache=SinkCache(vlmtools.wrap(model), window=6, sinks=4), max_new_tokens=8,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        logits.append(torch.stack(out.logits))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def released_streaming_logits(model, embeds: torch.Tensor, prompt: int, sinks: int, window: int) -> torch.Tensor:
    """mit-han-lab/streaming-llm by hand on one unpadded sample: keys cached before the rotary embedding
    (``pos_shift``), every cached key rotated at its place in the cache and the query at its own place, the
    cache cut to the first ``sinks`` and the latest ``window`` keys after each forward
    (``StartRecentKVCache.__call__``). The prompt in one forward, then one token a step; each step's logits."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    cache = [(None, None)] * len(lm.layers)
    chunks = [embeds[None, :prompt]] + [embeds[None, t:t + 1] for t in range(prompt, embeds.shape[0])]
    logits = []
    for hidden in chunks:
        new, held = hidden.shape[1], 0 if cache[0][0] is None else cache[0][0].shape[2]
        places = torch.arange(held + new)[None]
        for index, layer in enumerate(lm.layers):
            attn, x = layer.self_attn, layer.input_layernorm(hidden)
            q, k, v = (proj(x).view(1, new, -1, attn.head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            past_k, past_v = cache[index]
            k = k if past_k is None else torch.cat([past_k, k], 2)
            v = v if past_v is None else torch.cat([past_v, v], 2)
            cache[index] = (k, v)
            cos, sin = lm.rotary_emb(v, places)
            q, _ = apply_rotary_pos_emb(q, q, cos[:, held:], sin[:, held:])
            k_rot, _ = apply_rotary_pos_emb(k, k, cos, sin)
            groups = q.shape[1] // k.shape[1]
            scores = q @ k_rot.repeat_interleave(groups, 1).transpose(2, 3) * attn.scaling
            causal = torch.ones(new, held + new, dtype=torch.bool).tril(held)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = (probs @ v.repeat_interleave(groups, 1)).transpose(1, 2).reshape(1, new, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits.append(model.lm_head(lm.norm(hidden))[0, -1])
        if held + new > sinks + window:
            cache = [tuple(torch.cat([t[:, :, :sinks], t[:, :, -window:]], 2) for t in kv) for kv in cache]
    return torch.stack(logits)


def test_every_step_equals_the_released_algorithm_by_hand_in_every_layer():
    model, inputs = tiny_llava()                      # three layers: kept tokens' states depend on their past
    sinks, window, steps = 4, 6, 10
    embeds, logits = streamed(model, inputs, SinkCache(vlmtools.wrap(model), window=window, sinks=sinks), steps)
    prompt = inputs["input_ids"].shape[1]
    for b, pads in enumerate((1 - inputs["attention_mask"]).sum(1).tolist()):
        with torch.no_grad():
            expected = released_streaming_logits(model, embeds[b, pads:-1], prompt - pads, sinks, window)
        torch.testing.assert_close(torch.stack(logits)[:, b], expected, atol=1e-4, rtol=1e-4)


class KeysAt(vlmtools.AttentionHook):
    """Each call's keys at one text site and their original positions as methods read them (``key_positions``)."""

    def __init__(self, layer):
        self.layer, self.calls = layer, []

    def attach(self, vlm, plan):
        self.state = plan.state
        plan.attention(vlm.site(f"text.{self.layer}"), self)

    def observe(self, call):
        from vlmtools.plan import key_positions

        self.calls.append((call.key.clone(), key_positions(self.state, self.layer, call.k_len)))


class Forced:
    """A logits processor that makes ``generate`` emit ``tokens`` (B, steps), one column a step."""

    def __init__(self, tokens, prompt):
        self.tokens, self.prompt = tokens, prompt

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, self.tokens[:, input_ids.shape[1] - self.prompt, None], 0.0)


def forced_run(model, vlm, inputs, tokens, cache, layer, *methods):
    """Keys (and their positions) at ``layer`` and its last rows at every step of a forced generate."""
    from transformers import LogitsProcessorList

    keys = KeysAt(layer)
    with torch.no_grad(), vlm.use(*methods, keys, vlmtools.RecordRows([f"text.{layer}"], "last")) as trace:
        model.generate(**inputs, cache=cache, max_new_tokens=tokens.shape[1], do_sample=False,
                       logits_processor=[Forced(tokens, inputs["input_ids"].shape[1])])
    return keys.calls, trace[f"text.{layer}.rows"]


@pytest.mark.parametrize("build", [tiny_llava, lambda: (tiny_llava()[0], one_sample(tiny_llava()[1]))],
                         ids=["left-padded", "one-sample-in-place"])
def test_methods_read_an_evicting_caches_keys_at_their_positions(build):
    """Once the sink cache has evicted, ``key_positions`` names each held key's original position: a window key
    is the full cache's key at that position, a sink the same key turned (same norm); ZeroTuning then biases the
    held initial token, read by position (the row against the same cache's unedited row)."""
    from tuning import ZeroTuning

    model, inputs = build()
    vlm = vlmtools.wrap(model)
    layer, steps, prompt = 0, 12, inputs["input_ids"].shape[1]  # layer 0: its keys depend on the tokens alone
    tokens = torch.randint(10, 40, (inputs["input_ids"].shape[0], steps), generator=torch.Generator().manual_seed(0))
    full, _ = forced_run(model, vlm, inputs, tokens, DynamicCache(), layer)
    held, plain = forced_run(model, vlm, inputs, tokens, SinkCache(vlm, window=6, sinks=2), layer)
    all_keys = full[-1][0]  # the last step's keys over every position
    last_keys, positions = held[-1]
    assert positions is not None and last_keys.shape[2] < prompt  # evicted: fewer keys than the prompt
    first = [sample.first for sample in vlm.layout(inputs).samples]
    for b in range(len(first)):
        assert len(set(positions[b].tolist())) == positions.shape[1]
        sinks = set(range(first[b], first[b] + 2))
        assert sinks <= set(positions[b].tolist())  # the first two real tokens are held
        for slot, at in enumerate(positions[b].tolist()):
            got, want = last_keys[b, :, slot], all_keys[b, :, at]
            if at in sinks:
                torch.testing.assert_close(got.norm(dim=-1), want.norm(dim=-1), atol=1e-4, rtol=0)
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    _, tuned = forced_run(model, vlm, inputs, tokens, SinkCache(vlm, window=6, sinks=2), layer,
                          ZeroTuning({layer: [0, 1, 2, 3]}, gamma=4.0))
    ratio = tuned[-1][:, :, 0] / plain[-1][:, :, 0]  # (B, H, held): gamma / Z at the initial token, 1 / Z elsewhere
    for b in range(len(first)):
        initial = positions[b] == first[b]
        torch.testing.assert_close(ratio[b][:, initial].squeeze(-1) / ratio[b][:, ~initial].mean(-1),
                                   torch.full((ratio.shape[1],), 4.0), atol=1e-3, rtol=1e-3)


def one_sample(inputs):
    """The second sample of a batch alone, unpadded (its steps then run in place)."""
    real = inputs["attention_mask"][1].bool()
    out = {"input_ids": inputs["input_ids"][1:, real], "attention_mask": inputs["attention_mask"][1:, real]}
    return {**inputs, **out, "pixel_values": inputs["pixel_values"][inputs["pixel_values"].shape[0] // 2:]}
