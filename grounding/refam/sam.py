"""Optional refinement: a SAM / SAM 2 model from transformers, prompted with the heatmap's peak point.

The paper prompts SAM 2 with the peak; without a SAM model RefAM's mask comes from the
heatmap alone. Of the masks SAM proposes for the point, the one with the highest
predicted IoU is kept.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def refine(sam, image: Image.Image, point: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask from ``sam = (model, processor)`` (``SamModel``/``SamProcessor`` or
    ``Sam2Model``/``Sam2Processor``) prompted with one positive ``point`` (x, y)."""
    model, processor = sam
    x, y = (float(v) for v in point)
    sam2 = "Sam2" in type(model).__name__
    # SAM 2 nests points as (image, object, point, xy) and takes explicit labels; SAM as (image, point batch, xy)
    prompt = {"input_points": [[[[x, y]]]], "input_labels": [[[1]]]} if sam2 else {"input_points": [[[x, y]]]}
    inputs = processor(images=image, return_tensors="pt", **prompt).to(model.device)
    with torch.no_grad():
        out = model(**inputs, multimask_output=True)
    sizes = [inputs["original_sizes"].cpu()] + ([] if sam2 else [inputs["reshaped_input_sizes"].cpu()])
    masks = processor.post_process_masks(out.pred_masks.cpu(), *sizes)[0]  # (objects, masks, H, W)
    best = int(out.iou_scores[0, 0].argmax())
    return masks[0, best].numpy().astype(bool)
