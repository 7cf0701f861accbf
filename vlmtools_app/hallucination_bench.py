"""``vlmtools hallucination-bench``: POPE and CHAIR on held-out zoo scenes, greedy vs VAR vs GIFT vs PAINT.

POPE asks "Is there a <colour shape> in the image?" with balanced yes/no labels on the random,
popular and adversarial splits of the shapes world (``vlmtools_zoo.world.pope``); CHAIR scores free
captions (``world.DESCRIBE_PROMPT``, the prompt the zoo VLMs were trained to answer with an object listing) against each scene's exact colour-shape objects. Every method runs
under ``vlm.use`` around a plain batched, left-padded greedy ``generate``, with its default settings or
those its ``--methods`` entry gives (``gift:alpha=2.5``);
GIFT gets each prompt's question, so that it reads gaze shifts from the question's words only.
A method's recorded settings are those of its first batch (VAR's sink dimensions and GIFT's chosen
saliency layer are found per batch).

Your data instead of the zoo's: POPE's question files (``--pope FILE.jsonl``, once per split, with
``--images DIR``), scored with the POPE authors' answer rule (``hallucination.metrics.pope``: accuracy,
precision, recall, F1, yes-ratio per split and their average); CHAIR on the first ``--captions`` images of a
COCO captions file (``--coco-captions``, ``--coco-instances``, ``--images``; ``hallucination.metrics.chair``:
ground truth from the instances and the reference captions, the original COCO vocabulary); or a saved
``--dataset DIR`` holding either. Files read and item counts go into the JSON (``results.data``).

vlmtools hallucination-bench --scenes 40 --captions 60
vlmtools hallucination-bench --methods greedy,gift:alpha=1,paint:alpha=0.2:beta=0.1   # other strengths
torchrun --nproc_per_node 4 -m vlmtools_app.cli hallucination-bench    # the same numbers, four processes
vlmtools hallucination-bench --model /models/llava-1.5-7b-hf --pope coco_pope_random.json --pope coco_pope_popular.json \
    --pope coco_pope_adversarial.json --coco-captions captions_val2014.json --coco-instances instances_val2014.json \
    --images val2014/ --captions 500 --caption-tokens 512 --device cuda
"""
from __future__ import annotations

import time

from .args import at_least

METHODS = ("greedy", "var", "gift", "paint")
SCENES = 40
"""Held-out zoo scenes per POPE split by default."""
CAPTION_PROMPT = "Please describe this image in detail."
"""The captioning prompt on your data (the one CHAIR evaluations of LLaVA-style models use)."""


def intervention(method: str, settings: dict, questions: list[str]):
    """A fresh instance of ``method`` with keyword ``settings`` for one batch (None for greedy)."""
    from hallucination import GIFT, PAINT, VAR

    if method == "greedy":
        return None
    if method == "gift":
        return GIFT(questions=questions, **settings)
    return {"var": VAR, "paint": PAINT}[method](**settings)


def parse_methods(text: str) -> list[tuple[str, str, dict]]:
    """``--methods`` entries ``NAME[:KEY=VALUE...]`` (``gift:alpha=2.5``, ``paint:alpha=0.35:beta=0.2``) as
    (entry, method, keyword settings); every entry is built once here, so a bad setting fails before the run."""
    from . import bench

    out = bench.entries(text, METHODS, "methods")
    for entry, name, settings in out:
        if name == "greedy" and settings:
            raise ValueError(f"{entry!r}: greedy takes no settings")
        try:
            intervention(name, settings, ["Is there a red circle?"])
        except TypeError as error:
            raise ValueError(f"{entry!r}: {error}") from None
    return out


