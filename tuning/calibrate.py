"""Head search on a small labelled calibration set, shared by ACT and ZeroTuning.

A sample is ``(inputs, answer)``: a prompt batch as the processor gives it (a batch of one, or a batch with
one answer per prompt) and the expected answer (a string, or a token id). ``score="first_token"`` (default)
scores the argmax of the next-token logits after ONE prefill: correct when it is the first token of the answer
(with or without a leading space), as the released ACT and ZeroTuning searches score a label by the logits of
one forward. ``score="greedy"`` decodes a few tokens (:func:`vlmtools.chat.greedy`) and compares the first
word (:func:`vlmtools.chat.first_word`): slower, and what a user's evaluation usually reads.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from vlmtools.cache import model_key
from vlmtools.chat import chat_inputs, first_word, greedy

from .act import ACT
from .selection import Heads, HeadSelection
from .zerotuning import ZeroTuning

Score = Literal["first_token", "greedy"]
GAMMAS = (1.5, 0.5)
"""ZeroTuning's profiling factors above and below 1 (ours: the paper profiles each head with gamma > 1 and < 1)."""


def labelled_samples(processor, data, device=None) -> list[tuple[dict, str]]:
    """``(inputs, answer)`` pairs from a :class:`vlmtools.data.Data` (``read_pope``, ``read_vqa``,
    ``read_dataset``): one chat prompt per example, the answer its POPE label or its most given VQA answer."""
    pairs = []
    for example in data.examples:
        answer = example.label if example.label is not None else (
            max(example.answers, key=example.answers.count) if example.answers else None)
        if answer is None:
            raise ValueError(f"example {example.key!r} has no label or answer to calibrate on")
        pairs.append((chat_inputs(processor, [example.load_image()], [example.question], device), answer))
    return pairs


def _answer_ids(tokenizer, answer) -> set[int]:
    if isinstance(answer, int):
        return {answer}
    if tokenizer is None:
        raise ValueError("scoring a string answer needs the processor's tokenizer: vlmtools.wrap(model, processor), "
                         "or give answers as token ids")
    return {ids[0] for text in (answer, " " + answer.lstrip()) if (ids := tokenizer(text, add_special_tokens=False)
                                                                   ["input_ids"])}


def _answers(inputs: dict, answer) -> list:
    batch = inputs["input_ids"].shape[0]
    answers = [answer] if isinstance(answer, (str, int)) else list(answer)
    if len(answers) != batch:
        raise ValueError(f"a calibration sample holds {batch} prompts and {len(answers)} answers")
    return answers


def accuracy(vlm, samples: Sequence[tuple[dict, object]], *interventions, score: Score = "first_token") -> float:
    """The share of ``samples`` answered right with ``interventions`` in use (see the module's text)."""
    tokenizer = getattr(getattr(vlm, "processor", None), "tokenizer", None)
    right = total = 0
    for inputs, answer in samples:
        answers = _answers(inputs, answer)
        if score == "first_token":
            with torch.no_grad(), vlm.use(*interventions):
                predicted = vlm.model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
            right += sum(p in _answer_ids(tokenizer, a) for p, a in zip(predicted, answers))
        elif score == "greedy":
            said = greedy(vlm, inputs, *interventions)
            right += sum(first_word(s) == first_word(str(a)) for s, a in zip(said, answers))
        else:
            raise ValueError(f"score must be 'first_token' or 'greedy', got {score!r}")
        total += len(answers)
    if not total:
        raise ValueError("no calibration samples")
    return right / total


def candidate_heads(vlm, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None) -> list[tuple]:
    """(layer, head) pairs to try: ``layers`` (default 2 .. L-2, as the released ACT search) that have attention,
    each with ``heads`` (default all)."""
    attention = set(vlm.attention_layers)
    chosen = range(2, vlm.num_layers - 1) if layers is None else layers
    missing = [layer for layer in chosen if layer not in attention]
    if layers is not None and missing:
        raise ValueError(f"layers {missing} have no attention to edit; the attention layers are {sorted(attention)}")
    pairs = []
    for layer in (layer for layer in chosen if layer in attention):
        count = vlm.site(f"text.{layer}").heads
        listed = range(count) if heads is None else list(heads)
        if any(not 0 <= h < count for h in listed):
            raise ValueError(f"heads {list(listed)}: layer {layer} has heads 0 .. {count - 1}")
        pairs += [(layer, h) for h in listed]
    if not pairs:
        raise ValueError("no candidate heads: the model has no attention layer among 2 .. L-2; pass layers=")
    return pairs


def search_heads(vlm, make: Callable[[int, int], object], samples, candidates: Sequence[tuple],
                 score: Score = "first_token", progress: bool = True, desc: str = "heads",
                 baseline: float | None = None) -> tuple[float, list[float]]:
    """``(baseline, accuracies)``: the unedited accuracy (unless given) and that of ``make(layer, head)`` (an
    intervention editing that one head) for each candidate."""
    if baseline is None:
        baseline = accuracy(vlm, samples, score=score)
    scores = [accuracy(vlm, samples, make(layer, head), score=score)
              for layer, head in tqdm(candidates, desc=desc, disable=not progress)]
    return baseline, scores


