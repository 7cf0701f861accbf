"""Training of llava-shapes, in twelve resumable stages (see docs/zoo.md; their history: docs/zoo-history.md).

1. ``tower``: the CLIP tower alone on the world's labels. A random tower gets
   too weak a gradient through 30 frozen LM layers to learn anything (measured,
   ZOO-NOTES), so it first learns per-patch colour x shape (the binding that
   existence questions need) and object centres on the features the LM will
   read (layer -2), and presence/count from CLS at the last layer.
2. ``words``: the projector alone learns to turn each object's centre patch
   into the SmolLM2 embedding of its colour word and the next patch (raster
   order) into that of its shape word, every other patch into a space; the
   visual tokens then read like text ("... red circle ... blue cross ..."), so
   alignment starts from something the frozen LM can already read (the tower
   learns these "slots" in stage 1).
3. ``align``: tower, projector and a rank-8 LoRA on every LM linear layer,
   trained through the LM on multi-turn chats (several one-word answers per
   image, half of the chats opening with "Describe the image." answered by the
   object listing, the loss and the LM head only at answer positions, bf16
   autocast where the CPU has native bf16: ``train_utils.autocast``).
4. ``refine``: the align stage again on fresh chats, a warm restart with a new
   optimiser at half its learning rates (more alignment was the one lever
   measured to help, docs/zoo-history.md).
5. ``bind``: the refine stage on chats of 10 questions drawn from all of each
   scene's questions, not one per type, a quarter of them opening with the
   listing. Crowded scenes then ask most about colour and shape: every wrong
   colour or shape answer of the refined models named another object of the
   scene (docs/zoo-history.md), so the binding, not the seeing, is what fails.
6. ``probe``: the bind stage at a lower learning rate with the scene's existence
   probes (every object present, as many near-miss absent ones) among the
   questions: the bind stage's chats ask existence least, and it fell there.
7. ``reread``: the tower sees each object's shape but spreads it over the
   object's patches (an MLP on their mean names it for 92 % of objects, a
   linear read of one patch for 63 %), and LLaVA's per-token projector cannot
   gather it. The tower's last layer, which only stage 1's CLS heads used,
   restarts as the identity and learns alone, the layers below frozen, to put
   the object's colour x shape into every patch of it (``reread_tower``); the
   LM then reads that layer (``vision_feature_layer`` -2 -> -1) through the
   probe stage's chats. Exported weights record the layer their LM reads.
8. ``reprobe``: the probe stage again, its chats from their start, on the layer
   the LM now reads: stage 7's 300 LM steps left the LM still improving on it
   (600 more steps raised every question type but count on ``val``, 1200 count too;
   1800 and 2400 gained less each time, docs/zoo-history.md).
9. ``widen``: the probe stage on fresh chats with the LoRA widened from rank 8
   to 16 at the same scale (``widen_lora``): whether the LoRA's rank was what
   held the LM back once more steps at rank 8 had stopped paying. It was not
   (600 steps at rank 16 moved ``val`` about as 600 at rank 8 had, docs/zoo-history.md),
   but they were better steps than none, so the shipped weights have them.
10. ``recount``: every probe of the tokens the LM reads counted at most 0.86
   while the pixels hold the count (0.999 from a small CNN): the tower lost it.
   The whole tower learns alone, 5000 steps, to put the count into the mean of
   those tokens, pulled toward its starting tokens (``count_tower``); then the
   probe stage's chats, fresh ones, realign the LM to it.
11. ``tally``: stage 10 again from where it left the tower: 4000 more tower steps on fresh
   scenes (its token mean counted 0.93 of ``val`` scenes after 5000 and was still rising),
   then fresh chats realign the LM.
12. ``census``: stage 11's LM miscounted "How many <shape>s are there?" far more often than
   "How many shapes are there?". Stage 10 again, the tower now also learning each shape's
   count from the token mean (``CountHeads.shape_counts_from_mean``), then fresh chats that
   ask "how many" of every shape in the scene (``chat(counts=True)``).
``--from-shipped`` runs stages 4-12 (those given steps) from the shipped
weights, which are what the last stage exported.

Scene indices come from the step number, so resuming replays nothing.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import llava
from . import world as W
from .train_utils import Checkpoint, autocast, device_of, log, schedule_end, training_device

GRID = llava.IMAGE_SIZE // llava.PATCH
N_COMBO = len(W.COLOURS) * len(W.SHAPES)
N_SLOT = 1 + len(W.COLOURS) + len(W.SHAPES)
SLOT_WEIGHT = torch.tensor([0.2] + [1.0] * (N_SLOT - 1))  # slots are rare: ~2 patches per object


def patch_labels(scenes):
    """Per patch, in the letterboxed 96 px frame: colour x shape class
    (0 = background), object-centre flag and word slot (0 none, 1 + colour at
    an object's centre patch, 1 + 6 + shape at the patch after it); per image:
    presence (24) and count."""
    combo = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    centre = torch.zeros(len(scenes), GRID * GRID)
    slot = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    presence = torch.zeros(len(scenes), N_COMBO)
    count = torch.zeros(len(scenes), dtype=torch.long)
    colours, shapes = list(W.COLOURS), list(W.SHAPES)
    for b, s in enumerate(scenes):
        side = max(s.width, s.height)
        ox, oy, k = (side - s.width) // 2, (side - s.height) // 2, llava.IMAGE_SIZE / side
        masks = torch.zeros(len(s.objects), side, side)
        masks[:, oy:oy + s.height, ox:ox + s.width] = torch.from_numpy(s.masks).float()
        frac = F.adaptive_avg_pool2d(masks, GRID).flatten(1)  # (n, 144)
        best, who = frac.max(0)
        cls = torch.tensor([1 + colours.index(o.colour) * len(shapes) + shapes.index(o.shape)
                            for o in s.objects])
        combo[b] = torch.where(best >= 0.2, cls[who], 0)
        for o, c in zip(s.objects, cls):
            px = min(GRID - 1, int((o.cx + ox) * k // llava.PATCH))
            py = min(GRID - 1, int((o.cy + oy) * k // llava.PATCH))
            centre[b, py * GRID + px] = 1
            slot[b, py * GRID + px] = 1 + colours.index(o.colour)
            slot[b, min(py * GRID + px + 1, GRID * GRID - 1)] = 1 + len(colours) + shapes.index(o.shape)
            presence[b, c - 1] = 1
        count[b] = len(s.objects)
    return combo, centre, slot, presence, count


class TowerHeads(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.combo, self.centre = nn.Linear(d, N_COMBO + 1), nn.Linear(d, 1)
        self.slot = nn.Linear(d, N_SLOT)
        self.presence, self.count = nn.Linear(d, N_COMBO), nn.Linear(d, 6)


def tower_step(tower, heads, pixel_values, labels):
    device = device_of(heads)
    combo, centre, slot, presence, count = (label.to(device) for label in labels)
    with autocast(device):
        out = tower(pixel_values=pixel_values.to(device), output_hidden_states=True)
    patches = out.hidden_states[-2][:, 1:].float()
    pooled = out.pooler_output.float()
    logits = heads.combo(patches)
    losses = {
        "combo": F.cross_entropy(logits.flatten(0, 1), combo.flatten()),
        "centre": F.binary_cross_entropy_with_logits(heads.centre(patches)[..., 0], centre),
        "slot": F.cross_entropy(heads.slot(patches).flatten(0, 1), slot.flatten(),
                                weight=SLOT_WEIGHT.to(device)),
        "presence": F.binary_cross_entropy_with_logits(heads.presence(pooled), presence),
        "count": F.cross_entropy(heads.count(pooled), count),
    }
    slot_pred = heads.slot(patches).argmax(-1)
    acc = {"acc_slot": ((slot_pred == slot) | (slot == 0)).all(1).float().mean(),
           "acc_combo": ((logits.argmax(-1) == combo) | (combo == 0)).all(1).float().mean(),
           "acc_count": (heads.count(pooled).argmax(-1) == count).float().mean(),
           "acc_presence": ((heads.presence(pooled) > 0) == (presence > 0)).all(1).float().mean()}
    return sum(losses.values()), losses, acc


TOWER_RESTARTS = (600,)  # the shipped tower: 600 steps, then resumed to 2600 (docs/zoo-history.md)


def train_tower(steps: int, batch: int = 32, lr: float = 1e-3, device: torch.device | str = "cpu"):
    from transformers import CLIPVisionModel

    proc = llava.build_processor()
    tower = CLIPVisionModel(llava.vision_config()).to(device)
    heads = TowerHeads(tower.config.hidden_size).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def loss_at(step):
        scenes = [W.scene("train", step * batch + i) for i in range(batch)]
        pv = proc.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        return tower_step(tower, heads, pv, patch_labels(scenes))

    tower_loop(Checkpoint("llava-shapes", "tower"), {"tower": tower, "heads": heads, "opt": opt}, steps, lr, loss_at,
               TOWER_RESTARTS)
    return tower


def tower_loop(ck: Checkpoint, parts: dict, steps: int, lr: float, loss_at, restarts: tuple[int, ...] = ()) -> None:
    """A tower stage from where ``ck`` left off: warm-up then cosine learning rate (restarted at
    ``restarts``), one optimiser step on ``loss_at(step) -> (loss, losses, accuracies)`` (dicts of
    scalar tensors, read only when logged), a log line every 25 steps, a checkpoint of ``parts``
    (``opt`` among them) every 50."""
    opt = parts["opt"]
    start = ck.load(parts)
    t0 = time.time()
    for step in range(start, steps):
        set_lr(opt, lr, step, steps, warmup=30, restarts=restarts)
        loss, losses, acc = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(ck.stage, step, time.time() - t0, loss=loss.item(), **{k: v.item() for k, v in (losses | acc).items()})
        if (step + 1) % 50 == 0 or step == steps - 1:
            ck.save(step + 1, parts)


REREAD_TOWER_STEPS = 800
KEEP_WEIGHT = 0.1  # how strongly stages 7a and 10a keep the tower's output near where it started


def moved(tokens: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The relative squared change of ``tokens`` from ``before``."""
    return (tokens - before).pow(2).mean() / before.pow(2).mean()


def identity_layer(layer: nn.Module) -> None:
    """Zero the residual branches' output projections of a CLIP encoder layer: it passes its
    input through unchanged."""
    with torch.no_grad():
        for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()


def reread_tower(tower, steps: int = REREAD_TOWER_STEPS, batch: int = 32, lr: float = 1e-3) -> None:
    """Stage 7a: the last layer from the identity, alone, to per-patch colour x shape (a linear
    head on its patch outputs), plus ``KEEP_WEIGHT`` x the relative squared change of its output
    (``moved``)."""
    proc = llava.build_processor()
    last = tower.encoder.layers[-1]
    identity_layer(last)  # a checkpoint, when there is one, replaces it
    device = device_of(last)
    head = nn.Linear(tower.config.hidden_size, N_COMBO + 1).to(device)
    opt = torch.optim.AdamW(list(last.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.01)

    def loss_at(step):
        scenes = [W.scene("train", 60_000_000 + step * batch + i) for i in range(batch)]
        pv = proc.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        with torch.no_grad(), autocast(device):
            x = tower(pixel_values=pv.to(device), output_hidden_states=True).hidden_states[-2].float()
        h = last(x, None)
        combo = patch_labels(scenes)[0].to(device)
        logits = head(h[:, 1:])
        losses = {"combo": F.cross_entropy(logits.flatten(0, 1), combo.flatten()),
                  "keep": KEEP_WEIGHT * moved(h, x)}
        objects = combo > 0
        acc = {"acc_object_patch": (logits.argmax(-1) == combo)[objects].float().mean()}
        return sum(losses.values()), losses, acc

    tower_loop(Checkpoint("llava-shapes", "reread_tower"), {"last": last, "head": head, "opt": opt},
               steps, lr, loss_at)  # only the last layer and the head learn: x has no gradient


COUNT_TOWER_STEPS = 5000
COUNT_TOWER_RESTARTS = (2500,)  # stage 10a: 2500 steps, then resumed to 5000 (docs/zoo-history.md)
COUNT_FIRST_SCENE = 70_000_000  # train scenes no other stage draws
TALLY_TOWER_STEPS = 4000
TALLY_FIRST_SCENE = 71_000_000  # past stage 10a's 5000 x 32
CENSUS_TOWER_STEPS = 3000
CENSUS_FIRST_SCENE = 72_000_000  # past stage 11a's 4000 x 32
PER_SHAPE_WEIGHT = 1.0
CENTRE_WEIGHT = 5.0


class CountHeads(nn.Module):
    """Stage 10a's heads: the count (index = number of objects) from the mean of the patch
    tokens and from CLS, and per patch the object-centre flag and colour x shape class; with
    ``per_shape`` (stage 12a), the count of each shape from the mean too."""

    def __init__(self, d: int, per_shape: bool = False):
        super().__init__()
        self.count, self.cls = nn.Linear(d, 6), nn.Linear(d, 6)
        self.centre, self.combo = nn.Linear(d, 1), nn.Linear(d, N_COMBO + 1)
        self.per_shape = nn.Linear(d, len(W.SHAPES) * 6) if per_shape else None

    def count_from_mean(self, tokens: torch.Tensor) -> torch.Tensor:
        """Count logits from the mean of the patch tokens (``tokens``: CLS first)."""
        return self.count(tokens[:, 1:].mean(1))

    def shape_counts_from_mean(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, shape, count) logits of each shape's count from the mean of the patch tokens."""
        return self.per_shape(tokens[:, 1:].mean(1)).unflatten(-1, (len(W.SHAPES), 6))


def shape_count_labels(scenes) -> torch.Tensor:
    """(scene, shape): how many objects of each of ``W.SHAPES``."""
    return torch.tensor([[sum(o.shape == s for o in sc.objects) for s in W.SHAPES] for sc in scenes])


class TokenReader:
    """The tokens an LM reads from ``tower``: its ``layer`` output (CLS first), fp32."""

    def __init__(self, tower, layer: int):
        self.tower, self.layer = tower, layer

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        device = device_of(self.tower)
        with autocast(device):
            out = self.tower(pixel_values=pixel_values.to(device), output_hidden_states=True)
        return out.hidden_states[self.layer].float()


def count_tower(tower, layer: int, steps: int = COUNT_TOWER_STEPS, batch: int = 32, lr: float = 5e-4,
                keep: float = KEEP_WEIGHT, centre: float = CENTRE_WEIGHT,
                restarts: tuple[int, ...] = COUNT_TOWER_RESTARTS, report: Callable | None = None,
                stage: str = "count_tower", first_scene: int = COUNT_FIRST_SCENE,
                per_shape: float = 0.0) -> CountHeads:
    """Stage 10a: the whole tower, alone, on the object count read linearly from the mean of the
    tokens the LM reads (``layer``: what an LM attending evenly over the image reads) and from
    CLS, stage 1's per-patch centres (x ``centre``) and colour x shape on the same tokens, plus
    ``keep`` x the tokens' relative squared change from the tower's at the start, so that the
    LM's reading of them needs little realignment. Every probe of the tokens stage 9's LM reads
    counts at most 0.86 while the pixels hold the count (docs/zoo-history.md). ``report(step, read,
    heads)`` runs before each step (the benchmark's ``val`` reading). Checkpointed as ``stage``,
    on the ``train`` scenes from ``first_scene`` on; ``per_shape`` > 0 adds x it each shape's
    count from the token mean (``CountHeads.shape_counts_from_mean``)."""
    proc = llava.build_processor()
    read = TokenReader(tower, layer)
    read_start = TokenReader(copy.deepcopy(tower).requires_grad_(False), layer)  # before a checkpoint loads
    heads = CountHeads(tower.config.hidden_size, per_shape > 0).to(device_of(tower))
    tower.requires_grad_(True)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01)

    def loss_at(step):
        if report:
            report(step, read, heads)
        scenes = [W.scene("train", first_scene + step * batch + i) for i in range(batch)]
        pv = proc.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        combo, centres, _, _, count = (label.to(device_of(tower)) for label in patch_labels(scenes))
        tokens = read(pv)
        with torch.no_grad():
            start = read_start(pv)
        patches = tokens[:, 1:]
        count_logits = heads.count_from_mean(tokens)
        losses = {"count": F.cross_entropy(count_logits, count),
                  "cls": F.cross_entropy(heads.cls(tokens[:, 0]), count),
                  "centre": centre * F.binary_cross_entropy_with_logits(heads.centre(patches)[..., 0], centres),
                  "combo": F.cross_entropy(heads.combo(patches).flatten(0, 1), combo.flatten()),
                  "keep": keep * moved(tokens, start)}
        accuracies = {"acc_count": (count_logits.argmax(-1) == count).float().mean()}
        if per_shape:
            logits, truth = heads.shape_counts_from_mean(tokens), shape_count_labels(scenes).to(count.device)
            losses["per_shape"] = per_shape * F.cross_entropy(logits.flatten(0, 1), truth.flatten())
            accuracies["acc_per_shape"] = (logits.argmax(-1) == truth)[truth > 0].float().mean()
        return sum(losses.values()), losses, accuracies

    tower_loop(Checkpoint("llava-shapes", stage), {"tower": tower, "heads": heads, "opt": opt},
               steps, lr, loss_at, restarts)
    return heads


def words_loop(ck: Checkpoint, name: str, proj: nn.Module, targets: torch.Tensor, steps: int, words_at,
               lr: float = 2e-3) -> None:
    """The words stage: ``proj`` alone (checkpointed as ``name``) learns to map the frozen
    tower's features to ``targets[slot]``, ``words_at(step) -> (features, slot labels)``."""
    targets = targets.to(device_of(proj))
    opt = torch.optim.AdamW(proj.parameters(), lr=lr)
    start = ck.load({name: proj, "opt": opt})
    proj.requires_grad_(True)
    t0 = time.time()
    for step in range(start, steps):
        with torch.no_grad():
            feats, slot = words_at(step)
        loss = F.mse_loss(proj(feats), targets[slot.to(targets.device)]) / targets.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log("words", step, time.time() - t0, rel_mse=loss.item())
    if start < steps:
        ck.save(steps, {name: proj, "opt": opt})

def set_lr(opt, lr, step, steps, warmup, restarts: tuple[int, ...] = ()):
    end = schedule_end(step, steps, restarts)
    f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, end) / end))
    for g in opt.param_groups:
        g["lr"] = g.get("base_lr", lr) * max(f, 0.05)


