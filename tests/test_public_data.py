"""The benches on public formats: POPE question files, COCO captions / instances, VQA question files and
saved Hugging Face datasets, written here from held-out zoo scenes (PNG files), give exactly the answers the
in-memory benches give on the same scenes; VQA accuracy and its answer normalisation against hand-computed
values; every kind of bad input refused with one message naming the file and line (or column), exit
status 2 and no file written."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.zoo_folders import tiny_llava_folder
from vlmtools.chat import first_word
from vlmtools_app.cli import main
from vlmtools_zoo import world

SCENES = 1  # zoo POPE scenes per split
CAPTIONS = 2
QUESTIONS = 3
CALIBRATION = 2
HALLUCINATION = ["--batch", "4", "--caption-tokens", "3", "--methods", "greedy,var", "--threads", "1"]
PRUNE = ["--batch", "2", "--hosts", "fastv,random", "--calibration-samples", str(CALIBRATION), "--threads", "1"]


def png(scene, folder: Path, name: str) -> str:
    scene.image.save(folder / name)
    return name


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llava_folder(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Zoo test scenes as PNGs in images/, with POPE files (one per split), COCO captions / instances of the
    captioned scenes, a VQA file of the zoo's questions, val scenes and their questions to calibrate on, and
    the same POPE / VQA / CHAIR items as saved datasets."""
    import datasets

    root = tmp_path_factory.mktemp("public")
    images = root / "images"
    images.mkdir()
    name = {i: png(world.scene("test", i), images, f"COCO_test_{i:06d}.png")
            for i in range(max(SCENES, CAPTIONS, 1 + max(s for s, _ in world.qa_items("test", QUESTIONS))))}
    pope = {}
    for kind in ("random", "popular", "adversarial"):
        pope[kind] = write_jsonl(root / f"shapes_pope_{kind}.jsonl", (
            {"question_id": k, "image": name[scene], "text": question, "label": label}
            for k, (scene, question, label) in enumerate(world.pope("test", SCENES, kind))))
    names = sorted(f"{c} {s}" for c in world.COLOURS for s in world.SHAPES)
    shown = [world.scene("test", i) for i in range(CAPTIONS)]
    listed = [{"id": 100 + i, "file_name": name[i], "width": s.width, "height": s.height} for i, s in enumerate(shown)]
    captions = root / "captions.json"
    captions.write_text(json.dumps({"images": listed, "annotations": [
        {"id": i, "image_id": 100 + i, "caption": s.listing()} for i, s in enumerate(shown)]}))
    instances = root / "instances.json"
    instances.write_text(json.dumps({
        "images": listed, "categories": [{"id": k, "name": n} for k, n in enumerate(names)],
        "annotations": [{"id": 10 * i + j, "image_id": 100 + i, "category_id": names.index(o.name)}
                        for i, s in enumerate(shown) for j, o in enumerate(s.objects)]}))
    qa = world.qa_items("test", QUESTIONS)
    vqa = write_jsonl(root / "vqa.jsonl", ({"image": name[s], "question": q.question, "answer": q.answer} for s, q in qa))
    calibration = root / "calibration"
    calibration.mkdir()
    held_out = world.qa_items("val", CALIBRATION)
    for k, (s, _) in enumerate(held_out):
        png(world.scene("val", s), calibration, f"{k:03d}.png")
    questions = root / "questions.txt"
    questions.write_text("".join(q.question + "\n" for _, q in held_out))

    image = datasets.Image()
    pope_rows = [(kind, scene, question, label) for kind in pope for scene, question, label in world.pope("test", SCENES, kind)]
    pope_set = root / "pope-dataset"
    datasets.Dataset.from_dict(
        {"image": [world.scene("test", s).image for _, s, _, _ in pope_rows], "question": [q for _, _, q, _ in pope_rows],
         "label": [label for *_, label in pope_rows], "category": [kind for kind, *_ in pope_rows]},
        features=datasets.Features({"image": image, "question": datasets.Value("string"),
                                    "label": datasets.Value("string"), "category": datasets.Value("string")}),
    ).save_to_disk(str(pope_set))
    vqa_set = root / "vqa-dataset"  # a DatasetDict of one split; the images as paths under images/
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"image": [name[s] for s, _ in qa], "question": [q.question for _, q in qa], "answers": [[q.answer] for _, q in qa]})
    }).save_to_disk(str(vqa_set))
    chair_set = root / "chair-dataset"
    datasets.Dataset.from_dict({"image": [s.image for s in shown], "objects": [[o.name for o in s.objects] for s in shown]},
                               features=datasets.Features({"image": image, "objects": datasets.Sequence(datasets.Value("string"))}),
                               ).save_to_disk(str(chair_set))
    return {"root": root, "images": images, "name": name, "pope": pope, "captions": captions, "instances": instances,
            "vqa": vqa, "calibration": calibration, "questions": questions, "pope_set": pope_set, "vqa_set": vqa_set,
            "chair_set": chair_set}


