import doctest
import json

import pytest

from hallucination import metrics
from hallucination.metrics import (
    COCO,
    Vocabulary,
    chair,
    mentioned_objects,
    parse_yes_no,
    pope,
    pope_by_split,
    read_coco_captions,
    read_coco_objects,
)
from vlmtools.text import _load_spacy

needs_spacy = pytest.mark.skipif(_load_spacy() is None, reason="CHAIR's lemmas need spaCy and an English pipeline")


# Parsed by hand. "reference": the POPE script's rule (text before the first ".", commas deleted,
# cut at single spaces, "no" iff a piece is exactly "no" / "No" / "not"); "lenient": ours.
@pytest.mark.parametrize("answer, reference, lenient", [
    ("Yes, there is.", True, True),
    ("No.", False, False),
    ("There is not a dog.", False, False),          # "not" is a piece
    ("I don't think so", True, False),              # "don't" is not "not"; lenient reads n't
    ("Nope", True, True),                           # no rule knows "nope"
    ("yes. no.", True, True),                       # only the first sentence counts
    ("No, there is no dog.", False, False),
    ("NO", True, False),                            # the reference rule is case-sensitive
    ("Not at all.", True, False),                   # "Not" is not in {"no", "No", "not"}
    ("There is no dog!", False, False),             # no full stop: the whole text, "no" is a piece
    ("no!", True, False),                           # "!" stays on the piece
    ("Yes, there is no doubt.", False, True),       # lenient takes an opening yes/no at its word
    ("A cat,no dog", True, False),                  # the comma is deleted: "catno"
    (" no", False, False),                          # cut at single spaces: "", "no"
    ("There is a dog! No, wait.", False, True),     # "!" ends no sentence in the reference rule
    ("I don’t see one", True, False),
    (True, True, True), (False, False, False),
])  # fmt: skip
def test_parse_yes_no(answer, reference, lenient):
    assert parse_yes_no(answer) is reference
    assert parse_yes_no(answer, rule="reference") is reference
    assert parse_yes_no(answer, rule="lenient") is lenient


def test_pope_on_free_form_answers_by_hand():
    answers = ["Yes, there is.", "No.", "There is not a dog.", "I don't think so", "Nope", "yes. no.",
               "Not at all.", "No, there is no dog."]  # fmt: skip
    labels = ["yes", "no", "yes", "no", "no", "yes", "no", "no"]
    # reference parse: Y N N Y Y Y Y N -> TP (1, 6), TN (2, 8), FN (3), FP (4, 5, 7)
    m = pope(answers, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["rule"]) == (2, 3, 2, 1, "reference")
    assert m["accuracy"] == pytest.approx(4 / 8) and m["yes_ratio"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 5) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.5)  # 2 TP / (2 TP + FP + FN) = 4 / 8
    # lenient parse: Y N N N Y Y N N -> TP (1, 6), TN (2, 4, 7, 8), FN (3), FP (5)
    m = pope(answers, labels, rule="lenient")
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["rule"]) == (2, 1, 4, 1, "lenient")
    assert m["accuracy"] == pytest.approx(6 / 8) and m["yes_ratio"] == pytest.approx(3 / 8)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)  # 4 / (4 + 1 + 1)
    # per split (3 random, 5 popular); "average" is the plain mean of the two splits
    splits = ["random"] * 3 + ["popular"] * 5
    r = pope_by_split(answers, labels, splits)  # random: TP TN FN; popular: FP FP TP FP TN
    assert (r["random"]["accuracy"], r["popular"]["accuracy"]) == (pytest.approx(2 / 3), pytest.approx(2 / 5))
    assert r["average"]["accuracy"] == pytest.approx(8 / 15) and r["average"]["rule"] == "reference"
    r = pope_by_split(answers, labels, splits, rule="lenient")  # popular: TN FP TP TN TN
    assert (r["random"]["accuracy"], r["popular"]["accuracy"]) == (pytest.approx(2 / 3), pytest.approx(4 / 5))
    assert r["average"]["accuracy"] == pytest.approx(11 / 15)
    with pytest.raises(ValueError, match="rule must be one of"):
        pope(answers, labels, rule="loose")


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


COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]  # fmt: skip

# A hand-made COCO subset: instance annotations and reference captions of four images.
INSTANCES = {
    "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 58, "name": "hot dog"},
                   {"id": 67, "name": "dining table"}, {"id": 70, "name": "toilet"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 1, "category_id": 2},
        {"id": 3, "image_id": 1, "category_id": 2}, {"id": 4, "image_id": 2, "category_id": 58},
        {"id": 5, "image_id": 2, "category_id": 67}, {"id": 6, "image_id": 3, "category_id": 70},
    ],  # image 4: no instance at all
}  # fmt: skip
REFERENCES = {
    "images": INSTANCES["images"],
    "annotations": [
        {"id": 11, "image_id": 1, "caption": "A man riding a bike down the street."},  # person, bicycle
        {"id": 12, "image_id": 1, "caption": "Two dogs run beside a cyclist."},  # dog (only in a caption)
        {"id": 13, "image_id": 2, "caption": "A hot dog on a plate on a table."},  # hot dog, dining table; no dog
        {"id": 14, "image_id": 3, "caption": "A white toilet next to a sink."},  # toilet, sink (only in a caption)
        {"id": 15, "image_id": 4, "caption": "A teddy bear sitting on a chair."},  # teddy bear, chair
    ],
}
# Ground truth = instances + reference captions:
#   1: {person, bicycle, dog}   2: {hot dog, dining table}   3: {toilet, sink}   4: {teddy bear, chair}
GENERATED = [
    # men -> man -> person, bikes -> bike -> bicycle, dog, car, car    hallucinated: car, car
    (1, "Two men ride bikes past a dog and a car. The car is red."),
    # "hot dogs" -> hot dog (no dog), dog, "dining table" -> table -> dining table    hallucinated: dog
    (2, "Hot dogs and a dog on the dining table."),
    # seat: no chair next to "toilet"; toilet; "teddy bear" (no bear)    hallucinated: teddy bear
    (3, "The seat of the toilet is up and a teddy bear sits on it."),
    # teddy bear, chair: both only in the reference caption    hallucinated: none
    (4, "A teddy bear sits on a chair."),
    # person, "motor bike" -> motorcycle; "train track" is no train    hallucinated: motorcycle
    (1, "A person on a motor bike next to a train track."),
]


