"""Debiasing: the formula against a direct tensor implementation, a planted trend removed,
calibration files made, found by name and used; padding and sink suppression."""
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vlmtools
from pruning import Debias, FastV, PDrop, SparseVLM, Trend, calibrate, debiased, fit_trend
from pruning import host as pruning_host
from vlmtools.adapters.llava import letterbox_padding
from vlmtools.testing.vlm import tiny_llava


def planted(samples=400, count=144, slope=3.0, seed=0):
    """Random positive scores times ``exp(slope * i / (count - 1))``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(samples, count, generator=generator) + 0.5
    return noise * torch.exp(slope * torch.linspace(0, 1, count)), noise


def test_the_formula_matches_a_direct_implementation():
    scores, _ = planted(samples=1)
    scores = scores[0]
    trend = Trend(fit="exponential", coef=[2.5, -1.0])
    index = torch.arange(0, 144, 3)
    flags = torch.zeros(len(index), dtype=torch.bool)
    flags[[0, 5]] = True
    direct = scores[index] * (~flags).float() / torch.exp(-1.0 + 2.5 * index / 143)
    torch.testing.assert_close(debiased(scores[index], index, 144, trend, flags), direct, rtol=1e-5, atol=0)
    cubic = Trend(fit="cubic", coef=[1.0, -2.0, 0.5, 3.0])
    x = index / 143
    torch.testing.assert_close(debiased(scores[index], index, 144, cubic, None),
                               scores[index] / (x ** 3 - 2 * x ** 2 + 0.5 * x + 3), rtol=1e-5, atol=0)


@pytest.mark.parametrize("fit", ["exponential", "cubic"])
def test_a_planted_exponential_trend_is_removed(fit):
    scores, noise = planted()
    trend = fit_trend(scores.mean(0), fit)
    index = torch.arange(144)
    before = scores[:, 108:].mean() / scores[:, :36].mean()
    after = torch.stack([debiased(s, index, 144, trend, None) for s in scores])
    assert before > 8
    assert abs(float(after[:, 108:].mean() / after[:, :36].mean()) - 1) < (0.05 if fit == "exponential" else 0.3)
    if fit == "exponential":
        assert trend.coef[0] == pytest.approx(3.0, abs=0.05)
        # what remains is the planted noise: the ranking follows it, not the position
        correlation = torch.corrcoef(torch.stack([after.flatten(), noise.flatten()]))[0, 1]
        assert correlation > 0.99


def test_calibrate_writes_a_file_that_debias_finds_by_name(tmp_path, capsys):
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    samples = [{k: v[b:b + 1] for k, v in inputs.items()} for b in range(2)]
    for sample in samples:  # drop the left padding of the shorter prompt
        real = sample["attention_mask"][0].bool()
        sample["input_ids"], sample["attention_mask"] = sample["input_ids"][:, real], sample["attention_mask"][:, real]
    trends = calibrate(vlm, FastV(keep=4, layer=1), samples, directory=tmp_path)
    assert "calibrating fastv" in capsys.readouterr().err  # the progress bar
    path = tmp_path / "llava-h64-l3__fastv__L1.json"
    stored = json.loads(path.read_text())
    assert stored["fit"] == "exponential" and stored["samples"] == 2 and len(stored["rows"]) == 4
    assert Trend.load(path) == trends[0]
    host = FastV(keep=4, layer=1, debias=Debias(directory=tmp_path))
    with torch.no_grad(), vlm.use(host) as trace:
        model(**inputs)
    assert trace[host].trends[0] == trends[0] and host.settings["debias"]["trend"] == "calibrated"
    with pytest.raises(FileNotFoundError, match="pruning.calibrate"):
        with vlm.use(FastV(keep=4, layer=2, debias=Debias(directory=tmp_path))):
            model(**inputs)


def test_debiasing_moves_the_choice_away_from_the_trend():
    """A steep trend divides late tokens' scores: the debiased choice keeps earlier tokens."""
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    steep = Trend(fit="exponential", coef=[30.0, 0.0])
    chosen = {}
    for name, debias in (("plain", False), ("debiased", Debias(trend=steep, sinks=False))):
        host = FastV(keep=4, layer=1, debias=debias)
        with torch.no_grad(), vlm.use(host) as trace:
            model(**inputs)
        visual = vlm.layout(inputs).visual_positions()
        kept = trace[host].kept_at(1)
        chosen[name] = torch.stack([k[torch.isin(k, v)] - v[0] for k, v in zip(kept, visual)]).float().mean()
    assert chosen["debiased"] < chosen["plain"]
    assert chosen["debiased"] <= 1.5  # the first four-ish tokens


