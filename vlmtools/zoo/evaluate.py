"""Held-out measurements of the zoo models (the numbers in docs/zoo.md).

``python -m vlmtools.zoo.evaluate llava-shapes|flux-shapes [--n N]`` prints JSON.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from . import world as W


# ---- VLMs: greedy generate, one-word answers ----------------------------------
@torch.no_grad()
def answer(model, processor, images, questions, prompt_fn, batch: int = 16) -> list[str]:
    """Greedy answers (first word, lower case) to one question per image."""
    out = []
    for i in range(0, len(images), batch):
        texts = [prompt_fn(processor, q) for q in questions[i:i + batch]]
        x = processor(images=images[i:i + batch], text=texts, return_tensors="pt", padding=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gen = model.generate(**x, max_new_tokens=4, do_sample=False)
        for seq in processor.tokenizer.batch_decode(gen[:, x["input_ids"].shape[1]:], skip_special_tokens=True):
            words = seq.strip().lower().split()
            out.append(words[0].strip(".,") if words else "")
    return out


def qa_accuracy(model, processor, prompt_fn, n: int = 520, split: str = "test") -> dict:
    items = W.qa_items(split, n)
    preds = answer(model, processor, [W.scene(split, i).image for i, _ in items],
                   [q.question for _, q in items], prompt_fn)
    acc: dict[str, list] = {}
    for (_, q), p in zip(items, preds):
        acc.setdefault(q.type, []).append(p == q.answer)
    return {t: {"accuracy": round(float(np.mean(v)), 3), "n": len(v)} for t, v in acc.items()}


def pope_scores(model, processor, prompt_fn, n_scenes: int = 40, split: str = "test") -> dict:
    out = {}
    for kind in ("random", "popular", "adversarial"):
        triples = W.pope(split, n_scenes, kind)
        preds = answer(model, processor, [W.scene(split, i).image for i, _, _ in triples],
                       [q for _, q, _ in triples], prompt_fn)
        y = np.array([a == "yes" for _, _, a in triples])
        p = np.array([a == "yes" for a in preds])
        tp, fp, fn = (p & y).sum(), (p & ~y).sum(), (~p & y).sum()
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        out[kind] = {"accuracy": round(float((p == y).mean()), 3), "f1": round(float(f1), 3),
                     "yes_rate": round(float(p.mean()), 3), "n": len(y)}
    return out


# ---- the DiT: image-query -> content-word attention ---------------------------
class AttentionProbe:
    """Attention processor for FluxAttention that also keeps, per call, the
    head-mean attention of image queries over the text keys (explicit softmax)."""

    def __init__(self, n_text: int):
        self.n_text, self.maps = n_text, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            q = torch.cat([attn.norm_added_q(eq), q], 1)
            k = torch.cat([attn.norm_added_k(ek), k], 1)
            v = torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, L, D)
        probs = (q @ k.transpose(-1, -2) / attn.head_dim ** 0.5).softmax(-1)
        self.maps.append(probs[:, :, self.n_text:, :self.n_text].mean(1))  # (B, image, text)
        out = (probs @ v).transpose(1, 2).flatten(2, 3).to(hidden_states.dtype)
        if encoder_hidden_states is None:
            return out
        e, h = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1)
        return attn.to_out[1](attn.to_out[0](h)), attn.to_add_out(e)


def word_token_index(pipe, prompt: str, words: list[str]) -> list[int]:
    """Positions of the tokens that spell any of ``words`` in the padded prompt."""
    toks = pipe.token_strings(prompt)
    return [i for i, t in enumerate(toks) if t.lstrip("Ġ").lower() in words]


@torch.no_grad()
def heatmaps(pipe, images, prompts, words, t: float = 0.3, blocks=(0, 1), seed: int = 0):
    """(B, 64, 64) maps: image-query attention on the given words' tokens, mean
    over heads and the chosen double blocks, at flow time t with fixed noise."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from .flux import MAX_TOKENS

    probe = AttentionProbe(MAX_TOKENS)
    dit = pipe.transformer
    for b in blocks:
        dit.transformer_blocks[b].attn.set_processor(probe)
    try:
        emb, pooled, txt_ids = pipe.encode_prompt(prompts)
        g = torch.Generator().manual_seed(seed)
        x0 = pipe.image_tokens(images)
        x_t, _ = pipe.denoise_input(images, torch.full((len(prompts),), t),
                                    torch.randn(x0.shape, generator=g))
        pipe.forward(x_t, torch.full((len(prompts),), t), emb, pooled, txt_ids)
    finally:
        for b in blocks:
            dit.transformer_blocks[b].attn.set_processor(FluxAttnProcessor())
    att = torch.stack(probe.maps).mean(0)  # (B, 256, 32)
    side = int(att.shape[1] ** 0.5)
    out = []
    for i, p in enumerate(prompts):
        idx = word_token_index(pipe, p, words[i])
        m = att[i][:, idx].sum(-1).view(1, 1, side, side)
        out.append(torch.nn.functional.interpolate(m, size=images.shape[-2:], mode="bilinear")[0, 0])
    return torch.stack(out)


def otsu(x: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    return x > threshold_otsu(x) if x.max() > x.min() else np.zeros_like(x, bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def grounding_scores(pipe, n: int = 300, split: str = "test", t: float = 0.3, blocks=(0, 1)) -> dict:
    from .flux import letterbox

    items, idx = [], 0
    while len(items) < n:
        s = W.scene(split, idx)
        items += [(s, e) for e in s.referring_expressions()]
        idx += 1
    items = items[:n]
    ref, other = [], []
    for i in range(0, n, 16):
        chunk = items[i:i + 16]
        boxes = [letterbox(s) for s, _ in chunk]
        maps = heatmaps(pipe, torch.stack([b[0] for b in boxes]), [e.text for _, e in chunk],
                        [e.content_words for _, e in chunk], t=t, blocks=blocks)
        for (s, e), (_, masks), m in zip(chunk, boxes, maps):
            pred, masks = otsu(m.numpy()), masks.numpy()
            ref.append(iou(pred, masks[e.target]))
            rest = np.delete(masks, e.target, 0)
            if len(rest):
                other.append(iou(pred, rest.any(0)))
    return {"mIoU": round(float(np.mean(ref)), 3), "IoU_others": round(float(np.mean(other)), 3),
            "n": n, "t": t, "blocks": list(blocks)}


def main(argv=None):
    from . import load

    ap = argparse.ArgumentParser(prog="python -m vlmtools.zoo.evaluate")
    ap.add_argument("name")
    ap.add_argument("--n", type=int, default=520)
    ap.add_argument("--pope-scenes", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.name == "flux-shapes":
        print(json.dumps(grounding_scores(load("flux-shapes"), n=args.n)))
        return
    from .llava import prompt

    model, processor = load(args.name)
    print(json.dumps({"qa": qa_accuracy(model, processor, prompt, n=args.n),
                      "pope": pope_scores(model, processor, prompt, n_scenes=args.pope_scenes)}))


if __name__ == "__main__":
    main()
