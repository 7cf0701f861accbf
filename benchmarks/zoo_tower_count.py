"""Can more tower training put the object count into the 144 tokens llava-shapes' LM reads?

``zoo_ceilings.py`` found the count capped by the tower: every probe of those tokens, or of the
CLS token, stops at 0.84-0.86 of 1000 ``val`` scenes, while a small CNN trained on the same
pixels counts 0.999. This runs the trainer's stage 10a (``llava_train.count_tower``: the tower
alone on the count from the mean of the LM-read tokens and from CLS, stage 1's per-patch labels,
and a pull toward its starting tokens) on the shipped tower, and every ``--every`` steps prints
the count read from the token mean on ``--val`` ``val`` scenes, per number of objects, and how
far the tokens have moved. The LM is not involved: this asks only whether the tower can learn
to count at this pace.

Run: ``python benchmarks/zoo_tower_count.py [--steps 5000] [--lr 5e-4] [--keep 0.1] [--per-shape 1]``
(resumable: the checkpoint is stage 10a's, ``<cache>/train/llava-shapes/count_tower.pt``; remove
it to start over). The shipped tower has already been through it twice (stages 10a and 11a,
``llava_train.start_tally``), then again with each shape's count too (12a, ``start_census``).
"""
from __future__ import annotations

import argparse
import time

import torch

from vlmtools_zoo import load
from vlmtools_zoo import llava_train as T
from vlmtools_zoo import world as W


class ValCount:
    """Every ``every`` steps: the count read from the token mean on ``val`` scenes, per number of
    objects, with heads that read each shape's count (stage 12a) that too, over the shapes
    present, and the tokens' relative squared change from the tower's at the start."""

    def __init__(self, tower, layer: int, processor, n: int, every: int):
        scenes = [W.scene("val", i) for i in range(n)]
        self.pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        self.truth = torch.tensor([len(s.objects) for s in scenes])
        self.shape_truth = T.shape_count_labels(scenes)
        with torch.no_grad():  # before count_tower trains the tower or loads its checkpoint
            self.start = T.TokenReader(tower, layer)(self.pixels)
        self.every = every

    @torch.no_grad()
    def __call__(self, step: int, read, heads, last: bool = False) -> None:
        if not (last or (step and step % self.every == 0)):
            return
        tokens = read(self.pixels)
        right = heads.count_from_mean(tokens).argmax(-1) == self.truth
        per_count = " ".join(f"{c}: {right[self.truth == c].float().mean():.3f}" for c in range(1, 6))
        print(f"step {step}: count from the token mean {right.float().mean():.3f} ({per_count}); "
              f"tokens moved {T.moved(tokens, self.start):.3f}", flush=True)
        if heads.per_shape is not None:
            right = heads.shape_counts_from_mean(tokens).argmax(-1) == self.shape_truth
            per_count = " ".join(f"{c}: {right[self.shape_truth == c].float().mean():.3f}" for c in range(1, 5))
            print(f"  each shape's count from the token mean {right[self.shape_truth > 0].float().mean():.3f} "
                  f"({per_count})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=T.COUNT_TOWER_STEPS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--keep", type=float, default=T.KEEP_WEIGHT, help="weight of the tokens' relative squared change")
    parser.add_argument("--centre", type=float, default=T.CENTRE_WEIGHT, help="weight of the per-patch centre flag")
    parser.add_argument("--per-shape", type=float, default=0.0,
                        help=f"weight of each shape's count from the token mean (stage 12a: {T.PER_SHAPE_WEIGHT})")
    parser.add_argument("--val", type=int, default=512, help="val scenes the count is read on")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    model, processor = load("llava-shapes")
    tower, layer = model.model.vision_tower.float(), model.config.vision_feature_layer
    val = ValCount(tower, layer, processor, args.val, args.every)
    heads = T.count_tower(tower, layer, args.steps, batch=args.batch, lr=args.lr, keep=args.keep,
                          centre=args.centre, per_shape=args.per_shape,
                          report=val)  # a restart at or past --steps is ignored
    val(args.steps, T.TokenReader(tower, layer), heads, last=True)
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