def test_letterbox_padding_lowers_the_budget_and_is_never_kept():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    pixels = inputs["pixel_values"].clone()
    pixels[0, :, :12] = 0.0  # top 12 of 32 rows padded: patch rows 0 (all) and 1 (4 of 8 rows: not > half)
    pixels[1, :, :, 20:] = 0.01  # right 12 columns: patch columns 3 (all) and 2 (4 of 8: not > half)
    padding = letterbox_padding(pixels, patch=8)
    assert padding.view(2, 4, 4)[0].nonzero()[:, 0].unique().tolist() == [0]
    assert padding.view(2, 4, 4)[1].nonzero()[:, 1].unique().tolist() == [3]
    host = FastV(keep=14, layer=1, debias=Debias(trend=None, sinks=False), padding=padding)
    with torch.no_grad(), vlm.use(host) as trace:
        model(**{**inputs, "pixel_values": pixels})
    layout = vlm.layout(inputs)
    for b, (sample, kept) in enumerate(zip(layout.samples, trace[host].kept_at(1))):
        visual = sample.visual_positions()
        kept_visual = kept[torch.isin(kept, visual)]
        assert len(kept_visual) == 12  # min(14, 16 - 4 padded)
        assert not torch.isin(kept_visual, visual[padding[b]]).any()


def test_a_letterboxing_processors_padding_is_read_from_the_pixels_in_a_forward_and_under_generate():
    """Wrapped with a processor that letterboxes (``do_pad``), the seam flags each image's padding from
    the pixels where they enter the tower, also under ``generate`` (it encodes the images before the
    prefill): the host then keeps what it keeps when given the explicit mask. Without such a
    processor nothing is flagged."""
    model, inputs = tiny_llava()
    pixels = inputs["pixel_values"].clone()
    pixels[0, :, :12] = 0.0
    pixels[1, :, :, 20:] = 0.01
    inputs = {**inputs, "pixel_values": pixels}
    expected = letterbox_padding(pixels, patch=8)
    letterboxing = SimpleNamespace(image_processor=SimpleNamespace(do_pad=True))
    runs = {"forward": lambda: model(**inputs),
            "generate": lambda: model.generate(**inputs, max_new_tokens=2, do_sample=False)}
    for name, run in runs.items():
        kept = {}
        for vlm, padding in ((vlmtools.wrap(model, letterboxing), None), (vlmtools.wrap(model), expected)):
            host = FastV(keep=14, layer=1, debias=Debias(trend=None, sinks=False), padding=padding)
            with torch.no_grad(), vlm.use(host) as trace:
                run()
            kept[padding is None] = trace[host].kept_at(1)
            images = trace[host].state.layout.images()
            if padding is None:
                assert torch.equal(torch.stack([image.padding for image in images]), expected), name
            else:
                assert all(image.padding is None for image in images), name
        assert torch.equal(kept[True], kept[False]), name
    vlm = vlmtools.wrap(model, letterboxing)
    assert torch.equal(torch.stack([image.padding for image in vlm.layout(inputs).images()]), expected)
    with pytest.raises(KeyError), torch.no_grad(), vlm.use(FastV(keep=14, layer=1, debias=Debias(trend=None))):
        raise KeyError("inside the block")
    assert not model.model.vision_tower._forward_pre_hooks


def test_visual_sinks_from_the_shared_detector_are_suppressed():
    """Plant a sink-dimension outlier (as on the first token of real LMs) on one visual token
    entering the drop layer: with sink suppression it is dropped (m = 0), without it is kept.
    tau = 5: with 64 dimensions a normalised magnitude can never reach the default 20."""
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    layout = vlm.layout(inputs)
    target = layout.visual_positions()[:, 5]
    first = torch.tensor([sample.first for sample in layout.samples])

    class Plant(vlmtools.LayerHook):
        def attach(self, vlm, plan):
            plan.layer(1, vlm.layers[1], self)

        def before_layer(self, index, hidden, kwargs):
            hidden = hidden.clone()
            rows = torch.arange(len(hidden))
            hidden[:, :, 7] = 0
            hidden[rows, first, 7] = 400.0
            hidden[rows, target, 7] = 400.0
            return hidden, kwargs

    kept = {}
    for sinks in (False, True):
        host = FastV(keep=15, layer=1, debias=Debias(trend=None, sinks=sinks, sink_settings={"tau": 5.0}))
        with torch.no_grad(), vlm.use(Plant(), host) as trace:
            model(**inputs)
        kept[sinks] = [int(t) in k.tolist() for t, k in zip(target, trace[host].kept_at(1))]
    assert kept[True] == [False, False]
    assert any(kept[False])


