"""The language-model hosts keep exactly the visual tokens an independent reference keeps.

For FastV, PDrop, DART, random and grid on every tiny VLM family (a batch of two with left
padding), with a count and a fraction of the visual tokens: the reference
(:mod:`tests.reference_pruning`) recomputes the choice from the paper's / released code's
formulas on an unwrapped copy of the model (eager attention, plain torch hooks, its own
decoder loop), and the set of kept visual positions of every sample at every stage must be
the same. Ties go to the lower position; a mismatch at a numerical near-tie would be reported
as such. Swapping a host's selection for a trivial one makes the comparison fail.
"""
import pytest
import torch

import vlmtools
from pruning import DART, FastV, PDrop, RandomPrune, UniformGrid
from pruning.host import Host
from tests import reference_pruning as reference
from vlmtools.testing.vlm import BUILDERS

NEAR_TIE = 1e-6
"""A score gap below this at a budget boundary could flip between two correct fp32 computations (the message
of a mismatch says so)."""

def attention_layers(model) -> list[int]:
    """Decoder layers with softmax attention (a hybrid family's linear-attention layers have none)."""
    return [i for i, block in enumerate(reference.language_model(model).layers) if reference.has_attention(block)]


def after_attention(attention: list[int], count: int, first: int = 0) -> int | None:
    """The first drop layer ``>= first + 1`` whose previous layer has attention."""
    return next((a + 1 for a in attention if a >= first and a + 1 < count), None)


def setups(attention: list[int], count: int) -> dict:
    """Per host variant, ``(host(keep), reference(model, inputs, layout, keep))`` at layers this model can take
    (None where it has none: the variant is skipped). With attention everywhere: FastV at 1 and 2, PDrop at
    1/2 and 0/2, DART at 2; a hybrid family's variants move to its attention layers."""
    fastv, fastv_k2 = after_attention(attention, count), after_attention(attention, count, first=1)
    pdrop = tuple(attention[1:3]) if len(attention) >= 3 else tuple(attention[:2])
    pdrop_0 = (attention[0], attention[-1]) if (attention[0], attention[-1]) != pdrop else None
    out = {
        "fastv": fastv and (lambda keep: FastV(keep=keep, layer=fastv),
                            lambda m, x, lay, keep: reference.fastv(m, x, lay, keep, layer=fastv)),
        "fastv_k2": fastv_k2 and fastv_k2 != fastv and (
            lambda keep: FastV(keep=keep, layer=fastv_k2),
            lambda m, x, lay, keep: reference.fastv(m, x, lay, keep, layer=fastv_k2)),
        "pdrop": (lambda keep: PDrop(keep=keep, layers=pdrop),
                  lambda m, x, lay, keep: reference.pdrop(m, x, lay, keep, layers=pdrop)),
        "pdrop_from_0": pdrop_0 and (lambda keep: PDrop(keep=keep, layers=pdrop_0),
                                     lambda m, x, lay, keep: reference.pdrop(m, x, lay, keep, layers=pdrop_0)),
        "dart": fastv_k2 and (lambda keep: DART(keep=keep, layer=fastv_k2, pivots=2, text_pivots=2),
                              lambda m, x, lay, keep: reference.dart(m, x, lay, keep, layer=fastv_k2, image_pivots=2,
                                                                    text_pivots=2)),
        "random": (lambda keep: RandomPrune(keep=keep, layer=1, seed=3),
                   lambda m, x, lay, keep: reference.random(m, x, lay, keep, layer=1, seed=3)),
        "grid": (lambda keep: UniformGrid(keep=keep, layer=1),
                 lambda m, x, lay, keep: reference.grid(m, x, lay, keep, layer=1)),
    }
    return out


VARIANTS = ["fastv", "fastv_k2", "pdrop", "pdrop_from_0", "dart", "random", "grid"]
KEEPS = (5, 0.5)
_MODELS = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = BUILDERS[family]()
    return _MODELS[family]


def kept_visual(model, inputs, host) -> dict[int, list[list[int]]]:
    """What the host keeps through vlmtools: per stage layer, each sample's kept visual positions."""
    vlm = vlmtools.wrap(model)
    layout = vlm.layout(inputs)
    with torch.no_grad(), vlm.use(host) as trace:
        model(**inputs)
    out = {}
    for layer in host.layers:
        out[layer] = [sorted(p for p in kept.tolist() if p in set(sample.visual_positions().tolist()))
                      for kept, sample in zip(trace[host].kept_at(layer), layout.samples)]
    return out


