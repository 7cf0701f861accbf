"""Sink detector: every criterion on planted tensors (with near misses), discovery of
planted massive dimensions in an edited tiny Llama, and detect() through the seam."""

import json
import math
import types

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

import vlmtools
from vlmtools.testing.dit import GRID, TEXT, tiny_flux
from vlmtools.layout import ImageTokens, SampleLayout, Span, TokenLayout
from vlmtools.record import RecordHidden
from vlmtools_app import sinks as command
from vlmtools.sinks import (
    PUBLISHED_SINK_DIMS,
    ColumnMassSink,
    GlobalSink,
    MassiveActivation,
    PrimaryCosine,
    SinkDetector,
    SinkDimensions,
    SinkReport,
    ValueDrain,
    model_signature,
    model_sink_dims,
    visual_sink_positions,
)
from vlmtools.sinks.dims import first_token_states, sink_dims_path
from vlmtools.testing.vlm import BUILDERS


def tokens(report, criterion):
    return sorted({(f.sample, f.token) for f in report.sinks(criterion)})


def test_positional_skips_left_padding():
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    report = SinkDetector(["positional"]).detect_tensors(hidden=[torch.zeros(2, 8, 4)], attention_mask=mask)
    assert tokens(report, "positional") == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (1, 4), (1, 5)]
    assert report.sinks("positional", sample=1)[0].role == "first"


def causal_rows(length: int, planted: dict[int, float]) -> torch.Tensor:
    """Causal attention in which each row gives ``planted[k]`` to key k and spreads the rest evenly."""
    attn = torch.zeros(length, length)
    for i in range(length):
        fixed = {k: share for k, share in planted.items() if k <= i}
        free = [k for k in range(i + 1) if k not in fixed]
        for k, share in fixed.items():
            attn[i, k] = share
        attn[i, free] = (1 - sum(fixed.values())) / max(len(free), 1)
        attn[i] /= attn[i].sum()
    return attn


def test_column_mass_fires_on_uniform_mass_not_on_one_query():
    length = 16
    head0 = causal_rows(length, {0: 0.5, 3: 0.29})  # key 3: threshold just not reached
    head1 = causal_rows(length, {})
    head1[-1] = 0.1 / (length - 1)
    head1[-1, 5] = 0.9  # key 5: one query gives it 0.9, the column's mean stays low
    attn = torch.stack([head0, head1])[None]
    report = SinkDetector([ColumnMassSink()]).detect_tensors(attn=[attn])
    assert [(f.token, f.head) for f in report.sinks("column_mass")] == [(0, 0)]
    finding = report.sinks("column_mass")[0]
    assert finding.score == pytest.approx((1 + 0.5 * (length - 1)) / length)
    assert report.summary()[0]["score"] == pytest.approx(0.5)  # one of the two layer-heads
    assert report.sinks("column_mass")[0].role == "first"


def test_massive_activation_needs_both_thresholds():
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, 64)  # median |h| ~ 0.67
    hidden[0, 2, 7] = 2000.0
    hidden[0, 4, 9] = 500.0  # > 100 but < 1000 x median
    quiet = torch.randn(1, 6, 64) * 0.01
    quiet[0, 3, 1] = 90.0  # > 1000 x median but < 100
    report = SinkDetector([MassiveActivation()]).detect_tensors(hidden=[hidden, quiet])
    [finding] = report.sinks("massive")
    assert (finding.token, finding.layer, finding.dims, finding.score) == (2, 0, (7,), 2000.0)


def plant(vector: torch.Tensor, phis: dict[int, float]) -> torch.Tensor:
    """Set ``vector[d]`` so that ``|v[d]| / rms(v) == phis[d]`` exactly."""
    vector = vector.clone()
    vector[list(phis)] = 0
    rms = (vector.pow(2).sum() / (vector.numel() - sum(p**2 for p in phis.values()))).sqrt()
    for dim, phi in phis.items():
        vector[dim] = phi * rms
    return vector


