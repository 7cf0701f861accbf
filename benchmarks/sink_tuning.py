"""ACT and ZeroTuning against greedy decoding: accuracy on the zoo VLMs and decoding-step latency.

Quality: on each zoo VLM (``--models``), each method's heads are chosen by ``tuning.calibrate`` on the shapes
world's first ``--calibration-samples`` val questions (scored by the first token after one prefill, as the
released searches do), among the heads of ``--layers`` (default: the released search's layers 2 .. L-2; fewer
keep the search inside a CPU's time). Then greedy decoding, ACT and ZeroTuning answer the same held-out test
questions in the same batches (``--batch``, left-padded, 4 greedy tokens): ``--questions`` QA items (right when
the first word is the expected one, as prune-bench scores) and POPE on ``--pope-scenes`` test scenes per split
(the POPE authors' answer rule, ``hallucination.metrics.pope_by_split``).

Speed: on the CPU benchmark model of the other benches (``common.llava_bench``: LLaVA-1.5-shaped, 576 visual +
64 text tokens, random weights, batch 1, fp32, one thread), cached ``generate`` of 1 and of 1 + ``--tokens``
tokens, greedy and each method in interleaved rounds (``common.ratios``, medians of per-round ratios):
``*_prefill_ratio`` is the 1-token generate's, ``*_latency_ratio`` the decoding steps' (``common.decoding_step``:
the clock read after each generated token, the steps after the first averaged, so no prefill time enters it).
Both methods edit every head of layers 2 .. L-2 (the most a selection holds); random weights
grow no sinks above ACT's released eps, so ACT runs with eps 0.002 there, which makes it find sinks and edit
every row of those heads, prefill and decoding steps alike (its most costly case).

Run: ``python benchmarks/sink_tuning.py [--models llava-shapes,qwen2vl-shapes] [--questions 60] [--pope-scenes 6]
[--calibration-samples 32] [--layers 2 3 4] [--write]`` (``--write``: the "ACT and ZeroTuning" section of
benchmarks/RESULTS.md; ``--skip-speed`` / ``--skip-quality`` run one part). Prints a table and writes ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# this folder holds hallucination.py and pruning.py, which shadow the packages while it is first on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]

METHODS = ("greedy", "act", "zerotuning")
SECTION = "ACT and ZeroTuning"


def qa_accuracy(texts: list[str], answers: list[str]) -> float:
    """The share of greedy ``texts`` whose first word (``vlmtools.chat.first_word``) is the expected answer."""
    from vlmtools.chat import first_word

    if len(texts) != len(answers) or not texts:
        raise ValueError(f"{len(texts)} answers for {len(answers)} questions")
    return sum(first_word(text) == answer for text, answer in zip(texts, answers)) / len(texts)


def scores(qa_texts: list[str], qa_answers: list[str], pope_texts: list[str], pope_labels: list[str],
           pope_splits: list[str]) -> dict:
    """QA accuracy and POPE per split and averaged (the POPE authors' answer rule) of one method's answers."""
    from hallucination.metrics import pope_by_split

    return {"qa": qa_accuracy(qa_texts, qa_answers), "pope": pope_by_split(pope_texts, pope_labels, pope_splits)}


def batched(processor, images: list, questions: list[str], size: int) -> list[dict]:
    from vlmtools.chat import chat_inputs

    return [chat_inputs(processor, images[i:i + size], questions[i:i + size]) for i in range(0, len(images), size)]


def calibration_samples(processor, count: int, size: int) -> list[tuple[dict, list[str]]]:
    """The first ``count`` val questions of the shapes world as ``tuning.calibrate`` samples, ``size`` a batch."""
    from vlmtools_zoo import world

    items = world.qa_items("val", count)
    prompts = batched(processor, [world.scene("val", s).image for s, _ in items], [q.question for _, q in items], size)
    return [(inputs, [q.answer for _, q in items[i * size:(i + 1) * size]]) for i, inputs in enumerate(prompts)]


def quality(name: str, args) -> dict:
    """One zoo VLM: both methods' head selections on val, then every method's answers and scores on test."""
    from tqdm import tqdm

    import tuning
    import vlmtools
    import vlmtools_zoo as zoo
    from vlmtools.chat import greedy
    from vlmtools.data import POPE_SPLITS
    from vlmtools_zoo import world

    model, processor = zoo.load(name)
    vlm = vlmtools.wrap(model, processor)
    samples = calibration_samples(processor, args.calibration_samples, args.batch)
    selections, seconds = {}, {}
    for method in ("act", "zerotuning"):
        start = time.time()
        if args.no_search:  # every candidate head, ZeroTuning at --gamma: what the edits do without the search
            heads = {}
            for layer, head in tuning.candidate_heads(vlm, args.layers, args.heads):
                heads.setdefault(layer, []).append(head)
            selections[method] = tuning.HeadSelection(method, name, heads, gamma=args.gamma if method == "zerotuning"
                                                      else None, settings={"search": "none: every candidate head"})
        else:
            selections[method] = tuning.calibrate(vlm, getattr(tuning, {"act": "ACT", "zerotuning": "ZeroTuning"}[
                method])(), samples, layers=args.layers, heads=args.heads, save=False)
        seconds[method] = round(time.time() - start, 1)
    # a selection with no head (none beat the unedited val accuracy) changes nothing: the method is greedy
    edits = {"greedy": (), "act": (tuning.ACT(selections["act"]),) if selections["act"].heads else None,
             "zerotuning": (tuning.ZeroTuning(selections["zerotuning"]),) if selections["zerotuning"].heads else None}
    qa = world.qa_items("test", args.questions)
    pope = [(kind, *triple) for kind in POPE_SPLITS for triple in world.pope("test", args.pope_scenes, kind)]
    images = [world.scene("test", s).image for s, _ in qa] + [world.scene("test", s).image for _, s, _, _ in pope]
    questions = [q.question for _, q in qa] + [q for _, _, q, _ in pope]
    prompts = batched(processor, images, questions, args.batch)
    out = {"calibration": {m: {"heads": s.heads, "gamma": s.gamma, "baseline": s.baseline, "prompts": len(samples),
                               "candidates": len(tuning.candidate_heads(vlm, args.layers, args.heads)),
                               "score": s.score, "settings": s.settings, "seconds": seconds[m]}
                           for m, s in selections.items()},
           "qa_items": len(qa), "pope_items": len(pope), "methods": {}}
    for method in METHODS:
        if edits[method] is None:
            out["methods"][method] = {**out["methods"]["greedy"], "as_greedy": True}
            continue
        texts = [text for inputs in tqdm(prompts, desc=f"{name} {method}")
                 for text in greedy(vlm, inputs, *edits[method], max_new_tokens=4)]
        out["methods"][method] = {**scores(texts[:len(qa)], [q.answer for _, q in qa], texts[len(qa):],
                                           [label for *_, label in pope], [kind for kind, *_ in pope]),
                                  "answers": texts}
    return out


def speed(args) -> dict:
    """Prefill and decoding-step time ratios of ACT and ZeroTuning against greedy on the CPU benchmark model."""
    import torch

    import tuning
    import vlmtools

    sys.path.append(str(HERE))
    from common import decoding_step, llava_bench, ratios

    torch.set_num_threads(args.threads)
    model, batch, sync = llava_bench(False)
    vlm = vlmtools.wrap(model)
    layers = sorted({layer for layer, _ in tuning.candidate_heads(vlm)})
    heads = {layer: list(range(vlm.site(f"text.{layer}").heads)) for layer in layers}
    methods = {"act": tuning.ACT(heads, eps=0.002), "zerotuning": tuning.ZeroTuning(heads, gamma=1.5)}
    found = {}

    def run(tokens, method=None):
        def go(**kwargs):
            with vlm.use(*([method] if method else [])) as trace:
                model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)
            if method is methods["act"]:
                found["act_sinks"] = sum(len(k) for at in trace[method].sinks.values() for k in at)
            sync()
        return go

    clock = time.process_time if args.clock == "process" else time.perf_counter
    step_base, step = ratios(run(1 + args.tokens), {n: run(1 + args.tokens, m) for n, m in methods.items()},
                             repeats=args.repeats, clock=clock, measure=decoding_step)
    short_base, short = ratios(run(1), {n: run(1, m) for n, m in methods.items()}, repeats=args.repeats, clock=clock)
    out = {"model": "common.llava_bench: LLaVA-1.5-shaped, random weights, 8 layers, hidden 512",
           "tokens": f"1 x {batch['input_ids'].shape[1]} (576 visual), {args.tokens} decoding steps",
           "clock": "process CPU time" if args.clock == "process" else "wall", "threads": args.threads,
           "edited_layers": sorted(heads), "act_eps": 0.002, "act_sinks_found": found.get("act_sinks"),
           "greedy_prefill_s": short_base, "greedy_decode_s_per_token": step_base}
    for name in methods:
        out[f"{name}_prefill_ratio"] = short[name]
        out[f"{name}_latency_ratio"] = step[name]
    return out


def table(quality_of: dict) -> str:
    lines = ["| model | method | QA / POPE questions | QA accuracy | POPE random | POPE popular | POPE adversarial | "
             "POPE average | yes-ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for model, result in quality_of.items():
        for method, got in result["methods"].items():
            pope = got["pope"]
            label = f"{method} (no head chosen: greedy)" if got.get("as_greedy") else method
            splits = " | ".join(f"{pope[s]['accuracy']:.3f}" for s in ("random", "popular", "adversarial", "average"))
            lines.append(f"| {model} | {label} | {result['qa_items']} / {result['pope_items']} | {got['qa']:.3f} | "
                         f"{splits} | {pope['average']['yes_ratio']:.3f} |")
    return "\n".join(lines)


def gains(quality_of: dict) -> list[str]:
    """One line per model and method: its QA and average POPE accuracy minus greedy's."""
    lines = []
    for model, result in quality_of.items():
        base = result["methods"]["greedy"]
        for method in ("act", "zerotuning"):
            got = result["methods"][method]
            deltas = (got["qa"] - base["qa"], got["pope"]["average"]["accuracy"] - base["pope"]["average"]["accuracy"])
            changed = sum(a != b for a, b in zip(got["answers"], base["answers"]))
            lines.append(f"- {model}, {method} against greedy: QA {deltas[0]:+.3f}, POPE average {deltas[1]:+.3f} "
                         f"({changed} of {len(base['answers'])} answers differ).")
    return lines


def calibration_table(quality_of: dict) -> str:
    lines = ["| model | method | candidate heads | chosen heads | gamma | val accuracy unedited | search seconds |",
             "|---|---|---|---|---|---|---|"]
    for model, result in quality_of.items():
        for method, c in result["calibration"].items():
            chosen = sum(len(h) for h in c["heads"].values())
            lines.append(f"| {model} | {method} | {c['candidates']} | {chosen} {json.dumps(c['heads'])} | "
                         f"{'-' if c['gamma'] is None else c['gamma']} | "
                         f"{'-' if c['baseline'] is None else format(c['baseline'], '.3f')} | {c['seconds']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llava-shapes,qwen2vl-shapes")
    parser.add_argument("--questions", type=int, default=60, help="held-out test QA questions")
    parser.add_argument("--pope-scenes", type=int, default=6, help="held-out test scenes per POPE split")
    parser.add_argument("--calibration-samples", type=int, default=32, help="val questions the head search scores")
    parser.add_argument("--layers", type=int, nargs="+", help="candidate layers (default: 2 .. L-2)")
    parser.add_argument("--heads", type=int, nargs="+", help="candidate heads in each layer (default: all)")
    parser.add_argument("--no-search", action="store_true",
                        help="no head search: both methods edit every candidate head (ZeroTuning at --gamma)")
    parser.add_argument("--gamma", type=float, default=1.5, help="ZeroTuning's factor with --no-search")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="decoding steps timed")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the speed part")
    parser.add_argument("--clock", choices=["process", "wall"], default="process",
                        help="speed part: process CPU time (default, robust to other jobs) or wall clock")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", default="sink-tuning.json")
    parser.add_argument("--write", action="store_true", help="write the --section section of RESULTS.md")
    parser.add_argument("--section", default=SECTION, help="its heading (default: %(default)s); another heading "
                        "adds a section beside the earlier runs' instead of replacing it")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="run nothing: join the --out files of runs that each did a part (a model, the speed) "
                             "and print (and --write) them as one")
    args = parser.parse_args()
    if args.merge:
        record = merged([json.loads(Path(path).read_text()) for path in args.merge])
    else:
        record = measured(args)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    if "quality" in record:
        print(table(record["quality"]))
        print(calibration_table(record["quality"]))
    for key, value in record.get("speed", {}).items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.write:
        sys.path.append(str(HERE))
        from common import write_section

        write_section(HERE / "RESULTS.md", args.section, section(record, args.section))


