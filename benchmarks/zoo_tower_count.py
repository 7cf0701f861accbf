"""Can more tower training put the object count into the 144 tokens llava-shapes' LM reads?

``zoo_ceilings.py`` found the count capped by the tower: every probe of those tokens, or of the
CLS token, stops at 0.84-0.86 of 1000 ``val`` scenes, while a small CNN trained on the same
pixels counts 0.999. This trains the shipped tower (all layers) further, alone, on fresh
``train`` scenes: the count (1-5) from the mean of the LM-read patch tokens (a linear head: an
LM attending evenly over the image reads that mean) and from CLS, a per-patch object-centre flag
and colour x shape class on the same tokens (stage 1's labels, ``llava_train.patch_labels``),
plus ``--keep`` x the relative squared change of those tokens against the shipped tower's, so
that the LM's reading of them would need little realignment. Every ``--every`` steps it prints
the count read from the token mean on ``--val`` ``val`` scenes, per number of objects, and how
far the tokens have moved. The LM is not involved: this asks only whether the tower can learn
to count at this pace.

Run: ``python benchmarks/zoo_tower_count.py [--steps 2500] [--lr 5e-4] [--keep 0.1]``
(resumable: the checkpoint is ``<cache>/train/llava-shapes/count_tower.pt``; remove it to start over).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from vlmtools.zoo import load
from vlmtools.zoo import world as W
from vlmtools.zoo.llava_train import N_COMBO, patch_labels, tower_loop
from vlmtools.zoo.train_utils import Checkpoint, autocast

FIRST_SCENE = 70_000_000  # train scenes no shipped stage drew


class CountHeads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.count, self.cls = nn.Linear(width, 6), nn.Linear(width, 6)
        self.centre, self.combo = nn.Linear(width, 1), nn.Linear(width, N_COMBO + 1)


class TokenReader:
    """The tokens the LM reads (the tower's ``layer`` output, CLS first) for pixel values."""

    def __init__(self, tower, layer: int):
        self.tower, self.layer = tower, layer

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with autocast(pixel_values.device):
            return self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.layer].float()


def moved(tokens: torch.Tensor, shipped: torch.Tensor) -> torch.Tensor:
    return (tokens - shipped).pow(2).mean() / shipped.pow(2).mean()


@torch.no_grad()
def report(step: int, read: TokenReader, shipped: torch.Tensor, heads: CountHeads, pixels, truth) -> None:
    tokens = read(pixels)
    right = heads.count(tokens[:, 1:].mean(1)).argmax(-1) == truth
    per_count = " ".join(f"{c}: {right[truth == c].float().mean():.3f}" for c in range(1, 6))
    print(f"step {step}: count from the token mean {right.float().mean():.3f} ({per_count}); "
          f"tokens moved {moved(tokens, shipped):.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--keep", type=float, default=0.1, help="weight of the tokens' relative squared change")
    parser.add_argument("--centre", type=float, default=5.0, help="weight of the per-patch centre flag")
    parser.add_argument("--val", type=int, default=512, help="val scenes the count is read on")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    model, processor = load("llava-shapes")
    tower = model.model.vision_tower.float().train()
    layer = model.config.vision_feature_layer
    read = TokenReader(tower, layer)
    read_shipped = TokenReader(copy.deepcopy(tower).eval().requires_grad_(False), layer)
    heads = CountHeads(tower.config.hidden_size)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.01)

    def pixels(scenes):
        return processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]

    val = [W.scene("val", i) for i in range(args.val)]
    val_pixels, val_truth = pixels(val), torch.tensor([len(s.objects) for s in val])
    with torch.no_grad():
        val_shipped = read_shipped(val_pixels)

    def loss_at(step):
        if step % args.every == 0 and step:
            report(step, read, val_shipped, heads, val_pixels, val_truth)
        scenes = [W.scene("train", FIRST_SCENE + step * args.batch + i) for i in range(args.batch)]
        x = pixels(scenes)
        combo, centre, _, _, count = patch_labels(scenes)
        tokens = read(x)
        with torch.no_grad():
            shipped = read_shipped(x)
        patches = tokens[:, 1:]
        count_logits = heads.count(patches.mean(1))
        losses = {"count": F.cross_entropy(count_logits, count),
                  "cls": F.cross_entropy(heads.cls(tokens[:, 0]), count),
                  "centre": args.centre * F.binary_cross_entropy_with_logits(heads.centre(patches)[..., 0], centre),
                  "combo": F.cross_entropy(heads.combo(patches).flatten(0, 1), combo.flatten()),
                  "keep": args.keep * moved(tokens, shipped)}
        return sum(losses.values()), losses, {"acc_count": (count_logits.argmax(-1) == count).float().mean()}

    tower_loop(Checkpoint("llava-shapes", "count_tower"), {"tower": tower, "heads": heads, "opt": opt},
               args.steps, args.lr, loss_at)
    report(args.steps, read, val_shipped, heads, val_pixels, val_truth)
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