def test_calibration_on_2d_positions_reports_row_and_column_residuals(tmp_path):
    """Qwen2-VL (M-RoPE): prompts with different grids share one trend over the normalised index;
    the file keeps the residual per tenth of rows and columns to check the 1-D trend against."""
    from vlmtools.testing.vlm import tiny_qwen2_vl

    model, inputs = tiny_qwen2_vl()
    vlm = vlmtools.wrap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's residual may vary: the check is the point
        (trend,) = calibrate(vlm, FastV(keep=2, layer=1), [inputs], fit="cubic", directory=tmp_path, progress=False)
    assert trend.fit == "cubic" and trend.samples == 2
    assert len(trend.rows) == 4 and len(trend.columns) == 6  # tenths that the 2x3 and 4x4 grids reach
    assert (tmp_path / "qwen2_vl-h64-l3__fastv__L1.json").exists()


def test_a_host_reading_another_layer_than_its_default_has_its_own_trend_file():
    """PDrop ``rank="previous"`` and SparseVLM ``votes="previous"`` read the layer before each drop, their
    defaults the drop layer: another score, another trend. FastV's default is the layer before: no suffix."""
    vlm = vlmtools.wrap(tiny_llava()[0])
    keys = {host: host.calibration_key(vlm, 0) for host in (
        FastV(keep=2, layer=2), PDrop(keep=2, layers=(2,)), PDrop(keep=2, layers=(2,), rank="previous"),
        SparseVLM(keep=2, layers=(2,)), SparseVLM(keep=2, layers=(2,), votes="previous"))}
    assert list(keys.values()) == ["llava-h64-l3__fastv__L2", "llava-h64-l3__pdrop__L2",
                                   "llava-h64-l3__pdrop__L2__previous", "llava-h64-l3__sparsevlm__L2",
                                   "llava-h64-l3__sparsevlm__L2__previous"]


def test_calibration_leaves_padded_patches_out():
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    pixels = inputs["pixel_values"].clone()
    pixels[:, :, :16] = 0.0  # the top half of both images is letterbox padding
    padded = {**inputs, "pixel_values": pixels}
    (trend,) = calibrate(vlm, FastV(keep=4, layer=1), [padded], save=False, progress=False,
                         padding=lambda x: letterbox_padding(x["pixel_values"], patch=8))
    assert trend.rows and len(trend.rows) == 2  # only the real lower two patch rows contribute


def test_trends_are_kept_in_the_cache_never_in_the_package(tmp_path, monkeypatch):
    import pruning
    from pruning import calibration_path

    monkeypatch.delenv("PRUNING_CALIBRATION", raising=False)
    monkeypatch.setenv("VLMTOOLS_CACHE", str(tmp_path))
    assert calibration_path("m__fastv__L2") == tmp_path / "calibration" / "m__fastv__L2.json"
    monkeypatch.setenv("PRUNING_CALIBRATION", str(tmp_path / "mine"))
    assert calibration_path("m__fastv__L2") == tmp_path / "mine" / "m__fastv__L2.json"
    assert Path(pruning.__file__).parent not in calibration_path("m__fastv__L2").parents


# -- the trend fit and its 2-D residual check, against planted values ---------------------------------------

def _grid_sample(height, width):
    return SimpleNamespace(images=[SimpleNamespace(grid=(height, width))])


