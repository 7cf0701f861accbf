"""Dropping tokens for real: equals the model run on the kept tokens alone, and decodes with the cache."""
import copy

import pytest
import torch

import vlmtools
from vlmtools.drop import DropTokens
from vlmtools.testing.vlm import tiny_llava


def keep_every_other_visual(layout):
    """A fixed chooser: all non-visual tokens and the even-indexed visual tokens of each sample."""
    def choose(state, hidden, kept):
        rows = []
        for sample, positions in zip(state.layout.samples, kept):
            visual = sample.visual_positions().to(positions.device)
            drop = visual[1::2]
            rows.append(positions[~torch.isin(positions, drop)])
        return torch.stack(rows)
    return choose


@torch.no_grad()
def hidden_then_pruned(vlm, inputs, layer, drop):
    """The residual stream entering ``layer`` unpruned, then the logits and the kept positions under ``drop``."""
    with vlm.use(vlmtools.RecordHidden([layer])) as trace:
        vlm.model(**inputs)
    with vlm.use(drop) as pruned:
        logits = vlm.model(**inputs).logits
    return trace[f"text.{layer}.resid_pre"][0], logits, pruned[drop].kept_at(layer)


def tail_model(language_model, start):
    """The decoder layers from ``start`` on, as a model of their own (independent reference)."""
    tail = copy.deepcopy(language_model)
    tail.layers = tail.layers[start:]
    tail.config.num_hidden_layers = len(tail.layers)
    return tail


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_pruned_forward_equals_the_kept_tokens_alone(layer):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    chooser = keep_every_other_visual(None)
    drop = DropTokens({layer: chooser})
    hidden, pruned, kept = hidden_then_pruned(vlm, inputs, layer, drop)
    with torch.no_grad():
        n = inputs["input_ids"].shape[1]
        positions = torch.arange(n).expand(2, -1).gather(1, kept)
        mask = inputs["attention_mask"].gather(1, kept)
        tail = tail_model(model.model.language_model, layer)
        reference = tail(inputs_embeds=hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1])),
                         position_ids=positions, attention_mask=mask, use_cache=False).last_hidden_state
        expected = model.lm_head(reference)
    assert pruned.shape[1] == n - 8
    real = mask.bool()
    torch.testing.assert_close(pruned[real], expected[real], atol=1e-5, rtol=0)


def test_keeping_everything_changes_nothing():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    with torch.no_grad():
        plain = model(**inputs).logits
        with vlm.use(DropTokens({1: lambda state, hidden, kept: kept})):
            same = model(**inputs).logits
        plain_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vlm.use(DropTokens({1: lambda state, hidden, kept: kept})):
            same_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    assert torch.equal(same_gen, plain_gen)


@pytest.mark.parametrize("layer", [0, 2])
def test_cached_decoding_equals_recomputation_without_cache(layer):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    steps = 4
    with torch.no_grad(), vlm.use(DropTokens({layer: keep_every_other_visual(None)})):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    with torch.no_grad(), vlm.use(DropTokens({layer: keep_every_other_visual(None)})):
        sequence, mask = inputs["input_ids"], inputs["attention_mask"]
        for step in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=sequence, attention_mask=mask, position_ids=positions,
                           pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, out.scores[step], atol=1e-4, rtol=0)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(sequence, out.sequences)


def test_chooser_errors_are_clear_and_leave_the_model_unchanged():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    plain = model(**inputs).logits
    with pytest.raises(ValueError, match="already dropped"):
        with vlm.use(DropTokens({1: lambda s, h, kept: kept[:, :5], 2: lambda s, h, kept: torch.full((2, 3), 7)})):
            model(**inputs)
    with pytest.raises(ValueError, match="n >= 1"):
        with vlm.use(DropTokens({1: lambda s, h, kept: kept[:, :0]})):
            model(**inputs)
    with pytest.raises(ValueError, match="layer indices"):
        DropTokens({})
    torch.testing.assert_close(model(**inputs).logits, plain, atol=0, rtol=0)


def test_the_trace_gives_what_this_drop_kept_in_this_block():
    """``trace[drop]`` is what that DropTokens kept in that block; one not used there, or the same one
    twice in one block, is refused."""
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    drop, unused = DropTokens({1: keep_every_other_visual(None)}), DropTokens({1: lambda s, h, kept: kept})
    with torch.no_grad(), vlm.use(drop) as trace:
        model(**inputs)
    assert drop in trace and unused not in trace
    kept = trace[drop].kept_at(2)
    for sample, positions in zip(vlm.layout(inputs).samples, kept):
        assert torch.equal(positions[torch.isin(positions, sample.visual_positions())], sample.visual_positions()[::2])
    with pytest.raises(KeyError, match="not used in this block"):
        trace[unused]
    with pytest.raises(ValueError, match="used twice in one block"), vlm.use(drop, drop):
        pass