def check(family, name, keep):
    model, inputs = tiny(family)
    setup = setups(attention_layers(model), len(reference.language_model(model).layers))[name]
    if not setup:
        pytest.skip(f"{family} has no layers for the {name} variant")
    make, compute = setup
    layout = vlmtools.wrap(model).layout(inputs)
    expected = compute(model, inputs, layout, keep)
    got = kept_visual(model, inputs, make(keep))
    closest = min(expected.margins, default=float("inf"))
    assert got == expected.kept, ("a numerical near-tie at a budget boundary (score gap %.2g)" % closest
                                  if closest < NEAR_TIE else "the host's choice differs from the reference's")


FIRST = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
"""Every variant at both budgets on these; the other families run each host once (fraction: per-sample budgets)."""
CASES = [(family, name, keep) for family in BUILDERS for name in VARIANTS for keep in KEEPS
         if family in FIRST or (keep == 0.5 and name in ("fastv", "pdrop", "dart", "random", "grid"))]


@pytest.mark.parametrize("family,name,keep", CASES)
def test_the_host_keeps_what_the_reference_keeps(family, name, keep):
    check(family, name, keep)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_reference_loop_is_the_models_own_forward(family):
    """With nothing dropped, the reference's decoder loop (its mask, rotary tables and eager attention) gives the
    unwrapped model's own hidden states and attention at every real token; dropping nothing at a stage changes
    nothing either."""
    model, inputs = tiny(family)
    layout = vlmtools.wrap(model).layout(inputs)
    ref = reference.unwrapped(model)
    plain = reference.capture(ref, inputs)
    keep_all = lambda step: ([[p for _, p in reference.visual_present(step, b, s)] for b, s in  # noqa: E731
                              enumerate(layout.samples)], [len(s.visual_positions()) for s in layout.samples])
    for stages in ({}, {1: keep_all}):
        looped = reference.drop_loop(ref, inputs, layout, stages)
        assert torch.equal(looped.present, torch.arange(plain.real.shape[1]).expand_as(plain.real))
        torch.testing.assert_close(looped.hidden[plain.real], plain.hidden[-1][plain.real], atol=1e-5, rtol=0)
        for layer, (_, probs) in looped.loop.probs.items():
            rows = plain.real[:, None, :, None].expand_as(probs)
            torch.testing.assert_close(probs[rows], plain.probs[layer][rows], atol=1e-6, rtol=0)
        for layer, (_, keys) in looped.loop.keys.items():
            torch.testing.assert_close(keys, plain.keys[layer], atol=1e-6, rtol=0)


def _first_ones(self, run, sample, scores, columns, hidden, target):
    """A trivial selection: the first ``target`` visual tokens, whatever the score."""
    return columns[:target], None


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart", "random", "grid"])
def test_a_trivial_selection_fails_the_reference_check(name, monkeypatch):
    host_class = {"fastv": FastV, "pdrop": PDrop, "dart": DART, "random": RandomPrune, "grid": UniformGrid}[name]
    assert issubclass(host_class, Host)
    monkeypatch.setattr(host_class, "select", _first_ones)
    with pytest.raises(AssertionError):
        check("llava", name, 5)


def test_pdrops_previous_layer_reading_is_fastvs_not_the_released_codes():
    """``rank="previous"`` (the reading PDrop used before) matches a reference that ranks by the layer before
    each drop, and not the released code's reading of the drop layer itself."""
    model, inputs = tiny("llava")
    layout = vlmtools.wrap(model).layout(inputs)
    got = kept_visual(model, inputs, PDrop(keep=5, layers=(1, 2), rank="previous"))
    assert got == reference.pdrop(model, inputs, layout, 5, layers=(1, 2), reading="previous").kept
    assert got != reference.pdrop(model, inputs, layout, 5, layers=(1, 2)).kept
    assert PDrop(keep=5, rank="previous").settings["rank"].startswith("attention of the layer before")
    with pytest.raises(ValueError, match=">= 1"):
        PDrop(keep=5, layers=(0, 2), rank="previous")
    with pytest.raises(ValueError, match="rank"):
        PDrop(keep=5, rank="mean")


def test_darts_budget_split_reproduces_the_released_count():
    """The released code keeps the image pivots plus ``T // (pivots + text_pivots)`` per pivot: with
    ``keep = pivots + (pivots + text_pivots) * (T // 8)`` every pivot takes exactly that share here too."""
    model, inputs = tiny("llava_next")
    layout = vlmtools.wrap(model).layout(inputs)
    keep = 2 + 4 * 3  # two image and two text pivots, three picks each: 14 of 32
    got = kept_visual(model, inputs, DART(keep=keep, layer=2, pivots=2, text_pivots=2))
    assert [len(k) for k in got[2]] == [keep, keep]
    assert got == reference.dart(model, inputs, layout, keep, layer=2, image_pivots=2, text_pivots=2).kept
