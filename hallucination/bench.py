"""``vlmtools hallucination-bench``: POPE and CHAIR on held-out zoo scenes, greedy vs VAR vs GIFT vs PAINT.

POPE asks "Is there a <colour shape> in the image?" with balanced yes/no labels on the random,
popular and adversarial splits of the shapes world (``vlmtools.zoo.world.pope``); CHAIR scores free
captions (``world.DESCRIBE_PROMPT``, the prompt the zoo VLMs were trained to answer with an object listing) against each scene's exact colour-shape objects. Every method runs
under ``vlm.use`` around a plain batched, left-padded greedy ``generate`` with its default settings;
GIFT gets each prompt's question, so that it reads gaze shifts from the question's words only.
A method's recorded settings are those of its first batch (VAR's sink dimensions and GIFT's chosen
saliency layer are found per batch).

vlmtools hallucination-bench --scenes 40 --captions 60
torchrun --nproc_per_node 4 -m vlmtools.cli hallucination-bench    # the same numbers, four processes
"""
from __future__ import annotations

import time

METHODS = ("greedy", "var", "gift", "paint")


def intervention(method: str, questions: list[str]):
    """A fresh instance of ``method`` for one batch (None for greedy)."""
    from . import GIFT, PAINT, VAR

    return {"greedy": lambda: None, "var": VAR, "gift": lambda: GIFT(questions=questions), "paint": PAINT}[method]()


def hallucination_bench_command(args) -> int:
    """POPE (random / popular / adversarial: accuracy, F1, yes-ratio) and CHAIR (CHAIR_S, CHAIR_I, recall) of
    greedy decoding, VAR, GIFT and PAINT on held-out zoo scenes; Markdown tables and a JSON file. Shards across
    processes under torchrun / accelerate launch."""
    from vlmtools import bench, shard
    from vlmtools.inputs import chat_inputs, greedy
    from vlmtools.zoo import world

    from .metrics import POPE_SPLITS, chair, pope_by_split

    started = time.time()
    methods = bench.chosen(args.methods, METHODS, "methods")
    vlm = bench.load(args)
    # one task list per method: the POPE questions, then the captions; (scene, prompt, max new tokens)
    pope_items = [(kind, *triple) for kind in POPE_SPLITS for triple in world.pope("test", args.scenes, kind)]
    tasks = [(scene, question, args.pope_tokens) for _, scene, question, _ in pope_items]
    tasks += [(scene, world.DESCRIBE_PROMPT, args.caption_tokens) for scene in range(args.captions)]
    images = {scene: world.scene("test", scene).image for scene, _, _ in tasks}
    n = len(tasks)

    def run(batch: list[int]) -> list[dict]:
        method = methods[batch[0] // n]
        scenes, questions, tokens = zip(*(tasks[i % n] for i in batch))
        inputs = chat_inputs(vlm.processor, [images[s] for s in scenes], list(questions), vlm.model.device)
        edit = intervention(method, list(questions))
        texts = greedy(vlm, inputs, *([edit] if edit else []), max_new_tokens=tokens[0])
        records = [{"text": text} for text in texts]
        if edit and batch[0] % n == 0:  # a method's first batch records its settings
            records[0]["settings"] = edit.settings
        return records

    # batches never mix methods, nor POPE questions with captions (they generate different lengths)
    work = [batch for m in range(len(methods)) for start, stop in ((0, len(pope_items)), (len(pope_items), n))
            for batch in shard.batches(range(m * n + start, m * n + stop), args.batch)]
    records = shard.evaluate(work, run, desc="hallucination-bench")
    if records is None:
        return 0
    names = sorted({f"{colour} {shape}" for colour in world.COLOURS for shape in world.SHAPES})
    objects = {scene: {o.name for o in world.scene("test", scene).objects} for scene in range(args.captions)}
    results = {"pope_items": len(pope_items), "captions": args.captions, "methods": {}}
    for m, method in enumerate(methods):
        mine = records[m * n:(m + 1) * n]
        answers, captions = [r["text"] for r in mine[:len(pope_items)]], [r["text"] for r in mine[len(pope_items):]]
        scores = pope_by_split(answers, [label for *_, label in pope_items], [kind for kind, *_ in pope_items])
        found = chair(list(enumerate(captions)), objects, synonyms={name: [name] for name in names}) if captions else {}
        results["methods"][method] = {
            "pope": scores, **{k: found[k] for k in ("chair_s", "chair_i", "recall") if k in found},
            "settings": mine[0].get("settings"), "pope_answers": answers, "captions": captions}
    bench.finish(args, results, tables(results["methods"]), started)
    return 0


def tables(methods: dict[str, dict]) -> str:
    """A POPE table (per method and split) and a CHAIR table (per method)."""
    lines = ["| method | split | accuracy | F1 | yes-ratio |", "|---|---|---|---|---|"]
    for method, result in methods.items():
        for split, scores in result["pope"].items():
            lines.append(f"| {method} | {split} | {scores['accuracy']:.3f} | {scores['f1']:.3f} "
                         f"| {scores['yes_ratio']:.3f} |")
    lines += ["", "| method | CHAIR_S | CHAIR_I | recall |", "|---|---|---|---|"]
    for method, result in methods.items():
        if "chair_s" in result:
            lines.append(f"| {method} | {result['chair_s']:.3f} | {result['chair_i']:.3f} | {result['recall']:.3f} |")
    return "\n".join(lines)


def register(subparsers) -> None:
    from vlmtools import bench

    parser = subparsers.add_parser("hallucination-bench", help="POPE and CHAIR of greedy, VAR, GIFT and PAINT",
                                   description=hallucination_bench_command.__doc__)
    parser.add_argument("--scenes", type=int, default=40,
                        help="held-out scenes per POPE split (up to 3 present and 3 absent objects asked each)")
    parser.add_argument("--captions", type=int, default=60, help="held-out scenes captioned for CHAIR (0: no CHAIR)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods, each with its default settings (default: %(default)s)")
    parser.add_argument("--pope-tokens", type=int, default=4, help="greedy tokens generated per POPE answer")
    parser.add_argument("--caption-tokens", type=int, default=24, help="greedy tokens generated per caption")
    bench.add_arguments(parser, out="hallucination-bench.json")
    parser.set_defaults(run=hallucination_bench_command)
