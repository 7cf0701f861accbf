"""lmms-eval's ``vlmtools`` model (vlmtools_app/lmms_eval.py): ``--model_args`` parsing (several methods, their
settings, every refusal), the task's generation settings, the registration through the ``lmms_eval.models``
entry point, and ``python -m lmms_eval`` end to end, offline, on a POPE task defined in tests/lmms_eval_tasks/
over local files written from zoo scenes: its per-question answers equal hallucination-bench's (VAR) and
prune-bench's (FastV, debiased) on the same file with the same prompt and batch size, and batches under
fastv+var equal the library's own run of each batch, the task's stop strings cut."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmtools_app.lmms_eval import (DEFAULT_MAX_NEW_TOKENS, Method, cut, generation, method_names, options,
                                    parse_model_args)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "lmms_eval_tasks"
needs_lmms_eval = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed (pip install -e '.[lmms-eval]', as .ci/run does)")
MODEL = "llava-shapes"
BATCH = 2
UNTIL = ["\n\n"]  # the task's stop string (tests/lmms_eval_tasks/vlmtools_pope.yaml), 4 new tokens
ITEMS = [0, 6, 3, 8]
"""Of ``world.pope("test", 2, "random")``: yes and no questions on two scenes, each batch of 2 showing both."""
FASTV_KEEP = 1 / 9  # prune-bench's 11%


# -- model_args -------------------------------------------------------------------------------------------

def test_several_methods_take_their_own_settings_and_build_afresh_per_batch():
    config = parse_model_args({"pretrained": MODEL, "method": "fastv+var", "keep": 64, "debias": True, "rho": 0.8,
                               "batch_size": "8", "device": "cpu", "max_batch_size": None})
    assert config.pretrained == MODEL and config.batch_size == 8 and config.device == "cpu"
    assert config.methods == (Method("fastv", {"keep": 64, "debias": True}), Method("var", {"rho": 0.8}))
    fastv, var = config.build(["Is there a red circle?"])
    assert (type(fastv).__name__, fastv.keep, fastv.layers, fastv.debias.trend) == ("FastV", 64, (2,), "calibrated")
    assert (type(var).__name__, var.rho) == ("VAR", 0.8)
    assert config.build(["q"])[1] is not var  # a fresh intervention for every batch


def test_prefixed_keys_literals_debias_options_and_gift_questions(tmp_path):
    config = parse_model_args({"pretrained": "/models/x", "method": "fastv+dart", "fastv.keep": 32, "dart.keep": 0.25,
                               "fastv.layer": 3, "pivots": 2, "debias": "true", "trend": "none",
                               "calibration": str(tmp_path)})
    fastv, dart = config.build(["q"])
    assert (fastv.keep, fastv.layers, fastv.debias.trend, fastv.debias.directory) == (32, (3,), None, str(tmp_path))
    assert (dart.keep, dart.pivots, dart.debias) == (0.25, 2, None)
    pdrop, = parse_model_args({"pretrained": "x", "method": "pdrop", "layers": "[4,8]", "rank": "previous"}).build(["q"])
    assert (pdrop.layers, pdrop.rank) == ((4, 8), "previous")
    gift, paint = parse_model_args({"pretrained": "x", "method": "gift+paint", "gift.alpha": 2.0,
                                    "paint.alpha": 0.3}).build(["Is there a cat?", "Is there a dog?"])
    assert gift.questions == ["Is there a cat?", "Is there a dog?"] and gift.alpha == 2.0 and paint.alpha == 0.3
    assert parse_model_args({"pretrained": MODEL}).methods == ()
    assert parse_model_args({"pretrained": MODEL, "method": "none"}).build(["q"]) == []


def test_every_method_has_its_settings_listed():
    assert method_names() == ("none", "fastv", "pdrop", "sparsevlm", "visionzip", "fastervlm", "dart", "random",
                              "grid", "var", "gift", "paint")
    assert options("fastv") == ("keep", "layer", "debias", "trend", "calibration")
    assert "debias" not in options("dart") and "questions" not in options("gift") and "padding" not in options("pdrop")
    for name in method_names()[1:]:  # each builds with its defaults
        parse_model_args({"pretrained": MODEL, "method": name}).build(["Is there a red circle?"])


@pytest.mark.parametrize(("args", "message"), [
    ({"method": "fast"}, "unknown method 'fast' in method=fast; methods: none, fastv, pdrop"),
    ({"method": "fastv+fastv"}, "names a method twice"),
    ({"method": "none+var"}, "none runs the plain model"),
    ({"method": "fastv", "foo": 1}, "unknown model_args key 'foo'; valid: pretrained, method, device, dtype, "
                                    "batch_size; fastv: keep, layer, debias, trend, calibration"),
    ({"method": "none", "keep": 64}, "(method=none takes no settings)"),
    ({"method": "fastv+dart", "keep": 32}, "keep is a setting of fastv and dart; say which: fastv.keep=32 or dart.keep=32"),
    ({"method": "fastv", "var.rho": 0.5}, "var.rho=0.5 is a setting of var, which method=fastv does not run"),
    ({"method": "fastv", "fastv.rho": 0.5}, "fastv has no setting 'rho'; its settings: keep, layer, debias"),
    ({"method": "dart", "debias": True}, "unknown model_args key 'debias'; valid: pretrained, method, device, dtype, "
                                         "batch_size; dart: keep, layer, pivots, text_pivots"),
    ({"method": "fastv", "trend": "none"}, "fastv with {'trend': 'none'}: trend goes with debias=true"),
    ({"method": "fastv", "debias": "maybe"}, "debias is true or false, got 'maybe'"),
    ({"method": "fastv", "keep": 0}, "keep must be a positive token count or a fraction in (0, 1], got 0"),
    ({"method": "var", "rho": 3}, "var with {'rho': 3}: VAR rho must be in [0, 1], got 3"),
    ({"method": "pdrop", "layers": "[0,8]", "rank": "previous"}, "layers must be decoder-layer indices >= 1"),
    ({"method": "var", "dtype": "half"}, "dtype=half: one of float16, bfloat16, float32"),
    ({"batch_size": "auto"}, "batch_size=auto: a number"),
    ({"batch_size": 0}, "batch_size=0: at least 1"),
])
def test_bad_model_args_are_refused_naming_what_is_valid(args, message):
    with pytest.raises(ValueError) as error:
        parse_model_args({"pretrained": MODEL, **args})
    assert message in str(error.value)


def test_a_model_is_needed():
    with pytest.raises(ValueError, match="needs pretrained=ZOO_NAME_OR_FOLDER"):
        parse_model_args({"method": "fastv"})


def test_the_tasks_generation_settings_are_honoured():
    kwargs, until, ignored = generation({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                         "do_sample": False, "until": "\n\n", "image_aspect_ratio": "pad"})
    assert (kwargs, until, ignored) == ({"max_new_tokens": 16, "do_sample": False}, ["\n\n"], ["image_aspect_ratio"])
    kwargs, until, _ = generation({"temperature": 0.7, "top_p": 0.9, "num_beams": 3, "until": ["</s>", ""]})
    assert kwargs == {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                      "num_beams": 3} and until == ["</s>"]
    assert generation({"temperature": 0.7, "do_sample": False})[0]["do_sample"] is False
    assert generation({})[0] == {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False}
    assert cut("yes\n\nno. ASSISTANT: x", ["ASSISTANT:", "\n\n"]) == "yes" and cut("no", UNTIL) == "no"
    with pytest.raises(ValueError, match="until is a string or a list of strings"):
        generation({"until": 3})


# -- lmms-eval ------------------------------------------------------------------------------------------

@needs_lmms_eval
def test_lmms_eval_finds_the_model_through_the_entry_point():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    from vlmtools_app.lmms_eval import VLMTools

    assert [e.value for e in entry_points(group="lmms_eval.models") if e.name == "vlmtools"] == [
        "vlmtools_app.lmms_eval:manifest"]
    assert get_model("vlmtools") is VLMTools
    with pytest.raises(NotImplementedError, match="loglikelihood requests"):
        VLMTools.loglikelihood(None, [])


@pytest.fixture(scope="module")
def pope_folder(tmp_path_factory) -> Path:
    """pope.jsonl (POPE's format) and images/ (PNG files of zoo test scenes): what the task reads."""
    from vlmtools_zoo import world

    root = tmp_path_factory.mktemp("lmms-eval-pope")
    (root / "images").mkdir()
    items = world.pope("test", 2, "random")
    lines = []
    for k in ITEMS:
        scene, question, label = items[k]
        name = f"COCO_test_{scene:06d}.png"
        if not (root / "images" / name).exists():
            world.scene("test", scene).image.save(root / "images" / name)
        lines.append(json.dumps({"question_id": k, "image": name, "text": question, "label": label}) + "\n")
    (root / "pope.jsonl").write_text("".join(lines))
    return root


def lmms_eval(folder: Path, model_args: str, out: Path) -> tuple[list[str], dict]:
    """``python -m lmms_eval`` on the vlmtools_pope task in ``folder``, offline, one thread: (each question's answer
    in file order, the task's scores)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "vlmtools", "--model_args", model_args,
               "--tasks", "vlmtools_pope", "--include_path", str(TASKS), "--batch_size", str(BATCH),
               "--output_path", str(out / "results"), "--log_samples"]
    run = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples, = (out / "results").rglob("*_samples_vlmtools_pope.jsonl")
    results, = (out / "results").rglob("*_results.json")
    records = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    answers = [r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0] for r in records]
    return answers, json.loads(results.read_text())["results"]["vlmtools_pope"]


def bench(command: str, *args, out: Path) -> dict:
    from vlmtools_app.cli import main

    assert main([command, "--model", MODEL, *map(str, args), "--batch", str(BATCH), "--threads", "1",
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())["results"]


@pytest.fixture()
def one_thread():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@needs_lmms_eval
@pytest.mark.slow
def test_lmms_eval_answers_equal_hallucination_bench_under_var(pope_folder, tmp_path, one_thread):
    answers, scores = lmms_eval(pope_folder, f"pretrained={MODEL},method=var", tmp_path)
    results = bench("hallucination-bench", "--pope", pope_folder / "pope.jsonl", "--images", pope_folder / "images",
                    "--captions", 0, "--methods", "var", "--pope-tokens", 4, out=tmp_path / "hallucination.json")
    var = results["methods"]["var"]
    assert answers == [cut(a, UNTIL) for a in var["pope_answers"]] and len(answers) == len(ITEMS)
    assert scores["pope_accuracy,none"] == var["pope"]["pope"]["accuracy"]
    assert scores["pope_f1,none"] == var["pope"]["pope"]["f1"]
    assert {a.strip().lower() for a in answers} <= {"yes", "no"}  # llava-shapes answers the questions


@needs_lmms_eval
@pytest.mark.slow
def test_lmms_eval_answers_equal_prune_bench_under_debiased_fastv(pope_folder, tmp_path, one_thread):
    answers, scores = lmms_eval(pope_folder, f"pretrained={MODEL},method=fastv,keep={FASTV_KEEP!r},debias=true,"
                                             "trend=none", tmp_path)
    results = bench("prune-bench", "--pope", pope_folder / "pope.jsonl", "--images", pope_folder / "images",
                    "--hosts", "fastv", "--calibration-samples", 0, "--max-new-tokens", 4, out=tmp_path / "prune.json")
    assert answers == [cut(a, UNTIL) for a in results["answers"]["fastv +debias"]["11%"]]
    assert scores["pope_accuracy,none"] == results["accuracy"]["fastv +debias"]["11%"]


COMBINATIONS = {"fastv+paint": ({"keep": 16, "alpha": 0.3}, lambda: [FastV(keep=16), PAINT(alpha=0.3)]),
                "fastv+var": ({"keep": 16, "rho": 0.8}, lambda: [FastV(keep=16), VAR(rho=0.8)])}
"""Model args and the library's interventions for each combination run in one block."""


def FastV(**settings):
    from pruning import FastV

    return FastV(**settings)


def PAINT(**settings):
    from hallucination import PAINT

    return PAINT(**settings)


def VAR(**settings):
    from hallucination import VAR

    return VAR(**settings)


@needs_lmms_eval
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastv+paint", "fastv+var"])
def test_batches_follow_document_order_per_generation_setting(method, one_thread):
    """Requests of two generation settings, interleaved: each setting's requests are batched in document order
    (the last batch shorter), and each batch's answers are the library's own run of that batch (the methods in
    one block, greedy), cut at the setting's stop strings."""
    import torch
    from lmms_eval.api.instance import Instance

    from vlmtools.chat import chat_inputs
    from vlmtools_app.lmms_eval import VLMTools
    from vlmtools_zoo import world

    torch.set_num_threads(1)
    settings, interventions = COMBINATIONS[method]
    model = VLMTools(pretrained=MODEL, method=method, **settings, batch_size=BATCH, device="cpu")
    items = world.pope("test", 2, "random")
    docs = [{"image": world.scene("test", items[k][0]).image, "text": items[k][1]} for k in [*ITEMS, 1]]
    model.task_dict = {"pope": {"test": docs}}
    generation_settings = [{"max_new_tokens": 3, "temperature": 0, "until": UNTIL}, {"max_new_tokens": 3, "until": ["es", "o"]}]

    def visual(doc):
        return [doc["image"]]

    requests = [Instance("generate_until", (doc["text"], dict(gen), visual, i, "pope", "test"), 0,
                         {"task": "pope", "doc_id": i, "repeats": 1})
                for i, doc in enumerate(docs) for gen in generation_settings]
    answers = model.generate_until(requests)
    vlm = model.vlm
    expected = {}
    for batch in ([0, 1], [2, 3], [4]):
        inputs = chat_inputs(vlm.processor, [docs[i]["image"] for i in batch], [docs[i]["text"] for i in batch], "cpu")
        with torch.no_grad(), vlm.use(*interventions()):
            out = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = vlm.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        expected.update(zip(batch, texts))
    assert answers[0::2] == [cut(expected[i], UNTIL) for i in range(len(docs))]
    assert answers[1::2] == [cut(expected[i], ["es", "o"]) for i in range(len(docs))]
    assert {a.strip() for a in answers[0::2]} <= {"yes", "no"} and {a.strip() for a in answers[1::2]} <= {"y", "n"}


@needs_lmms_eval
@pytest.mark.slow
def test_prompts_of_several_images_or_none_and_a_missing_trend(tmp_path, one_thread):
    """A batch of a two-image prompt and a text-only one answers as the model's own generate on that chat batch;
    a video is refused; debias=true without the calibrated trend file ends the run when the model loads."""
    import torch
    from lmms_eval.api.instance import Instance

    from vlmtools_app.lmms_eval import VLMTools, prompt_inputs
    from vlmtools_zoo import world

    torch.set_num_threads(1)
    model = VLMTools(pretrained=MODEL, batch_size=2, device="cpu")
    shown = [world.scene("test", 0).image, world.scene("test", 1).image]
    docs = [{"images": shown, "text": "Is there a red circle in the image?"},
            {"images": [], "text": "Is there a red circle in the image?"}, {"images": ["clip.mp4"], "text": "?"}]
    model.task_dict = {"t": {"test": docs}}

    def request(i):
        return Instance("generate_until", (docs[i]["text"], {"max_new_tokens": 3}, lambda doc: doc["images"], i,
                                           "t", "test"), 0, {"task": "t", "doc_id": i, "repeats": 1})

    answers = model.generate_until([request(0), request(1)])
    inputs = prompt_inputs(model.vlm.processor, [shown, []], [docs[0]["text"], docs[1]["text"]], "cpu")
    assert (inputs["input_ids"] == model.model.config.image_token_id).sum(1).tolist() == [2 * 144, 0]
    with torch.no_grad():
        out = model.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert answers == model.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(ValueError, match="t document 2: doc_to_visual gave a str .* no video or audio"):
        model.generate_until([request(2)])
    with pytest.raises(FileNotFoundError, match="no calibrated trend"):
        VLMTools(pretrained=MODEL, method="fastv", debias=True, calibration=str(tmp_path), device="cpu")