def merged(records: list[dict]) -> dict:
    """One record of several runs: their quality results by model, the speed of the one that measured it."""
    out = {"runs": [run for record in records for run in record["runs"]], "quality": {}}
    for record in records:
        out["quality"].update(record.get("quality", {}))
        out.update({key: record[key] for key in ("speed",) if key in record})
        if "quality" in record:
            out.setdefault("settings", record["settings"])
    if not out["quality"]:
        del out["quality"]
    return out


def measured(args) -> dict:
    started = time.time()
    load = os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()  # the code imported now
    record = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "write", "merge", "section")}}
    if not args.skip_quality:
        record["quality"] = {name + (" (no search)" if args.no_search else ""): quality(name, args)
                             for name in args.models.split(",")}
    if not args.skip_speed:
        record["speed"] = speed(args)
    record["runs"] = [{"command": "python benchmarks/sink_tuning.py " + " ".join(sys.argv[1:]), "commit": commit,
                       "seconds": round(time.time() - started, 1), "load_average_at_start": load,
                       "cpus": os.cpu_count()}]
    return record


def without_out(command: str) -> str:
    """A run's command without its scratch ``--out`` file."""
    return re.sub(r" --out \S+", "", command)


def section(record: dict, heading: str = SECTION) -> str:
    lines = [f"## {heading}", ""]
    lines += [f"`{without_out(run['command'])}` at commit {run['commit']}: {run['seconds']:.0f} s on this "
              f"{run['cpus']}-core CPU "
              f"shared with other jobs (load average {run['load_average_at_start']:.1f} at the start)."
              for run in record["runs"]]
    lines.append("")
    if "quality" in record:
        s = record["settings"]
        lines += [f"Held-out zoo test questions (QA, and POPE on the first scenes of each split; counts in each row): "
                  f"in a run, the same prompts in the same batches of {s['batch']} for every method, 4 greedy "
                  "tokens. Heads "
                  f"chosen by `tuning.calibrate` on the first {s['calibration_samples']} val questions (first-token "
                  "scoring), among the candidate heads each command names (`--layers`, default 2 .. L-2; `--heads`, "
                  "default all; their count is in the second table), ACT beta 0.4 / eps 0.1, ZeroTuning "
                  "gammas 1.5 / 0.5.", ""]
        if any(model.endswith("(no search)") for model in record["quality"]):
            lines += ["Rows marked (no search) skip the head search: both methods edit every candidate head of their "
                      "run's command (ZeroTuning at its --gamma), to show what the edits do where the search keeps "
                      "none.", ""]
        lines += [table(record["quality"]), "", calibration_table(record["quality"]), "", *gains(record["quality"]), ""]
    if "speed" in record:
        sp = record["speed"]
        lines += [f"Speed ({sp['model']}; {sp['tokens']}; {sp['clock']}, {sp['threads']} thread; both methods on "
                  f"every head of layers {sp['edited_layers']}, ACT at eps {sp['act_eps']} so that it finds sinks "
                  f"on random weights ({sp['act_sinks_found']} (head, sink) pairs)); medians of interleaved rounds "
                  "against greedy in one process:", "", "| method | prefill ratio | decoding-step ratio |",
                  "|---|---|---|"]
        lines += [f"| {m} | {sp[f'{m}_prefill_ratio']:.3f} | {sp[f'{m}_latency_ratio']:.3f} |"
                  for m in ("act", "zerotuning")]
        lines += ["", f"greedy: prefill {sp['greedy_prefill_s']:.3f} s, {sp['greedy_decode_s_per_token']:.4f} s per "
                  f"decoding step. Against the target of 1.10 for the decoding step: " + ", ".join(
                      f"{m} {sp[f'{m}_latency_ratio'] - 1.10:+.3f}" for m in ("act", "zerotuning")) + ". The "
                  "decoding-step ratio is timed on the steps alone (`common.decoding_step`: the clock after each "
                  "token). ZeroTuning is a logit bias that the fused SDPA kernel adds itself (the seam's "
                  "`logit_bias`); ACT edits probabilities by each row's sink mass, so its edited layers recompute "
                  "their rows explicitly in fp32 (q k^T, softmax, the edit, then times v), and its prefill also "
                  "runs its own chunked pass over the edited heads' attention to find the sinks.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
