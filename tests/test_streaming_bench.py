"""benchmarks/streaming.py: the chat stream it feeds a cache turn by turn, and its scores."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "streaming.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("streaming_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def processor():
    from vlmtools_zoo import llava

    return llava.build_processor()


def scenes():
    """Two hand-made scenes: a red square image, then a wide blue one (letterboxed to 96 x 96)."""
    return [(Image.new("RGB", (96, 96), (215, 40, 40)), "What colour is the square?"),
            (Image.new("RGB", (128, 96), (40, 80, 225)), "What colour is the circle?")]


def test_each_turn_is_what_the_template_adds_with_its_own_image(bench, processor):
    stream = bench.ChatStream(processor)
    (red, q0), (blue, q1) = scenes()
    first = stream.user(red, q0)
    stream.assistant("red")
    second = stream.user(blue, q1)
    image = "<empty_output>" * 144  # 96 px in 8 px patches, the CLS token dropped
    decode = processor.tokenizer.decode
    assert decode(first["input_ids"][0]) == f"<|im_start|>user\n{image}\n{q0}<|im_end|>\n<|im_start|>assistant\n"
    assert decode(second["input_ids"][0]) == (f"<|im_end|>\n<|im_start|>user\n{image}\n{q1}<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert set(first) == set(second) == {"input_ids", "pixel_values"}  # no chunk-sized attention mask
    pixels = processor.image_processor([red, blue], return_tensors="pt")["pixel_values"]
    assert torch.equal(first["pixel_values"], pixels[:1]) and torch.equal(second["pixel_values"], pixels[1:])
    assert not torch.equal(pixels[0], pixels[1])
    answer = processor.tokenizer("red", add_special_tokens=False).input_ids
    fed = torch.cat([first["input_ids"][0], torch.tensor(answer), second["input_ids"][0]])
    whole = processor(images=[red, blue], return_tensors="pt", text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q0}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]}], add_generation_prompt=True))
    assert torch.equal(fed, whole["input_ids"][0])


def test_a_template_that_rewrites_earlier_turns_is_refused(bench, processor, monkeypatch):
    monkeypatch.setattr(processor, "chat_template", "{{ messages | length }} turns" + processor.chat_template)
    stream = bench.ChatStream(processor)
    (red, q0), (blue, q1) = scenes()
    stream.user(red, q0)
    stream.assistant("red")
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        stream.user(blue, q1)


def test_the_scores_are_the_hand_computed_ones(bench):
    logits = torch.tensor([0.0, math.log(2.0), 0.0])  # probabilities 1/4, 1/2, 1/4
    assert bench.answer_nll(logits, 1) == pytest.approx(math.log(2.0))
    assert bench.answer_nll(logits, 2) == pytest.approx(math.log(4.0))
    rows = [{"predicted": "red", "answer": "red", "nll": 0.5, "type": "colour"},
            {"predicted": "no", "answer": "yes", "nll": 1.5, "type": "existence"},
            {"predicted": "3", "answer": "3", "nll": 1.0, "type": "count"}]
    assert bench.summary(rows) == pytest.approx({"accuracy": 2 / 3, "nll": 1.0, "chance": (1 / 6 + 1 / 2 + 1 / 5) / 3,
                                                 "n": 3})
    with pytest.raises(ValueError, match="no scored turns"):
        bench.summary([])


def test_the_stream_through_a_cache_scores_as_one_forward_over_the_whole_chat(bench, processor):
    """Turn 2's answer NLL through the cache equals a plain forward over both turns (a chunk-sized attention mask
    made the model read the second turn wrongly)."""
    from transformers import (CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=96, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(processor.tokenizer))
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=16,
                                                      vision_feature_layer=-1)).eval()
    model.generation_config.eos_token_id = list(range(text.vocab_size))  # every answer ends at once: empty
    turns = [bench.Turn(image, question, "red", "colour") for image, question in scenes()]
    rows, peak = bench.run_stream(model, processor, turns, DynamicCache(config=model.config))
    whole = processor(images=[t.image for t in turns], return_tensors="pt", text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0].question}]},
         {"role": "assistant", "content": [{"type": "text", "text": ""}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[1].question}]}],
        add_generation_prompt=True))
    with torch.no_grad():
        logits = model(**whole).logits[0, -1]
    red = processor.tokenizer("red", add_special_tokens=False).input_ids[0]
    expected = -torch.log_softmax(logits, -1)[red].item()
    length = whole["input_ids"].shape[1]
    assert rows[1]["nll"] == pytest.approx(expected, abs=1e-4)
    assert rows[1]["context"] == rows[1]["held"] == length
    assert peak == length * 2 * text.num_hidden_layers * 16 * 4  # keys and values, one 16-wide head, fp32