def test_sink_dimensions_threshold_and_discovery():
    torch.manual_seed(0)
    num_layers, length, size = 6, 8, 4096
    hidden = [torch.randn(1, length, size) for _ in range(num_layers)]
    for layer in range(2, num_layers):
        hidden[layer][0, 0] = plant(hidden[layer][0, 0], {5: 30, 9: 25})  # the first token: D = {5, 9}
        hidden[layer][0, 3] = plant(hidden[layer][0, 3], {9: 21})  # a sink
        hidden[layer][0, 6] = plant(hidden[layer][0, 6], {5: 19.5})  # near miss: phi just below tau
    hidden[3][0, 0] = plant(hidden[3][0, 0], {5: 30, 9: 25, 11: 40})  # extreme in 1 of 4 layers only
    report = SinkDetector([SinkDimensions()]).detect_tensors(hidden=hidden)
    assert report.settings[0]["dims"] == [5, 9] and report.settings[0]["dims_source"] == "discovered"
    assert tokens(report, "sink_dims") == [(0, 0), (0, 3)]
    assert {f.layer for f in report.sinks("sink_dims")} == {2, 3, 4, 5}  # layers 2 .. L-1
    assert report.sinks("sink_dims", layer=2)[1].score == pytest.approx(21, rel=1e-4)
    assert report.sinks("sink_dims", layer=2)[1].dims == (9,)
    given = SinkDetector([SinkDimensions(dims=(11,))]).detect_tensors(hidden=hidden)
    assert tokens(given, "sink_dims") == [(0, 0)] and given.settings[0]["dims_source"] == "given"


def test_published_table_is_keyed_by_model_signature():
    text = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008)
    config = LlavaConfig(text_config=text, vision_config=CLIPVisionConfig())
    assert model_signature(config) == ("llama", 4096, 32, 11008)
    assert PUBLISHED_SINK_DIMS[model_signature(config)] == (1415, 2533)
    assert all(isinstance(d, int) for dims in PUBLISHED_SINK_DIMS.values() for d in dims)
    hidden = [torch.randn(1, 4, 4096) for _ in range(3)]
    report = SinkDetector(["sink_dims"]).detect_tensors(hidden=hidden, signature=model_signature(config))
    assert report.settings[0]["dims"] == [1415, 2533] and report.settings[0]["dims_source"] == "published"


def aligned(direction: torch.Tensor, cos: float, norm: float) -> torch.Tensor:
    other = torch.randn_like(direction)
    other -= (other @ direction) * direction
    return norm * (cos * direction + math.sqrt(1 - cos**2) * other / other.norm())


def test_primary_cosine_lifetime_classes():
    torch.manual_seed(0)
    num_layers, length, size = 24, 8, 32  # primary: >= 9 layers, secondary: 5 .. 8, short: < 5
    direction = torch.zeros(size)
    direction[0] = 1
    hidden = []
    for layer in range(num_layers):
        h = torch.randn(1, length, size)
        h[0, 0] = 50 * direction if layer < 22 else h[0, 1]  # norm raised except in the last two layers
        if 4 <= layer <= 10 or layer >= 22:
            h[0, 3] = aligned(direction, 0.95, 5)  # 7 counted layers: secondary
        if layer in (12, 13):
            h[0, 5] = aligned(direction, -0.95, 5)  # |cos|, 2 layers: short
        h[0, 6] = aligned(direction, 0.85, 5)  # near miss in every layer
        hidden.append(h)
    report = SinkDetector([PrimaryCosine()]).detect_tensors(hidden=hidden)
    labels = {f.token: f.label for f in report.sinks("primary_cosine")}
    assert labels == {0: "primary", 3: "secondary", 5: "short"}
    assert len(report.sinks("primary_cosine", layer=22)) == 0


def test_value_drain_ratio():
    norms = torch.ones(1, 2, 8)
    norms[0, 0, 0] = 0.05
    norms[0, 1, 2] = 0.11  # near miss
    report = SinkDetector([ValueDrain()]).detect_tensors(values=[norms])
    [finding] = report.sinks("value_drain")
    assert (finding.token, finding.head, finding.score) == (0, 0, pytest.approx(0.05))
    vectors = torch.ones(1, 2, 8, 4)  # vectors are reduced to their norms
    vectors[0, 1, 4] = 0.01
    assert tokens(SinkDetector(["value_drain"]).detect_tensors(values=[vectors]), "value_drain") == [(0, 4)]


