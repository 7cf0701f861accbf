"""CHAIR's data from COCO's annotation files: the images a captions file lists (``captions_val2014.json``:
``images`` with ``id`` and ``file_name``; ``annotations`` with the reference captions), each with the objects
its instances file annotates in it (``instances_val2014.json``, read by :func:`hallucination.metrics.read_coco_objects`).

    >>> data, categories = read_chair_coco("captions_val2014.json", "instances_val2014.json", "val2014/", 500)  # doctest: +SKIP
    >>> chair(captions, {i: e.objects for i, e in enumerate(data.examples)}, chair_synonyms(categories),
    ...       reference_captions={i: e.answers for i, e in enumerate(data.examples)})          # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path

from vlmtools.data import Data, Example, file_record, image_file, images_record

from .metrics import COCO, Vocabulary, read_coco_captions, read_coco_objects


def _json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg}, line {error.lineno} column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a COCO annotation file (a JSON object with 'images')")
    return data


def read_chair_coco(captions: str | Path, instances: str | Path, images: str | Path,
                    limit: int | None = None) -> tuple[Data, list[str]]:
    """The first ``limit`` (all by default) images of ``captions``, in its order, with the objects
    ``instances`` annotates in each (``Example.objects``, category names) and their reference captions
    (``Example.answers``); and the instances' category names, the objects CHAIR looks for.

    Refused with a ValueError naming the file: a malformed file, an image entry without ``id`` or
    ``file_name``, an image id the instances file does not list; a missing image is a FileNotFoundError."""
    listed, annotated = _json(captions), _json(instances)
    if not Path(images).is_dir():
        raise FileNotFoundError(f"{images}: no such images folder")
    if not isinstance(listed.get("images"), list):
        raise ValueError(f"{captions}: no 'images' list (a COCO captions file lists its images)")
    try:
        objects = read_coco_objects(annotated)
        categories = [c["name"] for c in annotated["categories"]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{instances}: not a COCO instances file (missing {error})") from None
    try:
        references = read_coco_captions({"annotations": [], **listed})
    except (KeyError, TypeError) as error:
        raise ValueError(f"{captions}: not a COCO captions file (missing {error})") from None
    examples, names = [], []
    for i, entry in enumerate(listed["images"]):
        if limit is not None and len(examples) == limit:
            break
        where = f"{captions}: images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise ValueError(f"{where}: an image entry needs 'id' and 'file_name', got {entry!r}")
        if entry["id"] not in objects:
            raise ValueError(f"{instances}: no image id {entry['id']} (listed at {where})")
        file = image_file(images, entry["file_name"], f"{where} (id {entry['id']})")
        examples.append(Example(str(file), objects=tuple(sorted(objects[entry["id"]])),
                                answers=tuple(references.get(entry["id"], ())), key=entry["id"]))
        names.append(entry["file_name"])
    if not examples:
        raise ValueError(f"{captions}: no images")
    return Data(examples, [file_record(captions), file_record(instances), images_record(images, names)]), categories


def chair_synonyms(names) -> Vocabulary | dict[str, list[str]]:
    """The vocabulary CHAIR reads captions with for objects ``names``: the original COCO one when every name
    is a COCO object (COCO's categories), else a table in which each name names itself."""
    names = sorted(set(names))
    if all(name in COCO.synonyms for name in names):
        return COCO
    return {name: [name] for name in names}
