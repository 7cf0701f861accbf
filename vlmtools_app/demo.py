"""``vlmtools demo``: the three jobs on the zoo models, in one self-contained HTML report.

Steps: wrap llava-shapes and find its sinks; answer held-out questions plainly, with
FastV pruning (debias off and on), the accuracy / speed-up trade-off of a few hosts
from a small ``prune-bench`` run, and with VAR / GIFT; segment held-out referring
expressions with RefAM on flux-shapes; write ``report.html`` (pictures inline).
"""
from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .args import at_least
from vlmtools.chat import chat_inputs, first_word
from vlmtools.plan import Trace

from .inputs import held_out_prompts

KEEP, LAYER = 16, 2  # 144 -> 16 visual tokens (11%, LLaVA-1.5's 576 -> 64), dropped from layer 2


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run every job on the zoo models and write an HTML report",
        description="Wraps the zoo VLM, finds its attention sinks, answers held-out questions with and without "
                    "debiased pruning and VAR/GIFT, segments referring expressions with RefAM on the zoo DiT, "
                    "and writes one self-contained HTML report.")
    parser.add_argument("--out", default="vlmtools-demo", help="output folder (default: ./vlmtools-demo)")
    parser.add_argument("--questions", type=at_least(1), default=24, help="held-out questions answered per method")
    parser.add_argument("--expressions", type=at_least(1), default=4, help="held-out referring expressions segmented")
    parser.set_defaults(run=run)


@dataclass
class Report:
    """Sections of the HTML page: (title, html) in order."""

    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, title: str, *parts: str) -> None:
        self.sections.append((title, "\n".join(parts)))

    def write(self, path: Path) -> None:
        body = "\n".join(f"<h2>{html.escape(t)}</h2>\n{h}" for t, h in self.sections)
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>vlmtools demo</title>"
                        f"<style>{_CSS}</style></head><body><h1>vlmtools demo</h1>{body}</body></html>")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "figure{display:inline-block;margin:6px;text-align:center}figcaption{font-size:12px}"
        "img{image-rendering:pixelated}pre{font-size:11px;overflow-x:auto}")