def test_global_sink_needs_high_and_even_attention():
    text, image = 4, 16
    queries = keys = text + image
    attn = torch.zeros(queries, keys)
    for i in range(queries):
        planted = {1: 0.4, 12: 0.08}  # key 1: every query, evenly; key 12: even but only ~2.6x the median
        if text <= i < text + 4:
            planted[9] = 0.5  # four image queries only: high mean, uneven map
        attn[i] = (1 - sum(planted.values())) / (keys - len(planted))
        attn[i, list(planted)] = torch.tensor(list(planted.values()))
    attn = attn[None, None].expand(1, 2, queries, keys)
    report = SinkDetector([GlobalSink()]).detect_tensors(
        joint_attention=[attn], image_queries=torch.arange(text, queries)
    )
    assert tokens(report, "global_sink") == [(0, 1)]
    ratio = report.scores["global_sink"][0, 0]
    assert ratio[9] > 5 and 2 < ratio[12] < 5
    with pytest.raises(ValueError, match="image_queries"):
        SinkDetector([GlobalSink()]).detect_tensors(joint_attention=[attn])


def test_detect_on_flux_streams_what_full_maps_give():
    model, inputs = tiny_flux()
    dit = vlmtools.wrap(model)
    detector = SinkDetector([GlobalSink(ratio=1.2, max_cv=1.0)])
    report = detector.detect(dit, inputs)
    names = [site.name for site in dit.sites]
    with torch.no_grad(), dit.use(vlmtools.RecordRows(names, "all")) as trace:
        model(**inputs)
    maps = [torch.cat(trace[f"{name}.rows"], 2) for name in names]
    full = detector.detect_tensors(joint_attention=maps, layout=dit.layout(TEXT, GRID))
    torch.testing.assert_close(report.scores["global_sink"], full.scores["global_sink"])
    assert report.findings and [(f.sample, f.layer, f.token) for f in report.findings] == [
        (f.sample, f.layer, f.token) for f in full.findings
    ]
    assert report.layer_names == names
    image = [f for f in report.findings if f.role == "visual"]
    assert all(TEXT + f.row * GRID[1] + f.col == f.token for f in image)
    assert {f.role for f in report.findings} <= {"first", "text", "visual"}


def edited_llama():
    """A tiny Llama whose layer-1 MLP writes +-1500 into dims 100 and 900 of tokens 1 and 7.

    Dim 3 is a private feature: only those tokens' embeddings have it and no layer
    writes into it, so one MLP unit (gate = up = dim 3) fires on them alone.
    """
    torch.manual_seed(0)
    feature, unit, dims = 3, 5, (100, 900)
    config = LlamaConfig(
        hidden_size=1536,
        intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=16,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, feature] = 0
        embed[1] = embed[7] = torch.nn.functional.one_hot(torch.tensor(feature), 1536).float()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[feature] = 0
            layer.mlp.down_proj.weight[feature] = 0
        mlp = model.model.layers[1].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[unit] = 0
            proj.weight[unit, feature] = 10
        mlp.down_proj.weight[:, unit] = 0
        mlp.down_proj.weight[dims[0], unit] = 10
        mlp.down_proj.weight[dims[1], unit] = -10
    return model, dims


