"""qwen2vl-shapes: loading, Qwen's dynamic resolution, its TokenLayout, evaluation and a trainer smoke run."""
import pytest
import torch

import vlmtools
from vlmtools_zoo import world as W


@pytest.fixture(scope="module")
def qwen():
    from vlmtools_zoo import load

    return load("qwen2vl-shapes")


def scene_with_canvas(width, height):
    return next(s for s in (W.scene("test", i) for i in range(200)) if (s.width, s.height) == (width, height))


def chat(processor, images, question="How many shapes are there?"):
    from vlmtools_zoo.llava import prompt

    return processor(images=images, text=[prompt(processor, question)] * len(images), return_tensors="pt",
                     padding=True)


def test_loads_forwards_and_generates(qwen):
    model, processor = qwen
    assert processor.tokenizer.padding_side == "left"
    x = chat(processor, [W.scene("test", 0).image])
    with torch.no_grad():
        out = model(**x)
        blank = model(**{**x, "pixel_values": torch.zeros_like(x["pixel_values"])})
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(out.logits).all()
    assert (out.logits[0, -1] - blank.logits[0, -1]).abs().max() > 0  # the image reaches the LM
    new = gen[0, x["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    assert 1 <= len(new) <= 3 and (len(new) == 3 or new[-1] in (eos if isinstance(eos, list) else [eos]))


def test_m_rope_turns_the_width_section_across_an_image():
    """Visual tokens 7 columns apart (a 128 px wide scene) must get rotary phases the LM can tell
    apart: with Qwen's 1 : 1.5 : 1.5 sections the width axis would hold SmolLM2's slowest
    frequencies, which turn by under 0.01 rad across the image (docs/zoo.md)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    from vlmtools_zoo import qwen2vl

    rotary = Qwen2VLRotaryEmbedding(qwen2vl.build_config().text_config)
    ids = torch.tensor([[[9, 9]], [[11, 11]], [[9, 16]]])  # (t, h, w) of two tokens in one row

    def largest_turn():
        cos, sin = rotary(torch.zeros(1), ids)
        angle = torch.atan2(sin[0], cos[0])
        return (torch.remainder(angle[1] - angle[0] + torch.pi, 2 * torch.pi) - torch.pi).abs().max().item()

    assert largest_turn() > 0.5
    rotary.mrope_section = [8, 12, 12]  # Qwen2-VL's proportions at SmolLM2's head size
    assert largest_turn() < 0.01


@pytest.mark.parametrize("canvas", [(96, 96), (128, 96), (96, 128), (128, 64)])
def test_dynamic_resolution_keeps_each_canvas(qwen, canvas):
    model, processor = qwen
    width, height = canvas
    x = chat(processor, [scene_with_canvas(width, height).image])
    assert x["image_grid_thw"].tolist() == [[1, height // 8, width // 8]]  # native size, 8 px patches
    merged = (height // 16) * (width // 16)
    assert (x["input_ids"] == model.config.image_token_id).sum() == merged
    assert ((x["input_ids"] == model.config.vision_start_token_id).sum()
            == (x["input_ids"] == model.config.vision_end_token_id).sum() == 1)


def test_large_images_shrink_within_max_pixels_keeping_aspect(qwen):
    from vlmtools_zoo.qwen2vl import MAX_PIXELS

    _, processor = qwen
    big = scene_with_canvas(128, 64).image.resize((512, 256))
    _, h, w = processor.image_processor([big], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert (h * 8) * (w * 8) <= MAX_PIXELS
    assert abs(w / h - 2) < 0.25  # 2:1 up to the 16 px rounding


def test_wrap_gives_the_merged_token_layout(qwen):
    model, processor = qwen
    vlm = vlmtools.wrap(model, processor)
    assert vlm.family == "qwen2_vl"
    x = chat(processor, [scene_with_canvas(96, 96).image, scene_with_canvas(128, 64).image])
    layout = vlm.layout(x)
    for sample, ids, mask, (rows, cols) in zip(layout.samples, x["input_ids"], x["attention_mask"], [(6, 6), (4, 8)]):
        (image,) = sample.images
        assert image.grid == (rows, cols) and image.thw == (1, rows, cols)
        assert torch.equal(image.positions, (ids == model.config.image_token_id).nonzero().squeeze(1))
        assert len(sample.layout) == 2  # vision start and end
        assert torch.equal(sample.padding, (mask == 0).nonzero().squeeze(1))

    class Seen(vlmtools.LayerHook):  # the layout the seam computes inside generate
        def attach(self, vlm, plan):
            self.state, self.layouts = plan.state, []
            plan.layer(0, vlm.layers[0], self)

        def before_layer(self, index, hidden, kwargs):
            self.layouts.append(self.state.layout)

    seen = Seen()
    with torch.no_grad(), vlm.use(seen):
        model.generate(**x, max_new_tokens=2, do_sample=False)
    assert [im.grid for s in seen.layouts[0].samples for im in s.images] == [(6, 6), (4, 8)]


def test_evaluation_reports_every_question_type(qwen):
    from vlmtools_zoo.evaluate import qa_accuracy
    from vlmtools_zoo.llava import prompt

    model, processor = qwen
    scores = qa_accuracy(model, processor, prompt, n=5)
    assert set(scores) == set(W.QUESTION_TYPES)
    # the reference: each question alone (no batch, no padding), greedy, its first word read here
    expected = {}
    for i, q in W.qa_items("test", 5):
        x = processor(images=[W.scene("test", i).image], text=[prompt(processor, q.question)], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**x, max_new_tokens=4, do_sample=False)
        text = processor.tokenizer.decode(gen[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
        expected[q.type] = {"accuracy": float(text.lower().split()[0].strip(".,") == q.answer), "n": 1}
    assert scores == expected
    # one question per type; guessing uniformly gets 1/2 + 1/6 + 1/4 + 1/5 + 1/2 = 1.6 of them right on average
    assert sum(s["accuracy"] for s in scores.values()) >= 4


@pytest.mark.slow
def test_trainer_smoke_run_resumes_and_exports(train_cache, tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtools_zoo import qwen2vl, qwen2vl_train

    weights = tmp_path / "weights"
    qwen2vl_train.main(3, 3, 3, 1, later={"refine": 0, "bind": 0, "probe": 0}, tower_batch=4, weights=weights)
    ckpts = train_cache / "train" / "qwen2vl-shapes"
    assert {p.name for p in ckpts.iterdir()} == {"tower.pt", "words.pt", "align.pt"}
    # one more align step, then the refine, bind and probe stages
    qwen2vl_train.main(3, 3, 4, 1, later={"refine": 1, "bind": 1, "probe": 1}, tower_batch=4, weights=weights)
    assert torch.load(ckpts / "align.pt", weights_only=True)["step"] == 4
    assert torch.load(ckpts / "refine.pt", weights_only=True)["step"] == 1
    assert torch.load(ckpts / "bind.pt", weights_only=True)["step"] == 1
    assert torch.load(ckpts / "probe.pt", weights_only=True)["step"] == 1
    for stage in ("refine", "bind"):
        (ckpts / f"{stage}.pt").unlink()
    qwen2vl_train.main(later={"bind": 2}, from_shipped=True, align_batch=1, weights=weights)  # no refine: not asked
    assert not (ckpts / "refine.pt").exists()
    assert torch.load(ckpts / "bind.pt", weights_only=True)["step"] == 2
    state = load_file(weights / "model.safetensors")
    assert {k.split(".")[0] for k in state} == {"visual", "lora"}
    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen2vl.assemble(tmp_path / "folder", weights))
    assert torch.equal(model.model.visual.merger.mlp[0].weight, state["visual.merger.mlp.0.weight"].float())


@pytest.mark.slow
def test_evaluate_reads_other_weights_beside_the_package_folder(train_cache, tmp_path, capsys):
    import json
    import shutil

    from vlmtools_zoo import evaluate, qwen2vl

    other = tmp_path / "other"
    shutil.copytree(qwen2vl.WEIGHTS, other)
    evaluate.main(["qwen2vl-shapes", "--n", "5", "--pope-scenes", "1", "--weights", str(other), "--threads", "1",
                   "--answers", str(tmp_path / "answers.json")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(s["n"] for s in result["qa"].values()) == 5
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert [a["type"] for a in answers] == ["existence", "colour", "shape", "count", "position"]
    for kind, score in result["qa"].items():  # the printed accuracies are those of the written answers
        assert score["accuracy"] == sum(a["predicted"] == a["answer"] for a in answers if a["type"] == kind)
    assert set(result["pope"]) == {"random", "popular", "adversarial"}
    marker = json.loads((train_cache / "evaluate" / "qwen2vl-shapes" / "assembled_from.json").read_text())
    assert marker["stamp"]["weights"] == (other / "model.safetensors").stat().st_mtime_ns
    assert not (train_cache / "qwen2vl-shapes").exists()  # the package's own folder is left alone


@pytest.mark.slow
def test_processes_started_together_assemble_the_folder_once(train_cache):
    """As under torchrun on a fresh cache: two processes load the zoo model at the same moment."""
    import os
    import subprocess
    import sys

    code = "from vlmtools_zoo import qwen2vl; qwen2vl.load(); print('loaded')"
    env = {**os.environ, "VLMTOOLS_CACHE": str(train_cache), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]
    assert all(out.strip().endswith("loaded") for out, _ in outs)
    assert (train_cache / "qwen2vl-shapes" / "assembled_from.json").exists()
