"""tuning: ACT and ZeroTuning against the released formulas on planted attention, and the head search."""
import pytest
import torch

import vlmtools
from tuning import ACT, HeadSelection, ZeroTuning, calibrate
from vlmtools.testing import tiny_llava

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
    selection = calibrate(vlm, method, [(inputs, answers)], layers=[1, 2], directory=tmp_path, progress=False)
    assert selection.heads == {LAYER: [HEAD]}
    assert selection.baseline == 1 - changed / 2
    if kind == "zerotuning":
        assert selection.gamma == 1.5 and selection.groups["up"] == {LAYER: [HEAD]}
    stored = HeadSelection.stored(vlm, kind, tmp_path)
    assert stored == selection
    loaded = ACT(directory=tmp_path, beta=0.0) if kind == "act" else ZeroTuning(directory=tmp_path)
    assert planted_labels(vlm, inputs, loaded)[0] == answers  # the stored heads are what ACT() / ZeroTuning() edit


def test_missing_selection_is_refused(tmp_path):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    for method in (ACT(directory=tmp_path), ZeroTuning(directory=tmp_path)):
        with pytest.raises(ValueError, match="tuning.calibrate"), torch.no_grad(), vlm.use(method):
            model(**inputs)
