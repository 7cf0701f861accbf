"""Calibration samples from a user's own images and questions (never the evaluation set)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmtools.chat import chat_inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_QUESTION = "Describe the image."


def calibration_samples(processor, pairs: Iterable[tuple], device=None) -> Iterator[dict]:
    """One chat prompt (left-padded batch of one) per ``(image, question)`` pair, for :func:`pruning.calibrate`.

    >>> pruning.calibrate(vlm, FastV(keep=64), calibration_samples(processor, zip(images, questions)))
    """
    for image, question in pairs:
        yield chat_inputs(processor, [image], [question], device)


def image_question_pairs(images: str | Path, questions: str | Path | None = None) -> list[tuple]:
    """The images of a folder (sorted by name) with the questions of a text file, one a line, taken in
    turn (``DEFAULT_QUESTION`` without one). Refuses an empty folder or question file with a ValueError."""
    from PIL import Image

    folder = Path(images)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    asked = [DEFAULT_QUESTION]
    if questions is not None:
        asked = [line.strip() for line in Path(questions).read_text().splitlines() if line.strip()]
        if not asked:
            raise ValueError(f"{questions}: no questions (one a line)")
    return [(Image.open(file).convert("RGB"), asked[i % len(asked)]) for i, file in enumerate(files)]