def test_merging_chooser_replaces_the_kept_hidden_states():
    """A chooser may return ``(positions, hidden)``: each kept even visual token becomes the mean of
    itself and the odd token after it, in an order other than sorted (guards the reordering)."""
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    layer = 1
    keep_even = keep_every_other_visual(None)

    def merge(state, hidden, kept):
        keep = keep_even(state, hidden, kept).flip(1)
        merged = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1])).clone()
        for b, sample in enumerate(state.layout.samples):
            visual = sample.visual_positions()
            for even, odd in zip(visual[0::2].tolist(), visual[1::2].tolist()):
                merged[b, (keep[b] == even).nonzero()[0, 0]] = (hidden[b, even] + hidden[b, odd]) / 2
        return keep, merged

    drop = DropTokens({layer: merge})
    hidden, pruned, kept = hidden_then_pruned(vlm, inputs, layer, drop)
    with torch.no_grad():
        with vlm.use(DropTokens({layer: keep_even})):
            plain_drop = model(**inputs).logits
        reference_in = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1])).clone()
        for b in range(2):
            visual = vlm.layout(inputs).samples[b].visual_positions()
            for even, odd in zip(visual[0::2].tolist(), visual[1::2].tolist()):
                reference_in[b, (kept[b] == even).nonzero()[0, 0]] = (hidden[b, even] + hidden[b, odd]) / 2
        n = inputs["input_ids"].shape[1]
        positions = torch.arange(n).expand(2, -1).gather(1, kept)
        mask = inputs["attention_mask"].gather(1, kept)
        tail = tail_model(model.model.language_model, layer)
        expected = model.lm_head(tail(inputs_embeds=reference_in, position_ids=positions, attention_mask=mask,
                                      use_cache=False).last_hidden_state)
    real = mask.bool()
    torch.testing.assert_close(pruned[real], expected[real], atol=1e-5, rtol=0)
    assert (pruned - plain_drop).abs().max() > 1e-3
    with pytest.raises(ValueError, match="hidden states"):
        with vlm.use(DropTokens({layer: lambda s, h, kept: (kept, h[:, :3])})):
            model(**inputs)


@pytest.mark.parametrize("layer", [0, 2])
def test_compacted_positions_equal_the_short_prompt_alone(layer):
    """``positions="compact"``: from the drop layer on, the kept tokens run at consecutive positions, as the
    layers from ``layer`` on of a model given only the kept tokens (ids counted over the real kept tokens)."""
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    drop = DropTokens({layer: keep_every_other_visual(None)}, positions="compact")
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        with vlm.use(vlmtools.RecordHidden([layer])) as trace:
            model(**inputs, position_ids=positions)
        hidden = trace[f"text.{layer}.resid_pre"][0]
        with vlm.use(drop) as pruned:
            logits = model(**inputs, position_ids=positions).logits
        kept = pruned[drop].kept_at(layer)
        mask = inputs["attention_mask"].gather(1, kept)
        short = (mask.cumsum(-1) - 1).clamp(min=0)  # 0, 1, 2, ... over each row's real kept tokens
        if layer:  # the layers before the drop ran at the original positions
            assert not torch.equal(short, positions.gather(1, kept))
        tail = tail_model(model.model.language_model, layer)
        expected = model.lm_head(tail(inputs_embeds=hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1])),
                                      position_ids=short, attention_mask=mask, use_cache=False).last_hidden_state)
        with vlm.use(DropTokens({layer: keep_every_other_visual(None)})):
            original = model(**inputs, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)
    assert (logits[real] - original[real]).abs().max() > 1e-4  # renumbering changed the computation


@pytest.mark.parametrize("layer", [0, 2])
def test_compacted_positions_decode_with_the_cache_as_recomputation(layer):
    """Cached greedy decoding under ``positions="compact"`` gives the scores of recomputing the whole sequence
    without cache (each new token's id moves back by the dropped real tokens)."""
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    steps = 3
    make = lambda: DropTokens({layer: keep_every_other_visual(None)}, positions="compact")
    with torch.no_grad(), vlm.use(make()):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    with torch.no_grad(), vlm.use(make()):
        sequence, mask = inputs["input_ids"], inputs["attention_mask"]
        for step in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=sequence, attention_mask=mask, position_ids=positions,
                           pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, out.scores[step], atol=1e-4, rtol=0)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(sequence, out.sequences)


def test_compacted_positions_are_refused_where_positions_have_several_rows():
    from vlmtools.testing.vlm import tiny_qwen2_vl

    model, inputs = tiny_qwen2_vl()
    with pytest.raises(ValueError, match="positions must be"):
        DropTokens({1: lambda s, h, kept: kept}, positions="renumbered")
    with pytest.raises(NotImplementedError, match="use positions=.original."):
        with torch.no_grad(), vlmtools.wrap(model).use(DropTokens({1: lambda s, h, kept: kept}, positions="compact")):
            model(**inputs)
