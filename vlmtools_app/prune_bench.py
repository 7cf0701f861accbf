"""``vlmtools prune-bench``: accuracy of the pruning hosts on held-out zoo questions, debias off and on.

Each host keeps 33%, 22% and 11% of every image's visual tokens (LLaVA-1.5's 576 -> 192 / 128 / 64;
llava-shapes' 144 -> 48 / 32 / 16), with debias off and, for the attention-based hosts, on; ``none``
is the unpruned model (100%). Questions: the zoo world's test split, cycling over its five question
types; an answer is right when its first word is the expected one (greedy decoding).

Debias = a recency trend per (model, host, layer) calibrated here on val-split questions (never the
test split: rank 0 fits it, every process gets it), letterbox padding (flagged by the wrapped model
when its image processor letterboxes, as LLaVA-1.5's does) and visual-sink suppression.

Where the kept tokens fall: for each configuration, the share of the visual tokens read after the
host's last drop that lie on an object, and on letterbox padding (the world's exact masks, as the
zoo's model card places tokens); ``none`` gives the shares of all of them, what a random choice
keeps on average.

Your data instead of the zoo's (``--vqa FILE.jsonl --images DIR``, ``--pope FILE.jsonl --images DIR`` or a
saved ``--dataset DIR``; see ``vlmtools_app.bench``): accuracy per host and keep share is the mean VQA accuracy
of the first line of each answer (``vlmtools.vqa``), or POPE's accuracy on yes / no
(``hallucination.metrics``); the trends are fitted on ``--calibration-images`` (a model that is no zoo model
is never calibrated on shapes scenes); where the kept tokens fall is not reported (no masks).

vlmtools prune-bench --questions 200                          # every host, the zoo's llava-shapes
vlmtools prune-bench --model qwen2vl-shapes                   # hosts the family cannot run are skipped, with why
vlmtools prune-bench --model /models/llava-1.5-7b-hf --hosts fastv,visionzip --device cuda
torchrun --nproc_per_node 4 -m vlmtools_app.cli prune-bench       # the same numbers, four processes
vlmtools prune-bench --model /models/llava-1.5-7b-hf --vqa vqav2_val.jsonl --images val2014/ \
    --calibration-images my_images/ --device cuda
"""
from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .args import at_least

KEEP = {"100%": 1.0, "33%": 1 / 3, "22%": 2 / 9, "11%": 1 / 9}
HOSTS = ("fastv", "pdrop", "sparsevlm", "visionzip", "fastervlm", "dart", "random")
"""Hosts run by default (each with its class's default layers)."""
AT_THE_SHARE = {"sparsevlm": {"budget": "schedule"}}
"""Settings that make a host keep exactly the kept share compared: SparseVLM's released rank budget keeps as
many tokens as the raters' attention has rank (``keep`` is only its floor), so the bench runs its schedule."""
QUESTIONS = 200
"""Held-out zoo test questions by default."""
METRICS = {"vqa": "VQA accuracy (vlmtools.vqa)", "pope": "POPE accuracy (hallucination.metrics.pope)"}
"""What accuracy means on your data, by task."""
PLACES = {"object": "objects", "letterbox": "letterbox padding"}
"""Token kinds (:func:`vlmtools_zoo.card.patch_kinds`) whose share of the kept tokens is reported, and their names."""


@dataclass(frozen=True)
class Config:
    label: str  # "fastv +debias"
    host: str | None  # None: the unpruned model
    ratio: str  # a key of KEEP
    debias: bool


def parse_hosts(text: str) -> list[tuple[str, str, dict]]:
    """``--hosts`` entries ``NAME[:KEY=VALUE...]`` (``sparsevlm:votes=previous:recycle=0``) as (entry, host,
    keyword settings); every entry is built once here, so a bad setting fails before the model loads."""
    from . import bench
    from pruning import HOSTS as CLASSES

    out = bench.entries(text, CLASSES, "hosts")
    for entry, name, settings in out:
        if fixed := sorted({"keep", "debias"} & set(settings)):
            raise ValueError(f"{entry!r}: the bench sets {' and '.join(fixed)} itself (its budgets, its +debias rows)")
        try:
            build(name, settings, min(KEEP.values()))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{entry!r}: {error}") from None
    return out


def build(name: str, settings: dict, keep: float, **kwargs):
    """Host ``name`` at the bench's settings (:data:`AT_THE_SHARE`), the entry's ``settings`` over them."""
    from pruning import HOSTS as CLASSES

    return CLASSES[name](keep=keep, **{**AT_THE_SHARE.get(name, {}), **settings}, **kwargs)