def _planted_entries(trend, height=24, width=24, rows=None, columns=None, samples=2):
    """Calibration entries whose raw scores are exactly ``trend(x) * rows[r] * columns[c]`` on an
    ``height x width`` grid (``x = i / (N - 1)``, ``i = r * width + c``)."""
    count = height * width
    x = torch.linspace(0, 1, count, dtype=torch.float64)
    index = torch.arange(count)
    factor = torch.ones(count, dtype=torch.float64)
    if rows is not None:
        factor *= torch.tensor(rows, dtype=torch.float64)[index // width]
    if columns is not None:
        factor *= torch.tensor(columns, dtype=torch.float64)[index % width]
    scores = trend(x) * factor
    return [(_grid_sample(height, width), index, scores, count) for _ in range(samples)], factor


def _tenths(factor, coordinate, size):
    """Mean of the planted factor (normalised by its mean) per tenth of rows or columns: what the residual must be."""
    normalised = factor / factor.mean()
    where = coordinate * 10 // size
    return [float(normalised[where == t].mean()) for t in range(10) if (where == t).any()]


@pytest.mark.parametrize("fit,planted,coef", [
    ("exponential", lambda x: torch.exp(-1.0 + 3.0 * x), [3.0, -1.0]),
    ("cubic", lambda x: 4 * x ** 3 - 3 * x ** 2 + 2 * x + 1, [4.0, -3.0, 2.0, 1.0]),
])
def test_the_fit_recovers_a_planted_trend_and_a_flat_residual(fit, planted, coef):
    from pruning.calibrate import fit_collected

    entries, _ = _planted_entries(planted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a flat residual raises no warning
        trend = fit_collected(entries, fit, key="m__planted__L2")
    assert trend.fit == fit and trend.samples == 2 and trend.key == "m__planted__L2"
    assert trend.coef == pytest.approx(coef, abs=1e-6)
    assert trend.rows == pytest.approx([1.0] * 10, abs=1e-6) and trend.columns == pytest.approx([1.0] * 10, abs=1e-6)


def test_prompts_of_different_sizes_share_one_trend_over_the_normalised_index():
    from pruning.calibrate import fit_collected

    planted = lambda x: torch.exp(0.5 + 2.0 * x)  # noqa: E731
    entries = _planted_entries(planted)[0][:1] + _planted_entries(planted, 12, 12)[0][:1]
    trend = fit_collected(entries)
    assert trend.coef == pytest.approx([2.0, 0.5], abs=2e-3)  # binned to the smaller prompt's 144 indices


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_a_planted_row_or_column_residual_is_reported_and_warned_about(axis):
    """Twice the score on the middle third of the rows (or columns), symmetric about the image's centre, so
    the least-squares slope over the index is untouched: the slope is the planted one, the residual per tenth
    is the planted factor over its mean (2 / (4/3) = 1.5 in the band, 0.75 outside) and the spread 2x warns."""
    from pruning.calibrate import fit_collected

    band = [2.0 if 8 <= i < 16 else 1.0 for i in range(24)]
    entries, factor = _planted_entries(lambda x: torch.exp(-1.0 + 3.0 * x), **{axis: band})
    with pytest.warns(UserWarning, match=r"m__planted__L8: the 1-D trend leaves a residual varying 2\.00x"):
        trend = fit_collected(entries, "exponential", key="m__planted__L8")
    assert trend.coef[0] == pytest.approx(3.0, abs=1e-6)
    index = torch.arange(24 * 24)
    assert trend.rows == pytest.approx(_tenths(factor, index // 24, 24), abs=1e-6)
    assert trend.columns == pytest.approx(_tenths(factor, index % 24, 24), abs=1e-6)
    other = trend.columns if axis == "rows" else trend.rows
    assert other == pytest.approx([1.0] * 10, abs=1e-6)
    assert max(getattr(trend, axis)) == pytest.approx(1.5) and min(getattr(trend, axis)) == pytest.approx(0.75)


@pytest.mark.parametrize("factor,warns", [(1.4, False), (1.6, True)])
def test_the_residual_warning_fires_above_one_and_a_half(factor, warns):
    from pruning.calibrate import RESIDUAL_WARNING, fit_collected

    assert RESIDUAL_WARNING == 1.5
    band = [factor if 8 <= i < 16 else 1.0 for i in range(24)]
    entries, _ = _planted_entries(lambda x: torch.exp(3.0 * x), columns=band)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_collected(entries, key="m__planted__L2")
    assert bool(caught) == warns


class _Planted(pruning_host.Host):
    """A host whose raw score is planted: ``exp(c + k x)`` times a factor per image row."""

    name = "planted"

    def __init__(self, slope, intercept, rows, **kwargs):
        super().__init__(1.0, (1,), **kwargs)
        self.slope, self.intercept, self.rows = slope, intercept, rows

    def score(self, run, stage, hidden, kept, layout, targets):
        values = []
        for sample in layout.samples:
            count = len(sample.visual_positions())
            width = sample.images[0].grid[1]
            x = torch.linspace(0, 1, count)
            values.append(torch.exp(self.intercept + self.slope * x) * torch.tensor(self.rows)[torch.arange(count) // width])
        return pruning_host.at_present(values, layout, kept)


def test_calibrate_collects_the_hosts_scores_and_fits_them():
    """End to end on a tiny LLaVA (two 4 x 4 images): the planted scores come back through the calibration run;
    the middle two rows doubled (symmetric: the slope stays) give rows 2/3, 4/3, 4/3, 2/3 and the warning."""
    model, inputs = tiny_llava()
    vlm = vlmtools.wrap(model)
    (flat,) = calibrate(vlm, _Planted(2.5, -0.5, [1.0] * 4), [inputs], save=False, progress=False)
    assert flat.coef == pytest.approx([2.5, -0.5], abs=1e-5) and flat.samples == 2
    assert flat.rows == pytest.approx([1.0] * 4, abs=1e-5) and flat.columns == pytest.approx([1.0] * 4, abs=1e-5)
    with pytest.warns(UserWarning, match=r"varying 2\.00x"):
        (banded,) = calibrate(vlm, _Planted(2.5, -0.5, [1.0, 2.0, 2.0, 1.0]), [inputs], save=False, progress=False)
    assert banded.coef[0] == pytest.approx(2.5, abs=1e-5)
    assert banded.rows == pytest.approx([2 / 3, 4 / 3, 4 / 3, 2 / 3], abs=1e-5)
    assert banded.columns == pytest.approx([1.0] * 4, abs=1e-5)
