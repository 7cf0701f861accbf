"""StreamingLLM's sink cache against recomputation on the kept tokens (streaming/README.md)."""
import pytest
import torch
from transformers import DynamicCache

import vlmtools
from streaming import SinkCache
from vlmtools.testing.vlm import IMAGE, left_padded, tiny_llava


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
        hidden = model.model.language_model(inputs_embeds=embeds[None, columns], position_ids=positions[None]).last_hidden_state
        return model.lm_head(hidden[0, -1])


def test_next_logits_equal_a_plain_forward_over_the_kept_tokens_at_their_places_in_the_cache():
    model, inputs = one_layer_llava()
    vlm = vlmtools.wrap(model)
    sinks, window, steps = 4, 6, 12
    cache = SinkCache(vlm, window=window, sinks=sinks)
    embeds, logits = streamed(model, inputs, cache, steps)
    query = embeds.shape[1] - 2                       # the last step's input token; the cache held what came before
    for b, pads in enumerate((1 - inputs["attention_mask"]).sum(1).tolist()):
        real = torch.arange(pads, query)
        kept = torch.cat([real[:sinks], real[-window:], torch.tensor([query])])   # paper: first k + latest window
        places = torch.arange(kept.numel())                                        # positions = places in the cache
        expected = kept_forward(model, embeds[b], kept, places)
        torch.testing.assert_close(logits[-1][b], expected, atol=1e-4, rtol=1e-4)
        at_stream_positions = kept_forward(model, embeds[b], kept, kept - pads)    # same keys, no re-placing
        assert not torch.allclose(at_stream_positions, expected, atol=1e-3)
    _, full = streamed(model, inputs, DynamicCache(), steps)
    assert not torch.allclose(full[-1], logits[-1], atol=1e-3)                    # a plain cache keeps everything