def run(command: str, *args, out: Path) -> dict:
    assert main([command, *map(str, args), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def zoo_hallucination(folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zoo") / "hallucination.json"
    return run("hallucination-bench", "--model", folder, "--scenes", SCENES, "--captions", CAPTIONS, *HALLUCINATION,
               out=out)["results"]


def test_pope_and_coco_files_give_the_zoo_benchs_answers_and_scores(folder, data, zoo_hallucination, tmp_path,
                                                                     one_thread):
    pope = [a for kind in ("random", "popular", "adversarial") for a in ("--pope", data["pope"][kind])]
    result = run("hallucination-bench", "--model", folder, *pope, "--coco-captions", data["captions"],
                 "--coco-instances", data["instances"], "--images", data["images"], "--captions", CAPTIONS,
                 "--caption-prompt", world.DESCRIBE_PROMPT, *HALLUCINATION, out=tmp_path / "public.json")
    results = result["results"]
    for method, zoo in zoo_hallucination["methods"].items():
        mine = results["methods"][method]
        assert mine["pope_answers"] == zoo["pope_answers"] and mine["captions"] == zoo["captions"]
        assert mine["pope"] == zoo["pope"]
        assert {k: mine[k] for k in ("chair_s", "chair_i", "recall")} == {k: zoo[k] for k in ("chair_s", "chair_i", "recall")}
        assert mine["pope"].keys() == {"random", "popular", "adversarial", "average"}
        assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= mine["pope"]["random"].keys()
    assert results["pope_items"] == zoo_hallucination["pope_items"] and results["captions"] == CAPTIONS
    record = results["data"]
    assert record["pope"]["items"] == zoo_hallucination["pope_items"] and record["chair"]["items"] == CAPTIONS
    files = {f["path"]: f["sha256"] for f in record["pope"]["files"] + record["chair"]["files"]}
    for path in [*data["pope"].values(), data["captions"], data["instances"]]:
        assert files[str(path)] == sha(path)
    images = [f for f in record["chair"]["files"] if f["path"] == str(data["images"])]
    assert images[0]["images"] == CAPTIONS and len(images[0]["sha256"]) == 64
    assert result["settings"]["pope"] == [str(data["pope"][k]) for k in ("random", "popular", "adversarial")]


def test_a_saved_pope_dataset_gives_the_zoo_benchs_answers(folder, data, zoo_hallucination, tmp_path, one_thread):
    results = run("hallucination-bench", "--model", folder, "--dataset", data["pope_set"], *HALLUCINATION,
                  out=tmp_path / "dataset.json")["results"]
    for method, zoo in zoo_hallucination["methods"].items():
        assert results["methods"][method]["pope_answers"] == zoo["pope_answers"]
        assert results["methods"][method]["pope"] == zoo["pope"]  # splits from the category column
        assert "chair_s" not in results["methods"][method]
    assert results["data"]["pope"]["items"] == zoo_hallucination["pope_items"] and "chair" not in results["data"]
    arrow = [f for f in results["data"]["pope"]["files"] if f["path"].endswith(".arrow")]
    assert arrow and all(f["sha256"] == sha(f["path"]) for f in arrow)


def test_a_saved_chair_dataset_gives_the_zoo_benchs_captions_and_scores(folder, data, zoo_hallucination, tmp_path,
                                                                        one_thread):
    results = run("hallucination-bench", "--model", folder, "--dataset", data["chair_set"], "--captions", CAPTIONS,
                  "--caption-prompt", world.DESCRIBE_PROMPT, *HALLUCINATION, out=tmp_path / "chair.json")["results"]
    from hallucination.metrics import chair

    assert results["pope_items"] == 0 and results["data"]["chair"]["items"] == CAPTIONS
    objects = {i: {o.name for o in world.scene("test", i).objects} for i in range(CAPTIONS)}
    vocabulary = {name: [name] for name in sorted(set().union(*objects.values()))}  # the objects of the rows read
    for method, zoo in zoo_hallucination["methods"].items():
        mine = results["methods"][method]
        assert mine["captions"] == zoo["captions"] and mine["pope"] == {}
        expected = chair(list(enumerate(zoo["captions"])), objects, vocabulary)
        assert {k: mine[k] for k in ("chair_s", "chair_i", "recall")} == {k: expected[k] for k in ("chair_s", "chair_i", "recall")}


def test_a_vqa_file_gives_the_zoo_benchs_answers_and_trends_fit_on_your_images(folder, data, tmp_path, one_thread):
    from vlmtools.vqa import vqa_accuracy

    zoo = run("prune-bench", "--model", folder, "--questions", QUESTIONS, *PRUNE, out=tmp_path / "zoo.json")["results"]
    calibrate = ["--calibration-images", data["calibration"], "--calibration-questions", data["questions"]]
    result = run("prune-bench", "--model", folder, "--vqa", data["vqa"], "--images", data["images"], *PRUNE, *calibrate,
                 out=tmp_path / "vqa.json")
    results = result["results"]
    assert results["trends"] == zoo["trends"]  # your images and questions = the zoo's val prompts here
    assert results["accuracy"].keys() == zoo["accuracy"].keys() and "kept_share" not in results
    answers = [q.answer for _, q in world.qa_items("test", QUESTIONS)]
    for label, row in results["answers"].items():
        for ratio, mine in row.items():
            assert [first_word(a) for a in mine] == zoo["answers"][label][ratio]
            assert results["accuracy"][label][ratio] == pytest.approx(
                sum(vqa_accuracy(a, [t]) for a, t in zip(mine, answers)) / QUESTIONS)
    assert results["n"] == QUESTIONS and results["data"]["vqa"]["items"] == QUESTIONS
    assert results["data"]["vqa"]["files"][0] == {"path": str(data["vqa"]), "sha256": sha(data["vqa"])}
    # the same questions as a saved dataset (answers as lists, images as paths under --images): the same answers
    again = run("prune-bench", "--model", folder, "--dataset", data["vqa_set"], "--images", data["images"], *PRUNE,
                *calibrate, out=tmp_path / "dataset.json")["results"]
    assert again["answers"] == results["answers"] and again["accuracy"] == results["accuracy"]


def test_prune_bench_scores_pope_files_as_yes_no_accuracy(folder, data, tmp_path, one_thread):
    from hallucination.metrics import pope

    results = run("prune-bench", "--model", folder, "--pope", data["pope"]["random"], "--images", data["images"],
                  "--questions", 2, "--batch", "2", "--hosts", "random", "--calibration-samples", "0", "--threads", "1",
                  out=tmp_path / "pope.json")["results"]
    labels = [json.loads(line)["label"] for line in data["pope"]["random"].read_text().splitlines()[:2]]
    assert results["n"] == 2 and results["data"]["pope"]["items"] == 2 and results["metric"].startswith("POPE")
    for label, row in results["answers"].items():
        for ratio, answers in row.items():
            assert results["accuracy"][label][ratio] == pope(answers, labels)["accuracy"]


def test_a_saved_chair_dataset_reads_images_objects_and_vocabulary(data):
    import numpy as np

    from hallucination.coco import chair_synonyms, read_chair_coco
    from hallucination.metrics import COCO
    from vlmtools.data import read_dataset

    read = read_dataset(data["chair_set"], "chair", limit=1)
    scene = world.scene("test", 0)
    assert len(read.examples) == 1 and read.examples[0].objects == tuple(o.name for o in scene.objects)
    assert np.array_equal(np.asarray(read.examples[0].load_image()), np.asarray(scene.image))
    coco, categories = read_chair_coco(data["captions"], data["instances"], data["images"])
    assert [e.key for e in coco.examples] == [100, 101] and coco.examples[0].answers == (scene.listing(),)
    assert set(coco.examples[0].objects) == {o.name for o in scene.objects}
    assert chair_synonyms(categories) == {n: [n] for n in categories}
    assert chair_synonyms(["dog", "person"]) is COCO


# ---- VQA accuracy and normalisation, by hand -------------------------------------------------------------

@pytest.mark.parametrize("text, normal", [
    ("Two dogs.", "2 dogs"),  # period dropped, number word -> digit
    ("The cat's toy", "cat's toy"),  # article dropped, apostrophe kept
    ("dont know", "don't know"),  # contraction given its apostrophe
    ("3.5", "3.5"),  # a period before a digit stays
    ("1,000", "1000"),  # a comma between digits: punctuation removed, not spaced
    ("yes, it is", "yes it is"),  # punctuation next to a space is removed
    ("black/white", "black white"),  # punctuation inside a word becomes a space
    ("A red-ish car!", "red ish car"),
    ("None", "0"),
    ("  Ten\tapples\n", "10 apples"),
])
def test_answers_are_normalised_as_the_vqa_evaluation_does(text, normal):
    from vlmtools.vqa import normalize_answer

    assert normalize_answer(text) == normal


@pytest.mark.parametrize("prediction, answers, accuracy", [
    ("Yes.", ["yes"] * 2 + ["no"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # ten answers: each left out in turn
    ("no", ["yes"] * 2 + ["no"] * 8, 1.0),
    ("no", ["no"] * 3 + ["yes"] * 7, (3 * 2 / 3 + 7 * 1) / 10),
    ("maybe", ["yes"] * 10, 0.0),
    ("red", ["red", "Red.", "blue", "the red"], 1.0),  # not ten: min(matches / 3, 1)
    ("blue", ["red", "Red.", "blue", "the red"], 1 / 3),
    ("two", ["2", "3"], 1 / 3),
    ("Two.", ["2"], 1.0),  # one answer: exact match after normalisation
    ("three", ["2"], 0.0),
])
def test_vqa_accuracy_matches_hand_computed_values(prediction, answers, accuracy):
    from vlmtools.vqa import vqa_accuracy

    assert vqa_accuracy(prediction, answers) == pytest.approx(accuracy)


# ---- bad input: one message naming the file and line (or column), exit 2, nothing written ------------------

@pytest.fixture(scope="module")
def cases(data, tmp_path_factory) -> dict:
    """Each case: (command and its arguments, the message expected)."""
    import datasets

    tmp_path = tmp_path_factory.mktemp("bad")
    one = json.loads(data["pope"]["random"].read_text().splitlines()[0])
    missing = write_jsonl(tmp_path / "missing.jsonl", [one, {**one, "image": "nowhere.png"}])
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(one) + "\n{\"image\": \"x.png\", \"text\": \n")
    label = write_jsonl(tmp_path / "label.jsonl", [{**one, "label": "maybe"}])
    no_answer = write_jsonl(tmp_path / "no-answer.jsonl", [{"image": one["image"], "question": "What?"}])
    instances = json.loads(data["instances"].read_text())
    instances["images"] = instances["images"][1:]
    instances["annotations"] = [a for a in instances["annotations"] if a["image_id"] != 100]
    lacking = tmp_path / "instances.json"
    lacking.write_text(json.dumps(instances))
    no_label = tmp_path / "no-label"
    datasets.Dataset.from_dict({"image": [one["image"]], "question": ["Is there?"], "answer": ["yes"]}).save_to_disk(str(no_label))
    bad_row = tmp_path / "bad-row"
    datasets.Dataset.from_dict({"image": [one["image"]] * 2, "question": ["Is there?"] * 2, "label": ["yes", "perhaps"]}
                               ).save_to_disk(str(bad_row))
    images = ["--images", str(data["images"])]
    hb, pb = "hallucination-bench", "prune-bench"
    return {
        "missing image": ([hb, "--pope", missing, *images], f"{missing}:2: no image file {data['images'] / 'nowhere.png'}"),
        "malformed line": ([hb, "--pope", malformed, *images], f"{malformed}:2: not a JSON line"),
        "label": ([hb, "--pope", label, *images], f"{label}:1: label 'maybe' is not yes or no"),
        "vqa answer": ([pb, "--vqa", no_answer, *images], f"{no_answer}:1: give one of the fields 'answer'"),
        "image id": ([hb, "--coco-captions", data["captions"], "--coco-instances", lacking, *images],
                     f"{lacking}: no image id 100 (listed at {data['captions']}: images[0])"),
        "column": ([hb, "--dataset", no_label, "--dataset-task", "pope", *images], f"{no_label}: no column 'label'"),
        "column value": ([hb, "--dataset", bad_row, *images], f"{bad_row}: row 1, column 'label': label 'perhaps' is not yes or no"),
        "no task": ([hb, "--dataset", no_label, *images], f"{no_label}: its columns (answer, image, question) fit none"),
        "no images": ([hb, "--pope", data["pope"]["random"]], "--pope needs --images DIR"),
        "no trend": ([pb, "--model", str(tmp_path), "--vqa", data["vqa"], *images], f"{tmp_path} is no zoo model"),
    }


CASES = ["missing image", "malformed line", "label", "vqa answer", "image id", "column", "column value", "no task",
         "no images", "no trend"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_naming_the_file_and_line_and_writes_nothing(case, cases, tmp_path, capsys):
    argv, message = cases[case]
    out = tmp_path / "out" / "result.json"
    with pytest.raises(SystemExit) as exit:
        main([*map(str, argv), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith(f"vlmtools {argv[0]}: error: ") and message in err, err
    assert err.count("\n") == 1 and not out.exists() and not out.parent.exists()


def test_the_readers_and_vqa_examples_hold():
    import doctest

    import hallucination.coco
    import vlmtools.data
    import vlmtools.vqa

    for module in (vlmtools.vqa, vlmtools.data, hallucination.coco):
        assert doctest.testmod(module).failed == 0
