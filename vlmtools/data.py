"""Evaluation data read from public formats: POPE question files, VQA-style question files, and Hugging Face
``datasets`` folders written by ``save_to_disk``. Each reader takes paths and returns :class:`Data`: the
examples, and a record of what was read (the path and sha256 of every file; an image folder as its path,
the number of its images read and one sha256 over their names and bytes).

Formats (one JSON object a line; blank lines are skipped):

* POPE (:func:`read_pope`): ``{"question_id", "image", "text", "label"}``, ``label`` yes or no, as in POPE's
  released files (any split: the split is the one of random / popular / adversarial the file name holds,
  else the file's stem). ``image`` is a file name under the images folder.
* VQA (:func:`read_vqa`): ``{"image", "question", "answer"}`` or ``{"image", "question", "answers": [...]}``
  (answers as strings, or as VQA annotations' ``{"answer": ...}`` objects); scored by :mod:`vlmtools.vqa`.
* A saved dataset (:func:`read_dataset`), with these columns (``columns`` maps a name to another column):
  ``image`` (an image feature, or a path: under ``images`` when given, else as written), ``question``;
  POPE: ``label`` (yes / no) and, optionally, ``category`` (the split); VQA: ``answer`` (a string) or
  ``answers`` (a list of strings); CHAIR: ``objects`` (the names of the objects the image shows).

A malformed line, a missing field or column, a label that is not yes or no, or a missing image file is
refused with a ValueError (FileNotFoundError for a file) naming the file and its line, or the column.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POPE_SPLITS = ("random", "popular", "adversarial")
TASKS = ("pope", "vqa", "chair")
COLUMNS = ("image", "question", "label", "category", "answer", "answers", "objects")
"""The column names :func:`read_dataset` reads (``columns`` maps any of them to another column)."""


@dataclass(frozen=True)
class Example:
    """One item: an image (a file path, or a dataset row's image read when asked) and what is asked of it."""

    image: Any
    question: str = ""
    answers: tuple[str, ...] = ()  # VQA: the humans' answers
    label: str | None = None  # POPE: "yes" or "no"
    group: str = ""  # POPE: the split
    objects: tuple[str, ...] = ()  # CHAIR: the objects the image shows
    key: Any = None  # question_id, image id or row

    def load_image(self):
        """The image as an RGB PIL image."""
        from PIL import Image

        image = self.image
        if isinstance(image, _RowImage):
            image = image.load()
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                return opened.convert("RGB")
        return image.convert("RGB")


@dataclass
class Data:
    """Examples and the files they were read from (``files``: dicts with ``path`` and ``sha256``)."""

    examples: list[Example]
    files: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        """What a result records: the files read and the number of items."""
        return {"files": self.files, "items": len(self.examples)}

    @classmethod
    def joined(cls, parts: Sequence["Data"]) -> "Data":
        return cls([e for p in parts for e in p.examples], [f for p in parts for f in p.files])


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict:
    return {"path": str(path), "sha256": sha256(path)}


def images_record(folder: str | Path, names: Sequence[str]) -> dict:
    """An image folder's record: its path, the number of distinct images read, and one sha256 over each of
    them (name and bytes, in the order first read)."""
    digest = hashlib.sha256()
    unique = list(dict.fromkeys(names))
    for name in unique:
        digest.update(f"{name}\0{sha256(Path(folder) / name)}\n".encode())
    return {"path": str(folder), "images": len(unique), "sha256": digest.hexdigest()}


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is no JSON object is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg}, column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: not a JSON object: {line.strip()[:80]}")
            yield number, record


def _field(record: dict, name: str, where: str, kind=str):
    if name not in record:
        raise ValueError(f"{where}: no field {name!r} (fields: {', '.join(record)})")
    value = record[name]
    if not isinstance(value, kind):
        raise ValueError(f"{where}: field {name!r} is {value!r}, not a {getattr(kind, '__name__', kind)}")
    return value


def yes_no(label, where: str) -> str:
    """A POPE label, lower case: "yes" or "no" (else a ValueError naming ``where``)."""
    if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
        raise ValueError(f"{where}: label {label!r} is not yes or no")
    return label.strip().lower()


def image_file(images: str | Path, name: str, where: str) -> Path:
    """``images / name``, which must be a file (else a FileNotFoundError naming ``where``)."""
    path = Path(images) / name
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no image file {path}")
    return path


def _images_folder(images) -> Path:
    if images is None:
        raise ValueError("the images folder is needed: give it (--images DIR)")
    if not Path(images).is_dir():
        raise FileNotFoundError(f"{images}: no such images folder")
    return Path(images)


def pope_split(path: str | Path) -> str:
    """The POPE split a file name holds (coco_pope_adversarial.json: adversarial), else the file's stem."""
    stem = Path(path).stem
    return next((s for s in POPE_SPLITS if s in stem), stem)


def read_pope(path: str | Path, images: str | Path, limit: int | None = None, split: str | None = None) -> Data:
    """The first ``limit`` (all by default) questions of a POPE file, their images under ``images``."""
    folder = _images_folder(images)
    split = split or pope_split(path)
    examples, names = [], []
    for number, record in read_jsonl(path):
        if limit is not None and len(examples) == limit:
            break
        where = f"{path}:{number}"
        name = _field(record, "image", where)
        file = image_file(folder, name, where)
        examples.append(Example(str(file), _field(record, "text", where),
                                label=yes_no(_field(record, "label", where), where), group=split,
                                key=record.get("question_id", number)))
        names.append(name)
    if not examples:
        raise ValueError(f"{path}: no questions")
    return Data(examples, [file_record(path), images_record(folder, names)])


