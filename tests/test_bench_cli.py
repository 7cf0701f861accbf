"""The bench commands: help, tiny runs on a random LLaVA saved as a folder, and sharding (two processes
under torchrun give exactly the one-process JSON)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.zoo_folders import tiny_llava_folder
from vlmtools_app import shard
from vlmtools_app.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRUNE = ["--questions", "3", "--batch", "2", "--hosts", "fastv,random", "--calibration-samples", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llava_folder(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command", ["prune-bench", "hallucination-bench", "segment-bench"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "--model" in text and "torchrun" in text


def test_prune_bench_records_every_host_ratio_and_setting(folder, tmp_path, capsys, one_thread):
    out = tmp_path / "prune.json"
    assert main(["prune-bench", "--model", folder, *PRUNE, "--calibration", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    accuracy = result["results"]["accuracy"]
    assert accuracy.keys() == {"none", "fastv", "fastv +debias", "random"}
    assert accuracy["none"].keys() == {"100%"} and accuracy["fastv +debias"].keys() == {"33%", "22%", "11%"}
    assert result["settings"]["model"] == folder and result["settings"]["calibration_samples"] == 2
    assert result["results"]["host_settings"]["fastv +debias"]["11%"]["debias"]["trend"] == "calibrated"
    assert len(result["results"]["answers"]["random"]["22%"]) == 3 and result["run"]["processes"] == 1
    assert [t["key"] for t in result["results"]["trends"]["fastv"]] == [p.stem for p in tmp_path.glob("*fastv*")]
    assert "| fastv +debias |" in capsys.readouterr().out
    speedup = result["run"]["speedup"]  # timings are how the run went, beside processes and seconds
    assert speedup["none"] == {"100%": 1.0} and speedup.keys() == accuracy.keys()
    assert all(value > 0 for row in speedup.values() for value in row.values())
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as picture:  # accuracy and speed-up against the kept share
        assert picture.size[0] > 2 * picture.size[1] * 0.9 and len(set(picture.convert("L").getdata())) > 20
    # where the kept tokens fall: unpruned, the shares of the three scenes' own cells (one of them letterboxed);
    # debias never keeps a token that shows only letterbox padding
    from vlmtools_zoo import world
    from vlmtools_zoo.card import patch_kinds

    scenes = [world.scene("test", s) for s, _ in world.qa_items("test", 3)]
    kinds = np.stack([patch_kinds(scene, (12, 12), letterbox=True) for scene in scenes])
    share = result["results"]["kept_share"]
    assert (kinds == "letterbox").any()
    assert share["object"]["none"]["100%"] == pytest.approx((kinds == "object").mean())
    assert share["letterbox"]["none"]["100%"] == pytest.approx((kinds == "letterbox").mean())
    assert all(share["letterbox"]["fastv +debias"][ratio] == 0 for ratio in ("33%", "22%", "11%"))


def test_prune_bench_skips_hosts_the_family_cannot_run_and_says_why(folder, tmp_path, capsys, monkeypatch,
                                                                      one_thread):
    import dataclasses

    import vlmtools.adapters
    from vlmtools.adapters import llava
    from vlmtools.adapters.vision import VisionEncoder, same_order

    without_cls = VisionEncoder(to_lm=same_order, no_cls="no [CLS] token here, as on Qwen-VL")
    monkeypatch.setitem(vlmtools.adapters.REGISTERED, "LlavaForConditionalGeneration",
                        dataclasses.replace(llava.ADAPTER, vision=without_cls))
    out = tmp_path / "prune.json"
    hosts = [arg.replace("fastv", "visionzip") for arg in PRUNE]
    assert main(["prune-bench", "--model", folder, *hosts, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["accuracy"].keys() == {"none", "random"}
    assert ("skipping visionzip: visionzip ranks by the vision encoder's [CLS] attention; llava: no [CLS] token "
            "here") in capsys.readouterr().err


def test_prune_bench_runs_a_host_at_several_settings(folder, tmp_path, one_thread):
    """Each entry labels its rows, runs with its settings over the bench's own (SparseVLM's schedule budget) and
    calibrates its own trend: the previous layer's votes get their own file."""
    out = tmp_path / "prune.json"
    released, former = "sparsevlm:layers=[3]", "sparsevlm:layers=[3]:votes=previous:recycle=0"
    args = ["--questions", "1", "--hosts", f"{released},{former}", "--calibration-samples", "1", "--threads", "1"]
    assert main(["prune-bench", "--model", folder, *args, "--calibration", str(tmp_path), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["accuracy"].keys() == {"none", released, f"{released} +debias", former, f"{former} +debias"}
    settings = results["host_settings"]
    assert settings[former]["11%"]["votes"].startswith("the recorded attention of the layer before")
    assert settings[former]["11%"]["recycle"] is None and settings[released]["11%"]["recycle"].startswith("top 0.3")
    assert settings[released]["22%"]["layers"] == [3] and settings[released]["22%"]["budget"].startswith("equal")
    keys = {entry: [t["key"] for t in trends] for entry, trends in results["trends"].items()}
    assert keys[released][0].endswith("__sparsevlm__L3") and keys[former] == [keys[released][0] + "__previous"]
    assert sorted(p.stem for p in tmp_path.glob("*sparsevlm*")) == sorted(keys[released] + keys[former])


@pytest.mark.parametrize("hosts, error", [
    ("sparsevlm:votes=mean", "'sparsevlm:votes=mean': SparseVLM votes must be 'layer'"),
    ("pdrop:strength=2", "unexpected keyword argument 'strength'"),
    ("fastv:layer", "settings are KEY=VALUE"),
    ("pdrop:keep=0.5", "'pdrop:keep=0.5': the bench sets keep itself"),
    ("fastv:debias=True", "the bench sets debias itself"),
    ("random,random", "lists an entry twice"),
    ("fastvv", r"unknown hosts \['fastvv'\]"),
])
def test_a_bad_host_entry_exits_2_before_the_model_loads(hosts, error, monkeypatch, capsys):
    from vlmtools_app import bench

    monkeypatch.setattr(bench, "load", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit:
        main(["prune-bench", "--hosts", hosts, "--out", "unused.json"])
    assert exit.value.code == 2
    assert re.search(error, capsys.readouterr().err)


def test_hallucination_bench_scores_pope_and_chair_per_method(folder, tmp_path, capsys, one_thread):
    out = tmp_path / "hallucination.json"
    args = ["--scenes", "1", "--captions", "2", "--batch", "8", "--caption-tokens", "3", "--threads", "1"]
    assert main(["hallucination-bench", "--model", folder, *args, "--out", str(out)]) == 0
    methods = json.loads(out.read_text())["results"]["methods"]
    assert list(methods) == ["greedy", "var", "gift", "paint"]
    for name, result in methods.items():
        assert result["pope"].keys() == {"random", "popular", "adversarial", "average"}
        assert {"chair_s", "chair_i", "recall"} <= result.keys() and len(result["captions"]) == 2
        assert (result["settings"] is None) == (name == "greedy")
    assert "| paint | adversarial |" in capsys.readouterr().out


def test_hallucination_bench_runs_a_method_at_several_strengths(folder, tmp_path, one_thread):
    out = tmp_path / "hallucination.json"
    args = ["--scenes", "1", "--captions", "0", "--batch", "8", "--threads", "1"]
    methods = "gift,gift:alpha=1.5,paint:alpha=0.2:beta=0.1"
    assert main(["hallucination-bench", "--model", folder, *args, "--methods", methods, "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]["methods"]
    assert list(results) == methods.split(",")
    assert [results[m]["settings"]["alpha"] for m in results] == [5.0, 1.5, 0.2]
    assert results["paint:alpha=0.2:beta=0.1"]["settings"]["beta"] == 0.1


@pytest.mark.parametrize("methods, error", [
    ("gift:alpha", "settings are KEY=VALUE"),
    ("gift:strength=2", "unexpected keyword argument 'strength'"),
    ("greedy:alpha=1", "greedy takes no settings"),
    ("var,var", "lists an entry twice"),
    ("vaar", r"unknown methods \['vaar'\]"),
])
def test_bad_method_entries_fail_before_the_run(methods, error):
    from vlmtools_app.hallucination_bench import parse_methods

    with pytest.raises(ValueError, match=error):
        parse_methods(methods)


def test_method_entries_parse_to_settings():
    from vlmtools_app.hallucination_bench import parse_methods

    assert parse_methods("greedy,var:variant=released,paint:alpha=0.35:head_modulation=False") == [
        ("greedy", "greedy", {}), ("var:variant=released", "var", {"variant": "released"}),
        ("paint:alpha=0.35:head_modulation=False", "paint", {"alpha": 0.35, "head_modulation": False})]


def test_batches_go_whole_to_processes_and_records_merge_in_item_order():
    assert shard.batches(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert shard.evaluate([[2, 3], [0, 1]], lambda batch: [i * 10 for i in batch]) == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="2 records for a batch of 1"):
        shard.evaluate([[0]], lambda batch: [1, 2])


@pytest.mark.slow
def test_two_processes_give_exactly_the_one_process_json(folder, tmp_path, one_thread):
    """torchrun with two CPU processes (gloo): the merged JSON equals a one-process run but for how it ran."""
    main(["prune-bench", "--model", folder, *PRUNE, "--out", str(tmp_path / "one.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    subprocess.run([*launch, "vlmtools_app.cli", "prune-bench", "--model", folder, *PRUNE, "--out", str(tmp_path / "two.json")],
                   check=True, env=env, cwd=tmp_path, timeout=900)
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (one["run"]["processes"], two["run"]["processes"]) == (1, 2)
    del one["run"], two["run"]
    assert one == two


def test_bench_names_are_checked_against_what_exists():
    from vlmtools_app.bench import chosen

    assert chosen("fastv,dart", ["fastv", "pdrop", "dart"], "hosts") == ["fastv", "dart"]
    with pytest.raises(ValueError, match=r"unknown hosts \['fastvv'\]; available: fastv, pdrop"):
        chosen("fastv,fastvv", ["fastv", "pdrop"], "hosts")


def test_answers_are_scored_by_their_first_word():
    from vlmtools.chat import first_word

    assert first_word(" Blue. It is blue") == "blue"
    assert first_word("3,") == "3"
    assert first_word("  ") == ""
