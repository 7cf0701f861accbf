"""Training of flux-shapes: rectified flow matching on (letterboxed image, caption).

Most captions name every object in a random order, each with its shape and,
at random, its size and colour; a quarter are one of the scene's referring
expressions ("the circle", "the red square on the left"), the prompts grounding
reads. Each object's words are then the ones its image tokens should attend to.

The loss on a token is weighted ``1 + OBJECT_WEIGHT`` x the fraction of it an
object covers. Objects cover about 6 % of the tokens, so a plain mean is nearly
all background, which the caption hardly predicts. Trained on that mean, the
DiT barely used its caption: on object tokens another scene's caption raised
the loss by 3 % at t = 0.3. It bound no words to objects (docs/zoo-history.md).

Timesteps are drawn logit-normal as in SD3/FLUX training. Scenes, captions,
timesteps and noise all come from the step number, so a resumed run draws what
an uninterrupted one would, on any device. ``seed`` changes the DiT's initial
weights and the noise, not the data: the grounding of this recipe varies with
that draw as much as with any change of recipe tried (docs/zoo-history.md), so variants
are compared over several seeds. The learning rate decays linearly toward step 2000,
then restarts toward step 3000 (``RESTARTS``): the first shipped weights were trained to
2000 steps and resumed to 3000. Training then went on from them in a new round
(``ROUNDS``: a fresh optimiser and warm-up, and the decay restarted toward the last step),
which lifted grounding (docs/zoo-history.md). The defaults are that whole run.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import flux
from . import world as W
from .train_utils import Checkpoint, autocast, log, schedule_end, training_device

OBJECT_WEIGHT = 9.0
RESTARTS = (2000,)  # warm restarts of the learning-rate decay, the optimiser kept (the shipped run's)
ROUNDS = (3000,)  # where the shipped run began a new round: fresh optimiser and warm-up, decay restarted
STEPS = 6000  # the shipped DiT's training steps: where ``from_shipped`` runs begin a round


def caption(scene, rng) -> str:
    """One of the scene's referring expressions (p 0.25), else every object with its shape and, at
    random, its size (p 0.5) and colour (p 0.7), and the background half of the time."""
    refs = scene.referring_expressions()
    if refs and rng.random() < 0.25:
        return refs[rng.integers(len(refs))].text
    parts = []
    for i in rng.permutation(len(scene.objects)):
        o = scene.objects[i]
        words = ([o.size] if rng.random() < 0.5 else []) + ([o.colour] if rng.random() < 0.7 else []) + [o.shape]
        parts.append(W._a(" ".join(words)))
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + (f" on a {scene.background} background" if rng.random() < 0.5 else "")


def batch(pipe, step: int, size: int, seed: int = 0):
    """(x_t, t, prompt embeddings, pooled, text ids, velocity target, per-token loss weight), on
    the pipeline's device; the noise of ``seed`` (seed 0: the shipped run's recipe)."""
    rng = np.random.default_rng(step + 1_000_000)
    scenes = [W.scene("train", 70_000_000 + step * size + i) for i in range(size)]
    boxes = [flux.letterbox(s) for s in scenes]
    images = torch.stack([image for image, _ in boxes]).to(pipe.device)
    covered = torch.stack([flux.token_share(masks.any(0)) for _, masks in boxes])
    emb, pooled, txt_ids = pipe.encode_prompt([caption(s, rng) for s in scenes])
    t = torch.sigmoid(torch.from_numpy(rng.normal(0, 1, size)).float()).to(pipe.device)
    x_t, target = pipe.denoise_input(images, t, generator=torch.Generator().manual_seed(seed * 10**9 + step))
    return x_t, t, emb, pooled, txt_ids, target, (1 + OBJECT_WEIGHT * covered.flatten(1)).to(pipe.device)


def learning_rate(step: int, steps: int, lr: float, restarts: tuple[int, ...], first: int = 0) -> float:
    """20 warm-up steps from ``first``, then a linear decay to 10 % at the schedule's end
    (``schedule_end``)."""
    return lr * min(1.0, (step - first + 1) / 20) * (1 - 0.9 * step / schedule_end(step, steps, restarts))


def optimiser(dit, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)


def check_size(dit_size: tuple[int, int, int], from_shipped: bool, out: Path | None) -> None:
    """Raise ValueError unless a DiT of ``dit_size`` can be trained as asked: at least one head and
    one block of each stream; another size than the shipped one from scratch, to ``out``."""
    if min(dit_size) < 1:
        raise ValueError("--dit takes at least one head and one block of each stream")
    if tuple(dit_size) != flux.DIT_SIZE and (from_shipped or out is None):
        raise ValueError("a DiT of another size (--dit) is trained from scratch and exported to --out, "
                         "not --from-shipped")


def main(steps: int = STEPS, size: int = 16, lr: float = 1e-3, seed: int = 0, device: str | None = None,
         out: Path | None = None, from_shipped: bool = False, dit_size: tuple[int, int, int] = flux.DIT_SIZE):
    """Train (or resume) the DiT of ``seed`` (checkpoint ``dit``, other seeds ``dit-seed<N>``) on
    ``device`` (default: a GPU where there is one) and export it to ``out`` (default: the
    package's shipped weights) every 25 steps. ``from_shipped``: go on from the shipped DiT as if
    from its checkpoint at ``STEPS``, in a new round toward ``steps`` (checkpoint
    ``dit-from-shipped``). ``dit_size``: (heads, double-stream, single-stream blocks) of a DiT
    trained from scratch (checkpoint ``dit-<H>x<D>x<S>``), exported to ``out`` only."""
    dit_size = tuple(dit_size)
    first = STEPS if from_shipped else 0
    if steps <= first:
        raise ValueError(f"the shipped DiT had {first} steps: --from-shipped needs more")
    check_size(dit_size, from_shipped, out)
    resized = dit_size != flux.DIT_SIZE
    rounds = ROUNDS + (first,) if from_shipped else ROUNDS
    torch.manual_seed(seed)
    device = training_device(device)
    pipe = flux.build_pipeline(size=dit_size).to(device)
    dit = pipe.transformer.train()
    opt = optimiser(dit, lr)
    name = ("dit" + ("-from-shipped" if from_shipped else "") + ("-{}x{}x{}".format(*dit_size) if resized else "")
            + (f"-seed{seed}" if seed else ""))
    ck = Checkpoint("flux-shapes", name)
    if from_shipped and not ck.path.exists():  # a checkpoint, when there is one, holds the DiT
        dit.load_state_dict(load_file(flux.WEIGHTS / "transformer" / "diffusion_pytorch_model.safetensors"))
    start = ck.load({"dit": dit, "opt": opt}) or first
    out = Path(out) if out else flux.WEIGHTS
    t0 = time.time()
    for step in range(start, steps):
        if step in rounds:  # what the optimiser learnt in the last round is dropped
            opt = optimiser(dit, lr)
        round_start = max([0] + [r for r in rounds if r <= step])
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, steps, lr, RESTARTS + rounds, round_start)
        x_t, t, emb, pooled, txt_ids, target, weight = batch(pipe, step, size, seed)
        with autocast(device):
            pred = pipe.forward(x_t, t, emb, pooled, txt_ids)
        loss = (weight * (pred.float() - target).pow(2).mean(-1)).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        if step % 5 == 0 or step == steps - 1:
            log("flux", step, time.time() - t0, loss=loss.item())
        if (step + 1) % 25 == 0 or step == steps - 1:
            ck.save(step + 1, {"dit": dit, "opt": opt})
            dit.save_pretrained(out / "transformer")
