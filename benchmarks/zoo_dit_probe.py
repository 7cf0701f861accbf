"""What do flux-shapes' image tokens know of the object they lie on?

RefAM reads which image tokens attend to the expression's content words, so a token can only
single out "the circle" if it holds, somewhere, that it lies on a circle. This probes that:
on ``val`` scenes noised to flow time ``--t`` (the grounding readout's, prompted with the scene's
first referring expression), it keeps every image token an object covers by at least half,
and trains a small MLP (one hidden layer) per feature to read the object's shape and its
colour: the tokens entering each DiT block, and as references the token's own clean pixels
and its 3 x 3 token neighbourhood, clean and as the DiT sees it at ``--t``. Probes train on the
first half of the scenes and are scored on the rest (no scene in both); the majority class is
printed beside them.

Run: ``python benchmarks/zoo_dit_probe.py [--scenes 512] [--t 0.3] [--epochs 100] [--weights DIR]``
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from common import fit, predict
from vlmtools_zoo import load
from vlmtools_zoo import world as W
from vlmtools_zoo.flux import letterbox, token_share


@contextlib.contextmanager
def block_inputs(dit):
    """``{block name: image tokens entering it}`` for the forward run inside the context."""
    blocks = {f"double.{i}": b for i, b in enumerate(dit.transformer_blocks)}
    blocks |= {f"single.{i}": b for i, b in enumerate(dit.single_transformer_blocks)}
    held: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, kwargs):
            held[name] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    handles = [b.register_forward_pre_hook(keep(n), with_kwargs=True) for n, b in blocks.items()]
    try:
        yield held
    finally:
        for h in handles:
            h.remove()


def neighbourhood(tokens: torch.Tensor) -> torch.Tensor:
    """(L, C) tokens on a square grid -> (L, 9C): each token with its 3 x 3 neighbours (zeros off the edge)."""
    side = int(tokens.shape[0] ** 0.5)
    return F.unfold(tokens.T.reshape(1, -1, side, side), 3, padding=1)[0].T


@torch.no_grad()
def features(pipe, n: int, t: float, batch: int = 16):
    """Per kept token: ``{feature name: (N, C)}``, shape and colour labels, and each token's scene."""
    feats: dict[str, list] = {}
    shapes, colours, scene_of = [], [], []
    for start in range(0, n, batch):
        scenes = [W.scene("val", i) for i in range(start, min(n, start + batch))]
        boxes = [letterbox(s) for s in scenes]
        images = torch.stack([image for image, _ in boxes])
        emb, pooled, ids = pipe.encode_prompt([s.referring_expressions()[0].text for s in scenes])
        x0 = pipe.image_tokens(images)
        ts = torch.full((len(scenes),), t)
        x_t, _ = pipe.denoise_input(images, ts, torch.randn(x0.shape, generator=torch.Generator().manual_seed(start)))
        with block_inputs(pipe.transformer) as held:
            pipe.forward(x_t, ts, emb, pooled, ids)
        length = x0.shape[1]
        for b, (scene, (_, masks)) in enumerate(zip(scenes, boxes)):
            cover, owner = torch.stack([token_share(m).flatten() for m in masks]).max(0)
            keep = cover >= 0.5
            own = {"pixels": x0[b], "pixels 3x3": neighbourhood(x0[b]), "pixels 3x3 at t": neighbourhood(x_t[b])}
            own |= {name: h[b, -length:] for name, h in held.items()}  # single blocks: text, then image
            for name, value in own.items():
                feats.setdefault(name, []).append(value[keep].float())
            objects = [scene.objects[o] for o in owner[keep].tolist()]
            shapes += [W.SHAPES.index(o.shape) for o in objects]
            colours += [list(W.COLOURS).index(o.colour) for o in objects]
            scene_of += [scene.seed] * len(objects)
    return ({k: torch.cat(v) for k, v in feats.items()}, torch.tensor(shapes), torch.tensor(colours),
            torch.tensor(scene_of))


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, epochs: int, name: str) -> float:
    """Held-out accuracy of a one-hidden-layer MLP on standardised ``x``, trained on the ``train`` rows."""
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-3)
    seen, held = x[train], x[~train]
    probe = fit(lambda: torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(),
                                            torch.nn.Linear(256, int(y.max()) + 1)),
                len(seen), lambda index: (seen[index],), y[train], epochs, 128, name)
    return (predict(probe, len(held), lambda index: (held[index],)) == y[~train]).float().mean().item()


def majority(y: torch.Tensor, train: torch.Tensor) -> float:
    """Held-out accuracy of always answering the held-out rows' commonest class."""
    return torch.bincount(y[~train]).max().item() / int((~train).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=512)
    parser.add_argument("--t", type=float, default=0.3)
    parser.add_argument("--weights", type=Path, metavar="DIR",
                        help="a flux-shapes export to probe instead of the shipped DiT")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of each probe (batches of 128)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load("flux-shapes", weights=args.weights)
    feats, shapes, colours, scene_of = features(pipe, args.scenes, args.t)
    train = scene_of < scene_of.median()
    print(f"{len(shapes)} object tokens of {args.scenes} val scenes at t = {args.t}; "
          f"held-out accuracy of an MLP probe (train on {int(train.sum())} tokens, score on {int((~train).sum())})")
    print("| feature | dims | shape | colour |\n|---|---|---|---|")
    print(f"| majority class | - | {majority(shapes, train):.3f} | {majority(colours, train):.3f} |")
    for name, x in feats.items():
        accuracy = [probe_accuracy(x, y, train, args.epochs, f"{name}: {label}")
                    for label, y in (("shape", shapes), ("colour", colours))]
        print(f"| {name} | {x.shape[1]} | {accuracy[0]:.3f} | {accuracy[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