def configs(hosts: list[tuple[str, str, dict]]) -> list[Config]:
    from pruning import HOSTS as CLASSES

    out = [Config("none", None, "100%", False)]
    for entry, name, _ in hosts:
        for debias in (False, True) if CLASSES[name].attention_based else (False,):
            label = f"{entry}{' +debias' if debias else ''}"
            out += [Config(label, entry, ratio, debias) for ratio, keep in KEEP.items() if keep < 1]
    return out


def calibrated(vlm, hosts: list[tuple[str, str, dict]], samples: int, directory: str | None,
               pairs: list[tuple] | None = None) -> dict[str, list]:
    """Host entry -> its trends (one per stage, the entry's settings), fitted by rank 0 on ``pairs`` (your
    (image, question) pairs) or else ``samples`` zoo val questions, and sent to every process; rank 0 also
    writes them to ``directory`` when given (where ``vlmtools prune --debias`` finds them)."""
    from . import shard
    from .inputs import held_out_prompts

    from pruning import HOSTS as CLASSES
    from pruning import calibrate, calibration_path, calibration_samples

    trends = {}
    if shard.is_main():
        device = vlm.model.device
        held_out = list(calibration_samples(vlm.processor, pairs, device) if pairs
                        else held_out_prompts(vlm.processor, samples, device))
        for entry, name, settings in hosts:
            if CLASSES[name].attention_based:
                trends[entry] = calibrate(vlm, build(name, settings, 1.0), held_out, save=False)
                for trend in trends[entry] if directory else ():
                    trend.save(calibration_path(trend.key, directory))
    return shard.broadcast(trends)


def kept_places(vlm, inputs: dict, pruned, scenes: list) -> list[dict[str, int]]:
    """Per sample of the last prefill: how many of the visual tokens present after the last drop of
    ``pruned`` (a host's block, ``trace[host]``; all of them when None) lie on an object, the background
    or letterbox padding."""
    import torch

    from vlmtools_zoo.card import patch_kinds

    layout = pruned.state.layout if pruned else vlm.layout(inputs)
    kept = pruned.kept_at(pruned.host.layers[-1]).cpu() if pruned else None
    places = []
    for row, (sample, scene) in enumerate(zip(layout.samples, scenes)):
        image = sample.images[0]
        kinds = patch_kinds(scene, tuple(int(g) for g in image.grid), vlm.letterbox_tower is not None)
        present = torch.isin(image.positions.cpu(), kept[row]) if pruned else torch.ones(len(kinds), dtype=torch.bool)
        places.append(dict(Counter(kinds[present.numpy()].tolist())))
    return places


def calibration_pairs(args, public) -> list[tuple] | None:
    """The (image, question) pairs of ``--calibration-images`` (at most ``--calibration-samples``), or None
    (zoo val questions). A model that is no zoo model, on your data, is never calibrated on shapes scenes."""
    import vlmtools_zoo as zoo

    from pruning import image_question_pairs

    if args.calibration_questions and not args.calibration_images:
        raise ValueError("--calibration-questions goes with --calibration-images")
    if args.calibration_images and args.calibration_samples:
        return image_question_pairs(args.calibration_images, args.calibration_questions)[:args.calibration_samples]
    if public and args.calibration_samples and args.model not in zoo.MODELS:
        raise ValueError(f"{args.model} is no zoo model: give --calibration-images DIR (images of the kind your data "
                         "holds, not the evaluated ones) or --calibration-samples 0 (debias without a trend); a trend "
                         "fitted on shapes scenes would misdebias it")
    return None


def reply(text: str) -> str:
    """A VQA answer as scored: the generated text's first line, stripped (the VQA normalisation does the rest)."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def score(metric: str, answers: list[str], examples: list) -> float:
    """Accuracy of ``answers`` on your data: mean VQA accuracy, or POPE's accuracy on yes / no."""
    from vlmtools.vqa import vqa_accuracy

    from hallucination.metrics import pope

    if metric == "vqa":
        return sum(vqa_accuracy(a, e.answers) for a, e in zip(answers, examples)) / len(examples)
    return pope(answers, [e.label for e in examples])["accuracy"]


