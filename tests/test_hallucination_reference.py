"""VAR, GIFT and PAINT against references that never read the objects under test.

Each reference is written here from METHODS.md section 3: it runs an unwrapped copy of a tiny
LLaVA on a hand-written eager attention, finds by hand what the method decides at prefill
(VAR's sink tokens from the hidden states, GIFT's saliency from the attention rows, PAINT's
token sets from the vision encoder's attention), applies the method's edit by hand, row by row,
and gives the edited attention rows and logits. The method runs on the original model through
``vlm.use``; its edited rows (``RecordRows`` in the same block) and logits must equal the
reference's. Each reference also has to move attention (VAR on planted sink dimensions), and
swapping a method's edit for the identity must fail its check.
"""
import copy
import math

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import eager_mask

import vlmtools
from hallucination import GIFT, PAINT, VAR
from hallucination.gift import GIFTRun
from hallucination.paint import PAINTRun
from hallucination.var import VARRun
from vlmtools.testing import vlm as tiny

LAYERS = 5
IMAGE = tiny.IMAGE
ATOL = 2e-5


@pytest.fixture(autouse=True)
def shapes(monkeypatch):
    monkeypatch.setitem(tiny._LLAMA, "num_hidden_layers", LAYERS)  # VAR edits 2 .. L-2
    monkeypatch.setitem(tiny._CLIP, "num_hidden_layers", 3)  # PAINT: second-to-last vision layer != layer 0


# ---------------------------------------------------------------- the reference forward
def reference_forward(model, inputs, edit=None):
    """Logits of ``model`` with every text layer on a hand-written eager attention.

    ``edit(layer, z, hidden)`` gets the layer's pre-softmax scores ``z`` ``(B, H, L, L)`` (fp32,
    mask added) and the hidden states entering the layer, and returns the probabilities the
    layer uses. Returns the logits and, per layer, the rows before and after the edit.
    """
    rows, entering = {}, {}

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        z = (query.float() @ k.float().transpose(2, 3)) * scaling + attention_mask
        before = z.softmax(-1)
        after = before if edit is None else edit(module.layer_idx, z, entering[module.layer_idx])
        rows[module.layer_idx] = (before, after)
        return (after @ v.float()).to(query.dtype).transpose(1, 2).contiguous(), after

    def keep_input(index):
        def hook(module, args, kwargs):
            entering[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    AttentionInterface.register("reference_eager", attention)
    AttentionMaskInterface.register("reference_eager", eager_mask)
    model.set_attn_implementation({"text_config": "reference_eager"})
    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True)
               for i, layer in enumerate(model.model.language_model.layers)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, rows


def run_method(model, inputs, method, layers):
    """The method on ``model`` (wrapped): logits, the edited rows of ``layers`` and the run."""
    vlm = vlmtools.wrap(model)
    recorder = vlmtools.RecordRows([f"text.{layer}" for layer in layers], queries="all")
    with torch.no_grad(), vlm.use(method, recorder) as trace:
        logits = model(**inputs).logits
    return logits, {layer: trace[f"text.{layer}.rows"][0] for layer in layers}, trace[method]


def real_rows(inputs):
    """``(B, L)`` True on real (not padding) tokens."""
    return inputs["attention_mask"].bool()


def image_positions(inputs, b):
    return (inputs["input_ids"][b] == IMAGE).nonzero()[:, 0].tolist()


def text_after_image(inputs, b):
    """Without a tokenizer every real token after the image is a question (content) word."""
    return list(range(image_positions(inputs, b)[-1] + 1, inputs["input_ids"].shape[1]))


def assert_rows_match(got, want, inputs, layer, rows=None):
    """Post-edit rows of the real queries (``rows``: only those) on the real keys."""
    real = real_rows(inputs)
    for b in range(real.shape[0]):
        queries = real[b].nonzero()[:, 0] if rows is None else torch.tensor(rows[b])
        keys = real[b].nonzero()[:, 0]
        torch.testing.assert_close(got[b][:, queries][..., keys], want[b][:, queries][..., keys], atol=ATOL, rtol=0,
                                   msg=lambda m: f"layer {layer}, sample {b}: {m}")


def assert_logits_match(got, want, inputs):
    real = real_rows(inputs)
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- VAR
FEATURE, UNIT, DIMS = 3, 5, (10, 40)
SINK_PATCHES = {0: [2, 9], 1: [5]}  # image -> patches made visual sinks
TAU = 4.5  # a 64-wide LM: |h_d| / rms(h) <= 8; the planted tokens reach ~5.7, the others stay under ~3.5