def _grouped(pairs) -> Heads:
    heads: Heads = {}
    for layer, head in pairs:
        heads.setdefault(layer, []).append(head)
    return heads


def calibrate(vlm, method: ACT | ZeroTuning, samples: Iterable[tuple[dict, object]],
              layers: Iterable[int] | None = None, heads: Iterable[int] | None = None, score: Score = "first_token",
              gammas: tuple[float, float] = GAMMAS, gamma_grid: Sequence[float] | None = None,
              directory: str | Path | None = None, save: bool = True, progress: bool = True) -> HeadSelection:
    """Choose the heads ``method`` edits on ``vlm`` from labelled ``samples`` (never the evaluation set) and,
    with ``save``, store them where ``ACT()`` / ``ZeroTuning()`` load them.

    Every candidate head (:func:`candidate_heads`) is edited alone and scored against the unedited model.
    ACT (released ``calibration.sh``): the heads that beat the unedited accuracy, with ``method``'s beta and eps.
    ZeroTuning (the paper's supervised mode): each head is profiled with ``gammas`` (one above 1, one below),
    kept when its better direction beats the unedited accuracy, and grouped by that direction ("up" / "down");
    the larger group is applied with its factor (on a tie, the group whose best head gained most);
    ``gamma_grid`` then scores that group with each factor of the grid on its side of 1 and keeps the best.

    >>> selection = tuning.calibrate(vlm, ACT(), labelled_samples(processor, read_pope(path, images, limit=64)))
    >>> with vlm.use(ACT()):                        # loads what was just stored for this model
    ...     model.generate(**inputs)
    """
    samples = list(samples)
    candidates = candidate_heads(vlm, layers, heads)
    common = {"model": model_key(vlm), "samples": sum(len(_answers(*sample)) for sample in samples), "score": score}
    if isinstance(method, ACT):
        baseline, scores = search_heads(vlm, lambda layer, head: method.with_heads({layer: [head]}), samples,
                                        candidates, score, progress, "ACT heads")
        kept = [pair for pair, acc in zip(candidates, scores) if acc > baseline]
        selection = HeadSelection("act", heads=_grouped(kept), baseline=baseline, settings=method.settings,
                                  profile=[{"layer": layer, "head": head, "setting": "act", "accuracy": acc}
                                           for (layer, head), acc in zip(candidates, scores)], **common)
    elif isinstance(method, ZeroTuning):
        up, down = gammas
        if not (up > 1 > down > 0):
            raise ValueError(f"gammas must be (above 1, between 0 and 1), got {gammas}")
        profile, groups, gains = [], {"up": [], "down": []}, {"up": 0.0, "down": 0.0}
        baseline = None
        for gamma in (up, down):
            def one_head(layer, head, gamma=gamma):
                return method.with_heads({layer: [head]}, gamma)

            baseline, scores = search_heads(vlm, one_head, samples, candidates, score, progress,
                                            f"ZeroTuning heads, gamma {gamma:g}", baseline)
            profile += [{"layer": layer, "head": head, "setting": gamma, "accuracy": acc}
                        for (layer, head), acc in zip(candidates, scores)]
        by_pair = {}
        for entry in profile:
            by_pair.setdefault((entry["layer"], entry["head"]), []).append(entry["accuracy"])
        for pair, (acc_up, acc_down) in by_pair.items():
            best = max(acc_up, acc_down)
            if best > baseline:
                direction = "up" if acc_up >= acc_down else "down"
                groups[direction].append(pair)
                gains[direction] = max(gains[direction], best - baseline)
        chosen = max(("up", "down"), key=lambda d: (len(groups[d]), gains[d]))
        gamma, tuned = up if chosen == "up" else down, []
        if gamma_grid and groups[chosen]:
            group = method.with_heads(_grouped(groups[chosen]), gamma)
            side = [g for g in gamma_grid if (g > 1 if chosen == "up" else 0 < g < 1)]
            tuned = [(accuracy(vlm, samples, group.with_heads(group.heads, g), score=score), g)
                     for g in tqdm(side, desc="ZeroTuning gamma", disable=not progress)]
            gamma = max(tuned, key=lambda pair: (pair[0], -abs(pair[1] - gamma)))[1] if tuned else gamma
        selection = HeadSelection("zerotuning", heads=_grouped(groups[chosen]), gamma=gamma,
                                  groups={d: _grouped(p) for d, p in groups.items()}, baseline=baseline,
                                  settings={"gammas": [up, down], "applied": chosen,
                                            "gamma_grid": [[g, acc] for acc, g in tuned]}, profile=profile, **common)
    else:
        raise ValueError(f"tuning.calibrate calibrates ACT or ZeroTuning, got {type(method).__name__}")
    if not selection.heads:
        warnings.warn(f"tuning.calibrate: no head beat the unedited accuracy ({baseline:.3f} on {selection.samples} "
                      f"prompts); {type(method).__name__} with this selection would change nothing and is refused")
    if save:
        selection.save(directory)
    return selection
