"""``vlmtools prune`` and ``vlmtools calibrate``: pruning from the shell.

vlmtools prune                                   # a held-out zoo scene, FastV keeping 16 of 144 tokens
vlmtools prune photo.jpg "What is on the table?" --model /models/llava-1.5-7b-hf --host fastv --keep 64 --debias
vlmtools calibrate --host fastv --samples 64     # fit the recency trend on the zoo's val split

``prune --debias`` without a calibrated trend for the (model, host, layer) fits one first, as
``calibrate`` would with its defaults, and keeps it for the next run.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pruning.samples import DEFAULT_QUESTION

from .args import at_least

CALIBRATION_SAMPLES = 64
HOST_OPTIONS = {"layer": ("fastv", "dart", "random", "grid"), "layers": ("pdrop", "sparsevlm")}


def _host(args, debias):
    from pruning import HOSTS

    options = {}
    if args.layers:
        key = "layers" if args.host in HOST_OPTIONS["layers"] else "layer"
        options[key] = tuple(args.layers) if key == "layers" else args.layers[0]
    return HOSTS[args.host](keep=args.keep, debias=debias, **options)


def _add_common(parser, keep_default) -> None:
    from pruning import HOSTS

    parser.add_argument("--model", default="llava-shapes", help="llava-shapes (default) or a VLM folder")
    parser.add_argument("--host", default="fastv", choices=sorted(HOSTS), help="the scoring host")
    parser.add_argument("--keep", type=keep_value, default=keep_default,
                        help="visual tokens kept: a whole count (64) or a fraction in (0, 1] (0.11)")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="drop layer(s): FastV/DART/random/grid take one, PDrop/SparseVLM several")


def keep_value(text: str) -> int | float:
    """``--keep``: a whole number is a count of tokens (at least 1), anything else a fraction in (0, 1]."""
    try:
        value = int(text)
    except ValueError:
        value = float(text)
        if 0 < value <= 1:
            return value
        raise argparse.ArgumentTypeError(f"{text} is neither a whole count of tokens nor a fraction in (0, 1]")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: keep at least one token")
    return value


def ensure_trends(vlm, host, model: str, samples: int) -> None:
    """Where ``host``'s calibration file is missing: on a zoo model, fit and store the trend on ``samples``
    val prompts; on any other model refuse, saying how to calibrate it on its own kind of images (a
    trend fitted on shapes would silently misdebias a real checkpoint)."""
    import vlmtools_zoo as zoo
    from pruning import calibrate, calibration_path

    from .inputs import held_out_prompts

    missing = [key for key in (host.calibration_key(vlm, stage) for stage in range(len(host.layers)))
               if not calibration_path(key).exists()]
    if not missing:
        return
    if model not in zoo.MODELS:
        raise ValueError(f"no calibrated trend {missing[0]} in {calibration_path(missing[0]).parent}: calibrate on "
                         f"your own images first: vlmtools calibrate --model {model} --host {host.name} "
                         "--images DIR [--questions FILE]")
    print(f"no calibrated trend {', '.join(missing)}: fitting it on {samples} val prompts "
          f"(as `vlmtools calibrate` does) into {calibration_path(missing[0]).parent}", file=sys.stderr)
    calibrate(vlm, host, held_out_prompts(vlm.processor, samples))


def prune_command(args) -> int:
    """Answer one question about one image, plainly and pruned; print both answers and times."""
    from PIL import Image

    import vlmtools
    from vlmtools.chat import chat_inputs

    from .inputs import load_vlm
    from vlmtools_zoo import world

    model, processor = load_vlm(args.model)
    vlm = vlmtools.wrap(model, processor)
    image = Image.open(args.image).convert("RGB") if args.image else world.scene("test", 0).image
    inputs = chat_inputs(processor, [image], [args.question])
    host = _host(args, args.debias)
    host.check(vlm)  # before the plain answer, not after it
    if args.debias:
        ensure_trends(vlm, host, args.model, args.calibration_samples)
    for name, interventions in (("plain", ()), (args.host, (host,))):
        start = time.perf_counter()
        with torch.no_grad(), vlm.use(*interventions) as trace:
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{name:>10} ({seconds:.2f} s): {text.strip()}")
    pruned = trace[host]
    layout = pruned.state.layout.samples[0]
    kept = torch.isin(layout.visual_positions(), pruned.kept_at(host.layers[-1])[0].cpu()).sum()
    print(f"kept {int(kept)} of {len(layout.visual_positions())} visual tokens from layer {host.layers[0]}; "
          f"settings: {host.settings}")
    return 0


def calibrate_command(args) -> int:
    """Fit the host's recency trend on held-out inputs and store it by name: a folder of your images
    (--images, with --questions), else, for a zoo model, the world's val scenes (never test)."""
    import vlmtools
    import vlmtools_zoo as zoo
    from pruning import calibrate, calibration_samples, image_question_pairs

    from .inputs import held_out_prompts, load_vlm

    if args.images is None and args.model not in zoo.MODELS:
        raise ValueError(f"{args.model} is no zoo model: give --images DIR (and --questions FILE) of the kind of "
                         "images it will see; a trend fitted on shapes scenes would misdebias it")
    if args.questions is not None and args.images is None:
        raise ValueError("--questions goes with --images")
    pairs = image_question_pairs(args.images, args.questions)[:args.samples] if args.images else None
    model, processor = load_vlm(args.model)
    vlm = vlmtools.wrap(model, processor)
    samples = calibration_samples(processor, pairs) if pairs else held_out_prompts(processor, args.samples)
    trends = calibrate(vlm, _host(args, False), samples, fit=args.fit, directory=args.directory)
    for trend in trends:
        print(trend)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("prune", help="answer one question on one image, plainly and pruned",
                                   description=prune_command.__doc__)
    parser.add_argument("image", nargs="?", help="an image file (default: a held-out zoo scene)")
    parser.add_argument("question", nargs="?", default="How many shapes are there?")
    _add_common(parser, keep_default=16)
    parser.add_argument("--debias", action="store_true", help="debias the scores (calibrated trend, padding, sinks)")
    parser.add_argument("--calibration-samples", type=at_least(1), default=CALIBRATION_SAMPLES,
                        help="with --debias on a zoo model with no trend calibrated yet: val prompts it is fitted on")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=16, help="greedy tokens generated per answer")
    parser.set_defaults(run=prune_command)

    parser = subparsers.add_parser("calibrate", help="fit a host's recency trend on held-out inputs",
                                   description=calibrate_command.__doc__)
    _add_common(parser, keep_default=1.0)
    parser.add_argument("--samples", type=at_least(1), default=CALIBRATION_SAMPLES,
                        help="held-out prompts averaged (at most this many of --images)")
    parser.add_argument("--images", help="a folder of your images to calibrate on (required for a non-zoo model)")
    parser.add_argument("--questions", help="with --images: a text file of questions, one a line, taken in turn "
                                            f"(default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--fit", choices=["exponential", "cubic"], default="exponential",
                        help="trend shape: exponential (four released hosts) or cubic (FastV's released weights)")
    parser.add_argument("--directory", help="where the trend file goes (default: $PRUNING_CALIBRATION, else "
                                             "calibration/ in $VLMTOOLS_CACHE or ~/.cache/vlmtools)")
    parser.set_defaults(run=calibrate_command)