def test_discovery_finds_planted_dims_in_edited_llama():
    model, dims = edited_llama()
    ids = torch.tensor([[1, 2, 3, 4, 7, 5, 6, 8]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[:-1]
    detector = SinkDetector(["massive", "sink_dims"])
    report = detector.detect_tensors(hidden=hidden, signature=model_signature(model.config))
    settings = report.settings[1]
    assert settings["dims_source"] == "discovered" and tuple(settings["dims"]) == dims
    assert tokens(report, "sink_dims") == [(0, 0), (0, 4)]
    assert {f.dims for f in report.sinks("massive")} == {dims}
    assert {f.layer for f in report.sinks("massive")} == {2, 3, 4}
    # the question VAR asks: positions 3..6 are an image here, token 4 is its sink
    image = ImageTokens(positions=torch.arange(3, 7), grid=(2, 2), span=Span(3, 7))
    layout = TokenLayout(
        [SampleLayout(8, [image], Span(7, 8), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0)],
        8,
        8,
    )
    [sinks] = visual_sink_positions(hidden, layout)
    assert sinks.tolist() == [4]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_one_token_forward_gives_every_prompts_first_token_states(family):
    """What makes VAR's discovery one per model: causal attention gives a prompt's first token the
    states of that token alone, whatever follows it (images, padding, M-RoPE)."""
    model, inputs = BUILDERS[family]()
    vlm = vlmtools.wrap(model)
    samples = vlm.layout(inputs).samples
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    first = torch.tensor([int(inputs["input_ids"][b, s.first]) for b, s in enumerate(samples)])
    states = first_token_states(vlm, first)
    assert len(states) == vlm.num_layers
    for layer, state in enumerate(states):
        want = torch.stack([hidden[layer][b, s.first] for b, s in enumerate(samples)])
        torch.testing.assert_close(state, want, atol=1e-5, rtol=1e-5)


def test_model_sink_dims_are_cached_per_model_and_tau(tmp_path):
    model, dims = edited_llama()
    vlm = types.SimpleNamespace(model=model, adapter=types.SimpleNamespace(text_layers="model.layers"),
                                num_layers=5, family="llama")
    first = torch.tensor([1])
    assert model_sink_dims(vlm, first, directory=tmp_path).path is None  # a model built in memory: not cached
    model.config._name_or_path = "checkpoints/edited-llama"
    found = model_sink_dims(vlm, first, directory=tmp_path)
    path = sink_dims_path(vlm, 20.0, tmp_path)
    assert tuple(found.dims) == dims and found.source == "discovered" and found.path == str(path)
    assert path.name == "edited-llama__sink_dims__tau20.json" and found.layers == [2, 3, 4]
    cached = model_sink_dims(vlm, directory=tmp_path)  # no tokens needed once cached
    assert cached.source == "cached" and tuple(cached.dims) == dims
    assert model_sink_dims(vlm, directory=tmp_path, tau=30.0) is None  # another tau: another file
    assert model_sink_dims(vlm, directory=tmp_path, consistency=0.9) is None  # another rule: not this file
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "signature": ["llama", 1, 1, 1]}))  # another model of the same name
    assert model_sink_dims(vlm, first, directory=tmp_path).source == "discovered"


@pytest.mark.slow
def test_smollm2_first_token_sink_dimension_is_discovered():
    """The pretrained LM of llava-shapes: dimension 507 is massive on the first token (ZOO-NOTES)."""
    from vlmtools_zoo.lm import load_smollm2

    model, tokenizer = load_smollm2()
    ids = tokenizer("<|im_start|>user\nHow many red circles are in the picture?<|im_end|>", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states[:-1]
    report = SinkDetector(["massive", "sink_dims"]).detect_tensors(
        hidden=hidden, signature=model_signature(model.config)
    )
    assert 507 in report.settings[1]["dims"] and report.settings[1]["dims_source"] == "discovered"
    assert (0, 0) in tokens(report, "sink_dims") and (0, 0) in tokens(report, "massive")


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99))
    ids = torch.tensor([[1, 2] + [99] * 16 + [3, 4, 5], [0, 0, 1] + [99] * 16 + [3, 4]])
    mask = torch.tensor([[1] * 21, [0, 0] + [1] * 19])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32)}
    return vlmtools.wrap(model.eval()), inputs


