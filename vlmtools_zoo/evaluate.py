"""Held-out measurements of the zoo models (the numbers in docs/zoo.md).

``python -m vlmtools_zoo.evaluate llava-shapes|qwen2vl-shapes|flux-shapes [--n N]`` prints JSON:
per-type QA accuracy and POPE for a VLM (``--answers FILE``: every answer too), RefAM-style
grounding scores for the DiT.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import vlmtools
from vlmtools.chat import first_word
from vlmtools.masks import heatmap_to_mask, iou, upsample
from vlmtools.record import RecordBlock

from . import world as W


# ---- VLMs: greedy generate, one-word answers ----------------------------------
@torch.no_grad()
def answer(model, processor, images, questions, prompt_fn, batch: int = 16, desc: str = "answering") -> list[str]:
    """Greedy answers (first word, lower case) to one question per image, on the model's device."""
    out = []
    with tqdm(total=len(images), desc=desc, unit="question") as bar:
        for i in range(0, len(images), batch):
            texts = [prompt_fn(processor, q) for q in questions[i:i + batch]]
            x = processor(images=images[i:i + batch], text=texts, return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**x, max_new_tokens=4, do_sample=False)
            out += map(first_word, processor.tokenizer.batch_decode(gen[:, x["input_ids"].shape[1]:],
                                                                    skip_special_tokens=True))
            bar.update(len(texts))
    return out


def qa_answers(model, processor, prompt_fn, n: int = 520, split: str = "test") -> list[dict]:
    """Each held-out question (``W.qa_items``) with the true answer and the model's, and its
    scene's index and object count (what an error analysis groups by)."""
    items = W.qa_items(split, n)
    scenes = {i: W.scene(split, i) for i, _ in items}
    preds = answer(model, processor, [scenes[i].image for i, _ in items], [q.question for _, q in items], prompt_fn,
                   desc="questions")
    return [{"scene": i, "objects": len(scenes[i].objects), "type": q.type, "question": q.question,
             "answer": q.answer, "predicted": p} for (i, q), p in zip(items, preds)]


def accuracy_per_type(answers: list[dict]) -> dict:
    acc: dict[str, list] = {}
    for a in answers:
        acc.setdefault(a["type"], []).append(a["predicted"] == a["answer"])
    return {t: {"accuracy": round(float(np.mean(v)), 3), "n": len(v)} for t, v in acc.items()}


def qa_accuracy(model, processor, prompt_fn, n: int = 520, split: str = "test") -> dict:
    return accuracy_per_type(qa_answers(model, processor, prompt_fn, n, split))


def pope_scores(model, processor, prompt_fn, n_scenes: int = 40, split: str = "test") -> dict:
    out = {}
    for kind in ("random", "popular", "adversarial"):
        triples = W.pope(split, n_scenes, kind)
        preds = answer(model, processor, [W.scene(split, i).image for i, _, _ in triples],
                       [q for _, q, _ in triples], prompt_fn, desc=f"POPE {kind}")
        y = np.array([a == "yes" for _, _, a in triples])
        p = np.array([a == "yes" for a in preds])
        tp, fp, fn = (p & y).sum(), (p & ~y).sum(), (~p & y).sum()
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        out[kind] = {"accuracy": round(float((p == y).mean()), 3), "f1": round(float(f1), 3),
                     "yes_rate": round(float(p.mean()), 3), "n": len(y)}
    return out


# ---- the DiT: image-query -> content-word attention ---------------------------
def word_token_index(pipe, prompt: str, words: list[str]) -> list[int]:
    """Positions of the tokens that spell any of ``words`` in the padded prompt."""
    toks = pipe.token_strings(prompt)
    return [i for i, t in enumerate(toks) if t.lstrip("Ġ").lower() in words]


@torch.no_grad()
def heatmaps(pipe, images, prompts, words, t: float = 0.3, sites=None, seed: int = 0) -> list[np.ndarray]:
    """(H, W) maps, one per image: image-query attention on the given words' tokens,
    mean over heads and the blocks ``sites`` (default ``flux.REFAM_BLOCKS``; recorded
    through the seam), at flow time t with fixed noise (drawn on the CPU), upsampled to the image;
    computed on the pipeline's device."""
    from .flux import REFAM_BLOCKS

    sites = list(sites or REFAM_BLOCKS)
    dit = vlmtools.wrap(pipe)
    emb, pooled, txt_ids = pipe.encode_prompt(prompts)
    images = images.to(pipe.device)
    x0 = pipe.image_tokens(images)
    ts = torch.full((len(prompts),), t, device=pipe.device)
    x_t, _ = pipe.denoise_input(images, ts, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)))
    side = math.isqrt(x0.shape[1])
    joint = dit.layout(emb.shape[1], (side, side))
    with dit.use(RecordBlock(sites, joint.image.span, joint.text, mean_heads=True)) as trace:
        pipe.forward(x_t, ts, emb, pooled, txt_ids)
    att = torch.stack([RecordBlock.collect(trace, s)[0][:, 0] for s in sites]).mean(0).cpu()  # (B, image, text)
    return [upsample(att[i][:, word_token_index(pipe, p, words[i])].sum(-1).view(side, side), images.shape[-2:])
            for i, p in enumerate(prompts)]