# ---- stage 2: projector to word embeddings -----------------------------------
def word_targets(model, tok) -> torch.Tensor:
    """(N_SLOT, 576) SmolLM2 input embeddings: row 0 a space (no word), then the
    colour words, then the shape words (first sub-token, with a leading space)."""
    emb = model.model.language_model.embed_tokens.weight.detach()
    words = [""] + list(W.COLOURS) + list(W.SHAPES)
    return torch.stack([emb[tok.encode(" " + w)[0]] for w in words])


class LoRA(nn.Module):
    """y = base(x) + scale * x A^T B^T; B starts at zero so training starts from SmolLM2."""

    def __init__(self, base: nn.Linear, r: int = llava.LORA_RANK, alpha: int = llava.LORA_ALPHA):
        super().__init__()
        self.base, self.scale = base, alpha / r
        device = base.weight.device  # A is drawn on the CPU: the same start on every device
        self.A = nn.Parameter((torch.randn(r, base.in_features) / math.sqrt(base.in_features)).to(device))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=device))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale


def add_lora(model, factors: dict | None = None) -> dict[str, LoRA]:
    """Wrap every targeted LM linear layer in a LoRA, fresh or with shipped ``factors``."""
    lm = model.model.language_model
    out = {}
    for name, mod in list(lm.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in llava.LORA_TARGETS:
            parent, attr = name.rsplit(".", 1)
            out[name] = LoRA(mod)
            if factors is not None:
                for p in ("A", "B"):
                    getattr(out[name], p).data = factors[f"{name}.{p}"].to(mod.weight.device, torch.float32, copy=True)
            setattr(lm.get_submodule(parent), attr, out[name])
    return out


def lora_state(loras: dict[str, LoRA]) -> dict:
    return {f"{k}.{p}": getattr(m, p).detach() for k, m in loras.items() for p in ("A", "B")}


def chat(proc, scene, rng, turns: int, describe: float = 0.5, every_question: bool = False,
         probes: bool = False, counts: bool = False):
    """A multi-turn chat about one scene: with probability ``describe`` first "Describe the
    image." answered by the left-to-right object listing, then one-word answers, every
    question type once, then again; with ``every_question``, ``turns`` questions drawn
    without repeats from all of the scene's questions (with ``probes``, its existence probes
    among them; with ``counts``, "how many" of every shape present always among them)."""
    qs = list(dict.fromkeys(scene.questions() + (scene.existence_probes() if probes else [])))
    if every_question:
        asked = scene.shape_counts() if counts else []
        rest = [q for q in qs if q not in asked]
        picked = asked + [rest[i] for i in rng.permutation(len(rest))[:turns - len(asked)]]
        if asked:  # at random turns
            picked = [picked[i] for i in rng.permutation(len(picked))]
    else:
        by_type = {t: [q for q in qs if q.type == t] for t in W.QUESTION_TYPES}
        types = [t for t in rng.permutation(W.QUESTION_TYPES) if by_type[t]]
        types = (types + [t for t in rng.permutation(W.QUESTION_TYPES) if by_type[t]])[:turns]
        picked = [by_type[t][rng.integers(len(by_type[t]))] for t in types]
    pairs = [(W.DESCRIBE_PROMPT, scene.listing())] if rng.random() < describe else []
    for q in picked:
        text = (q.question.replace("?", " in the image?") if q.type == "existence" and rng.random() < 0.5
                else q.question)
        pairs.append((text, q.answer))
    msgs = []
    for i, (text, answer) in enumerate(pairs):
        content = [{"type": "image"}, {"type": "text", "text": text}] if i == 0 else [{"type": "text", "text": text}]
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return proc.apply_chat_template(msgs)


def answer_positions(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every token that predicts an answer token or its <|im_end|>."""
    rows, pos = [], []
    header = [1, 520, 9531, 198]  # <|im_start|>assistant\n
    for b, seq in enumerate(ids.tolist()):
        i = 0
        while i < len(seq) - 4:
            if seq[i:i + 4] == header:
                j = i + 4
                while j < len(seq) and seq[j - 1] != 2:
                    rows.append(b)
                    pos.append(j - 1)
                    j += 1
                i = j
            else:
                i += 1
    return torch.tensor(rows), torch.tensor(pos)


def align_batch(proc, step, batch, turns, **chat_kw):
    rng = np.random.default_rng(step)
    scenes = [W.scene("train", 50_000_000 + step * batch + i) for i in range(batch)]
    texts = [chat(proc, s, rng, turns, **chat_kw) for s in scenes]
    x = proc(images=[s.image for s in scenes], text=texts, return_tensors="pt", padding=True)
    rows, pos = answer_positions(x["input_ids"])
    return x, rows, pos, x["input_ids"][rows, pos + 1]


def lm_loss(model, x, rows, pos, targets):
    device = model.device
    x, rows, pos, targets = x.to(device), rows.to(device), pos.to(device), targets.to(device)
    with autocast(device):
        h = model.model(**x).last_hidden_state
        logits = model.lm_head(h[rows, pos]).float()
    return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean().item()


def train_align(tower_state, words_steps: int, steps: int, batch: int = 6, turns: int = 6,
                later: dict[str, int] | None = None, device: torch.device | str = "cpu"):
    proc = llava.build_processor()
    model = llava.build_model(llava.FEATURE_LAYER_BEFORE_REREAD).to(device)  # stage 7 moves the layer
    model.model.vision_tower.load_state_dict(tower_state)
    model.requires_grad_(False)
    tower, proj = model.model.vision_tower, model.model.multi_modal_projector

    # stage 2 (cheap: tower forward + projector only)
    def words_at(step):
        scenes = [W.scene("train", 40_000_000 + step * 64 + i) for i in range(64)]
        pv = proc.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        feats = tower(pixel_values=pv.to(device), output_hidden_states=True).hidden_states[-2][:, 1:]
        return feats, patch_labels(scenes)[2]

    words_loop(Checkpoint("llava-shapes", "words"), "proj", proj, word_targets(model, proc.tokenizer),
               words_steps, words_at)

    steps = {"align": steps, **(later or {})}
    return model, align_and_refine(model, proc, steps, batch, turns)


def align_and_refine(model, proc, steps: dict[str, int], batch: int, turns: int,
                     factors: dict | None = None) -> dict[str, LoRA]:
    """Stages 3-12 (``align_stages``) on llava-shapes: tower, projector and LoRA (fresh or from
    ``factors``); stage 7 first runs ``reread_tower`` and moves the LM to the last layer."""
    loras = add_lora(model, factors)
    tower, proj = model.model.vision_tower, model.model.multi_modal_projector
    parts = {"tower": tower, "proj": proj, "lora": lora_mod(loras)}
    groups = align_groups(proj.parameters(), tower.parameters(), loras)
    if (steps.get("reread") and model.config.vision_feature_layer == llava.FEATURE_LAYER
            and not Checkpoint("llava-shapes", "reread").path.exists()):
        raise ValueError("stage 7 (reread) already ran on these weights: their LM reads the tower's last layer")
    align_stages("llava-shapes", parts, groups, steps, model, proc, batch, turns,
                 lambda: export(model, loras))
    return loras


def refine_shipped(steps: dict[str, int], batch: int = 6, turns: int = 6, device: torch.device | str = "cpu") -> None:
    """Stages 4-12 alone (``steps``: refine, bind, probe, reread, reprobe, widen, recount, tally,
    census), from the shipped weights (what the last stage exported)."""
    from safetensors.torch import load_file

    shipped = llava.WEIGHTS / "model.safetensors"
    model = llava.build_model(llava.feature_layer(shipped)).to(device)
    model.requires_grad_(False)
    factors = llava.load_trained(model, load_file(shipped))
    align_and_refine(model, llava.build_processor(), steps, batch, turns, factors)


def lora_mod(loras: dict[str, LoRA]) -> nn.ModuleDict:
    """The LoRA factors as one checkpointable module."""
    return nn.ModuleDict({k.replace(".", "_"): m for k, m in loras.items()})


def align_groups(head, tower, loras: dict[str, LoRA]) -> list[dict]:
    """Trainable parameter groups of the align stages, with their base learning rates:
    projector (or merger) and LoRA factors 5e-4, the tower 1e-4."""
    groups = [{"params": list(head), "base_lr": 5e-4}, {"params": list(tower), "base_lr": 1e-4},
              {"params": [p for m in loras.values() for p in (m.A, m.B)], "base_lr": 5e-4}]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


SHIPPED_STEPS = {"refine": 200, "bind": 300, "probe": 180, "reread": 300, "reprobe": 2400, "widen": 600,
                 "recount": 1200, "tally": 1050, "census": 750}  # the shipped weights' stages 4-12 (docs/zoo-history.md)
WIDE_RANK = 16  # the LoRA's rank from stage 9 on


@dataclass(frozen=True)
class AlignStage:
    """A run of the align loop: its checkpoint name, learning rates relative to stage 3's,
    the step index its chats start at (each stage's chats are fresh) and how they are drawn."""

    name: str
    lr_scale: float
    first_step: int
    turns: int | None = None  # None: the trainer's ``turns``
    chat: dict = field(default_factory=dict)
    prepare: Callable | None = None  # run on the model before the stage's first step (and on resume)
    restarts: tuple[int, ...] = ()  # warm restarts of the learning-rate schedule (``schedule_end``)


def start_reread(model) -> None:
    """Stage 7's start: ``reread_tower`` on the tower, then the LM reads its last layer."""
    reread_tower(model.model.vision_tower, REREAD_TOWER_STEPS)
    model.config.vision_feature_layer = llava.FEATURE_LAYER


def widen_lora(model, rank: int = WIDE_RANK) -> None:
    """Stage 9's start: every LoRA of ``model`` narrower than ``rank`` grows to it at the same
    scale (``LoRA.scale`` stays alpha / 8), the new rows of A drawn fresh, the new columns of
    B zero, so the model is unchanged until the stage's first step. Factors already that wide
    (the shipped ones after stage 9, a resumed run's) stay as they are. In place (``.data``):
    the parameter groups ``align_and_refine`` built before the stages keep holding them."""
    draw = torch.Generator().manual_seed(1)  # on the CPU: the same start on every device
    for lora in (m for m in model.modules() if isinstance(m, LoRA)):
        extra, fan_in = rank - lora.A.shape[0], lora.A.shape[1]
        if extra > 0:
            fresh = torch.randn(extra, fan_in, generator=draw) / math.sqrt(fan_in)
            lora.A.data = torch.cat([lora.A.data, fresh.to(lora.A.device)])
            lora.B.data = torch.cat([lora.B.data, lora.B.data.new_zeros(lora.B.shape[0], extra)], 1)


def start_recount(model) -> None:
    """Stage 10's start: ``count_tower`` on the tower, at the layer the LM reads."""
    count_tower(model.model.vision_tower, model.config.vision_feature_layer, COUNT_TOWER_STEPS)


def start_tally(model) -> None:
    """Stage 11's start: ``count_tower`` again, on fresh scenes, from where stage 10 left the tower."""
    count_tower(model.model.vision_tower, model.config.vision_feature_layer, TALLY_TOWER_STEPS, restarts=(),
                stage="tally_tower", first_scene=TALLY_FIRST_SCENE)


def start_census(model) -> None:
    """Stage 12's start: ``count_tower`` again, on fresh scenes, now also on each shape's count:
    stage 11's LM miscounted "how many <shape>s" far more often than all the shapes (docs/zoo-history.md)."""
    count_tower(model.model.vision_tower, model.config.vision_feature_layer, CENSUS_TOWER_STEPS, restarts=(),
                stage="census_tower", first_scene=CENSUS_FIRST_SCENE, per_shape=PER_SHAPE_WEIGHT)


BIND_CHAT = {"describe": 0.25, "every_question": True}
PROBE_CHAT = {**BIND_CHAT, "probes": True}
PROBE = AlignStage("probe", 0.35, 3_000_000, turns=10, chat=PROBE_CHAT)
STAGES = (AlignStage("align", 1.0, 0), AlignStage("refine", 0.5, 1_000_000),
          AlignStage("bind", 0.5, 2_000_000, turns=10, chat=BIND_CHAT),
          PROBE,
          AlignStage("reread", 0.35, 4_000_000, turns=10, chat=PROBE_CHAT, prepare=start_reread,
                     restarts=(100,)),  # shipped: 100 steps, then resumed to 300
          replace(PROBE, name="reprobe", restarts=(300, 600, 1200, 1800)),  # shipped: each restart began a resumed run
          replace(PROBE, name="widen", first_step=6_000_000, prepare=widen_lora),
          replace(PROBE, name="recount", first_step=7_000_000, prepare=start_recount,
                  restarts=(600, 900)),  # shipped: each restart began a resumed run
          replace(PROBE, name="tally", first_step=8_000_000, prepare=start_tally,
                  restarts=(450, 750)),  # shipped: each restart began a resumed run
          replace(PROBE, name="census", first_step=9_000_000, prepare=start_census,
                  chat={**PROBE_CHAT, "counts": True}, restarts=(450,)))  # shipped: the restart began a resumed run


def align_stages(name: str, parts: dict, groups: list[dict], steps: dict[str, int], model, proc,
                 batch: int, turns: int, export) -> None:
    """Stages 3-12 in order, ``steps[stage]`` each (absent or 0: skipped), each with its own
    optimiser over ``groups`` and its own checkpoint of ``parts``, after its ``prepare``."""
    for stage in STAGES:
        if steps.get(stage.name):
            if stage.prepare:
                stage.prepare(model)
            opt = torch.optim.AdamW([{**g, "base_lr": g["base_lr"] * stage.lr_scale} for g in groups],
                                    weight_decay=0.0)
            align_loop(Checkpoint(name, stage.name), {**parts, "opt": opt}, steps[stage.name], model, proc,
                       batch, stage.turns or turns, export, stage.first_step, stage.chat, stage.restarts)


def align_loop(ck: Checkpoint, parts: dict, steps: int, model, proc, batch: int, turns: int, export,
               first: int = 0, chat_kw: dict | None = None, restarts: tuple[int, ...] = ()) -> None:
    """An align stage from where ``ck`` left off: multi-turn chats (those of steps ``first + step``,
    drawn by ``chat(**chat_kw)``) through the LM, the loss at the answers, clipped steps on every
    parameter ``parts["opt"]`` trains; a checkpoint and ``export()`` every 5 steps."""
    opt = parts["opt"]
    params = [p for g in opt.param_groups for p in g["params"]]
    start = ck.load(parts)
    t0 = time.time()
    for step in range(start, steps):
        set_lr(opt, 5e-4, step, steps, warmup=5, restarts=restarts)
        x, rows, pos, tg = align_batch(proc, first + step, batch, turns, **(chat_kw or {}))
        loss, acc = lm_loss(model, x, rows, pos, tg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log(ck.stage, step, time.time() - t0, loss=loss.item(), token_acc=acc)
        if (step + 1) % 5 == 0 or step == steps - 1:
            ck.save(step + 1, parts)
            export()


def export(model, loras):
    from safetensors.torch import save_file

    llava.WEIGHTS.mkdir(parents=True, exist_ok=True)
    # the LoRA-wrapped modules hold the base weights; the shipped state is tower + projector + factors
    save_file(llava.trained_state(model, lora_state(loras)), str(llava.WEIGHTS / "model.safetensors"),
              metadata={"vision_feature_layer": str(model.config.vision_feature_layer)})


def later_stages(given: dict[str, int | None], from_shipped: bool, shipped: dict[str, int]) -> dict[str, int]:
    """Steps of stages 4-12: those ``given``; the others as the shipped weights had them
    (``shipped``) on a full run, none from the shipped weights, which already had them."""
    return {k: v if (v := given.get(k)) is not None else 0 if from_shipped else d for k, d in shipped.items()}


def main(tower_steps: int = 2600, words_steps: int = 150, align_steps: int = 400, align_batch: int = 6,
         later: dict[str, int | None] | None = None, from_shipped: bool = False, device: str | None = None):
    """The twelve stages on ``device`` (default: a GPU where there is one); ``later``: steps of
    stages 4-12 (refine, bind, probe, reread, reprobe, widen, recount, tally, census) where not the shipped run's."""
    torch.manual_seed(0)
    device = training_device(device)
    later = later_stages(later or {}, from_shipped, SHIPPED_STEPS)
    if from_shipped:
        refine_shipped(later, batch=align_batch, device=device)
        return
    tower = train_tower(tower_steps, device=device)
    train_align(tower.state_dict(), words_steps, align_steps, batch=align_batch, later=later, device=device)
