"""Training of flux-shapes: rectified flow matching on (letterboxed image, caption).

The caption names every object (size, colour, shape) in a random order, so
each object's words are the ones whose tokens its image tokens should attend
to; that is what RefAM-style grounding reads at test time. Timesteps are drawn
logit-normal as in SD3/FLUX training. Scene indices come from the step number.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from . import flux
from . import world as W
from .train_utils import Checkpoint, autocast, log


def caption(scene, rng) -> str:
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    parts = [W._a(f"{o.size} {o.name}") for o in objs]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} on a {scene.background} background"


def batch(pipe, step: int, size: int):
    rng = np.random.default_rng(step + 1_000_000)
    scenes = [W.scene("train", 70_000_000 + step * size + i) for i in range(size)]
    images = torch.stack([flux.letterbox(s)[0] for s in scenes])
    emb, pooled, txt_ids = pipe.encode_prompt([caption(s, rng) for s in scenes])
    t = torch.sigmoid(torch.from_numpy(rng.normal(0, 1, size)).float())
    x_t, target = pipe.denoise_input(images, t)
    return x_t, t, emb, pooled, txt_ids, target


def main(steps: int = 1500, size: int = 16, lr: float = 1e-3):
    torch.manual_seed(0)
    pipe = flux.build_pipeline()
    dit = pipe.transformer.train()
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)
    ck = Checkpoint("flux-shapes", "dit")
    start = ck.load({"dit": dit, "opt": opt})
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:  # warmup, then linear decay to 10%
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / steps)
        x_t, t, emb, pooled, txt_ids, target = batch(pipe, step, size)
        with autocast():
            pred = pipe.forward(x_t, t, emb, pooled, txt_ids)
        loss = (pred.float() - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        if step % 5 == 0 or step == steps - 1:
            log("flux", step, time.time() - t0, loss=loss.item())
        if (step + 1) % 25 == 0 or step == steps - 1:
            ck.save(step + 1, {"dit": dit, "opt": opt})
            dit.save_pretrained(flux.WEIGHTS / "transformer")
