"""Gemma 3, LLaVA-OneVision, InternVL and SmolVLM end to end on their tiny builders (left-padded batches of two):
the seam is the plain model, also after an exception; every pruning host runs or refuses with the adapter's
reason; a pruned forward equals the model run on the kept tokens alone (Gemma 3: with its bidirectional image
runs and sliding windows); cached decoding equals recomputation; each sample of a batch prunes as if alone;
VAR, GIFT and PAINT through ``generate``; the sink detector's report. The tests every family runs
(``BUILDERS``: test_adapters, test_pruning, test_bf16, test_kernels, the reference tests) cover the rest; these
are what the four add."""
import pytest
import torch

import vlmtools
from hallucination import GIFT, PAINT, VAR
from pruning import HOSTS, FasterVLM, FastV, PDrop, VisionZip
from tests.test_pruning import SPECIAL, frozen, make
from tests.test_seam import AddToLastRow
from vlmtools.adapters import UnsupportedModel
from vlmtools.sinks import SinkDetector
from vlmtools.testing.vlm import BUILDERS, IMAGE, VIDEO, tiny_llava_onevision

FAMILIES = ("gemma3", "llava_onevision", "internvl", "smolvlm")
CLS_HOSTS = ("visionzip", "fastervlm")
_MODELS = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = BUILDERS[family]()
    return _MODELS[family]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SPECIAL, **kwargs)


def language_model(model):
    return model.model.text_model if hasattr(model.model, "text_model") else model.model.language_model


# -- the seam ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_planned_is_the_plain_model_also_after_an_exception(family):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    plain = logits(model, inputs)
    with vlm.use():
        torch.testing.assert_close(logits(model, inputs), plain, atol=1e-5, rtol=0)
    with pytest.raises(KeyError), vlm.use(vlmtools.RecordRows(["text.0"]), AddToLastRow([3], 5.0)):
        edited = logits(model, inputs)
        raise KeyError("boom")
    assert (edited - plain).abs().max() > 1e-4  # the block did act
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not any(layer._forward_pre_hooks for layer in vlm.layers)
    torch.testing.assert_close(logits(model, inputs), plain, atol=1e-5, rtol=0)


def test_gemma3_rows_are_transformers_bidirectional_and_windowed_rows():
    """The seam's recorded rows on a sliding-window and a full-attention layer are eager attention's; an image
    token sees the later tokens of its own run, not the next run, and in a sliding layer nothing 12 or more
    tokens back (the window bounds the past only: transformers' ``sliding_window_overlay``)."""
    model, inputs = tiny("gemma3")
    vlm = vlmtools.wrap(model)
    assert model.config.text_config.layer_types[:2] == ["sliding_attention", "full_attention"]
    with torch.no_grad(), vlm.use(vlmtools.RecordRows(["text.0", "text.1"], "all")) as trace:
        model(**inputs)
    model.set_attn_implementation({"text_config": "eager"})
    try:
        eager = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    real = inputs["attention_mask"].bool()[:, None, :, None]
    for layer in (0, 1):
        (rows,) = trace[f"text.{layer}.rows"]
        torch.testing.assert_close(rows * real, eager[layer].detach() * real, atol=1e-5, rtol=0)
    first, second = vlm.layout(inputs).samples[0].images[:2]
    full = trace["text.1.rows"][0][0].mean(0)
    q = int(first.positions[0])
    assert (full[q, first.positions] > 0).all() and (full[q, second.positions] == 0).all()
    sliding = trace["text.0.rows"][0][0].mean(0)
    assert (sliding[q, first.positions] > 0).all()  # the window bounds the past only
    last = int(second.positions[-1])
    assert (sliding[last, :last - 11] == 0).all() and (sliding[last, last - 11:last + 1] > 0).all()


def test_gemma3_under_flash_attention_is_refused_at_wrap():
    model, _ = BUILDERS["gemma3"]()
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModel, match="_supports_flash_attn = False"):
        vlmtools.wrap(model)


# -- pruning -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_host_runs_within_its_budget_or_refuses_with_the_adapters_reason(family):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    layout = vlm.layout(inputs)
    for name in sorted(HOSTS):
        refusal = HOSTS[name].refusal(vlm)
        if name in CLS_HOSTS and family != "internvl":
            assert refusal and vlm.adapter.vision.no_cls in refusal and "no [CLS] token" in refusal, name
            with pytest.raises((ValueError, UnsupportedModel), match="no \\[CLS\\] token"), vlm.use(make(name, 4)):
                model(**inputs)
            continue
        assert refusal is None, name
        pruner = make(name, 4)
        with torch.no_grad(), vlm.use(pruner) as trace:
            out = model(**inputs).logits
        kept = trace[pruner].kept_at(vlm.num_layers - 1)
        for b, sample in enumerate(layout.samples):
            assert int(torch.isin(kept[b], sample.visual_positions()).sum()) >= 4, name
            assert set(sample.layout.tolist()) <= set(kept[b].tolist()), name  # layout tokens always kept
        assert out.shape[1] == kept.shape[1] < inputs["input_ids"].shape[1] and out.isfinite().all(), name


