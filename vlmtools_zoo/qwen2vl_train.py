"""Training of qwen2vl-shapes: llava-shapes' six resumable stages on Qwen2-VL's tower.

1. ``tower``: patch embedding and vision blocks alone on the world's labels, read
   per merge window (the 2 x 2 patches that the merger turns into one LM token):
   colour x shape, object centre and word slot per window, presence and count
   from the mean window of each image (the tower has no CLS token).
2. ``words``: the ``PatchMerger`` alone learns to emit, at each object's centre
   token, the SmolLM2 embedding of its colour word and at the next token (raster
   order) that of its shape word, a space elsewhere.
3. ``align``: tower, merger and a rank-8 LoRA on every LM linear layer through
   the LM on multi-turn chats of one-word answers (loss and LM head only at
   answer positions, bf16 autocast where the CPU has native bf16).
4. ``refine``: llava's refine stage (a warm restart of 3 on fresh chats).
5. ``bind``: llava's bind stage (chats of questions drawn from all of a scene's).
6. ``probe``: llava's probe stage (the bind stage with existence probes).

Imported from ``llava_train`` (model-independent): the heads, word targets,
LoRA, and the stage loops (``tower_loop``, ``words_loop``, ``align_stages``:
schedule, checkpoints, logs). Written here because llava's versions are tied to
its model: ``cell_labels`` (``patch_labels`` is fixed to the letterboxed 96 px
frame and a 12 x 12 grid) and ``tower_step`` (no CLS, images of different sizes
in one flat sequence; its loss terms are llava's and could be factored out of
``llava_train.tower_step`` as one function of the window and pooled features).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import qwen2vl
from . import world as W
from .llava_train import (
    N_COMBO,
    SLOT_WEIGHT,
    TowerHeads,
    add_lora,
    align_groups,
    align_stages,
    later_stages,
    lora_mod,
    lora_state,
    tower_loop,
    word_targets,
    words_loop,
)
from .train_utils import Checkpoint, autocast, training_device

SHIPPED_STEPS = {"refine": 300, "bind": 400, "probe": 240}  # the shipped weights' stages 4-6 (docs/zoo-history.md)

NAME = "qwen2vl-shapes"
WINDOW = qwen2vl.MERGE ** 2


def cell_labels(scenes, grids: torch.Tensor):
    """Labels per merged token, all images concatenated in the tower's order
    (raster order of each image's merged grid): colour x shape class (0 =
    background; an object covering >= 10% of the cell, and always its centre
    cell), object-centre flag and word slot (0 none, 1 + colour at the centre
    token, 1 + 6 + shape at the token after it); per image: presence (24) and
    count. ``grids`` are the processor's ``image_grid_thw`` rows (in patches)."""
    colours, shapes = list(W.COLOURS), list(W.SHAPES)
    combo, centre, slot = [], [], []
    presence = torch.zeros(len(scenes), N_COMBO)
    for b, (s, (_, gh, gw)) in enumerate(zip(scenes, grids.tolist())):
        rows, cols = gh // qwen2vl.MERGE, gw // qwen2vl.MERGE
        frac = F.adaptive_avg_pool2d(torch.from_numpy(s.masks).float(), (rows, cols)).flatten(1)
        best, who = frac.max(0)
        cls = torch.tensor([1 + colours.index(o.colour) * len(shapes) + shapes.index(o.shape)
                            for o in s.objects])
        c = torch.where(best >= 0.1, cls[who], 0)
        ce, sl = torch.zeros(rows * cols), torch.zeros(rows * cols, dtype=torch.long)
        for o, k in zip(s.objects, cls):
            i = min(rows - 1, int(o.cy * rows / s.height)) * cols + min(cols - 1, int(o.cx * cols / s.width))
            c[i], ce[i] = k, 1
            sl[i] = 1 + colours.index(o.colour)
            sl[min(i + 1, rows * cols - 1)] = 1 + len(colours) + shapes.index(o.shape)
            presence[b, k - 1] = 1
        combo.append(c)
        centre.append(ce)
        slot.append(sl)
    count = torch.tensor([len(s.objects) for s in scenes])
    return torch.cat(combo), torch.cat(centre), torch.cat(slot), presence, count


def windows(visual, pixel_values, grids):
    """Last-block features per merge window ``(tokens, 4 * embed_dim)``: what the merger reads."""
    with autocast(visual.device):
        h = visual(pixel_values.to(visual.device), grid_thw=grids.to(visual.device)).last_hidden_state
    return h.float().view(-1, WINDOW * h.shape[-1])


