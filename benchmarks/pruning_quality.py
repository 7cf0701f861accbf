"""Accuracy of every pruning host on the zoo's llava-shapes (held-out test questions), debias off and on.

Keeps 100%, 33%, 22% and 11% of the visual tokens (LLaVA-1.5's 576 -> 192 / 128 / 64; here
144 -> 48 / 32 / 16). Trends are calibrated on the ``val`` split (never the test split) and
written to ``--calibration`` (default: the package's ``pruning/calibration``). Letterbox padding
is read from each batch's pixels (``letterbox_padding``). Prints a markdown table and JSON.
Run: ``python benchmarks/pruning_quality.py [--n 200] [--hosts fastv,visionzip]``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import vlmtools
from vlmtools.zoo import world as W

HERE = sys.path.pop(0)  # benchmarks/pruning.py shares the package's name: find the package first
import pruning
from pruning import Debias, letterbox_padding

sys.path.insert(0, HERE)

KEEP = {"100%": 1.0, "33%": 1 / 3, "22%": 2 / 9, "11%": 1 / 9}
HOSTS = {"fastv": {"layer": 2}, "pdrop": {"layers": (8, 16, 24)}, "sparsevlm": {"layers": (2, 6, 15)},
         "visionzip": {}, "fastervlm": {}, "dart": {"layer": 2}, "random": {"layer": 2}}


def batches(processor, split, items, size):
    from vlmtools.zoo.llava import prompt

    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        inputs = processor(images=[W.scene(split, s).image for s, _ in chunk],
                           text=[prompt(processor, q.question) for _, q in chunk], return_tensors="pt", padding=True)
        yield chunk, inputs


def load(snapshot: bool):
    if not snapshot:
        return vlmtools.zoo.load("llava-shapes")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmtools.zoo import llava

    copy = Path(tempfile.mkdtemp(prefix="llava-shapes-snapshot-"))
    shutil.copy(llava.WEIGHTS / "model.safetensors", copy / "model.safetensors")
    folder = llava.assemble(copy / "llava-shapes", weights=copy)  # the folder's name is the calibration key
    print(f"weights: snapshot of {llava.WEIGHTS} taken {time.strftime('%H:%M:%S')}", file=sys.stderr)
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def make(name, keep, debias, pixels, patch, directory):
    options = dict(HOSTS[name])
    if debias:
        options.update(debias=Debias(directory=directory), padding=letterbox_padding(pixels, patch))
    return pruning.HOSTS[name](keep=keep, **options)


@torch.no_grad()
def accuracy(vlm, processor, items, name, keep, debias, batch, directory):
    correct, patch = [], vlm.model.config.vision_config.patch_size
    for chunk, inputs in batches(processor, "test", items, batch):
        host = None if name is None else make(name, keep, debias, inputs["pixel_values"], patch, directory)
        with vlm.use(*([host] if host else [])):
            out = vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for (_, question), text in zip(chunk, texts):
            words = text.strip().lower().split()
            correct.append((words[0].strip(".,") if words else "") == question.answer)
    return sum(correct) / len(correct)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200, help="test questions (cycling over the 5 types)")
    parser.add_argument("--calibration-samples", type=int, default=48)
    parser.add_argument("--hosts", default=",".join(HOSTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calibration", default=None, help="folder of calibration files")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared CPU)")
    parser.add_argument("--snapshot", action="store_true",
                        help="evaluate a copy of the shipped weights (a training run may rewrite them meanwhile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load(args.snapshot)
    processor.tokenizer.padding_side = "left"  # not kept by the saved processor
    vlm = vlmtools.wrap(model, processor)
    hosts = args.hosts.split(",")
    start = time.time()
    held_out = [inputs for _, inputs in batches(processor, "val", W.qa_items("val", args.calibration_samples), 1)]
    for name in hosts:
        if pruning.HOSTS[name].attention_based:
            stage_layers = HOSTS[name]
            pruning.calibrate(vlm, pruning.HOSTS[name](keep=1.0, **stage_layers), held_out,
                              directory=args.calibration, padding=lambda inputs: letterbox_padding(
                                  inputs["pixel_values"], model.config.vision_config.patch_size))
    items = W.qa_items("test", args.n)
    rows = {"none": {"100%": accuracy(vlm, processor, items, None, 1.0, False, args.batch, args.calibration)}}
    for name in hosts:
        for debias in (False, True) if pruning.HOSTS[name].attention_based else (False,):
            label = f"{name}{' +debias' if debias else ''}"
            rows[label] = {ratio: accuracy(vlm, processor, items, name, keep, debias, args.batch, args.calibration)
                           for ratio, keep in KEEP.items() if keep < 1}
            print(label, rows[label], f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"| host (n={args.n}) | " + " | ".join(KEEP) + " |")
    print("|---|" + "---|" * len(KEEP))
    for label, row in rows.items():
        cells = [f"{row[r]:.3f}" if r in row else ("(= none)" if r == "100%" else "") for r in KEEP]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(json.dumps({"n": args.n, "calibration_samples": args.calibration_samples, "accuracy": rows}))


if __name__ == "__main__":
    main()
