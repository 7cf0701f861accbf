"""The `vlmtools` command: every subcommand is registered and documented; prune and calibrate run."""
import types

import pytest
import torch

import vlmtools.inputs
from tests.tiny import tiny_llava
from vlmtools.cli import build_parser, main

COMMANDS = {"demo", "sinks", "prune", "calibrate", "prune-bench", "hallucination-bench", "segment", "segment-bench"}


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
    monkeypatch.setattr(vlmtools.inputs, "load_vlm", lambda name: (model, StubProcessor(inputs)))
    return model


def test_prune_answers_plainly_and_pruned(tiny, capsys):
    assert main(["prune", "--keep", "4", "--layers", "1", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "fastv" in out and "kept 4 of 16 visual tokens from layer 1" in out
    assert tiny.config.text_config._attn_implementation == "sdpa"


def test_prune_rejects_a_budget_above_the_visual_tokens(tiny):
    with pytest.raises(ValueError, match="exceeds the 16 visual tokens"):
        main(["prune", "--keep", "40", "--layers", "1"])


def test_calibrate_writes_a_trend_file(tiny, tmp_path, capsys):
    assert main(["calibrate", "--samples", "3", "--layers", "1", "--directory", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*fastv*L1*"))) == 1