@needs_spacy
def test_chair_on_a_coco_fixture_by_hand(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    (tmp_path / "captions.json").write_text(json.dumps(REFERENCES))
    objects, references = read_coco_objects(tmp_path / "instances.json"), read_coco_captions(tmp_path / "captions.json")
    r = chair(GENERATED, objects, reference_captions=references)
    assert [c["mentioned"] for c in r["per_caption"]] == [
        ["person", "bicycle", "dog", "car", "car"],
        ["hot dog", "dog", "dining table"],
        ["toilet", "teddy bear"],
        ["teddy bear", "chair"],
        ["person", "motorcycle"],
    ]
    assert [c["hallucinated_words"] for c in r["per_caption"]] == [
        [("car", "car"), ("car", "car")], [("dog", "dog")], [("teddy bear", "teddy bear")], [],
        [("motor bike", "motorcycle")],
    ]  # fmt: skip
    assert [c["ground_truth"] for c in r["per_caption"]] == [
        ["bicycle", "dog", "person"], ["dining table", "hot dog"], ["sink", "toilet"], ["chair", "teddy bear"],
        ["bicycle", "dog", "person"],
    ]  # fmt: skip
    # CHAIR_S: captions 1, 2, 3, 5 of 5 hallucinate; CHAIR_I: (2 + 1 + 1 + 0 + 1) / (5 + 3 + 2 + 2 + 2) mentions
    assert (r["n_captions"], r["n_mentions"], r["n_hallucinated"]) == (5, 14, 5)
    assert r["chair_s"] == pytest.approx(4 / 5) and r["chair_i"] == pytest.approx(5 / 14)
    # recall: (3 + 2 + 1 + 2 + 1) of (3 + 2 + 2 + 2 + 3) ground-truth objects
    assert r["recall"] == pytest.approx(9 / 12)
    assert r["vocabulary"] == "coco" and r["lemmatizer"].startswith("spacy:")

    # Instances alone: 1 {person, bicycle}, 2 {hot dog, dining table}, 3 {toilet}, 4 {}.
    # Hallucinated: 1 dog, car, car; 2 dog; 3 teddy bear; 4 teddy bear, chair; 5 motorcycle
    r = chair(GENERATED, objects)
    assert [c["hallucinated"] for c in r["per_caption"]] == [
        ["dog", "car", "car"], ["dog"], ["teddy bear"], ["teddy bear", "chair"], ["motorcycle"]
    ]
    assert r["chair_s"] == pytest.approx(5 / 5) and r["chair_i"] == pytest.approx(8 / 14)
    # Reference captions alone are ground truth too (image 4 has no instance entry here)
    r = chair([GENERATED[3]], {}, reference_captions={4: ["A teddy bear sitting on a chair."]})
    assert (r["chair_s"], r["chair_i"], r["recall"]) == (0.0, 0.0, 1.0)


@needs_spacy
@pytest.mark.parametrize("caption, found", [
    ("A hot dog and a teddy bear.", [("hot dog", "hot dog"), ("teddy bear", "teddy bear")]),  # no dog, no bear
    ("Two men and three women.", [("man", "person"), ("woman", "person")]),
    ("Bikes and a motor bike.", [("bike", "bicycle"), ("motor bike", "motorcycle")]),
    ("Knives, forks and scissors.", [("knife", "knife"), ("fork", "fork"), ("scissors", "scissors")]),
    ("Oxen, mice and geese.", [("oxen", "cow"), ("mouse", "mouse"), ("goose", "bird")]),
    ("A man skiing on skis.", [("man", "person"), ("ski", "skis")]),  # "skiing" is no ski
    ("A man is skateboarding; a woman is bowling.", [("man", "person"), ("woman", "person")]),
    ("A baby elephant and a passenger train.", [("elephant", "elephant"), ("train", "train")]),  # no persons
    ("A train track near a bus.", [("bus", "bus")]),
    ("The seat of the toilet.", [("toilet", "toilet")]),
    ("A toilet seat.", [("toilet", "toilet")]),
    ("A seat by the window.", [("seat", "chair")]),
    ("Wine glasses on the dining table.", [("wine glass", "wine glass"), ("table", "dining table")]),
    ("A man with a bow tie and an iPhone.", [("man", "person"), ("tie", "tie"), ("iphone", "cell phone")]),
])  # fmt: skip
def test_chair_reads_words_as_the_original_does(caption, found):
    assert mentioned_objects(caption) == found


def test_chair_with_a_world_of_its_own():
    shapes = {"circle": ["circle", "disc", "ring"], "square": ["square"], "triangle": ["triangle"]}
    pairs = [("a", "Three red circles and a blue square."), ("a", "A disc."), ("b", "Two triangles, no dogs.")]
    r = chair(pairs, {"a": ["circle"], "b": ["triangle"]}, synonyms=shapes)
    assert [c["hallucinated"] for c in r["per_caption"]] == [["square"], [], []]
    assert (r["chair_s"], r["chair_i"]) == (pytest.approx(1 / 3), pytest.approx(1 / 4))
    assert mentioned_objects("rings and discs", shapes) == [("ring", "circle"), ("disc", "circle")]


@pytest.mark.parametrize("lemmatizer", ["auto", "suffixes"])
def test_chair_with_colour_shape_names(lemmatizer):
    # as hallucination-bench calls it on the zoo: every name is a two-word phrase read as itself
    names = [f"{c} {s}" for c in ("red", "blue", "green", "orange") for s in ("circle", "square", "cross")]
    captions = ["A red circle, two blue crosses and a green square. The red circle is large.", "An orange cross."]
    r = chair(list(enumerate(captions)), {0: {"red circle", "blue cross"}, 1: {"orange square"}},
              synonyms={n: [n] for n in names}, lemmatizer=lemmatizer)  # fmt: skip
    # 0: red circle, blue cross, green square (hallucinated), red circle; 1: orange cross (hallucinated; no fruit)
    assert [c["mentioned"] for c in r["per_caption"]] == [
        ["red circle", "blue cross", "green square", "red circle"], ["orange cross"]
    ]
    assert (r["chair_s"], r["chair_i"], r["recall"]) == (1.0, pytest.approx(2 / 5), pytest.approx(2 / 3))


def test_suffix_lemmatizer_without_spacy():
    words, used = metrics.caption_words(["Two men ride bikes past ponies."], lemmatizer="suffixes")
    assert used == "suffixes"
    assert words == [["two", "men", "ride", "bike", "past", "pony", "."]]  # irregular "men" is missed
    r = chair({1: "Two men ride bikes past ponies."}, {1: {"bicycle"}}, lemmatizer="suffixes")
    assert r["per_caption"][0]["hallucinated"] == ["horse"] and r["lemmatizer"] == "suffixes"
    with pytest.raises(ValueError, match="lemmatizer must be"):
        metrics.caption_words(["a dog"], lemmatizer="nltk")


def test_chair_fails_fast():
    with pytest.raises(KeyError, match="no ground-truth objects for image 7"):
        chair({7: "a dog"}, {1: {"dog"}})
    with pytest.raises(ValueError, match=r"\['unicorn'\] are not in the 'coco' vocabulary"):
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


def test_read_coco_captions():
    assert read_coco_captions(REFERENCES) == {
        1: ["A man riding a bike down the street.", "Two dogs run beside a cyclist."],
        2: ["A hot dog on a plate on a table."],
        3: ["A white toilet next to a sink."],
        4: ["A teddy bear sitting on a chair."],
    }


def test_coco_vocabulary_is_the_original_table():
    assert list(COCO.synonyms) == COCO_NAMES
    # the person line lists 67 words, 5 of them twice (person, woman, guy, child, gentleman)
    assert len(COCO.synonyms["person"]) == 62 and COCO.synonyms["hair drier"] == ("hair drier", "hairdryer")
    forms = COCO.forms
    assert (forms["puppy"], forms["motorbike"], forms["sofa"]) == ("dog", "motorcycle", "couch")
    # entries the original script could not match (a double space before them, a capital)
    assert (forms["motor bike"], forms["cheesecake"], forms["iphone"]) == ("motorcycle", "cake", "cell phone")
    # 25 phrases read as themselves, baby / adult + 12 animal words, 4 more
    assert len(COCO.phrases) == 25 + 24 + 4
    assert COCO.phrases[("baby", "cub")] == "cub" and COCO.phrases[("toilet", "seat")] == "toilet"
    assert COCO.phrases[("train", "track")] == "train track" and "train track" not in forms
    assert COCO.ignore == {"seat": "toilet"}
    assert COCO.object_of("motorbike") == "motorcycle" and COCO.object_of("Traffic Light") == "traffic light"


def test_vocabulary_file_format(tmp_path):
    path = tmp_path / "toys.txt"
    path.write_text("# toys\n[synonyms]\nball, balls,  Orb\nhoop\n[phrases]\nbeach ball\nhula hoop -> hoop\n"
                    "[ignore]\norb <- wizard\n")  # fmt: skip
    v = Vocabulary.read(path)
    assert v.name == "toys" and v.synonyms == {"ball": ("ball", "balls", "orb"), "hoop": ("hoop",)}
    assert v.phrases == {("beach", "ball"): "beach ball", ("hula", "hoop"): "hoop"} and v.ignore == {"orb": "wizard"}
    # "beach ball" reads as itself and names nothing; "orb" is no ball next to "wizard"
    assert v.mentions("a beach ball , a hula hoop and an orb".split()) == [("hoop", "hoop"), ("orb", "ball")]
    assert v.mentions("the wizard 's orb and ball".split()) == [("ball", "ball")]
    path.write_text("ball, orb\n")
    with pytest.raises(ValueError, match="toys.txt:1: cannot read"):
        Vocabulary.read(path)


def test_docstring_examples():
    assert doctest.testmod(metrics).failed == 0
