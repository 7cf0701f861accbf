import doctest
import json

import pytest

from hallucination import metrics
from hallucination.metrics import (
    chair,
    mentioned_objects,
    parse_yes_no,
    plural,
    pope,
    pope_by_split,
    read_coco_objects,
    read_pope,
)


@pytest.mark.parametrize("answer, yes", [
    ("Yes", True), ("yes.", True), ("Yes, there is a dog in the image.", True),
    ("Yes, there is no doubt a dog.", True),  # the reference script would say "no"
    ("No", False), ("No, there is not.", False), ("no dog", False),
    ("There is a dog in the image.", True), ("There isn't a dog.", False),
    ("There is no dog. Yes, I am sure.", False),  # only the first sentence counts
    ("I don’t see one", False), ("  YES!", True), (True, True), (False, False),
])  # fmt: skip
def test_parse_yes_no(answer, yes):
    assert parse_yes_no(answer) is yes


def test_pope_counts_and_rates():
    pred = ["Yes", "yes", "No", "no", "Yes, there is", "No."]
    gold = ["yes", "no", "yes", "no", "yes", "no"]
    m = pope(pred, gold)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.5)
    # an always-"no" model has no positives: precision, recall, F1 are 0, not an error
    m = pope(["no"] * 4, ["yes", "no", "yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)


def test_pope_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="at least one"):
        pope([], [])


def test_pope_by_split_averages_splits_not_items():
    pred = ["yes"] * 4 + ["yes"] * 2
    gold = ["yes"] * 4 + ["no"] * 2
    r = pope_by_split(pred, gold, ["random"] * 4 + ["adversarial"] * 2)
    assert list(r) == ["random", "adversarial", "average"]
    assert r["random"]["accuracy"] == 1.0 and r["adversarial"]["accuracy"] == 0.0
    assert r["average"]["accuracy"] == 0.5  # pooled over items it would be 4/6
    with pytest.raises(ValueError, match="lengths differ"):
        pope_by_split(pred, gold, ["random"])


def test_read_pope(tmp_path):
    rows = [
        {
            "question_id": 1,
            "image": "COCO_val2014_000000310196.jpg",
            "text": "Is there a snowboard in the image?",
            "label": "yes",
        },
        {
            "question_id": 2,
            "image": "COCO_val2014_000000310196.jpg",
            "text": "Is there a dog in the image?",
            "label": "no",
        },
    ]
    path = tmp_path / "coco_pope_adversarial.json"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    qs = read_pope(path)
    assert [(q.question_id, q.label, q.split) for q in qs] == [(1, "yes", "adversarial"), (2, "no", "adversarial")]
    assert qs[0].text.startswith("Is there a snowboard") and qs[0].image.endswith("310196.jpg")
    assert read_pope(path, split="mine")[0].split == "mine"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "?"}))
    with pytest.raises(ValueError, match="bad.jsonl:1: POPE record lacks field 'label'"):
        read_pope(tmp_path / "bad.jsonl")


def test_plural():
    words = ["dog", "glass", "box", "bench", "toothbrush", "pony", "toy", "person", "wine glass", "sheep"]
    assert [plural(w) for w in words] == [
        "dogs", "glasses", "boxes", "benches", "toothbrushes", "ponies", "toys", "people", "wine glasses", "sheep"
    ]  # fmt: skip


def test_chair_by_hand():
    captions = {
        1: "Two dogs play with a frisbee while a man watches. The dog is happy.",
        2: "A cat sleeps on a sofa next to a laptop.",
        3: "A hot dog on a plate.",
    }
    objects = {1: {"dog", "person", "frisbee"}, 2: {"cat", "couch"}, 3: {"sandwich"}}
    r = chair(captions, objects)
    got = {c["image_id"]: (c["mentioned"], c["hallucinated"]) for c in r["per_caption"]}
    assert got == {
        1: (["dog", "frisbee", "person", "dog"], []),
        2: (["cat", "couch", "laptop"], ["laptop"]),
        3: (["hot dog"], ["hot dog"]),  # not a dog: the longest form wins
    }
    assert r["n_mentions"] == 8 and r["n_hallucinated"] == 2  # "dog" twice counts twice
    assert r["chair_s"] == pytest.approx(2 / 3) and r["chair_i"] == pytest.approx(2 / 8)
    assert r["recall"] == pytest.approx(5 / 6)


def test_chair_with_a_world_of_its_own():
    shapes = {"circle": ["circle", "disc", "ring"], "square": ["square"], "triangle": ["triangle"]}
    pairs = [("a", "Three red circles and a blue square."), ("a", "A disc."), ("b", "Two triangles, no dogs.")]
    r = chair(pairs, {"a": ["circle"], "b": ["triangle"]}, synonyms=shapes)
    assert [c["hallucinated"] for c in r["per_caption"]] == [["square"], [], []]
    assert (r["chair_s"], r["chair_i"]) == (pytest.approx(1 / 3), pytest.approx(1 / 4))
    assert mentioned_objects("rings and discs", shapes) == [("rings", "circle"), ("discs", "circle")]


def test_chair_fails_fast():
    with pytest.raises(KeyError, match="no ground-truth objects for image 7"):
        chair({7: "a dog"}, {1: {"dog"}})
    with pytest.raises(ValueError, match=r"\['unicorn'\] are not keys"):
        chair({1: "a dog"}, {1: {"unicorn"}})
    with pytest.raises(ValueError, match="names both"):
        chair({1: "a dog"}, {1: {"dog"}}, synonyms={"dog": ["dog"], "puppy": ["dog"]})
    with pytest.raises(ValueError, match="at least one caption"):
        chair({}, {1: {"dog"}})


def test_read_coco_objects(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 63, "name": "couch"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 18}, {"id": 11, "image_id": 1, "category_id": 18},
            {"id": 12, "image_id": 1, "category_id": 1}, {"id": 13, "image_id": 2, "category_id": 63},
        ],
    }  # fmt: skip
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(data))
    objs = read_coco_objects(path)
    assert objs == {1: {"dog", "person"}, 2: {"couch"}, 3: set()}
    assert read_coco_objects(data) == objs
    assert chair({3: "a dog"}, objs)["chair_s"] == 1.0


def test_coco_synonyms_cover_coco_and_do_not_clash():
    assert len(metrics.COCO_SYNONYMS) == 80
    metrics._surface_index(metrics.COCO_SYNONYMS)  # raises on a form naming two objects


def test_docstring_examples():
    assert doctest.testmod(metrics).failed == 0