def test_detect_on_llava_reports_layout_roles(llava, tmp_path):
    vlm, inputs = llava
    detector = SinkDetector(
        [ColumnMassSink(eps=0.05), "positional", "massive", "sink_dims", "primary_cosine", ValueDrain(ratio=0.5)]
    )
    report = detector.detect(vlm, inputs)
    layout = vlm.layout(inputs)
    assert {f.criterion for f in report.findings} >= {"column_mass", "positional", "primary_cosine"}
    for f in report.findings:
        sample = layout.samples[f.sample]
        assert f.role == sample.roles()[f.token]
        if f.role == "visual":
            assert sample.images[f.image].positions[f.row * 4 + f.col] == f.token
    assert report.sinks("positional", sample=1)[0].token == 2  # after the left padding
    assert not report.sinks(role="padding")
    assert report.grids == [[(4, 4)], [(4, 4)]]
    figure = report.plot(tmp_path / "sinks.png")
    assert (tmp_path / "sinks.png").read_bytes()[:4] == b"\x89PNG"
    cells = {(f.row, f.col) for f in report.sinks(sample=0, role="visual") if f.image == 0}
    titles = [ax.get_title() for ax in figure.axes if ax.get_title().startswith("image 0")]
    assert titles == [f"image 0: sink hits per cell\n{len(cells)} of 16 cells fired"]
    again = SinkReport.from_json(report.to_json())
    assert again.findings == report.findings and again.to_json() == report.to_json()
    assert json.loads(report.to_json())["settings"][0]["eps"] == 0.05
    assert "column_mass" in report.table()


def test_detect_column_mass_matches_eager_attention(llava):
    vlm, inputs = llava
    detector = SinkDetector([ColumnMassSink(eps=0.05)])
    seam = detector.detect(vlm, inputs)
    model = vlm.model
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    eager = detector.detect_tensors(attn=attentions, layout=vlm.layout(inputs))
    assert [(f.sample, f.layer, f.head, f.token) for f in eager.findings] == [
        (f.sample, f.layer, f.head, f.token) for f in seam.findings
    ]
    torch.testing.assert_close(eager.scores["column_mass"], seam.scores["column_mass"], equal_nan=True)


def test_hidden_criteria_record_only_hidden_states(llava):
    vlm, _ = llava
    recorders = SinkDetector(["positional", "massive", "sink_dims", "primary_cosine"]).recorders(vlm)
    assert [type(r) for r in recorders] == [RecordHidden]
    with pytest.raises(ValueError, match="detect_tensors"):
        SinkDetector(["global_sink"]).recorders(vlm)
    with pytest.raises(ValueError, match="unknown sink criterion"):
        SinkDetector(["columnmass"])


class ChatProcessor:
    """Stands in for a processor: a fixed prompt with 16 image tokens."""

    tokenizer = types.SimpleNamespace(padding_side="right")

    def apply_chat_template(self, messages, add_generation_prompt):
        return "prompt"

    def __call__(self, images, text, return_tensors, padding):
        return {
            "input_ids": torch.tensor([[1, 2] + [99] * 16 + [3]]),
            "attention_mask": torch.ones(1, 19, dtype=torch.long),
            "pixel_values": torch.randn(1, 3, 32, 32),
        }


def test_run_sinks_cli_prints_table_and_writes_png(llava, tmp_path, monkeypatch, capsys):
    from PIL import Image

    vlm, _ = llava
    monkeypatch.setattr(command, "load_vlm", lambda name: (vlm.model, ChatProcessor()))
    report = command.run_sinks_cli("tiny", Image.new("RGB", (32, 32)), "what is there?", tmp_path)
    assert "positional" in capsys.readouterr().out
    assert (tmp_path / "sinks.png").exists()
    assert SinkReport.from_json((tmp_path / "sinks.json").read_text()).findings == report.findings


def test_sinks_subcommand_defaults_to_a_zoo_scene(llava, tmp_path, monkeypatch, capsys):
    import argparse

    vlm, _ = llava
    monkeypatch.setattr(command, "load_vlm", lambda name: (vlm.model, ChatProcessor()))
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sinks", "--criteria", "positional", "massive", "--out", str(tmp_path)])
    assert args.run(args) == 0
    assert "positional" in capsys.readouterr().out and (tmp_path / "sinks.png").exists()


def test_load_vlm_names_the_choices():
    with pytest.raises(FileNotFoundError, match="llava-shapes"):
        command.load_vlm("no-such-model")