def hallucination_bench_command(args) -> int:
    """POPE (random / popular / adversarial: accuracy, precision, recall, F1, yes-ratio) and CHAIR (CHAIR_S,
    CHAIR_I, recall) of greedy decoding, VAR, GIFT and PAINT on held-out zoo scenes or on your POPE / COCO data;
    Markdown tables and a JSON file. Shards across processes under torchrun / accelerate launch."""
    from . import bench, shard
    from vlmtools.chat import chat_inputs, greedy
    from vlmtools_zoo import world

    from hallucination.coco import chair_synonyms
    from hallucination.metrics import chair, pope_by_split
    from vlmtools.data import POPE_SPLITS

    started = time.time()
    methods = parse_methods(args.methods)
    if args.scenes is not None and (args.pope or args.coco_captions or args.dataset):
        raise ValueError("--scenes counts zoo scenes; with your data, --pope-questions and --captions say how many")
    public = bench.read_data(args, {"pope": args.pope_questions, "chair": args.captions})  # before the model loads
    if public:
        args.caption_prompt = args.caption_prompt or CAPTION_PROMPT
    else:
        if args.pope_questions is not None:
            raise ValueError("--pope-questions goes with --pope or --dataset; zoo POPE is sized by --scenes")
        args.scenes = SCENES if args.scenes is None else args.scenes
        args.caption_prompt = args.caption_prompt or world.DESCRIBE_PROMPT
        if not args.scenes and not args.captions:
            raise ValueError("nothing to measure: --scenes and --captions are both 0")
    vlm = bench.load(args)
    # one task list per method: the POPE questions, then the captions; (image key, prompt, max new tokens)
    if public:  # image keys are the examples, their images read when their batch runs
        pope_data, chair_data = public.tasks.get("pope"), public.tasks.get("chair")
        pope_items = [(e.group, e, e.question, e.label) for e in (pope_data.examples if pope_data else [])]
        captioned = chair_data.examples if chair_data else []
        tasks = [(e, question, args.pope_tokens) for _, e, question, _ in pope_items]
        tasks += [(e, args.caption_prompt, args.caption_tokens) for e in captioned]

        def image(example):
            return example.load_image()
    else:
        pope_items = [(kind, *triple) for kind in POPE_SPLITS for triple in world.pope("test", args.scenes, kind)]
        tasks = [(scene, question, args.pope_tokens) for _, scene, question, _ in pope_items]
        tasks += [(scene, args.caption_prompt, args.caption_tokens) for scene in range(args.captions)]
        image = {scene: world.scene("test", scene).image for scene, _, _ in tasks}.__getitem__
    n = len(tasks)

    def run(batch: list[int]) -> list[dict]:
        _, method, settings = methods[batch[0] // n]
        scenes, questions, tokens = zip(*(tasks[i % n] for i in batch))
        inputs = chat_inputs(vlm.processor, [image(s) for s in scenes], list(questions), vlm.model.device)
        edit = intervention(method, settings, list(questions))
        with vlm.use(*([edit] if edit else [])) as trace:  # greedy's own block shares this trace
            texts = greedy(vlm, inputs, max_new_tokens=tokens[0])
        records = [{"text": text} for text in texts]
        if edit and batch[0] % n == 0:  # a method's first batch records its settings
            records[0]["settings"] = trace[edit].settings
        return records

    # batches never mix methods, nor POPE questions with captions (they generate different lengths)
    work = [batch for m in range(len(methods)) for start, stop in ((0, len(pope_items)), (len(pope_items), n))
            for batch in shard.batches(range(m * n + start, m * n + stop), args.batch)]
    records = shard.evaluate(work, run, desc="hallucination-bench")
    if records is None:
        return 0
    if public:
        objects = {i: set(e.objects) for i, e in enumerate(captioned)}
        references = {i: list(e.answers) for i, e in enumerate(captioned)} if any(e.answers for e in captioned) else None
        synonyms = chair_synonyms(public.vocabulary)
    else:
        names = sorted({f"{colour} {shape}" for colour in world.COLOURS for shape in world.SHAPES})
        objects = {scene: {o.name for o in world.scene("test", scene).objects} for scene in range(args.captions)}
        references, synonyms = None, {name: [name] for name in names}
    results = {"pope_items": len(pope_items), "captions": n - len(pope_items), "methods": {}}
    if public:
        results["data"] = public.record()
    for m, (method, *_) in enumerate(methods):
        mine = records[m * n:(m + 1) * n]
        answers, captions = [r["text"] for r in mine[:len(pope_items)]], [r["text"] for r in mine[len(pope_items):]]
        scores = pope_by_split(answers, [label for *_, label in pope_items],
                               [kind for kind, *_ in pope_items]) if pope_items else {}
        found = chair(list(enumerate(captions)), objects, synonyms,
                      **({"reference_captions": references} if references else {})) if captions else {}
        results["methods"][method] = {
            "pope": scores, **{k: found[k] for k in ("chair_s", "chair_i", "recall") if k in found},
            "settings": mine[0].get("settings"), "pope_answers": answers, "captions": captions}
    bench.finish(args, results, tables(results["methods"]), started)
    return 0


def tables(methods: dict[str, dict]) -> str:
    """A POPE table (per method and split) and a CHAIR table (per method)."""
    lines = ["| method | split | accuracy | precision | recall | F1 | yes-ratio |", "|---|---|---|---|---|---|---|"]
    for method, result in methods.items():
        for split, scores in result["pope"].items():
            lines.append(f"| {method} | {split} | {scores['accuracy']:.3f} | {scores['precision']:.3f} "
                         f"| {scores['recall']:.3f} | {scores['f1']:.3f} | {scores['yes_ratio']:.3f} |")
    lines += ["", "| method | CHAIR_S | CHAIR_I | recall |", "|---|---|---|---|"]
    for method, result in methods.items():
        if "chair_s" in result:
            lines.append(f"| {method} | {result['chair_s']:.3f} | {result['chair_i']:.3f} | {result['recall']:.3f} |")
    return "\n".join(lines)


def register(subparsers) -> None:
    from . import bench

    parser = subparsers.add_parser("hallucination-bench", help="POPE and CHAIR of greedy, VAR, GIFT and PAINT",
                                   description=hallucination_bench_command.__doc__)
    parser.add_argument("--scenes", type=at_least(0),
                        help=f"held-out zoo scenes per POPE split (up to 3 present and 3 absent objects asked "
                             f"each; default {SCENES})")
    parser.add_argument("--captions", type=at_least(0), default=60,
                        help="images captioned for CHAIR: held-out zoo scenes, or the first of --coco-captions / "
                             "a --dataset (0: no CHAIR on the zoo) (default: %(default)s)")
    parser.add_argument("--pope-questions", type=at_least(1),
                        help="with --pope / --dataset: the first N questions of each file (default: all)")
    parser.add_argument("--caption-prompt",
                        help=f"the captioning prompt (default: the zoo's {'Describe the image.'!r}; with your "
                             f"data {CAPTION_PROMPT!r})")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods, each with its default settings or with settings of its "
                             "own as NAME:KEY=VALUE[:KEY=VALUE...], e.g. gift:alpha=2.5 (a method may appear "
                             "with several settings; results are keyed by the entry) (default: %(default)s)")
    parser.add_argument("--pope-tokens", type=at_least(1), default=4, help="greedy tokens generated per POPE answer")
    parser.add_argument("--caption-tokens", type=at_least(1), default=24, help="greedy tokens generated per caption")
    bench.add_arguments(parser, out="hallucination-bench.json")
    bench.add_data_arguments(parser, ("pope", "chair"))
    parser.set_defaults(run=hallucination_bench_command)