def kept_alone(model, family, inputs, start, tables, hidden, kept):
    """Layers ``start..`` run on the kept tokens alone with a mask built here: causal and padding; Gemma 3 also
    each image run both ways (``token_type_ids``) and, on its sliding layers, the window in original positions."""
    lm = language_model(model)
    take = lambda t: t.expand(len(kept), *t.shape[1:]).gather(  # noqa: E731
        1, kept.view(*kept.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
    real = inputs["attention_mask"].gather(1, kept).bool()
    visible = (kept[:, :, None] >= kept[:, None, :]) & real[:, None, :]
    config = model.config.get_text_config()
    if family == "gemma3":
        image = inputs["token_type_ids"].gather(1, kept) == 1
        run = torch.cumsum(image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1], 1)
        same = image[:, :, None] & image[:, None, :] & (run[:, :, None] == run[:, None, :])
        visible = visible | (same & real[:, None, :])
    h = take(hidden)
    for index, layer in enumerate(lm.layers[start:], start):
        mask = visible
        if family == "gemma3" and config.layer_types[index] == "sliding_attention":
            mask = visible & (kept[:, :, None] - kept[:, None, :] < config.sliding_window)  # the past only
        h = layer(h, attention_mask=mask[:, None], position_embeddings=tuple(take(t) for t in tables[index]),
                  position_ids=None)
    return model.lm_head(lm.norm(h)), real


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_forward_equals_the_kept_tokens_alone(family):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    start, tables, entering = 1, {}, {}

    def probe(index):
        def hook(module, args, kwargs):
            tables.setdefault(index, kwargs["position_embeddings"])
            if index == start:
                entering.setdefault("hidden", args[0] if args else kwargs["hidden_states"])
        return hook

    handles = [layer.register_forward_pre_hook(probe(i), with_kwargs=True) for i, layer in enumerate(vlm.layers)]
    try:
        logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    pruner = FastV(keep=4, layer=start)
    with torch.no_grad(), vlm.use(pruner) as trace:
        pruned = model(**inputs).logits
    kept = trace[pruner].kept_at(start)
    with torch.no_grad():  # outside the block: its hooks would drop again
        expected, real = kept_alone(model, family, inputs, start, tables, entering["hidden"], kept)
    assert pruned.shape[1] == kept.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(pruned[real], expected[real], atol=1e-5, rtol=0)


def recompute(model, inputs, replay, steps, scores):
    """Greedy decoding without cache under ``replay`` equals the cached scores."""
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    sequence, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for step in range(steps):
            out = model(input_ids=sequence, attention_mask=mask, use_cache=False,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **images).logits[:, -1]
            out[:, SPECIAL] = -float("inf")
            torch.testing.assert_close(out, scores[step], atol=1e-4, rtol=0)
            sequence = torch.cat([sequence, out.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return sequence


@pytest.mark.parametrize("family,host", [("gemma3", "pdrop_from_0"), ("internvl", "visionzip"),
                                         ("internvl", "fastervlm"), ("smolvlm", "pdrop")])
def test_cached_greedy_decoding_equals_recomputation(family, host):
    """Gemma 3 from layer 0 on: every sliding-window layer is pruned and decoding runs past the window (its cache
    keeps the kept keys, the decoding mask gathered with the window's offset); InternVL's [CLS] hosts."""
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    pruner = PDrop(keep=4, layers=(0, 2)) if host == "pdrop_from_0" else make(host, 4)
    with vlm.use(pruner) as trace:
        out = generate(model, inputs, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] > model.config.get_text_config().sliding_window if family == "gemma3" else True
    replay = make(host, 4) if host in CLS_HOSTS else frozen(pruner, trace[pruner], inputs["input_ids"].shape[1])
    with vlm.use(replay):
        sequence = recompute(model, inputs, replay, 3, out.scores)
    assert torch.equal(sequence, out.sequences)


def alone(family, inputs, b):
    """Sample ``b`` of the tiny batch as a batch of one, without its padding."""
    real = inputs["attention_mask"][b].bool()
    out = {key: inputs[key][b:b + 1, real] for key in ("input_ids", "attention_mask", "token_type_ids") if key in inputs}
    per_sample = [int((row == IMAGE).sum()) for row in inputs["input_ids"]]
    if family in ("gemma3", "internvl"):  # one pixel row per image / tile, sample after sample
        size = 16
        start = sum(per_sample[:b]) // size
        out["pixel_values"] = inputs["pixel_values"][start:start + per_sample[b] // size]
    else:  # one entry per sample
        for key in ("pixel_values", "image_sizes", "pixel_attention_mask"):
            if key in inputs:
                out[key] = inputs[key][b:b + 1]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_prunes_each_sample_as_if_alone(family):
    model, inputs = tiny(family)
    vlm = vlmtools.wrap(model)
    with torch.no_grad(), vlm.use(FastV(keep=5, layer=1)):
        batch = model(**inputs).logits[:, -1]
        for b in range(2):
            torch.testing.assert_close(model(**alone(family, inputs, b)).logits[0, -1], batch[b], atol=1e-5, rtol=0)


def test_internvl_cls_hosts_rank_each_tiles_cls_row_of_the_last_block():
    """FasterVLM keeps the tokens whose pixel-shuffle squares get the most [CLS] attention (head mean) at the
    last InternViT block, read here from the eager attention weights of a plain forward."""
    model, inputs = tiny("internvl")
    vlm = vlmtools.wrap(model)
    assert vlm.adapter.vision.cls_block(model) == model.config.vision_config.num_hidden_layers - 1
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            weights = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    cls = weights.mean(1)[:, 0, 1:].reshape(-1, 4, 2, 4, 2).mean((2, 4)).flatten()  # per tile, 2x2 squares
    host = FasterVLM(keep=6, positions="original")
    with torch.no_grad(), vlm.use(host) as trace:
        model(**inputs)
    layout = vlm.layout(inputs)
    start = 0
    for sample, kept in zip(layout.samples, trace[host].kept_at(0)):
        visual = sample.visual_positions()
        scores = cls[start:start + len(visual)]
        start += len(visual)
        expected = visual[scores.argsort(descending=True, stable=True)[:6]].sort().values
        assert torch.equal(kept[torch.isin(kept, visual)], expected)


# -- hallucination methods and sinks -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_var_gift_paint_run_through_generate_and_the_sink_report(family, monkeypatch):
    from vlmtools.testing import vlm as builders

    monkeypatch.setitem(builders._LLAMA, "num_hidden_layers", 5)  # VAR's layers 2 .. L-2; Gemma 3's full layers 1, 3
    model, inputs = BUILDERS[family]()
    vlm = vlmtools.wrap(model)
    plain = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
    for method in (VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3)), GIFT(alpha=5.0, saliency_layer=1, layers=[2, 3]),
                   PAINT()):
        with vlm.use(method) as trace:
            out = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
        change = (torch.stack(out.logits, 1) - torch.stack(plain.logits, 1)).abs().amax((0, 2))
        assert change.min() > 1e-6, (family, method)  # every step changes
    run = trace[method]
    assert run.settings["scores"] == ("CLS attention" if family == "internvl" else "mean attention received")
    assert run.local.any()
    report = SinkDetector(["positional", "sink_dims"]).detect(vlm, inputs)
    assert [f.token for f in report.findings if f.role == "first"] == [s.first for s in vlm.layout(inputs).samples]
    assert family in report.table() or report.table()


# -- OneVision videos ----------------------------------------------------------------------------------------------


def test_onevision_video_frames_are_images_of_the_layout_and_methods_run_on_them():
    model, inputs = tiny_llava_onevision(video=True)
    vlm = vlmtools.wrap(model)
    layout = vlm.layout(inputs)
    frames = [image for image in layout.samples[1].images if image.frame is not None]
    assert [f.frame for f in frames] == [(0, 0), (0, 1), (0, 2)] and all(f.grid == (2, 2) for f in frames)
    video = (inputs["input_ids"][1] == VIDEO).nonzero().squeeze(1)
    assert torch.equal(torch.cat([f.positions for f in frames] + [frames[-1].layout]), video)
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    newline = (features == model.model.image_newline).all(-1).nonzero().squeeze(1)
    assert newline.tolist() == [len(video) - 1]  # the layout token is where the model puts image_newline
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        generate(model, inputs)
    finally:
        handle.remove()
    assert [len(i) for i in vlm.layout(seen[0]).images()] == [len(i) for i in layout.images()]  # under generate
    paint = PAINT()
    with vlm.use(paint) as trace:
        generate(model, inputs)
    assert trace[paint].local[1, video].any()
    pruner = FastV(keep=6, layer=1)
    with torch.no_grad(), vlm.use(pruner) as trace:
        model(**inputs)
    assert int(torch.isin(trace[pruner].kept_at(1)[1], layout.samples[1].visual_positions()).sum()) >= 6


def test_onevision_tiles_are_read_back_from_features_when_one_tiling_fits():
    """Under generate the resized 5x5 grid alone fits 2x2 tiles of a square or 1x2 / 2x1 of a thin image; the
    tower's tile count settles it, and PAINT's values land as with image_sizes."""
    from vlmtools.adapters.llava_onevision import _packings, packing_of

    model, inputs = tiny("llava_onevision")
    config = model.config
    truth = [packing_of(config, size.tolist()) for size in inputs["image_sizes"]]
    grids = [image.tiles[1] for image in vlm_images(model, inputs)]
    assert _packings(config, grids, tile_count=2 + 2 + 4) == truth
    assert _packings(config, grids, tile_count=None)[0] == truth[0]  # the wide image's grid fits one tiling


def vlm_images(model, inputs):
    return vlmtools.wrap(model).layout(inputs).images()


def test_gemma3_compact_positions_take_each_layers_rotary_tables():
    """``positions="compact"`` recomputes the rotary tables of each layer type (Gemma 3's sliding and full layers
    use different bases) for the renumbered ids: those a layer gets are its own type's at those ids."""
    from vlmtools.drop import DropTokens

    model, inputs = tiny("gemma3")
    vlm = vlmtools.wrap(model)
    rotary = model.model.language_model.rotary_emb
    seen = {}

    def keep_half(state, hidden, kept):
        visual = [s.visual_positions() for s in state.layout.samples]
        count = min(len(v) for v in visual) // 2
        return torch.stack([row[~torch.isin(row, v[1::2][:count])] for row, v in zip(kept, visual)])

    def probe(index):
        def hook(module, args, kwargs):
            seen.setdefault(index, (kwargs["position_ids"], kwargs["position_embeddings"]))
        return hook

    with torch.no_grad(), vlm.use(DropTokens({1: keep_half}, positions="compact")):
        handles = [vlm.layers[i].register_forward_pre_hook(probe(i), with_kwargs=True) for i in (1, 2)]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    for index in (1, 2):
        ids, (cos, sin) = seen[index]
        kind = model.config.text_config.layer_types[index]
        expected = rotary(cos, ids, kind)
        torch.testing.assert_close(cos, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(sin, expected[1], atol=0, rtol=0)
        first = int(inputs["attention_mask"][0].argmin()) if not inputs["attention_mask"][0].all() else 0
        assert torch.equal(ids[0][first:], torch.arange(ids.shape[1] - first))  # consecutive from 0
    assert not torch.equal(seen[1][1][0], seen[2][1][0])  # full and sliding tables differ


def test_onevision_images_of_a_multi_image_prompt_are_base_views_and_one_newline():
    """With several images in one prompt (``batch_num_images`` > 1) the model packs each as its base view and one
    newline: the layout counts them so, and the newline is where the model puts ``image_newline``."""
    from transformers import LlavaOnevisionImageProcessor

    model, _ = tiny("llava_onevision")
    processor = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                             image_grid_pinpoints=model.config.image_grid_pinpoints)
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy() for h, w in ((16, 64), (64, 64))]
    pixels = processor(images=[images], return_tensors="pt")  # one prompt, two images
    ids = torch.tensor([[1, 2] + [IMAGE] * 17 + [3] + [IMAGE] * 17 + [4, 5]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels["pixel_values"],
              "image_sizes": pixels["image_sizes"], "batch_num_images": torch.tensor([2])}
    layout = vlmtools.wrap(model).layout(inputs)
    assert [(len(i), i.tiles, i.layout.tolist()) for i in layout.images()] == [(16, [], [18]), (16, [], [36])]
    with torch.no_grad():
        features = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"],
                                                  batch_num_images=torch.tensor([2])).pooler_output
    newline = model.model.image_newline
    assert [(f == newline).all(-1).nonzero().squeeze(1).tolist() for f in features] == [[16], [16]]
    host = FastV(keep=8, layer=1)
    with torch.no_grad(), vlmtools.wrap(model).use(host) as trace:  # the model takes the prompt; FastV prunes it
        model(**inputs)
    assert int(torch.isin(trace[host].kept_at(1)[0], layout.samples[0].visual_positions()).sum()) == 8
