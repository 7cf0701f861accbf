"""Hallucination metrics: POPE (yes/no object probing) and CHAIR (objects in captions).

POPE asks "Is there a <object> in the image?" with balanced yes/no labels on
three splits (random, popular, adversarial negatives). `pope` scores free-form
answers; `read_pope` reads the public question files (one JSON object a line:
question_id, image, text, label).

CHAIR counts the objects a caption mentions that the image does not contain.
CHAIR_S = captions with at least one hallucinated object / captions;
CHAIR_I = hallucinated object mentions / object mentions (every occurrence
counts, as in the original code). Which words name which object is a synonym
table, `{object: [surface forms]}`; plurals are added automatically.
`COCO_SYNONYMS` covers the 80 COCO categories; pass your own for other worlds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POPE_SPLITS = ("random", "popular", "adversarial")

_NEGATIONS = {"no", "not", "none", "nothing", "neither", "nor", "never", "cannot"}


def parse_yes_no(answer: str | bool) -> bool:
    """True for a "yes" answer. Booleans pass through.

    An answer that opens with yes or no is taken at its word; otherwise, as in
    the POPE reference script, its first sentence is "no" when it holds a
    negation (no, not, n't, none...) and "yes" when it does not.

        >>> parse_yes_no("Yes, there is no doubt a dog."), parse_yes_no("There isn't any dog.")
        (True, False)
    """
    if isinstance(answer, bool):
        return answer
    first = re.split(r"[.!?\n]", answer.strip().lower(), maxsplit=1)[0]
    words = re.findall(r"[a-z']+", first.replace("’", "'"))
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    return not any(w in _NEGATIONS or w.endswith("n't") for w in words)


def pope(predictions: Sequence[str | bool], labels: Sequence[str | bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" is positive) and yes-ratio.

    >>> m = pope(["Yes, there is.", "No.", "yes"], ["yes", "no", "no"])
    >>> m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]
    (0.6666666666666666, 0.5, 1.0, 0.6666666666666666)
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope() needs at least one prediction")
    pred = [parse_yes_no(p) for p in predictions]
    gold = [_label(y) for y in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pred),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(pred),
        "n": len(pred),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _label(y: str | bool) -> bool:
    if isinstance(y, bool):
        return y
    if y.strip().lower() not in ("yes", "no"):
        raise ValueError(f"POPE label must be 'yes' or 'no', got {y!r}")
    return y.strip().lower() == "yes"


def pope_by_split(
    predictions: Sequence[str | bool], labels: Sequence[str | bool], splits: Sequence[str]
) -> dict[str, dict[str, float]]:
    """`pope` per split, plus "average": each metric's plain mean over the splits, as papers report.

    >>> r = pope_by_split(["yes", "no", "yes", "yes"], ["yes", "no", "yes", "no"], ["random"] * 2 + ["adversarial"] * 2)
    >>> r["random"]["accuracy"], r["adversarial"]["accuracy"], r["average"]["accuracy"]
    (1.0, 0.5, 0.75)
    """
    if not len(predictions) == len(labels) == len(splits):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(labels)} labels, {len(splits)} splits")
    out = {}
    for name in dict.fromkeys(splits):  # first-seen order
        idx = [i for i, s in enumerate(splits) if s == name]
        out[name] = pope([predictions[i] for i in idx], [labels[i] for i in idx])
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    out["average"] = {k: sum(m[k] for m in out.values()) / len(out) for k in keys}
    return out


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int
    image: str
    text: str
    label: str
    split: str


def read_pope(path: str | Path, split: str | None = None) -> list[PopeQuestion]:
    """The questions of one public POPE file (JSON lines: question_id, image, text, label).

    `split` defaults to the one of random/popular/adversarial named in the file
    name (e.g. coco_pope_adversarial.json), else the file's stem.

        >>> qs = read_pope("coco_pope_random.json")                # doctest: +SKIP
        >>> pope(answers, [q.label for q in qs])                   # doctest: +SKIP
    """
    path = Path(path)
    if split is None:
        split = next((s for s in POPE_SPLITS if s in path.stem), path.stem)
    questions = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            try:
                questions.append(PopeQuestion(r["question_id"], r["image"], r["text"], r["label"], split))
            except KeyError as e:
                raise ValueError(f"{path}:{n}: POPE record lacks field {e}") from None
    return questions


# COCO category -> words naming it (singular; plurals are generated).
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": ["person", "man", "woman", "boy", "girl", "child", "kid", "baby", "guy", "lady",
               "people", "player", "skier", "surfer", "skateboarder", "rider", "pedestrian"],
    "bicycle": ["bicycle", "bike", "cycle"], "car": ["car", "automobile", "taxi", "sedan"],
    "motorcycle": ["motorcycle", "motorbike", "scooter"],
    "airplane": ["airplane", "plane", "jet", "aircraft", "airliner"], "bus": ["bus"],
    "train": ["train", "locomotive"], "truck": ["truck", "pickup"],
    "boat": ["boat", "ship", "kayak", "canoe", "sailboat"],
    "traffic light": ["traffic light", "stoplight", "traffic signal"], "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"], "parking meter": ["parking meter"], "bench": ["bench"],
    "bird": ["bird", "pigeon", "seagull", "duck", "parrot"], "cat": ["cat", "kitten", "kitty"],
    "dog": ["dog", "puppy", "pup"], "horse": ["horse", "pony"], "sheep": ["sheep", "lamb"],
    "cow": ["cow", "cattle", "bull", "calf"], "elephant": ["elephant"], "bear": ["bear"],
    "zebra": ["zebra"], "giraffe": ["giraffe"], "backpack": ["backpack"], "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse"], "tie": ["tie", "necktie"], "suitcase": ["suitcase", "luggage"],
    "frisbee": ["frisbee"], "skis": ["ski"], "snowboard": ["snowboard"],
    "sports ball": ["ball", "football", "soccer ball", "baseball"],
    "kite": ["kite"], "baseball bat": ["baseball bat", "bat"], "baseball glove": ["baseball glove", "glove", "mitt"],
    "skateboard": ["skateboard"], "surfboard": ["surfboard"], "tennis racket": ["tennis racket", "racket", "racquet"],
    "bottle": ["bottle"], "wine glass": ["wine glass"], "cup": ["cup", "mug"], "fork": ["fork"],
    "knife": ["knife"], "spoon": ["spoon"], "bowl": ["bowl"], "banana": ["banana"], "apple": ["apple"],
    "sandwich": ["sandwich", "burger"], "orange": ["orange"], "broccoli": ["broccoli"], "carrot": ["carrot"],
    "hot dog": ["hot dog"], "pizza": ["pizza"], "donut": ["donut", "doughnut"], "cake": ["cake", "cupcake"],
    "chair": ["chair", "stool"], "couch": ["couch", "sofa"], "potted plant": ["potted plant", "houseplant", "plant"],
    "bed": ["bed"], "dining table": ["dining table", "table", "desk"], "toilet": ["toilet"],
    "tv": ["tv", "television"], "laptop": ["laptop", "computer"], "mouse": ["mouse"],
    "remote": ["remote", "remote control"],
    "keyboard": ["keyboard"], "cell phone": ["cell phone", "phone", "cellphone", "smartphone"],
    "microwave": ["microwave"], "oven": ["oven", "stove"], "toaster": ["toaster"], "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"], "book": ["book"], "clock": ["clock"], "vase": ["vase"],
    "scissors": ["scissors"], "teddy bear": ["teddy bear", "teddy"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer"],
    "toothbrush": ["toothbrush"],
}  # fmt: skip

_IRREGULAR = {"man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
              "knife": "knives", "calf": "calves", "foot": "feet", "goose": "geese", "tooth": "teeth",
              "sheep": "sheep", "fish": "fish", "scissors": "scissors", "cattle": "cattle", "people": "people",
              "luggage": "luggage", "broccoli": "broccoli"}  # fmt: skip


def plural(word: str) -> str:
    """English plural of a noun or noun phrase (its last word).

    >>> plural("bus"), plural("pony"), plural("teddy bear"), plural("knife"), plural("day")
    ('buses', 'ponies', 'teddy bears', 'knives', 'days')
    """
    head, _, last = word.rpartition(" ")
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def _surface_index(synonyms: Mapping[str, Sequence[str]]) -> dict[tuple[str, ...], str]:
    """Word tuple (singular or plural) -> object, failing on a form claimed by two objects."""
    index: dict[tuple[str, ...], str] = {}
    for obj, forms in synonyms.items():
        for form in forms:
            for f in {form.lower(), plural(form.lower())}:
                key = tuple(f.split())
                if index.setdefault(key, obj) != obj:
                    raise ValueError(f"surface form {f!r} names both {index[key]!r} and {obj!r}")
    return index


def mentioned_objects(caption: str, synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS) -> list[tuple[str, str]]:
    """(surface form, object) for every object mention in `caption`, in order.

    Longest match first, so "hot dog" is one hot dog and not a dog.

        >>> mentioned_objects("Two dogs and a hot dog near a teddy bear.")
        [('dogs', 'dog'), ('hot dog', 'hot dog'), ('teddy bear', 'teddy bear')]
    """
    return _mentions(caption, _surface_index(synonyms))


def _mentions(caption: str, index: dict[tuple[str, ...], str]) -> list[tuple[str, str]]:
    longest = max(map(len, index), default=0)
    words = re.findall(r"[a-z]+", caption.lower())
    found, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            key = tuple(words[i : i + n])
            if key in index:
                found.append((" ".join(key), index[key]))
                i += n
                break
        else:
            i += 1
    return found


def chair(
    captions: Mapping[Hashable, str] | Iterable[tuple[Hashable, str]],
    objects_per_image: Mapping[Hashable, Iterable[str]],
    synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS,
) -> dict:
    """CHAIR_S, CHAIR_I and object recall of generated captions.

    `captions`: image id -> caption (or (image id, caption) pairs, several per
    image allowed); `objects_per_image`: image id -> objects truly present, named
    as the keys of `synonyms`. Recall = present objects mentioned / present objects.

        >>> r = chair({1: "A dog and a cat on a sofa."}, {1: {"dog", "couch"}})
        >>> r["chair_s"], r["chair_i"], r["per_caption"][0]["hallucinated"]
        (1.0, 0.3333333333333333, ['cat'])
    """
    pairs = list(captions.items() if isinstance(captions, Mapping) else captions)
    unknown = {o for objs in objects_per_image.values() for o in objs} - set(synonyms)
    if unknown:
        raise ValueError(f"objects {sorted(unknown)} are not keys of the synonym table: add them to `synonyms`")
    index = _surface_index(synonyms)
    per_caption = []
    for image_id, caption in pairs:
        if image_id not in objects_per_image:
            raise KeyError(f"no ground-truth objects for image {image_id!r}: add it to objects_per_image")
        present = set(objects_per_image[image_id])
        mentioned = [obj for _, obj in _mentions(caption, index)]
        per_caption.append({
            "image_id": image_id,
            "mentioned": mentioned,
            "hallucinated": [o for o in mentioned if o not in present],
            "recalled": sorted(present & set(mentioned)),
            "n_present": len(present),
        })  # fmt: skip
    if not per_caption:
        raise ValueError("chair() needs at least one caption")
    mentions = sum(len(c["mentioned"]) for c in per_caption)
    hallucinated = sum(len(c["hallucinated"]) for c in per_caption)
    present = sum(c["n_present"] for c in per_caption)
    return {
        "chair_s": sum(bool(c["hallucinated"]) for c in per_caption) / len(per_caption),
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": sum(len(c["recalled"]) for c in per_caption) / present if present else 0.0,
        "n_captions": len(per_caption),
        "n_mentions": mentions,
        "n_hallucinated": hallucinated,
        "per_caption": per_caption,
    }


def read_coco_objects(instances: str | Path | Mapping) -> dict[int, set[str]]:
    """Image id -> names of the categories annotated in it, from a COCO instances json.

    Every listed image appears, with an empty set when it has no annotation.

        >>> objs = read_coco_objects("annotations/instances_val2014.json")   # doctest: +SKIP
        >>> chair(captions, objs)                                             # doctest: +SKIP
    """
    data = instances if isinstance(instances, Mapping) else json.loads(Path(instances).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, set[str]] = {im["id"]: set() for im in data.get("images", [])}
    for ann in data["annotations"]:
        objects.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    return objects