def perfect_map_mask(mask: torch.Tensor) -> np.ndarray:
    """The mask a perfect attention map would give: each token's share of ``mask``, upsampled and
    thresholded as ``grounding_scores`` reads the real maps. Its IoU with ``mask`` is the most the
    token grid and that readout allow."""
    from .flux import token_share

    return heatmap_to_mask(upsample(token_share(mask), tuple(mask.shape)), keep="all")


def grounding_scores(pipe, n: int = 300, split: str = "test", t: float = 0.3, sites=None) -> dict:
    """The raw maps' (``heatmaps``, Otsu) mean IoU with the referent and with the other objects, over
    the first ``n`` referring expressions of ``split``, and with the referent per kind of expression
    (``RefExp.kind``); ``ceiling``: the mean IoU of a perfect map (``perfect_map_mask``)."""
    from .flux import REFAM_BLOCKS, letterbox

    sites = list(sites or REFAM_BLOCKS)
    items, idx = [], 0
    while len(items) < n:
        s = W.scene(split, idx)
        items += [(s, e) for e in s.referring_expressions()]
        idx += 1
    items = items[:n]
    ref, other, ceiling, by_kind = [], [], [], {}
    with tqdm(total=n, desc="grounding", unit="expression") as bar:
        for i in range(0, n, 16):
            chunk = items[i:i + 16]
            boxes = [letterbox(s) for s, _ in chunk]
            maps = heatmaps(pipe, torch.stack([b[0] for b in boxes]), [e.text for _, e in chunk],
                            [e.content_words for _, e in chunk], t=t, sites=sites)
            for (s, e), (_, masks), m in zip(chunk, boxes, maps):
                pred, masks = heatmap_to_mask(m, keep="all"), masks.numpy()
                ceiling.append(iou(perfect_map_mask(torch.from_numpy(masks[e.target])), masks[e.target]))
                ref.append(iou(pred, masks[e.target]))
                by_kind.setdefault(e.kind, []).append(ref[-1])
                rest = np.delete(masks, e.target, 0)
                if len(rest):
                    other.append(iou(pred, rest.any(0)))
            bar.update(len(chunk))
    return {"mIoU": round(float(np.mean(ref)), 3), "IoU_others": round(float(np.mean(other)), 3),
            "ceiling": round(float(np.mean(ceiling)), 3), "n": n, "t": t, "sites": sites,
            "by_kind": {k: {"mIoU": round(float(np.mean(v)), 3), "n": len(v)} for k, v in sorted(by_kind.items())}}


def main(argv=None):
    from . import MODELS, load
    from .llava import prompt
    from .train_utils import training_device

    ap = argparse.ArgumentParser(prog="python -m vlmtools_zoo.evaluate")
    ap.add_argument("name", choices=MODELS)
    ap.add_argument("--n", type=int, default=520, help="questions (VLMs) or referring expressions (the DiT)")
    ap.add_argument("--pope-scenes", type=int, default=40, help="scenes per POPE split (0: no POPE)")
    ap.add_argument("--weights", type=Path, metavar="DIR",
                    help="a folder of trained parts in the shipped layout to evaluate instead of the "
                         "package's (e.g. a training run's export)")
    ap.add_argument("--split", choices=["val", "test"], default="test",
                    help="held-out world split: choose among training runs (seeds, variants) on val, report test")
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU where there is one, else the CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--answers", type=Path, metavar="FILE",
                    help="VLMs: also write every question with the true and the model's answer (JSON)")
    ap.add_argument("--blocks", nargs="+", metavar="SITE",
                    help="flux-shapes: the blocks whose maps are averaged (default: RefAM's, dit.single.0), "
                         "e.g. to choose them on val for a DiT of another size")
    args = ap.parse_args(argv)
    if args.answers and args.name == "flux-shapes":
        ap.error("--answers applies to llava-shapes and qwen2vl-shapes")
    if args.blocks and args.name != "flux-shapes":
        ap.error("--blocks applies to flux-shapes")
    if args.n < 1 or args.pope_scenes < 0:
        ap.error("--n must be positive and --pope-scenes not negative")
    torch.set_num_threads(args.threads)
    loaded = load(args.name, weights=args.weights)
    device = training_device(args.device)
    if args.name == "flux-shapes":
        if args.blocks:
            sites = [s.name for s in vlmtools.wrap(loaded).sites]
            if unknown := [b for b in args.blocks if b not in sites]:
                ap.error(f"no block {', '.join(unknown)} in this DiT; its blocks: {', '.join(sites)}")
        print(json.dumps(grounding_scores(loaded.to(device), n=args.n, split=args.split, sites=args.blocks)))
        return
    model, processor = loaded
    model.to(device)
    answers = qa_answers(model, processor, prompt, n=args.n, split=args.split)
    if args.answers:
        args.answers.write_text(json.dumps(answers, indent=1))
    pope = pope_scores(model, processor, prompt, n_scenes=args.pope_scenes, split=args.split) if args.pope_scenes else {}
    print(json.dumps({"qa": accuracy_per_type(answers), "pope": pope}))


if __name__ == "__main__":
    main()