def tower_step(visual, heads, pixel_values, grids, labels):
    combo, centre, slot, presence, count = (label.to(visual.device) for label in labels)
    feats = windows(visual, pixel_values, grids)
    sizes = (grids.prod(-1) // WINDOW).tolist()
    pooled = torch.stack([w.mean(0) for w in feats.split(sizes)])
    logits, slot_logits = heads.combo(feats), heads.slot(feats)
    presence_logits, count_logits = heads.presence(pooled), heads.count(pooled)
    losses = {
        "combo": F.cross_entropy(logits, combo),
        "centre": F.binary_cross_entropy_with_logits(heads.centre(feats)[:, 0], centre),
        "slot": F.cross_entropy(slot_logits, slot, weight=SLOT_WEIGHT.to(visual.device)),
        "presence": F.binary_cross_entropy_with_logits(presence_logits, presence),
        "count": F.cross_entropy(count_logits, count),
    }

    def exact(ok):  # fraction of images with every labelled token right
        return torch.stack([o.all() for o in ok.split(sizes)]).float().mean()

    acc = {"acc_slot": exact((slot_logits.argmax(-1) == slot) | (slot == 0)),
           "acc_combo": exact((logits.argmax(-1) == combo) | (combo == 0)),
           "acc_count": (count_logits.argmax(-1) == count).float().mean(),
           "acc_presence": ((presence_logits > 0) == (presence > 0)).all(1).float().mean()}
    return sum(losses.values()), losses, acc


def image_batch(proc, seed: int, batch: int):
    scenes = [W.scene("train", seed + i) for i in range(batch)]
    x = proc.image_processor([s.image for s in scenes], return_tensors="pt")
    return scenes, x["pixel_values"], x["image_grid_thw"]


def train_tower(proc, steps: int, batch: int = 32, lr: float = 1e-3, device: torch.device | str = "cpu"):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    with torch.random.fork_rng():
        torch.manual_seed(0)
        visual = Qwen2VisionTransformerPretrainedModel(qwen2vl.build_config().vision_config).to(device)
    heads = TowerHeads(WINDOW * visual.config.embed_dim).to(device)
    opt = torch.optim.AdamW(list(visual.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01)

    def loss_at(step):
        scenes, pv, grids = image_batch(proc, step * batch, batch)
        return tower_step(visual, heads, pv, grids, cell_labels(scenes, grids))

    tower_loop(Checkpoint(NAME, "tower"), {"tower": visual, "heads": heads, "opt": opt}, steps, lr, loss_at)
    return visual


def train_words(model, proc, steps: int, batch: int = 64, lr: float = 2e-3):
    visual = model.model.visual
    merger = visual.merger

    def words_at(step):
        scenes, pv, grids = image_batch(proc, 40_000_000 + step * batch, batch)
        feats = visual(pv.to(visual.device), grid_thw=grids.to(visual.device)).last_hidden_state
        return feats, cell_labels(scenes, grids)[2]

    words_loop(Checkpoint(NAME, "words"), "merger", merger, word_targets(model, proc.tokenizer), steps,
               words_at, lr=lr)
    merger.requires_grad_(False)


def train_align(model, proc, steps: dict[str, int], batch: int, weights: Path, turns: int = 6,
                factors: dict | None = None):
    """Stages 3-6 (``steps`` of align, refine, bind, probe): tower, merger and LoRA (fresh or from shipped
    ``factors``)."""
    visual = model.model.visual
    loras = add_lora(model, factors)
    groups = align_groups(visual.merger.parameters(),
                          [p for n, p in visual.named_parameters() if not n.startswith("merger.")], loras)

    def export():
        weights.mkdir(parents=True, exist_ok=True)
        save_file(qwen2vl.trained_state(model, lora_state(loras)), str(weights / "model.safetensors"))

    align_stages(NAME, {"visual": visual, "lora": lora_mod(loras)}, groups, steps, model, proc,
                 batch, turns, export)


def main(tower_steps: int = 2600, words_steps: int = 150, align_steps: int = 400, align_batch: int = 6,
         later: dict[str, int | None] | None = None, from_shipped: bool = False,
         tower_batch: int = 32, weights: Path = qwen2vl.WEIGHTS, device: str | None = None):
    """The six stages on ``device`` (default: a GPU where there is one); checkpoints under
    ``<cache>/train/qwen2vl-shapes/``, the shipped parts exported to ``weights`` every 5 alignment
    steps. ``later``: steps of stages 4-6 (refine, bind, probe) where not the shipped run's.
    ``from_shipped``: stages 4-6 alone (those given steps), from the shipped weights in ``weights``."""
    torch.manual_seed(0)
    device = training_device(device)
    proc = qwen2vl.build_processor()
    later = later_stages(later or {}, from_shipped, SHIPPED_STEPS)
    if from_shipped:
        model = qwen2vl.port().requires_grad_(False).to(device)
        factors = qwen2vl.load_trained(model, load_file(weights / "model.safetensors"))
        train_align(model, proc, later, align_batch, weights, factors=factors)
        return
    tower = train_tower(proc, tower_steps, batch=tower_batch, device=device)
    model = qwen2vl.port().requires_grad_(False).to(device)
    model.model.visual.load_state_dict(tower.state_dict())
    train_words(model, proc, words_steps)
    train_align(model, proc, {"align": align_steps, **later}, align_batch, weights)