def picture(image: Image.Image, caption: str, width: int = 192) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return (f"<figure><img alt='{html.escape(caption)}' width='{width}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class QuestionRunner:
    """Greedy one-word answers of the zoo VLM to held-out questions, under any interventions."""

    def __init__(self, vlm, n: int):
        from vlmtools_zoo import world

        self.vlm = vlm
        self.items = world.qa_items("test", n)
        self.scenes = [world.scene("test", i) for i, _ in self.items]
        self.images = [scene.image for scene in self.scenes]

    def inputs(self, index: int) -> dict:
        return chat_inputs(self.vlm.processor, [self.images[index]], [self.items[index][1].question])

    @torch.no_grad()
    def answer(self, *interventions, after: Callable[[int, dict, Trace], None] | None = None
               ) -> tuple[list[str], float]:
        """Answers and generation seconds; ``after(index, inputs, trace)`` runs after each answer, untimed,
        with the trace of that answer's block."""
        tokenizer = self.vlm.processor.tokenizer
        answers, seconds = [], 0.0
        for index in range(len(self.items)):
            batch = self.inputs(index)
            start = time.perf_counter()
            with self.vlm.use(*interventions) as trace:
                out = self.vlm.model.generate(**batch, max_new_tokens=4, do_sample=False)
            seconds += time.perf_counter() - start
            new_tokens = out[0, batch["input_ids"].shape[1]:]
            answers.append(first_word(tokenizer.decode(new_tokens, skip_special_tokens=True)))
            if after:
                after(index, batch, trace)
        return answers, seconds

    def accuracy(self, answers: list[str]) -> float:
        return float(np.mean([a == q.answer for a, (_, q) in zip(answers, self.items)]))

    def object_share(self, places: list[dict[str, int]]) -> str:
        """The share of kept visual tokens that lie on an object, from ``vlmtools_app.prune_bench.kept_places`` counts."""
        kept = sum((Counter(p) for p in places), Counter())
        return f"{kept['object'] / kept.total():.2f}"


def grid_picture(image: Image.Image, values: np.ndarray, mask: np.ndarray | None = None) -> Image.Image:
    from grounding.masks import overlay

    square = _letterbox(image)
    full = None if mask is None else np.kron(mask, np.ones((square.height // mask.shape[0],) * 2)).astype(bool)
    return overlay(square, values, full)


def _letterbox(image: Image.Image) -> Image.Image:
    """The square, padded picture the LLaVA-1.5 processor feeds the tower (mean-colour fill)."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((192, 192), Image.NEAREST)


def sinks_section(report: Report, vlm, runner: QuestionRunner, out: Path) -> None:
    from vlmtools.sinks import SinkDetector

    found = SinkDetector().detect(vlm, runner.inputs(0))
    found.plot(out / "sinks.png")
    report.add("Attention sinks in llava-shapes",
               "<p>One prefill of a held-out question through the shared detector (criteria and thresholds "
               "as published; settings in sinks.json).</p>",
               picture(Image.open(out / "sinks.png").convert("RGB"), "layer x token sink scores", width=1000),
               f"<pre>{html.escape(found.table())}</pre>")
    (out / "sinks.json").write_text(found.to_json())


def calibrated(vlm, out: Path, samples: int):
    """Debias settings with a recency trend fitted here on held-out val scenes (never the test split)."""
    from pruning import Debias, FastV, calibrate

    calibrate(vlm, FastV(keep=1.0, layer=LAYER), held_out_prompts(vlm.processor, samples),
              directory=out / "calibration")
    return Debias(directory=out / "calibration")


def pruning_section(report: Report, vlm, runner: QuestionRunner, plain: tuple[list[str], float], out: Path) -> None:
    from pruning import FastV, debiased
    from .prune_bench import kept_places

    def fastv(debias):
        return FastV(keep=KEEP, layer=LAYER, debias=debias)

    debias_on = calibrated(vlm, out, samples=16)
    every = [kept_places(vlm, runner.inputs(i), None, [scene])[0] for i, scene in enumerate(runner.scenes)]
    rows = [["plain (144 tokens)", f"{runner.accuracy(plain[0]):.2f}", "1.00", runner.object_share(every)]]
    for debias in (False, debias_on):
        host, places = fastv(debias), []
        answers, seconds = runner.answer(
            host, after=lambda index, inputs, trace: places.extend(
                kept_places(vlm, inputs, trace[host], [runner.scenes[index]])))
        rows.append([f"FastV keep {KEEP}, debias {'on' if debias else 'off'}", f"{runner.accuracy(answers):.2f}",
                     f"{plain[1] / seconds:.2f}", runner.object_share(places)])
    pictures = []
    side = int(round(np.sqrt(144)))
    for debias in (False, debias_on):
        host = fastv(debias)
        with torch.no_grad(), vlm.use(host) as trace:
            vlm.model(**runner.inputs(0))
        run = trace[host]
        visual = run.state.layout.samples[0].visual_positions()
        raw = run.scorers[0].latest()[1][0, -1, visual].float()
        score = debiased(raw, torch.arange(len(visual)), len(visual), run.trends[0], None) if debias else raw
        kept = torch.isin(visual, run.kept_at(LAYER)[0]).numpy().reshape(side, side)
        name = "debiased" if debias else "raw"
        pictures.append(picture(grid_picture(runner.images[0], score.numpy().reshape(side, side)),
                                f"FastV score, {name}"))
        pictures.append(picture(grid_picture(runner.images[0], kept.astype(float), kept), f"kept, {name}"))
    report.add("Debiased visual token pruning (FastV host)",
               f"<p>{len(runner.items)} held-out questions; speed-up = plain / pruned wall time of the same "
               "greedy answers (this machine, noisy); on objects = the share of the kept visual tokens that lie "
               "on an object (the world's exact masks; plain: of all of them). The recency trend was calibrated "
               f"on 16 val-split prompts (settings: {html.escape(str(debias_on.settings()))}).</p>",
               table(["method", "accuracy", "speed-up", "on objects"], rows), *pictures)


TRADEOFF = ("--questions", "5", "--batch", "5", "--hosts", "fastv,dart,random", "--calibration-samples", "8")
"""The demo's small prune-bench run: the picture's shape, not a measurement (README: the full run)."""


def tradeoff_section(report: Report, out: Path) -> None:
    """``prune-bench`` on a few questions; its picture of accuracy and speed-up against the kept share."""
    import argparse
    import contextlib

    from . import prune_bench

    parser = argparse.ArgumentParser(prog="vlmtools")
    prune_bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prune-bench", *TRADEOFF, "--out", str(out / "prune-bench.json")])
    with contextlib.redirect_stdout(io.StringIO()):
        args.run(args)
    report.add("Pruning: accuracy and speed-up against the tokens kept",
               f"<p>A small run of <code>vlmtools prune-bench {' '.join(TRADEOFF)}</code> (solid: debias off, "
               "dashed: on; results in prune-bench.json): the shape of the trade-off, not a measurement. "
               "<code>vlmtools prune-bench</code> with its defaults (200 questions, every host) is the full one.</p>",
               picture(Image.open(out / "prune-bench.png").convert("RGB"), "accuracy and speed-up against the "
                       "share of visual tokens kept", width=1000))


def hallucination_section(report: Report, runner: QuestionRunner, plain: list[str]) -> None:
    from hallucination import GIFT, VAR

    rows = [["greedy", f"{runner.accuracy(plain):.2f}"]]
    examples = {"greedy": plain}
    for name, method in (("VAR", VAR()), ("GIFT", GIFT())):
        answers, _ = runner.answer(method)
        examples[name] = answers
        rows.append([name, f"{runner.accuracy(answers):.2f}"])
    sample = [[q.question, q.answer, *(examples[m][i] for m in examples)]
              for i, (_, q) in enumerate(runner.items[:8])]
    report.add("Attention redistribution (VAR, GIFT)",
               table(["method", "accuracy"], rows),
               table(["question", "truth", *examples], sample))


def grounding_section(report: Report, n: int) -> None:
    from grounding import RefAM
    from grounding.masks import overlay
    from grounding.metrics import SegmentationScores
    from vlmtools_zoo.refam import zoo_samples

    import vlmtools_zoo as zoo

    refam = RefAM(zoo.load("flux-shapes"))
    scores, pictures = SegmentationScores(), []
    for sample in zoo_samples(n):
        seg = refam.segment(sample.image, sample.expression)
        scores.add(seg.mask, sample.mask, point=seg.point)
        big = sample.image.resize((192, 192), Image.NEAREST)
        scale = 192 // sample.image.width
        pictures.append(picture(overlay(big, seg.heatmap, np.kron(seg.mask, np.ones((scale, scale))).astype(bool)),
                                f"RefAM: {sample.expression}"))
        pictures.append(picture(Image.fromarray(sample.mask.astype(np.uint8) * 255).resize((192, 192)),
                                "ground truth"))
    summary = scores.summary()
    report.add("Referring segmentation (RefAM on flux-shapes)",
               table(["expressions", "mIoU", "oIoU", "point accuracy"],
                     [[n, f"{summary['miou']:.2f}", f"{summary['oiou']:.2f}", f"{summary['point_acc']:.2f}"]]),
               *pictures)


def run(args) -> int:
    import vlmtools_zoo as zoo
    from vlmtools import wrap

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    steps = tqdm(total=6, desc="vlmtools demo", unit="step")
    steps.set_postfix_str("loading llava-shapes")
    model, processor = zoo.load("llava-shapes")
    vlm = wrap(model, processor)
    runner = QuestionRunner(vlm, args.questions)
    steps.update()
    steps.set_postfix_str("sinks")
    sinks_section(report, vlm, runner, out)
    steps.update()
    steps.set_postfix_str("pruning")
    plain = runner.answer()
    pruning_section(report, vlm, runner, plain, out)
    steps.update()
    steps.set_postfix_str("pruning trade-off")
    tradeoff_section(report, out)
    steps.update()
    steps.set_postfix_str("VAR / GIFT")
    hallucination_section(report, runner, plain[0])
    steps.update()
    steps.set_postfix_str("RefAM")
    grounding_section(report, args.expressions)
    steps.update()
    steps.close()
    report.write(out / "report.html")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0
