import doctest
import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from grounding import refcoco
from grounding.refcoco import RefCOCO, segmentation_to_mask


@pytest.fixture(params=["pycocotools", "skimage"])
def rasteriser(request, monkeypatch):
    if request.param == "pycocotools":
        pytest.importorskip("pycocotools")
    else:
        monkeypatch.setitem(sys.modules, "pycocotools", None)
    return request.param


def write_dataset(root):
    """Two images, three refs (train/val/val), one object given as two polygons."""
    instances = {
        "images": [
            {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 30, "width": 40},
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 20, "width": 20},
        ],
        "annotations": [
            {"id": 100, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [10, 5, 20, 10],
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            {"id": 101, "image_id": 7, "category_id": 18, "iscrowd": 0, "bbox": [0, 20, 10, 10],
             "segmentation": [[0, 20, 5, 20, 5, 25, 0, 25], [35, 25, 40, 25, 40, 30, 35, 30]]},
            {"id": 102, "image_id": 9, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 4, 4],
             "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }  # fmt: skip
    refs = [
        {"ref_id": 0, "ann_id": 102, "image_id": 9, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000009_102.jpg",
         "sentences": [{"sent_id": 0, "sent": "small man", "raw": "Small man", "tokens": ["small", "man"]}]},
        {"ref_id": 1, "ann_id": 100, "image_id": 7, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000007_100.jpg",
         "sentences": [{"sent_id": 1, "sent": "man in the middle", "raw": "Man in the middle.", "tokens": []},
                       {"sent_id": 2, "sent": "center guy", "raw": "center guy", "tokens": []}]},
        {"ref_id": 2, "ann_id": 101, "image_id": 7, "split": "val", "category_id": 18,
         "file_name": "COCO_train2014_000000000007_101.jpg",
         "sentences": [{"sent_id": 3, "sent": "the dog s two halves", "raw": "the dog's two halves", "tokens": []}]},
    ]  # fmt: skip
    (root / "refcoco").mkdir()
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    return root / "refcoco" / "refs(unc).p", root / "refcoco" / "instances.json"


def test_loader_yields_one_sample_per_sentence(tmp_path, rasteriser):
    refs, instances = write_dataset(tmp_path)
    data = RefCOCO(refs, instances, tmp_path / "train2014", split="val")
    assert len(data) == 3
    samples = list(data)
    assert [(s.ref_id, s.sent_id, s.sentence) for s in samples] == [
        (1, 1, "man in the middle"), (1, 2, "center guy"), (2, 3, "the dog s two halves")
    ]  # fmt: skip
    s = samples[0]
    assert s.image_path == tmp_path / "train2014" / "COCO_train2014_000000000007.jpg"
    assert s.raw == "Man in the middle." and s.split == "val" and (s.ann_id, s.image_id) == (100, 7)
    expected = np.zeros((30, 40), bool)
    expected[5:15, 10:30] = True
    assert s.mask.dtype == bool and (s.mask == expected).all()
    dog = samples[2].mask  # two polygons: their union
    assert dog[20:25, 0:5].all() and dog[25:30, 35:40].all() and dog.sum() == 50
    assert data[-1].sent_id == 3


def test_split_none_and_unknown_split(tmp_path):
    refs, instances = write_dataset(tmp_path)
    assert len(RefCOCO(refs, instances, tmp_path, split=None)) == 4
    assert [s.sentence for s in RefCOCO(refs, instances, tmp_path, split="train")] == ["small man"]
    with pytest.raises(ValueError, match=r"split 'testA' .* has \['train', 'val'\]"):
        RefCOCO(refs, instances, tmp_path, split="testA")


def test_polygon_fallback_agrees_with_pycocotools(monkeypatch):
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(0)
    polys = []
    for _ in range(30):
        centre, radius = rng.uniform([40, 40], [120, 80]), rng.uniform(10, 35)
        angles = np.linspace(0, 2 * np.pi, rng.integers(4, 9), endpoint=False) + rng.uniform(0, 1)
        polys.append(
            np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1).ravel().tolist()
        )
    coco = [segmentation_to_mask([p], 120, 160) for p in polys]
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    ours = [segmentation_to_mask([p], 120, 160) for p in polys]
    ious = [(a & b).sum() / (a | b).sum() for a, b in zip(coco, ours)]
    assert min(ious) > 0.95, min(ious)


def test_rle(rasteriser):
    mask = np.zeros((4, 3), bool)
    mask[1:3, 1] = True
    uncompressed = {"size": [4, 3], "counts": [5, 2, 5]}  # column-major runs, zeros first
    if rasteriser == "skimage":
        with pytest.raises(ImportError, match="pip install pycocotools"):
            segmentation_to_mask(uncompressed, 4, 3)
        return
    from pycocotools import mask as mask_utils

    assert (segmentation_to_mask(uncompressed, 4, 3) == mask).all()
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert (segmentation_to_mask(compressed, 4, 3) == mask).all()


def test_docstring_examples(rasteriser):
    assert doctest.testmod(refcoco).failed == 0


class _RunsCode:
    """What a crafted refs file could hold: unpickling it calls ``Path.touch``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_refs_file_that_would_run_code_is_refused(tmp_path):
    refs, instances = write_dataset(tmp_path)
    touched = tmp_path / "ran"
    with open(refs, "wb") as f:
        pickle.dump([{"ref_id": 0, "hook": _RunsCode(touched)}], f)
    with pytest.raises(ValueError, match=r"refs.*refuses to rebuild pathlib.*Path.touch"):
        RefCOCO(refs, instances, tmp_path / "train2014")
    assert not touched.exists()
    with open(refs, "rb") as f:  # the same file would have run it
        pickle.load(f)
    assert touched.exists()


def test_plain_data_pickles_of_both_pythons_are_read(tmp_path):
    from grounding.refcoco import DataUnpickler

    data = [{"ref_id": 1, "sentences": [{"sent": "the man"}], "split": "val", "ids": {3, 4}}]
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        assert DataUnpickler(io.BytesIO(pickle.dumps(data, protocol=protocol))).load() == data
    python2_str = b"(lp0\n(dp1\nS'sent'\np2\nS'caf\\xe9'\np3\nsa."  # a Python 2 byte string
    assert DataUnpickler(io.BytesIO(python2_str)).load() == [{"sent": "caf\xe9"}]
