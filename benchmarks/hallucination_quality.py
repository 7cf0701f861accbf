"""POPE and CHAIR on the zoo's llava-shapes: greedy vs VAR vs GIFT vs PAINT.

Held-out shapes-world scenes (``test`` split). POPE asks "Is there a <colour shape> in
the image?" with balanced yes/no on the random / popular / adversarial splits; CHAIR
scores free captions ("Describe the image.") against the scene's colour-shape objects.
Every method runs under ``vlm.use`` around a plain batched, left-padded ``generate``;
GIFT gets each prompt's question so that it reads gaze shifts from the question's
content words only. Prints ``name: value`` lines and one JSON line with everything,
including each method's settings (VAR's sink dimensions are discovered on SmolLM2:
it is not in the published table).
Run: ``python benchmarks/hallucination_quality.py [--scenes 40] [--captions 60]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import vlmtools
from vlmtools.zoo import world

# this folder holds hallucination.py, which shadows the package while the folder is first on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from hallucination import GIFT, PAINT, VAR
from hallucination.metrics import POPE_SPLITS, chair, pope_by_split

METHODS = {
    "greedy": lambda questions: None,
    "var": lambda questions: VAR(),
    "gift": lambda questions: GIFT(questions=questions),
    "paint": lambda questions: PAINT(),
}


def generate(vlm, processor, prompt_fn, images, questions, method, max_new_tokens, batch):
    """Decoded continuations, one per (image, question), ``method(questions)`` active per batch."""
    out, settings = [], None
    for start in range(0, len(images), batch):
        qs = questions[start:start + batch]
        inputs = processor(images=images[start:start + batch], text=[prompt_fn(processor, q) for q in qs],
                           return_tensors="pt", padding=True)
        intervention = METHODS[method](qs)
        with torch.no_grad(), vlm.use(*([intervention] if intervention else [])):
            ids = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        settings = getattr(intervention, "settings", None)
    return out, settings


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=40, help="POPE scenes per split (about 6 questions each)")
    parser.add_argument("--captions", type=int, default=60, help="scenes captioned for CHAIR")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    try:
        model, processor = vlmtools.zoo.load("llava-shapes")
    except (FileNotFoundError, OSError) as error:
        sys.exit(f"llava-shapes is not available yet ({error}); train it with python -m vlmtools.zoo.train llava-shapes")
    from vlmtools.zoo.llava import prompt

    processor.tokenizer.padding_side = "left"
    vlm = vlmtools.wrap(model, processor)
    pope_items = [(kind, *t) for kind in POPE_SPLITS for t in world.pope("test", args.scenes, kind)]
    captioned = range(args.captions)
    names = sorted({f"{c} {s}" for c in world.COLOURS for s in world.SHAPES})
    objects = {i: {o.name for o in world.scene("test", i).objects} for i in captioned}
    results = {}
    for method in args.methods.split(","):
        answers, settings = generate(vlm, processor, prompt, [world.scene("test", i).image for _, i, _, _ in pope_items],
                                     [q for _, _, q, _ in pope_items], method, 4, args.batch)
        scores = pope_by_split(answers, [a for *_, a in pope_items], [k for k, *_ in pope_items])
        captions, _ = generate(vlm, processor, prompt, [world.scene("test", i).image for i in captioned],
                               ["Describe the image."] * len(captioned), method, 24, args.batch)
        hallucinated = chair(dict(zip(captioned, captions)), objects, synonyms={n: [n] for n in names})
        results[method] = {"pope": scores, "chair_s": hallucinated["chair_s"], "chair_i": hallucinated["chair_i"],
                           "recall": hallucinated["recall"], "example_caption": captions[0], "settings": settings}
        print(f"{method}_pope_accuracy: {scores['average']['accuracy']:.3f}")
        print(f"{method}_pope_f1: {scores['average']['f1']:.3f}")
        print(f"{method}_pope_yes_ratio: {scores['average']['yes_ratio']:.3f}")
        print(f"{method}_chair_s: {hallucinated['chair_s']:.3f}")
        print(f"{method}_chair_i: {hallucinated['chair_i']:.3f}", flush=True)
    print(json.dumps({"pope_items": len(pope_items), "captions": len(captioned), "results": results}))


if __name__ == "__main__":
    main()
