"""RefCOCO / RefCOCO+ / RefCOCOg samples from the original annotation files.

The REFER layout: `refs(unc).p` (a pickled list of refs: ref_id, ann_id,
image_id, split, sentences) next to an `instances.json` in COCO format (images,
annotations with polygon or RLE segmentation). Each sentence of each ref in the
chosen split is one sample: image path, expression, binary mask of the referred
object. Masks are rasterised with pycocotools when installed, else polygons are
filled with skimage (pixel centres at +0.5, as COCO places them; RLE then needs
pycocotools).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.draw import polygon


class DataUnpickler(pickle.Unpickler):
    """Reads a pickle of plain data only: dicts, lists, tuples, sets, strings, bytes and numbers.

    A pickle names the classes it rebuilds and ``pickle.load`` imports and calls them, so a crafted
    refs file could run any code; REFER's refs are plain containers and need no class. Python 2
    pickles (REFER's own) have byte strings, read as latin-1 text.
    """

    PLAIN = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}

    def __init__(self, file):
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str):
        if (module, name) in self.PLAIN:
            return super().find_class("builtins", name)
        raise pickle.UnpicklingError(f"refuses to rebuild {module}.{name}: a REFER refs file holds plain data only "
                                     "(dicts, lists, strings, numbers), and rebuilding a class can run code")


@dataclass(frozen=True)
class RefSample:
    image_path: Path
    sentence: str  # the dataset's normalised form ("sent": lower case, tokens joined by spaces)
    raw: str  # as the annotator wrote it
    mask: np.ndarray  # bool (H, W)
    ref_id: int
    sent_id: int
    ann_id: int
    image_id: int
    split: str


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of a COCO segmentation: polygons (union) or RLE.

    >>> segmentation_to_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 4, 5).astype(int)
    array([[0, 0, 0, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 0, 0, 0]])
    """
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        mask_utils = None
    if mask_utils is not None:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return mask_utils.decode(rle).astype(bool)
    if not isinstance(segmentation, list):
        raise ImportError("this annotation is RLE-encoded: pip install pycocotools to decode it")
    mask = np.zeros((height, width), bool)
    for poly in segmentation:
        xy = np.asarray(poly, float).reshape(-1, 2) - 0.5  # COCO pixel i spans [i, i+1)
        mask[polygon(xy[:, 1], xy[:, 0], (height, width))] = True
    return mask


class RefCOCO(Sequence):
    """The samples of one split, indexable (for sharding) and iterable; masks are built on access.

    >>> data = RefCOCO("refcoco/refs(unc).p", "refcoco/instances.json", "coco/train2014")  # doctest: +SKIP
    >>> s = data[0]; s.sentence, s.mask.shape                                              # doctest: +SKIP
    ('man in red on the left', (480, 640))
    """

    def __init__(
        self, refs_path: str | Path, instances_path: str | Path, image_dir: str | Path, split: str | None = "val"
    ):
        with open(refs_path, "rb") as f:
            try:
                refs = DataUnpickler(f).load()
            except pickle.UnpicklingError as error:
                raise ValueError(f"{refs_path}: {error}") from None
        instances = json.loads(Path(instances_path).read_text())
        self.image_dir = Path(image_dir)
        self.images = {im["id"]: im for im in instances["images"]}
        self.annotations = {a["id"]: a for a in instances["annotations"]}
        splits = sorted({r["split"] for r in refs})
        if split is not None and split not in splits:
            raise ValueError(f"split {split!r} is not in {refs_path}; it has {splits}")
        self.split = split
        self._items = [(ref, sent) for ref in refs if split in (None, ref["split"]) for sent in ref["sentences"]]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> RefSample:
        ref, sent = self._items[i]
        image = self.images[ref["image_id"]]
        ann = self.annotations[ref["ann_id"]]
        return RefSample(
            image_path=self.image_dir / image["file_name"],
            sentence=sent["sent"],
            raw=sent["raw"],
            mask=segmentation_to_mask(ann["segmentation"], image["height"], image["width"]),
            ref_id=ref["ref_id"],
            sent_id=sent["sent_id"],
            ann_id=ref["ann_id"],
            image_id=ref["image_id"],
            split=ref["split"],
        )
