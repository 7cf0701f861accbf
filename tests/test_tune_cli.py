"""``vlmtools tune``: refusals (no data for a model that is no zoo model, a malformed file) end with exit
status 2 and write nothing; on a random LLaVA folder with a VQA file of zoo scenes it writes a head selection
the library loads back. The sink-tuning benchmark's scoring against hand-computed accuracies."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.zoo_folders import tiny_llava_folder
from vlmtools_app.cli import main
from vlmtools_zoo import world

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llava_folder(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> tuple[Path, Path]:
    """A VQA file of the zoo's first val questions and the folder of their scenes as PNGs."""
    root = tmp_path_factory.mktemp("vqa")
    images = root / "images"
    images.mkdir()
    lines = []
    for scene, question in world.qa_items("val", QUESTIONS):
        world.scene("val", scene).image.save(images / f"{scene}.png")
        lines.append(json.dumps({"image": f"{scene}.png", "question": question.question, "answer": question.answer}))
    (root / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return root / "vqa.jsonl", images


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


def test_refuses_a_model_without_data_and_a_malformed_file(folder, vqa, tmp_path, capsys):
    directory = tmp_path / "calibration"
    err = refused(["tune", "--method", "act", "--model", folder, "--directory", str(directory)], capsys)
    assert "is no zoo model" in err and f"vlmtools tune --method act --model {folder} --vqa FILE --images DIR" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(vqa[0].read_text().splitlines()[0] + "\n{not json\n")
    err = refused(["tune", "--method", "zerotuning", "--model", folder, "--vqa", str(bad), "--images", str(vqa[1]),
                   "--directory", str(directory)], capsys)
    assert f"{bad}:2: not a JSON line" in err
    err = refused(["tune", "--method", "act", "--model", folder, "--vqa", str(vqa[0]), "--directory", str(directory)],
                  capsys)
    assert "--vqa needs --images DIR" in err
    err = refused(["tune", "--method", "act", "--model", folder, "--vqa", str(vqa[0]), "--images", str(vqa[1]),
                   "--layers", "99", "--directory", str(directory)], capsys)
    assert "layers [99] have no attention" in err
    assert not directory.exists()


@pytest.mark.parametrize("method", ["act", "zerotuning"])
def test_writes_a_selection_the_library_loads(method, folder, vqa, tmp_path, capsys, one_thread):
    import tuning
    import vlmtools
    from vlmtools_app.inputs import load_vlm

    directory = tmp_path / "calibration"
    assert main(["tune", "--method", method, "--model", folder, "--vqa", str(vqa[0]), "--images", str(vqa[1]),
                 "--layers", "2", "--heads", "0", "1", "--directory", str(directory)]) == 0
    path = directory / f"{Path(folder).name}__{method}.json"
    assert f"wrote {path}" in capsys.readouterr().out
    vlm = vlmtools.wrap(*load_vlm(folder))
    selection = tuning.HeadSelection.stored(vlm, method, directory)
    assert (selection.method, selection.samples, selection.score) == (method, QUESTIONS, "first_token")
    tried = {(entry["layer"], entry["head"]) for entry in selection.profile}
    assert tried == {(2, 0), (2, 1)}
    assert len(selection.profile) == 2 * (2 if method == "zerotuning" else 1)
    assert set(selection.heads) <= {2} and all(set(heads) <= {0, 1} for heads in selection.heads.values())
    assert (selection.gamma is not None) == (method == "zerotuning")


def test_benchmark_scores_hand_made_answers():
    spec = importlib.util.spec_from_file_location("sink_tuning", ROOT / "benchmarks" / "sink_tuning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # first words: yes (right), "Purple." -> purple (wrong: red), "3 shapes" -> 3 (right), "" (wrong)
    assert bench.qa_accuracy(["yes", "Purple.", "3 shapes", ""], ["yes", "red", "3", "circle"]) == 0.5
    got = bench.scores(["yes"], ["yes"], ["Yes, there is.", "No.", "no", "There is no circle."],
                       ["yes", "yes", "no", "no"], ["random", "random", "adversarial", "adversarial"])
    assert got["qa"] == 1.0
    # the reference rule: "There is no circle." has the piece "no": a no; random 1/2 right, adversarial 2/2
    assert got["pope"]["random"]["accuracy"] == 0.5 and got["pope"]["adversarial"]["accuracy"] == 1.0
    assert got["pope"]["average"]["accuracy"] == 0.75
    with pytest.raises(ValueError, match="2 answers for 1 questions"):
        bench.qa_accuracy(["yes", "no"], ["yes"])


def test_decoding_step_times_only_the_steps_after_the_prefill():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    ticks = iter([10.0, 11.0, 13.0, 16.0])  # the clock after each token: the first one ends the prefill

    def generate(stopping_criteria):
        for length in range(4):
            assert not stopping_criteria(torch.zeros(1, 5 + length, dtype=torch.long), None).any()

    assert common.decoding_step(generate, lambda: next(ticks)) == 2.0  # (16 - 10) / 3 steps
    with pytest.raises(ValueError, match="at least two tokens"):
        common.decoding_step(lambda stopping_criteria: stopping_criteria(torch.zeros(1, 5, dtype=torch.long), None),
                             lambda: 0.0)