def planted_llava():
    """A tiny LLaVA whose layer-1 MLP writes +-C into dims 10 and 40 of the first token (BOS) and
    of chosen visual tokens: those tokens have sink dimensions in every layer from 2 on.

    Dim 3 is a private feature: only the BOS embedding and the chosen patches' projected
    features have it (a hook on the projector writes it there and clears it elsewhere), and
    no layer writes into it, so one MLP unit (gate = up = dim 3) fires on those tokens alone.
    """
    model, inputs = tiny.tiny_llava()
    with torch.no_grad():
        embed = model.model.language_model.embed_tokens.weight
        embed[:, FEATURE] = 0
        embed[1, FEATURE] = 1.0
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight[FEATURE] = 0
            layer.mlp.down_proj.weight[FEATURE] = 0
        mlp = model.model.language_model.layers[1].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[UNIT] = 0
            proj.weight[UNIT, FEATURE] = 10
        mlp.down_proj.weight[:, UNIT] = 0
        mlp.down_proj.weight[DIMS[0], UNIT] = 10
        mlp.down_proj.weight[DIMS[1], UNIT] = -10

    def mark(module, args, output):
        output = output.clone()
        output[..., FEATURE] = 0
        for image, patches in SINK_PATCHES.items():
            output[image, patches, FEATURE] = 10 * output[image, patches].pow(2).mean(-1).sqrt()
        return output

    model.model.multi_modal_projector.register_forward_hook(mark)
    return model, inputs


def var_reference(inputs, var_settings):
    """VAR's edit, by hand: ``edit(layer, z, hidden)`` for :func:`reference_forward`."""
    rho, moved, min_image, layers, released = (var_settings[k] for k in ("rho", "moved", "min_image", "layers",
                                                                         "released"))
    real = real_rows(inputs)
    batch = real.shape[0]
    visual = [set(image_positions(inputs, b)) for b in range(batch)]
    after_image = [max(visual[b]) for b in range(batch)]
    found = {}

    def edit(layer, z, hidden):
        probs = z.softmax(-1)
        if layer not in layers:
            return probs
        h = hidden.float()
        phi = (h[..., list(DIMS)].abs() / h.pow(2).mean(-1, keepdim=True).sqrt()).amax(-1)  # (B, L)
        out = probs.clone()
        for b in range(batch):
            above = [t for t in range(z.shape[-1]) if real[b, t] and phi[b, t] > TAU]
            sinks = [t for t in above if t in visual[b]]
            text = [t for t in above if t not in visual[b]] if released else []
            rest = [t for t in sorted(visual[b]) if t not in sinks]
            found[layer, b] = sinks
            for head in range(z.shape[1]):
                for i in range(after_image[b] + 1, z.shape[2]):
                    row = probs[b, head, i]
                    image = float(row[sorted(visual[b])].sum())
                    sink = float(row[sinks].sum()) if sinks else 0.0
                    if released:
                        centric = bool(sinks) and sink <= rho * image
                    else:
                        centric = image - sink >= rho * image
                    if image < min_image or not centric or image - sink <= 0:
                        continue
                    freed = moved * (sink + (float(row[text].sum()) if text else 0.0))
                    new = row.clone()
                    new[sinks + text] = row[sinks + text] * (1 - moved)
                    new[rest] = row[rest] + freed * row[rest] / (image - sink)
                    out[b, head, i] = new
        return out

    return edit, found


def check_var(variant):
    """VAR on the planted model against :func:`var_reference`; returns what the check saw."""
    model, inputs = planted_llava()
    twin = copy.deepcopy(model)
    var = VAR(rho=0.5, p=0.6, tau=TAU, variant=variant)
    edited = list(range(2, LAYERS - 1 if variant == "paper" else LAYERS))
    settings = {"rho": 0.5, "moved": 0.6 if variant == "paper" else 0.4, "min_image": 0.2, "layers": edited,
                "released": variant == "released"}
    got, rows, run = run_method(model, inputs, var, list(range(2, LAYERS)))
    edit, found = var_reference(inputs, settings)
    want, reference = reference_forward(twin, inputs, edit)
    for layer in range(2, LAYERS):
        before, after = reference[layer]
        torch.testing.assert_close(after.sum(-1), before.sum(-1), atol=1e-6, rtol=0)  # row sums unchanged
        moves = (after - before).abs().amax()
        assert (moves > 1e-3) if layer in edited else (moves == 0), (layer, float(moves))
        assert_rows_match(rows[layer], after, inputs, layer)
    assert_logits_match(got, want, inputs)
    return run, found, inputs


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_var_moves_attention_off_planted_sinks_as_the_reference(variant):
    run, found, inputs = check_var(variant)
    assert run.settings["dims"] == list(DIMS) and run.settings["status"] == "sinks found"
    for b, patches in enumerate(SINK_PATCHES.values()):
        want = [image_positions(inputs, b)[p] for p in patches]
        assert all(found[layer, b] == want == run.sinks[layer][b].tolist() for layer in run.layers)
    if variant == "released":
        first = [int(real_rows(inputs)[b].nonzero()[0]) for b in range(2)]
        assert all(run.text_sinks[2][b].tolist() == [first[b]] for b in range(2))  # BOS is a sink too