def prune_bench_command(args) -> int:
    """Accuracy of each pruning host at 100/33/22/11% of the visual tokens, debias off and on, and random,
    on held-out zoo questions (and where the kept tokens fall) or on your VQA / POPE data; Markdown tables
    and a JSON file. Shards across processes under torchrun / accelerate launch."""
    from . import bench, shard
    from vlmtools.chat import chat_inputs, first_word, greedy
    from vlmtools_zoo import world

    from pruning import HOSTS as CLASSES
    from pruning import Debias, calibration_path

    started = time.time()
    sources = [f"--{name}" for name in ("vqa", "pope", "dataset") if getattr(args, name)]
    if len(sources) > 1:
        raise ValueError(f"prune-bench scores one data set at a time; got {' and '.join(sources)}")
    public = bench.read_data(args, {"vqa": args.n, "pope": args.n})  # before the model loads
    pairs = calibration_pairs(args, public)
    entries = parse_hosts(args.hosts)
    if not public:
        args.n = QUESTIONS if args.n is None else args.n
    vlm = bench.load(args)
    hosts = []
    for entry, name, settings in entries:
        refusal = CLASSES[name].refusal(vlm)
        if refusal and shard.is_main():
            print(f"prune-bench: skipping {entry}: {refusal}", file=sys.stderr)
        hosts += [] if refusal else [(entry, name, settings)]
    trends = calibrated(vlm, hosts, args.calibration_samples, args.calibration, pairs) if args.calibration_samples else {}
    if public:  # (image, question) of your data, scored on answer / label
        metric, data = next(iter(public.tasks.items()))
        questions = [e.question for e in data.examples]

        def image(i: int):
            return data.examples[i].load_image()
    else:
        items = world.qa_items("test", args.n)
        scenes = [world.scene("test", s) for s, _ in items]
        questions = [q.question for _, q in items]

        def image(i: int):
            return scenes[i].image
    runs = configs(hosts)
    n = len(questions)
    chosen = {entry: (name, settings) for entry, name, settings in hosts}
    with tempfile.TemporaryDirectory(prefix="prune-bench-trends-") as directory:
        folders = {entry: Path(directory) / str(index) for index, entry in enumerate(chosen)}  # one per entry
        for entry, stages in trends.items():
            for trend in stages:
                trend.save(calibration_path(trend.key, folders[entry]))

        def answer(batch: list[int]) -> list[dict]:
            config = runs[batch[0] // n]
            inputs = chat_inputs(vlm.processor, [image(i % n) for i in batch], [questions[i % n] for i in batch],
                                 vlm.model.device)
            host = None
            if config.host:
                debias = ((Debias(directory=folders[config.host]) if trends else Debias(trend=None))
                          if config.debias else False)
                host = build(*chosen[config.host], KEEP[config.ratio], debias=debias)
            start = time.perf_counter()
            with vlm.use(*([host] if host else [])) as trace:  # greedy's own block shares this trace
                texts = greedy(vlm, inputs, max_new_tokens=args.max_new_tokens)
            seconds = (time.perf_counter() - start) / len(batch)
            if public:  # no masks: where the kept tokens fall is not known
                records = [{"answer": reply(text) if metric == "vqa" else text, "seconds": seconds} for text in texts]
            else:
                places = kept_places(vlm, inputs, trace[host] if host else None, [scenes[i % n] for i in batch])
                records = [{"answer": first_word(text), "kept": kept, "seconds": seconds}
                           for text, kept in zip(texts, places)]
            if host and batch[0] % n == 0:  # a configuration's first batch records the host's settings
                records[0]["settings"] = host.settings
            return records

        work = [batch for c in range(len(runs)) for batch in shard.batches(range(c * n, (c + 1) * n), args.batch)]
        records = shard.evaluate(work, answer, desc="prune-bench")
    if records is None:
        return 0
    speedup = {}  # label -> ratio -> greedy wall time of none / of the configuration: how this run went
    results = {"n": n, "accuracy": {}, "kept_share": {place: {} for place in PLACES},
               "host_settings": {}, "answers": {},
               "trends": {entry: [asdict(t) for t in stages] for entry, stages in trends.items()}}
    if public:
        del results["kept_share"]
        results.update(metric=METRICS[metric], data=public.record())
    seconds = {}  # (label, ratio) -> greedy wall time over the questions (the unpruned model's comes first)
    for c, config in enumerate(runs):
        mine = records[c * n:(c + 1) * n]
        if public:
            accuracy = score(metric, [r["answer"] for r in mine], data.examples)
        else:
            accuracy = sum(r["answer"] == q.answer for r, (_, q) in zip(mine, items)) / n
        results["accuracy"].setdefault(config.label, {})[config.ratio] = accuracy
        results["answers"].setdefault(config.label, {})[config.ratio] = [r["answer"] for r in mine]
        seconds[config.label, config.ratio] = sum(r["seconds"] for r in mine)
        speedup.setdefault(config.label, {})[config.ratio] = seconds["none", "100%"] / seconds[config.label, config.ratio]
        kept = sum((Counter(r["kept"]) for r in mine), Counter()) if not public else None
        for place, share in results.get("kept_share", {}).items():
            share.setdefault(config.label, {})[config.ratio] = kept[place] / kept.total()
        if "settings" in mine[0]:
            results["host_settings"].setdefault(config.label, {})[config.ratio] = mine[0]["settings"]
    tables = [table(results["accuracy"], n), f"speed-up (greedy wall time of none / of the host):\n"
              f"{table(speedup, n)}"] + [
        f"share of the kept visual tokens on {PLACES[place]}:\n{table(share, n)}"
        for place, share in results.get("kept_share", {}).items()]
    bench.finish(args, results, "\n".join(tables), started, timing={"speedup": speedup})
    if shard.is_main():
        plot_tradeoff(results["accuracy"], speedup, n, args.plot or str(Path(args.out).with_suffix(".png")))
    return 0


def plot_tradeoff(accuracy_of: dict, speedup: dict, n: int, path: str) -> None:
    """Accuracy and speed-up against the share of visual tokens kept, one line per host (dashed: debias on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = {ratio: 100 * keep for ratio, keep in KEEP.items()}
    figure, (accuracy, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {}
    for label, row in accuracy_of.items():
        if label == "none":
            continue
        host = label.split()[0]
        colour = colours.setdefault(host, f"C{len(colours)}")
        ratios = ["100%"] + [r for r in KEEP if r in row]
        style = {"color": colour, "marker": "o", "linestyle": "--" if "debias" in label else "-", "label": label}
        accuracy.plot([shares[r] for r in ratios], [accuracy_of["none"]["100%"]] +
                      [row[r] for r in ratios[1:]], **style)
        speed.plot([shares[r] for r in ratios], [1.0] + [speedup[label][r] for r in ratios[1:]], **style)
    for axes, name in ((accuracy, f"accuracy (n={n})"), (speed, "speed-up over the unpruned model")):
        axes.set_xlabel("visual tokens kept (%)")
        axes.set_ylabel(name)
        axes.set_xticks(list(shares.values()), labels=list(shares))
        axes.invert_xaxis()
        axes.grid(alpha=0.3)
    accuracy.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


def table(values: dict[str, dict[str, float]], n: int) -> str:
    lines = [f"| host (n={n}) | " + " | ".join(KEEP) + " |", "|---|" + "---|" * len(KEEP)]
    for label, row in values.items():
        cells = [f"{row[r]:.3f}" if r in row else ("(= none)" if r == "100%" else "") for r in KEEP]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def register(subparsers) -> None:
    from . import bench

    parser = subparsers.add_parser("prune-bench", help="accuracy of every pruning host at 100/33/22/11%% of the "
                                   "visual tokens, debias off and on", description=prune_bench_command.__doc__)
    parser.add_argument("--questions", "--n", dest="n", type=at_least(1),
                        help=f"held-out zoo test questions, cycling over the 5 types (default {QUESTIONS}); with "
                             "your data, the first N of each file (default: all) (under torchrun write --questions: "
                             "torchrun reads --n as its own)")
    parser.add_argument("--hosts", default=",".join(HOSTS),
                        help="comma-separated hosts, each at its default layers, or NAME:KEY=VALUE... with settings "
                             "(sparsevlm:votes=previous:recycle=0; the entry labels its rows) (default: %(default)s)")
    parser.add_argument("--calibration-samples", type=at_least(0), default=48,
                        help="prompts the debias trends are fitted on: zoo val questions, or at most this many "
                             "of --calibration-images (0: debias without a trend)")
    parser.add_argument("--calibration-images", metavar="DIR",
                        help="a folder of your images the trends are fitted on (never the evaluated ones); needed "
                             "to debias a model that is no zoo model on your data")
    parser.add_argument("--calibration-questions", metavar="FILE",
                        help="with --calibration-images: questions, one a line, taken in turn "
                             "(default: 'Describe the image.')")
    parser.add_argument("--calibration", help="also write the fitted trend files to this folder")
    parser.add_argument("--plot", help="the accuracy / speed-up against kept share picture (default: --out with .png)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=4, help="greedy tokens generated per answer")
    bench.add_arguments(parser, out="prune-bench.json")
    bench.add_data_arguments(parser, ("vqa", "pope"))
    parser.set_defaults(run=prune_bench_command)
