"""The `vlmtools` command: every subcommand is registered and documented; prune and calibrate run; what a
command refuses ends it with a message, not a traceback."""
import types

import pytest
import torch

import vlmtools_app.inputs
from vlmtools.testing.vlm import tiny_llava
from vlmtools_app.cli import build_parser, main

COMMANDS = {"demo", "sinks", "prune", "calibrate", "prune-bench", "hallucination-bench", "segment", "segment-bench", "tune"}


def test_every_subcommand_is_registered_and_every_option_explained():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == COMMANDS
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest not in ("help",) and action.option_strings:
                assert action.help, f"{name} {action.option_strings} has no help"


class StubProcessor:
    """A fixed prompt holding the tiny LLaVA's 16 image tokens; decodes ids as text."""

    def __init__(self, inputs):
        self.inputs = inputs
        self.tokenizer = types.SimpleNamespace(padding_side="left", decode=lambda ids, **_: " ".join(map(str, ids.tolist())))

    def apply_chat_template(self, messages, add_generation_prompt):
        return "prompt"

    def __call__(self, images, text, return_tensors, padding):
        return {k: v[1:] for k, v in self.inputs.items()}


@pytest.fixture()
def tiny(monkeypatch):
    model, inputs = tiny_llava()
    monkeypatch.setattr(vlmtools_app.inputs, "load_vlm", lambda name: (model, StubProcessor(inputs)))
    return model