def test_var_discovers_planted_dims_once_and_caches_them(tmp_path):
    model, inputs = planted_llava()
    model.config._name_or_path = "models/tiny-planted-llava"
    vlm = vlmtools.wrap(model)
    var = VAR(tau=TAU, directory=tmp_path)
    with torch.no_grad(), vlm.use(var) as trace:
        model(**inputs)
    settings = trace[var].settings
    path = tmp_path / f"tiny-planted-llava__sink_dims__tau{TAU:g}.json"
    assert settings["dims"] == list(DIMS) and settings["dims_source"] == "discovered"
    assert settings["dims_discovery"]["file"] == str(path) and settings["dims_discovery"]["layers"] == [2, 3, 4]
    assert settings["dims_discovery"]["first_tokens"] == [1] and path.exists()
    with torch.no_grad(), vlm.use(var) as trace:
        model(**inputs)
    assert trace[var].settings["dims_source"] == "cached" and trace[var].settings["dims"] == list(DIMS)


# ---------------------------------------------------------------- GIFT
def top_half(values):
    keep = max(1, len(values) // 2)
    return set(sorted(range(len(values)), key=lambda h: -values[h])[:keep])


def gift_saliency(rows, inputs, candidates, alpha):
    """Per sample: the chosen layer, the saliency map over its visual tokens and ``F = exp(alpha S)``,
    from the plain (unedited) rows of the candidate layers."""
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        visual, question = image_positions(inputs, b), text_after_image(inputs, b)
        best = None
        for layer in candidates:
            attn = rows[layer][0][b]  # (H, L, L) before any edit
            shift = [[sum(max(float(attn[h, i, j] - attn[h, i - 1, j]), 0.0) for i in question) for j in visual]
                     for h in range(attn.shape[0])]
            totals = [sum(s) for s in shift]
            kept = top_half(totals)
            saliency = [sum(shift[h][k] for h in kept) / len(kept) for k in range(len(visual))]
            if best is None or sum(totals) > best[1]:
                best = (layer, sum(totals), saliency)
        layer, _, saliency = best
        mean = sum(saliency) / len(saliency)
        sd = math.sqrt(sum((s - mean) ** 2 for s in saliency) / len(saliency))
        clamped = [min(max(s, mean - 3 * sd), mean + 3 * sd) for s in saliency]
        low, high = min(clamped), max(clamped)
        scaled = [(s - low) / (high - low) if high > low else 0.0 for s in clamped]
        out.append((layer, dict(zip(visual, saliency)), dict(zip(visual, (math.exp(alpha * s) for s in scaled)))))
    return out


def gift_reference(inputs, found, layers):
    """GIFT's enhancement of the last query row, by hand."""

    def edit(layer, z, hidden):
        probs = z.softmax(-1)
        if layer not in layers:
            return probs
        out = probs.clone()
        last = z.shape[2] - 1
        for b, (_, _, factor) in enumerate(found):
            visual, question = image_positions(inputs, b), text_after_image(inputs, b)
            rows = probs[b, :, last]
            image = [float(rows[h, visual].sum()) for h in range(z.shape[1])]
            asked = [float(rows[h, question].sum()) for h in range(z.shape[1])]
            on_image, on_question = top_half(image), top_half(asked)
            for h in range(z.shape[1]):
                new = rows[h].clone()
                ratio = sum(float(rows[h, j]) * factor[j] for j in visual) / image[h]
                if h in on_image:
                    for j in visual:
                        new[j] = new[j] * factor[j]
                if h in on_question:
                    new[question] = new[question] * ratio
                out[b, h, last] = new / new.sum()
        return out

    return edit


GIFT_CASES = {
    "auto": dict(alpha=5.0, saliency_layer="auto", layers=[2, 3]),  # every layer, a second prefill
    "fixed_before": dict(alpha=5.0, saliency_layer=1, layers=[2, 3]),  # read causally in the prefill
    "fixed_inside": dict(alpha=4.0, saliency_layer=1, layers=[0, 1, 2, 3]),  # as the Qwen2-VL-7B preset: a second prefill
}


def check_gift(case):
    model, inputs = tiny.tiny_llava()
    twin = copy.deepcopy(model)
    settings = GIFT_CASES[case]
    gift = GIFT(**settings)
    got, rows, run = run_method(model, inputs, gift, settings["layers"])
    _, plain = reference_forward(twin, inputs)
    candidates = range(LAYERS) if settings["saliency_layer"] == "auto" else [settings["saliency_layer"]]
    found = gift_saliency(plain, inputs, candidates, settings["alpha"])
    want, reference = reference_forward(twin, inputs, gift_reference(inputs, found, settings["layers"]))
    last = [[inputs["input_ids"].shape[1] - 1]] * 2
    for layer in settings["layers"]:
        before, after = reference[layer]
        assert (after - before)[:, :, -1].abs().amax() > 1e-3, layer
        assert_rows_match(rows[layer], after, inputs, layer, rows=last)
    assert_logits_match(got, want, inputs)
    return run, found


@pytest.mark.parametrize("case", list(GIFT_CASES))
def test_gift_saliency_and_enhancement_match_the_reference(case):
    run, found = check_gift(case)
    assert run.settings["chosen_layer"] == [layer for layer, _, _ in found]
    assert run.settings["second_prefill"] == (case != "fixed_before")
    for b, (_, saliency, factor) in enumerate(found):
        positions = list(saliency)
        torch.testing.assert_close(run.saliency[b, positions], torch.tensor([saliency[j] for j in positions]),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(run.factor[b, positions], torch.tensor([factor[j] for j in positions]),
                                   atol=0, rtol=1e-4)


def test_gift_second_prefill_needs_one_mask_for_every_layer(monkeypatch):
    """Sliding-window layers share layer 0's mask while the prompt fits the window; other kinds refuse."""
    model, inputs = tiny.tiny_llava()
    vlm = vlmtools.wrap(model)
    text = model.config.get_text_config()
    monkeypatch.setattr(text, "layer_types", ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
                        raising=False)
    monkeypatch.setattr(text, "sliding_window", inputs["input_ids"].shape[1], raising=False)
    gift = GIFT(layers=[2, 3])
    with torch.no_grad(), vlm.use(gift) as trace:
        model(**inputs)
    assert trace[gift].settings["second_prefill"] and trace[gift].factor is not None
    monkeypatch.setattr(text, "sliding_window", inputs["input_ids"].shape[1] - 1)
    with pytest.raises(ValueError, match="longer than the sliding window"), torch.no_grad(), vlm.use(GIFT(layers=[2])):
        model(**inputs)
    monkeypatch.setattr(text, "layer_types", ["linear_attention"] + ["full_attention"] * 4)
    with pytest.raises(ValueError, match="mixes attention types"):
        GIFT(layers=[2]).attach(vlm, vlmtools.Plan())
    assert not GIFT(saliency_layer=1, layers=[2]).attach(vlm, vlmtools.Plan()).second_prefill  # read causally


# ---------------------------------------------------------------- PAINT
def quantile(values, q):
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    at = (len(ordered) - 1) * q
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def paint_sets(twin, inputs, top=0.25, whisker=1.5):
    """Local and summary LM positions per sample, from the copy's eager vision attention by hand."""
    tower = twin.model.vision_tower
    twin.set_attn_implementation({"vision_config": "eager"})
    with torch.no_grad():
        attentions = tower(inputs["pixel_values"], output_attentions=True).attentions
    twin.set_attn_implementation({"vision_config": "sdpa"})
    first, penultimate = (attentions[i][:, :, 0, 1:].mean(1) for i in (0, len(attentions) - 2))  # CLS rows
    local, summary = [], []
    for b in range(first.shape[0]):  # one image per sample
        positions = image_positions(inputs, b)
        scores0, scores1 = first[b].tolist(), penultimate[b].tolist()
        q1, q3 = quantile(scores1, 0.25), quantile(scores1, 0.75)
        outliers = {k for k, s in enumerate(scores1) if s > q3 + whisker * (q3 - q1)}
        ranked = sorted(range(len(scores0)), key=lambda k: -scores0[k])[: math.ceil(top * len(scores0))]
        local.append([positions[k] for k in sorted(set(ranked) - outliers)])
        summary.append([positions[k] for k in sorted(outliers)])
    return local, summary


SUMMARY_PATCH, PRIVATE = 5, 7


def outlier_patch(model):
    """Make patch 5 of every image an outlier of [CLS] attention at vision layer 1 (the second-to-last).

    Dim 7 is private to patch 5's position embedding (nothing else writes it before layer 1),
    so after layer 1's LayerNorm only patch 5 carries it; layer 1's keys read it along ``u`` and
    every query gets ``u`` as a bias: all queries, the [CLS] query among them, look at patch 5.
    """
    tower = model.model.vision_tower
    with torch.no_grad():
        tower.embeddings.patch_embedding.weight[PRIVATE] = 0
        tower.embeddings.class_embedding[PRIVATE] = 0
        tower.embeddings.position_embedding.weight[:, PRIVATE] = 0
        tower.embeddings.position_embedding.weight[1 + SUMMARY_PATCH, PRIVATE] = 10.0
        first = tower.encoder.layers[0]
        for linear in (first.self_attn.out_proj, first.mlp.fc2):
            linear.weight[PRIVATE] = 0
            linear.bias[PRIVATE] = 0
        attention = tower.encoder.layers[1].self_attn
        u = torch.randn(attention.q_proj.out_features, generator=torch.Generator().manual_seed(0))
        u = 3 * u / u.norm()
        attention.q_proj.bias += u
        attention.k_proj.weight[:, PRIVATE] += u


def paint_reference(inputs, local, summary, alpha, beta, modulate, layers):
    """PAINT's boost of the last query row's scores, by hand."""

    def edit(layer, z, hidden):
        if layer not in layers:
            return z.softmax(-1)
        z = z.clone()
        last = z.shape[2] - 1
        for b in range(z.shape[0]):
            visual = image_positions(inputs, b)
            mass = [float(z[b, h, last].softmax(-1)[visual].sum()) for h in range(z.shape[1])]
            for h in range(z.shape[1]):
                a = alpha * (mass[h] / (sum(mass) / len(mass)) if modulate else 1.0)
                for j in local[b]:
                    z[b, h, last, j] = z[b, h, last, j] + a * abs(float(z[b, h, last, j]))
                for j in summary[b]:
                    z[b, h, last, j] = z[b, h, last, j] + beta * abs(float(z[b, h, last, j]))
        return z.softmax(-1)

    return edit


def check_paint(modulate):
    model, inputs = tiny.tiny_llava()
    outlier_patch(model)
    twin = copy.deepcopy(model)
    paint = PAINT(alpha=0.7, beta=0.4, head_modulation=modulate)
    layers = list(range(2, LAYERS))
    got, rows, run = run_method(model, inputs, paint, layers)
    local, summary = paint_sets(twin, inputs)
    want, reference = reference_forward(twin, inputs, paint_reference(inputs, local, summary, 0.7, 0.4, modulate,
                                                                      layers))
    last = [[inputs["input_ids"].shape[1] - 1]] * 2
    for layer in layers:
        before, after = reference[layer]
        assert (after - before)[:, :, -1].abs().amax() > 1e-3, layer
        assert_rows_match(rows[layer], after, inputs, layer, rows=last)
    assert_logits_match(got, want, inputs)
    return run, local, summary, inputs


@pytest.mark.parametrize("modulate", [False, True])
def test_paint_token_sets_and_boost_match_the_reference(modulate):
    run, local, summary, inputs = check_paint(modulate)
    assert all(local) and run.settings["vision_sites"] == ["vision.0", "vision.1"]
    assert summary == [[image_positions(inputs, b)[SUMMARY_PATCH]] for b in range(2)]  # beta is exercised
    for b in range(2):
        assert run.local[b].nonzero()[:, 0].tolist() == local[b]
        assert run.summary[b].nonzero()[:, 0].tolist() == summary[b]


# ---------------------------------------------------------------- the checks can fail
IDENTITY = {
    "var": (VARRun, "edit_probs", lambda: check_var("paper")),
    "gift": (GIFTRun, "edit_probs", lambda: check_gift("auto")),
    "paint": (PAINTRun, "edit_logits", lambda: check_paint(False)),
}


@pytest.mark.parametrize("method", list(IDENTITY))
def test_reference_checks_fail_when_the_edit_is_the_identity(method, monkeypatch):
    cls, name, check = IDENTITY[method]
    monkeypatch.setattr(cls, name, lambda self, call, rows, tensor: tensor)
    with pytest.raises(AssertionError, match="not close"):
        check()
