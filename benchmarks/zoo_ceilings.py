"""What do llava-shapes' visual tokens hold of the answers its LM gets wrong? Probe ceilings.

llava-shapes answers colour, shape and count questions below the zoo's 90 % bar (docs/zoo.md).
Is the answer in the 144 visual tokens its LM reads (the tower layer it reads, through the
projector), and the LM fails to read it, or is it not there? Probes trained on ``train`` scenes:

- ``question``: the LM's own held-out questions (``qa_items("val", n)``, the colour, shape and
  count ones) answered by a probe that sees the tokens and the question's words (a bag of words
  queries the tokens through 4-head attention, then an MLP). Trained on every colour, shape and
  count question of the train scenes.
- object count (1-5) of ``val`` scenes, per count: attention pooling over the tokens (``tokens``),
  an MLP on that layer's CLS token, which the LM never sees (``cls``), and a small CNN trained
  from scratch on the same letterboxed 96 px pixel values (``pixels``: does the tower's input
  hold the count? objects never overlap).

Run: ``python benchmarks/zoo_ceilings.py [--train 8000] [--val 1000] [--questions 1040]``.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

from common import fit, predict
from vlmtools_zoo import load
from vlmtools_zoo import world as W


@torch.no_grad()
def encoded(model, processor, split: str, count: int, batch: int = 64):
    """Pixel values, LM-read visual tokens, CLS and object counts of ``count`` scenes of ``split``."""
    layer = model.config.vision_feature_layer
    pixels, tokens, cls, counts = [], [], [], []
    for start in tqdm(range(0, count, batch), desc=f"encoding {split}"):
        scenes = [W.scene(split, i) for i in range(start, min(start + batch, count))]
        x = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(x, output_hidden_states=True).hidden_states[layer]
        pixels.append(x.half())
        tokens.append(model.model.multi_modal_projector(hidden[:, 1:]).half())
        cls.append(hidden[:, 0])
        counts += [len(s.objects) for s in scenes]
    return torch.cat(pixels), torch.cat(tokens), torch.cat(cls), torch.tensor(counts)


class AttentionPool(nn.Module):
    def __init__(self, width: int, queries: int = 4, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(queries, width) / width ** 0.5)
        self.head = nn.Sequential(nn.Linear(queries * width, hidden), nn.GELU(), nn.Linear(hidden, 6))

    def forward(self, tokens):
        x = self.norm(tokens.float())
        weights = torch.softmax(x @ self.queries.T / x.shape[-1] ** 0.5, 1)  # (B, N, queries)
        return self.head((weights.transpose(1, 2) @ x).flatten(1))


class CountingCNN(nn.Module):
    """Four conv blocks to a 12 x 12 map, a per-location code summed over the map (counting adds up)."""

    def __init__(self):
        super().__init__()
        widths = (3, 32, 64, 64, 128)
        blocks = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            blocks += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
            blocks += [nn.MaxPool2d(2)] if i < 3 else []
        self.features = nn.Sequential(*blocks, nn.Conv2d(128, 32, 1))
        self.head = nn.Linear(32, 6)

    def forward(self, pixels):
        return self.head(self.features(pixels.float()).sum((2, 3)) / 16)


class QuestionProbe(nn.Module):
    def __init__(self, width: int, words: int, answers: int, hidden: int = 256, heads: int = 4):
        super().__init__()
        self.tokens = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))
        self.words = nn.EmbeddingBag(words, hidden * heads)
        self.head = nn.Sequential(nn.Linear(hidden * heads * 2, hidden), nn.GELU(), nn.Linear(hidden, answers))
        self.heads, self.hidden = heads, hidden

    def forward(self, tokens, words, offsets):
        keys = self.tokens(tokens.float())  # (B, N, hidden)
        query = self.words(words, offsets)
        weights = torch.softmax(query.view(-1, self.heads, self.hidden) @ keys.transpose(1, 2) / self.hidden ** 0.5, -1)
        return self.head(torch.cat([(weights @ keys).flatten(1), query], 1))


class Questions:
    """The colour, shape and count questions of some scenes, as word ids and answer ids."""

    TYPES = ("colour", "shape", "count")

    def __init__(self, items: list[tuple[int, W.Question]], vocabulary: dict, answers: dict):
        items = [(i, q) for i, q in items if q.type in self.TYPES]
        for _, q in items:
            for word in self.words(q):
                vocabulary.setdefault(word, len(vocabulary))
            answers.setdefault(q.answer, len(answers))
        self.scene = torch.tensor([i for i, _ in items])
        self.word_ids = [torch.tensor([vocabulary[w] for w in self.words(q)]) for _, q in items]
        self.answer = torch.tensor([answers[q.answer] for _, q in items])
        self.type = [q.type for _, q in items]

    @staticmethod
    def words(question: W.Question) -> list[str]:
        return question.question.lower().rstrip("?").split()

    def batch(self, index: torch.Tensor, tokens: torch.Tensor):
        ids = [self.word_ids[i] for i in index.tolist()]
        offsets = torch.tensor([0] + [len(w) for w in ids[:-1]]).cumsum(0)
        return tokens[self.scene[index]], torch.cat(ids), offsets


def question_ceiling(train_tokens, val_tokens, train_scenes: int, items, epochs: int) -> dict[str, float]:
    """Accuracy per type of a :class:`QuestionProbe` on ``items`` (val), trained on the train scenes' questions."""
    vocabulary, answers = {}, {}
    train = Questions([(i, q) for i in range(train_scenes) for q in W.scene("train", i).questions()],
                      vocabulary, answers)
    val = Questions(items, vocabulary, answers)
    probe = fit(lambda: QuestionProbe(train_tokens.shape[-1], len(vocabulary), len(answers)), len(train.answer),
                lambda index: train.batch(index, train_tokens), train.answer, epochs, 128, "question")
    predicted = predict(probe, len(val.answer), lambda index: val.batch(index, val_tokens))
    right = predicted == val.answer
    return {t: right[[k == t for k in val.type]].float().mean().item() for t in Questions.TYPES}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=8000, help="train scenes the probes learn from")
    parser.add_argument("--val", type=int, default=1000, help="val scenes they are scored on")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the token and CLS probes")
    parser.add_argument("--cnn-epochs", type=int, default=12)
    parser.add_argument("--questions", type=int, default=1040, help="val questions, as zoo.evaluate's --n")
    parser.add_argument("--question-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    model, processor = load("llava-shapes")
    model.eval()
    items = W.qa_items("val", args.questions)
    train = encoded(model, processor, "train", args.train)
    val = encoded(model, processor, "val", max(args.val, items[-1][0] + 1))
    accuracy = question_ceiling(train[1], val[1], args.train, items, args.question_epochs)
    print(f"llava-shapes (vision_feature_layer {model.config.vision_feature_layer}), probes trained on "
          f"{args.train} train scenes")
    print(f"question probe on the first {args.questions} val questions of zoo.evaluate: "
          + ", ".join(f"{t} {a:.3f} (n={sum(q.type == t for _, q in items)})" for t, a in accuracy.items()),
          flush=True)
    val = tuple(part[:args.val] for part in val)
    truth = val[3]
    probes = {"tokens": (lambda: AttentionPool(train[1].shape[-1]), 1, args.epochs, 128),
              "cls": (lambda: nn.Sequential(nn.Linear(train[2].shape[-1], 256), nn.GELU(), nn.Linear(256, 6)), 2,
                      args.epochs, 128),
              "pixels": (CountingCNN, 0, args.cnn_epochs, 64)}
    print(f"object count of {args.val} val scenes:")
    print("| probe | " + " | ".join(f"{c} objects (n={int((truth == c).sum())})" for c in range(1, 6)) + " | all |")
    print("|---" * 7 + "|")
    for name, (make_probe, part, epochs, batch) in probes.items():
        probe = fit(make_probe, len(train[3]), lambda index: (train[part][index],), train[3], epochs, batch, name)
        predicted = predict(probe, len(truth), lambda index: (val[part][index],))
        right = predicted == truth
        per_count = [right[truth == c].float().mean().item() for c in range(1, 6)]
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in per_count) + f" | {right.float().mean():.3f} |",
              flush=True)
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