def test_prune_answers_plainly_and_pruned(tiny, capsys):
    assert main(["prune", "--keep", "4", "--layers", "1", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "fastv" in out and "kept 4 of 16 visual tokens from layer 1" in out
    assert tiny.config.text_config._attn_implementation == "sdpa"


def test_prune_refuses_a_budget_above_the_visual_tokens_with_a_message(tiny, capsys, monkeypatch):
    monkeypatch.delenv("VLMTOOLS_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit:
        main(["prune", "--keep", "40", "--layers", "1"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmtools prune: error: ") and "exceeds the 16 visual tokens" in err
    monkeypatch.setenv("VLMTOOLS_TRACEBACK", "1")
    with pytest.raises(ValueError, match="exceeds the 16 visual tokens"):
        main(["prune", "--keep", "40", "--layers", "1"])


def test_prune_refuses_a_drop_layer_past_the_model_before_answering(tiny, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--layers", "9"])
    out, err = capsys.readouterr()
    assert "drop layer 9 >= the model's 3 layers" in err and "plain" not in out


@pytest.mark.parametrize(("text", "value"), [("64", 64), ("1", 1), ("0.11", 0.11), ("1.0", 1.0)])
def test_keep_is_a_whole_count_or_a_fraction(text, value):
    parsed = build_parser().parse_args(["prune", "--keep", text]).keep
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(("text", "message"), [("0", "keep at least one token"), ("-3", "keep at least one token"),
                                               ("1.5", "neither a whole count"), ("0.0", "neither a whole count"),
                                               ("many", "invalid keep_value value")])
def test_keep_refuses_what_is_neither(text, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--keep", text])
    assert message in capsys.readouterr().err


def test_prune_debias_fits_a_missing_trend_once(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNING_CALIBRATION", str(tmp_path))
    command = ["prune", "--keep", "4", "--layers", "1", "--max-new-tokens", "2", "--debias",
               "--calibration-samples", "3"]
    assert main(command) == 0
    assert "no calibrated trend" in capsys.readouterr().err
    trend = next(tmp_path.glob("*fastv*L1*"))
    written = trend.stat().st_mtime_ns
    assert main(command) == 0
    out, err = capsys.readouterr()
    assert "no calibrated trend" not in err and "'trend': 'calibrated'" in out
    assert trend.stat().st_mtime_ns == written


def test_calibrate_writes_a_trend_file(tiny, tmp_path, capsys):
    assert main(["calibrate", "--samples", "3", "--layers", "1", "--directory", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*fastv*L1*"))) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["prune-bench", "--questions", "0"], "--questions/--n: 0: at least 1"),
    (["hallucination-bench", "--scenes", "-1"], "--scenes: -1: at least 0"),
    (["segment-bench", "--expressions", "0"], "--expressions/--n: 0: at least 1"),
    (["prune", "--max-new-tokens", "0"], "--max-new-tokens: 0: at least 1"),
    (["demo", "--questions", "x"], "invalid count (at least 1) value: 'x'")])
def test_counts_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_segment_with_an_expression_alone_says_what_it_takes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["segment", "the red circle"])
    assert "segment: error: no image file 'the red circle': give an image and its referring expression" in \
        capsys.readouterr().err
    image = tmp_path / "scene.png"
    image.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["segment", str(image)])
    err = capsys.readouterr().err
    assert "no image file" not in err and "or neither for a held-out zoo scene" in err


def test_calibrate_refuses_a_host_without_attention_scores(tiny, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--host", "dart", "--samples", "2", "--layers", "1"])
    assert "dart ranks without attention" in capsys.readouterr().err


def test_a_model_no_adapter_knows_is_refused_with_a_message(monkeypatch, capsys):
    from vlmtools.adapters import UnsupportedModel

    monkeypatch.setattr(vlmtools_app.inputs, "load_vlm", lambda name: (torch.nn.Linear(2, 2), None))
    with pytest.raises(SystemExit):
        main(["prune"])
    assert "vlmtools prune: error: vlmtools: unsupported model class Linear" in capsys.readouterr().err
    assert issubclass(UnsupportedModel, TypeError)  # what callers caught before it had a name


def test_prune_debias_on_a_checkpoint_without_a_trend_says_how_to_calibrate(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNING_CALIBRATION", str(tmp_path))
    with pytest.raises(SystemExit) as exit:
        main(["prune", "--model", "/models/my-llava", "--keep", "4", "--layers", "1", "--debias"])
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert "calibrate on your own images first: vlmtools calibrate --model /models/my-llava --host fastv --images DIR" in err
    assert "plain" not in out and not list(tmp_path.iterdir())


def test_calibrate_a_checkpoint_reads_the_users_images_never_shapes(tiny, tmp_path, monkeypatch, capsys):
    from PIL import Image

    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "/models/my-llava", "--layers", "1", "--directory", str(tmp_path)])
    assert "give --images DIR" in capsys.readouterr().err and not list(tmp_path.iterdir())
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (20, 10 + i), colour).save(images / f"{i}.png")
    (tmp_path / "questions.txt").write_text("What is this?\n\nWhere is it?\n")
    seen = []
    processor = vlmtools_app.inputs.load_vlm("x")[1]
    real_call = processor.__call__
    monkeypatch.setattr(type(processor), "__call__", lambda self, images, text, **kw: seen.append(
        (images[0].size, text)) or real_call(images, text, **kw))
    trends_dir = tmp_path / "trends"
    assert main(["calibrate", "--model", "/models/my-llava", "--layers", "1", "--images", str(images),
                 "--questions", str(tmp_path / "questions.txt"), "--directory", str(trends_dir)]) == 0
    assert [size for size, _ in seen] == [(20, 10), (20, 11), (20, 12)]
    assert len(list(trends_dir.glob("*fastv*L1*"))) == 1


def test_image_question_pairs_take_the_questions_in_turn_and_refuse_empty_input(tmp_path):
    from PIL import Image

    from pruning import DEFAULT_QUESTION, image_question_pairs

    for name in ("b.jpg", "a.png", "c.PNG"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "q.txt").write_text("one?\ntwo?\n")
    assert [q for _, q in image_question_pairs(tmp_path, tmp_path / "q.txt")] == ["one?", "two?", "one?"]
    assert [q for _, q in image_question_pairs(tmp_path)] == [DEFAULT_QUESTION] * 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        image_question_pairs(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        image_question_pairs(tmp_path, tmp_path / "blank.txt")
