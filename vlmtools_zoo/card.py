"""The sink section of the zoo's model card (docs/zoo.md), measured, never typed in.

``python -m vlmtools_zoo.card llava-shapes|qwen2vl-shapes|flux-shapes [--n N]`` prints the
numbers as JSON (docs/zoo.md states them in prose). Everything goes through the shared sink detector and the
seam's recorders, on ``N`` held-out scenes:

- VLM: per layer, the share of heads whose column mass on the first token
  passes the detector's ``column_mass`` threshold; the hidden dimensions the
  ``massive`` criterion fires on; visual tokens that any attention or
  hidden-state criterion calls a sink (how many per image, on an object or on
  the background, in the letterbox or not); the recency trend of the last
  query's attention over the visual tokens (last quarter / first quarter of the
  raster order, per layer); the attention letterbox-padding patches receive
  relative to their share of the visual tokens.
- DiT: the text-stream tokens the ``global_sink`` criterion fires on per
  block (the prompt's real words vs the padding), with the expression as prompt.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from . import world as W

VISUAL_CRITERIA = ("column_mass", "sink_dims", "massive", "value_drain")


def patch_kinds(scene, grid: tuple[int, int], letterbox: bool) -> np.ndarray:
    """Per visual token (raster order of its ``(rows, cols)`` grid): 'object' when an object
    covers >= 20% of its cell, 'letterbox' when the cell lies wholly in the padding of a
    letterboxed (LLaVA-1.5) image, else 'background'. Qwen-VL sees the scene as it is."""
    w, h = (max(scene.width, scene.height),) * 2 if letterbox else (scene.width, scene.height)
    ox, oy = (w - scene.width) // 2, (h - scene.height) // 2
    canvas = torch.zeros(2, h, w)
    canvas[0, oy:oy + scene.height, ox:ox + scene.width] = torch.from_numpy(scene.masks.any(0)).float()
    canvas[1, oy:oy + scene.height, ox:ox + scene.width] = 1
    obj, inside = F.adaptive_avg_pool2d(canvas, grid).flatten(1)
    kinds = np.full(grid[0] * grid[1], "background", dtype=object)
    kinds[(inside == 0).numpy()] = "letterbox"
    kinds[(obj >= 0.2).numpy()] = "object"
    return kinds


@torch.no_grad()
def vlm_card(model, processor, n: int) -> dict:
    from vlmtools import wrap
    from vlmtools.record import RecordColumnMass, RecordRows
    from vlmtools.sinks import SinkDetector
    from .llava import prompt

    vlm = wrap(model, processor)
    letterbox = getattr(processor.image_processor, "do_pad", False)
    detector = SinkDetector()
    layers = vlm.num_layers
    first = np.zeros((n, layers))
    recency = np.zeros((n, layers))
    pad_ratio, massive_dims, visual = [], Counter(), Counter()
    per_image = []
    for i in range(n):
        scene = W.scene("test", i)
        inputs = processor(images=[scene.image], text=[prompt(processor, scene.questions()[0].question)],
                           return_tensors="pt")
        report = detector.detect(vlm, inputs)
        roles = [t["role"] for t in report.tokens[0]]
        first[i] = report.scores["column_mass"][0, :, roles.index("first")].nan_to_num().numpy()
        massive_dims.update(d for f in report.sinks("massive") for d in f.dims)
        span = vlm.layout(inputs).samples[0].images[0]
        grid = tuple(int(g) for g in span.grid)
        kinds = patch_kinds(scene, grid, letterbox)
        cols = grid[1]
        sunk = {f.token: kinds[f.row * cols + f.col] for f in report.findings
                if f.role == "visual" and f.criterion in VISUAL_CRITERIA}
        per_image.append(len(sunk))
        visual.update(sunk.values())
        sites = [f"text.{layer}" for layer in range(layers)]
        with vlm.use(RecordRows(sites), RecordColumnMass(sites)) as trace:
            model(**inputs)
        positions = span.positions
        quarter = len(positions) // 4
        pad = torch.from_numpy(kinds == "letterbox")
        for layer, site in enumerate(sites):
            row = trace[f"{site}.rows"][0][0, :, -1].mean(0)[positions]
            recency[i, layer] = float(row[-quarter:].sum() / row[:quarter].sum().clamp(min=1e-12))
            if pad.any():
                mass = trace[f"{site}.column_mass"][0].mean[0].mean(0)[positions]
                pad_ratio.append(float(mass[pad].sum() / mass.sum()) / float(pad.float().mean()))
    return {
        "n": n,
        "first_token_sink_share_per_layer": first.mean(0).round(3).tolist(),
        "massive_dims": dict(massive_dims.most_common(5)),
        "visual_sink_tokens_per_image": {"median": float(np.median(per_image)), "mean": round(float(np.mean(per_image)), 2),
                                         "max": int(max(per_image)), "images_with_none": int(sum(c == 0 for c in per_image))},
        "visual_sinks_by_place": dict(visual),
        "recency_last_over_first_quarter_per_layer": np.median(recency, 0).round(2).tolist(),
        "letterbox_attention_over_token_share": round(float(np.mean(pad_ratio)), 3) if pad_ratio else None,
        "letterboxed_images": int(len(pad_ratio) / layers),
    }


@torch.no_grad()
def dit_card(pipe, n: int, t: float = 0.3) -> dict:
    from vlmtools import wrap
    from vlmtools.sinks import SinkDetector
    from .flux import MAX_TOKENS, letterbox

    dit = wrap(pipe.transformer)
    detector = SinkDetector(["global_sink"])
    roles, peak = Counter(), {}
    for i in range(n):
        scene = W.scene("test", i)
        expr = scene.referring_expressions()[0].text
        image = letterbox(scene)[0][None]
        noise = torch.randn(pipe.image_tokens(image).shape, generator=torch.Generator().manual_seed(i))
        x_t, _ = pipe.denoise_input(image, torch.tensor([t]), noise=noise)
        report = detector.detect(dit, pipe.transformer_inputs(x_t, torch.tensor([t]), *pipe.encode_prompt([expr])))
        words = int((pipe.tokenize([expr])[0] != pipe.tokenizer.pad_token_id).sum())
        for f in report.findings:
            where = "image" if f.token >= MAX_TOKENS else ("word" if f.token < words else "padding")
            roles[(report.layer_names[f.layer], where)] += 1
        ratio = report.scores["global_sink"][0]  # (blocks, tokens): received / median
        for block, site in enumerate(report.layer_names):
            for where, part in (("word", ratio[block, :words]), ("padding", ratio[block, words:MAX_TOKENS]),
                                ("image", ratio[block, MAX_TOKENS:])):
                key = f"{site} {where}"
                peak[key] = max(peak.get(key, 0.0), float(part.nan_to_num().max()))
    return {"n": n, "t": t,
            "global_sinks_per_prompt": {f"{site} {where}": c / n for (site, where), c in sorted(roles.items())},
            "max_received_over_median": {k: round(v, 2) for k, v in peak.items()}}


def main(argv=None):
    from . import MODELS, load

    ap = argparse.ArgumentParser(prog="python -m vlmtools_zoo.card")
    ap.add_argument("name", choices=MODELS)
    ap.add_argument("--n", type=int, default=32, help="held-out scenes")
    args = ap.parse_args(argv)
    if args.name == "flux-shapes":
        print(json.dumps(dit_card(load("flux-shapes"), args.n), indent=1))
    else:
        print(json.dumps(vlm_card(*load(args.name), args.n), indent=1))


if __name__ == "__main__":
    main()