def read_vqa(path: str | Path, images: str | Path, limit: int | None = None) -> Data:
    """The first ``limit`` (all by default) questions of a VQA-style file, their images under ``images``."""
    folder = _images_folder(images)
    examples, names = [], []
    for number, record in read_jsonl(path):
        if limit is not None and len(examples) == limit:
            break
        where = f"{path}:{number}"
        name = _field(record, "image", where)
        file = image_file(folder, name, where)
        examples.append(Example(str(file), _field(record, "question", where), answers=_answers(record, where),
                                key=record.get("question_id", number)))
        names.append(name)
    if not examples:
        raise ValueError(f"{path}: no questions")
    return Data(examples, [file_record(path), images_record(folder, names)])


def _answers(record: dict, where: str) -> tuple[str, ...]:
    if ("answer" in record) == ("answers" in record):
        raise ValueError(f"{where}: give one of the fields 'answer' (a string) or 'answers' (a list)")
    if "answer" in record:
        return (_field(record, "answer", where),)
    answers = _field(record, "answers", where, list)
    out = tuple(a.get("answer") if isinstance(a, dict) else a for a in answers)
    if not out or not all(isinstance(a, str) for a in out):
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}")
    return out


class _RowImage:
    """One row's image of a saved dataset, decoded when asked."""

    def __init__(self, column, row: int):
        self.column, self.row = column, row

    def load(self):
        return self.column[self.row][self.column.column_names[0]]


def read_dataset(folder: str | Path, task: str, images: str | Path | None = None, limit: int | None = None,
                 split: str | None = None, columns: dict[str, str] | None = None) -> Data:
    """The first ``limit`` rows of a dataset saved with ``datasets``' ``save_to_disk`` as ``task`` items
    (``pope``, ``vqa`` or ``chair``; the columns each needs are in the module's text). A folder holding a
    ``DatasetDict`` needs ``split`` unless it has one split only."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: {', '.join(TASKS)}")
    dataset = load_dataset(folder, split)
    names = {**{c: c for c in COLUMNS}, **(columns or {})}
    present = dataset.column_names

    def column(name: str) -> str:
        if names[name] not in present:
            raise ValueError(f"{folder}: no column {names[name]!r} ({task} reads {name!r}; "
                             f"its columns: {', '.join(present)})")
        return names[name]

    wanted = ["image"] + {"pope": ["question", "label"], "vqa": ["question"], "chair": ["objects"]}[task]
    if task == "vqa":
        having = [n for n in ("answers", "answer") if names[n] in present]
        if not having:
            raise ValueError(f"{folder}: no column {names['answer']!r} nor {names['answers']!r} (vqa reads one; "
                             f"its columns: {', '.join(present)})")
        wanted.append(having[0])
    if task == "pope" and names["category"] in present:
        wanted.append("category")
    real = [column(n) for n in wanted]
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError(f"{folder}: no rows")
    values = dataset.select(range(count)).select_columns(real[1:]).to_dict() if real[1:] else {}
    image_column = dataset.select_columns([real[0]])
    kind = type(dataset.features[real[0]]).__name__
    if kind not in ("Image", "Value"):
        raise ValueError(f"{folder}: column {real[0]!r} holds {kind}, neither images nor paths")
    image_root = None if images is None else _images_folder(images)
    examples, paths = [], []
    for row in range(count):
        where = f"{folder}: row {row}"
        if kind == "Image":
            image = _RowImage(image_column, row)
        else:
            name = image_column[row][real[0]]
            if not isinstance(name, str):
                raise ValueError(f"{where}, column {real[0]!r}: {name!r} is not an image path")
            image = str(image_file(image_root or ".", name, f"{where}, column {real[0]!r}"))
            paths.append(name)
        got = {n: values[c][row] for n, c in zip(wanted[1:], real[1:])}
        examples.append(_row_example(task, image, got, row, where, dict(zip(wanted, real))))
    files = [file_record(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()]
    if paths:
        files.append(images_record(image_root or Path("."), paths))
    return Data(examples, files)


def _row_example(task: str, image, got: dict, row: int, where: str, real: dict) -> Example:
    def text(name: str) -> str:
        if not isinstance(got[name], str):
            raise ValueError(f"{where}, column {real[name]!r}: {got[name]!r} is not a string")
        return got[name]

    if task == "pope":
        return Example(image, text("question"), label=yes_no(got["label"], f"{where}, column {real['label']!r}"),
                       group=str(got.get("category", Path(where.split(": row ")[0]).name)), key=row)
    if task == "vqa":
        if "answers" in got:
            answers = got["answers"]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{where}, column {real['answers']!r}: {answers!r} is not a non-empty list of strings")
            return Example(image, text("question"), answers=tuple(answers), key=row)
        return Example(image, text("question"), answers=(text("answer"),), key=row)
    objects = got["objects"]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise ValueError(f"{where}, column {real['objects']!r}: {objects!r} is not a list of object names")
    return Example(image, objects=tuple(objects), key=row)


def load_dataset(folder: str | Path, split: str | None = None):
    """A ``datasets.Dataset`` saved with ``save_to_disk`` (one split of a saved ``DatasetDict``)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("reading a saved dataset needs the datasets package: pip install datasets") from None
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise ValueError(f"{folder}: not a dataset saved with save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{folder}: name a split ({', '.join(loaded)})" if split is None
                             else f"{folder}: no split {split!r} ({', '.join(loaded)})")
        return loaded[split]
    if split is not None:
        raise ValueError(f"{folder}: one dataset without splits; drop the split {split!r}")
    return loaded
