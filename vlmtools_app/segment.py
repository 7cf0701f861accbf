"""``vlmtools segment`` and ``vlmtools segment-bench``: RefAM from the shell.

vlmtools segment                                     # a held-out zoo scene and its first referring expression
vlmtools segment scene.png "the large red circle on the left" --out out/
vlmtools segment photo.jpg "the dog on the left" --model /models/FLUX.1-dev --resize 512 512
vlmtools segment scene.png "the circle left of the square" --words head   # only "circle" is read
vlmtools segment clip.mp4 "the dog that runs left" --model /models/Wan2.1-T2V-1.3B-Diffusers --resize 832 480
vlmtools segment frames/ "the red circle"            # a folder of frames (sorted by name), frame by frame on flux-shapes
vlmtools segment --video                             # a held-out zoo clip and its first expression, J&F with its truth
vlmtools segment-bench --n 300                       # zoo held-out expressions, ablations, baselines
vlmtools segment-bench --model PATH --refs refs.p --instances instances.json --images DIR --split val
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .args import at_least

ZOO = "flux-shapes"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif"}


def load_model(name_or_path: str):
    """The zoo's flux-shapes pipeline, or a diffusers pipeline folder (FLUX, SD3, Mochi, Wan)."""
    import vlmtools_zoo as zoo

    if name_or_path == ZOO:
        return zoo.load(ZOO)
    if name_or_path in zoo.MODELS:
        raise ValueError(f"{name_or_path} is a VLM; RefAM reads a diffusion transformer: {ZOO} or a FLUX / SD3 / "
                         "Mochi / Wan folder")
    if not Path(name_or_path).exists():
        raise FileNotFoundError(f"{name_or_path!r} is neither the zoo model ({ZOO}) nor a pipeline folder")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(name_or_path)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    from grounding.refam import DEFAULT_MAGNETS

    parser.add_argument("--model", default=ZOO, help=f"{ZOO} (default) or a FLUX / SD3 / Mochi / Wan pipeline folder")
    parser.add_argument("--timesteps", type=float, nargs="+", default=[0.3], help="flow-matching times, averaged")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds, averaged")
    parser.add_argument("--magnets", nargs="*", default=list(DEFAULT_MAGNETS), help="appended stop words")
    parser.add_argument("--colour", help="a colour word appended as an extra magnet")
    parser.add_argument("--sinks", choices=["suppress", "redirect", "none"], default="suppress",
                        help="global attention sinks: suppress their maps, redirect their mass, or leave them")
    parser.add_argument("--words", choices=["content", "head", "expression", "all"], default="content",
                        help="maps aggregated: content words, the content words of the head noun phrase "
                        "('the red mug on the left' -> red, mug), every expression word, or every real token")
    parser.add_argument("--padding", choices=["budget", "exclude"], default="budget",
                        help="padding keys: keep their mass in each query's text budget, or renormalise without it")
    parser.add_argument("--blocks", nargs="+", help="site names, e.g. dit.double.0 (default: measured on the zoo model; per family otherwise)")
    parser.add_argument("--heads", type=int, nargs="+", help="head indices averaged (default: all)")
    parser.add_argument("--threshold", default="otsu", help="'otsu' or a level in [0, 1)")
    parser.add_argument(
        "--resize",
        type=at_least(1),
        nargs=2,
        metavar=("W", "H"),
        help="resize images to W x H for the model; masks are mapped back",
    )


def settings_from(args: argparse.Namespace, **changes):
    from grounding.refam import RefAMSettings

    threshold = args.threshold if args.threshold == "otsu" else float(args.threshold)
    settings = RefAMSettings(
        timesteps=tuple(args.timesteps),
        seeds=tuple(args.seeds),
        magnets=tuple(args.magnets),
        colour=args.colour,
        sinks=args.sinks,
        words=args.words,
        padding=args.padding,
        blocks=tuple(args.blocks) if args.blocks else None,
        heads=tuple(args.heads) if args.heads else None,
        threshold=threshold,
    )
    return dataclasses.replace(settings, **changes)


def read_frames(path: str | Path, limit: int | None = None) -> list:
    """The RGB frames of a video file (OpenCV; GIFs by PIL) or of a folder's image files in name order."""
    from PIL import Image, ImageSequence

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) to read as frames")
        return [Image.open(f).convert("RGB") for f in files[:limit]]
    if path.suffix.lower() == ".gif":
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(Image.open(path))]
    else:
        import cv2

        capture, frames = cv2.VideoCapture(str(path)), []
        while limit is None or len(frames) < limit:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        capture.release()
    if not frames:
        raise ValueError(f"no frames could be read from {path}")
    return frames[:limit]


def is_video(path: str) -> bool:
    return Path(path).is_dir() or Path(path).suffix.lower() in VIDEO_SUFFIXES


def video_command(args: argparse.Namespace) -> int:
    """Segment every frame of a clip: one pass over the clip on a video DiT (Mochi, Wan), frame by frame on an
    image DiT; write frames/NNNN_mask.png, frames/NNNN_heatmap.png and video.json to ``--out``."""
    import json

    import numpy as np
    from PIL import Image

    from grounding.masks import overlay
    from grounding.refam import RefAM
    from grounding.refam.video import segment_video

    truth = None
    if args.image is None:  # the zoo's first held-out clip, as flux-shapes sees frames
        from vlmtools_zoo.video import video_samples

        sample = video_samples(1, split="test")[0]
        frames, args.expression, truth = sample.frames, sample.expression, sample.masks
        print(f"a held-out zoo clip (test split, clip 0, {sample.kind}): {args.expression!r}")
    else:
        frames = read_frames(args.image, args.max_frames)
    refam = RefAM(load_model(args.model), settings_from(args))
    temporal = refam.source.temporal
    path = ("clip" if temporal else "frames") if args.path == "auto" else args.path
    if path == "clip" and temporal and (len(frames) - 1) % temporal:
        whole = (len(frames) - 1) // temporal * temporal + 1
        print(f"{refam.source.family}'s VAE takes 1 + {temporal} k frames: segmenting the first {whole} of "
              f"{len(frames)}")
        frames = frames[:whole]
    model_frames = [f.resize(tuple(args.resize), Image.BILINEAR) for f in frames] if args.resize else frames
    segs = segment_video(refam, model_frames, args.expression, smoothing=args.smoothing, path=args.path)
    out = Path(args.out)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    records = []
    for index, (frame, seg) in enumerate(zip(frames, segs)):
        width, height = frame.size
        mask, heatmap, (x, y) = seg.mask, seg.heatmap, seg.point
        if args.resize:
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
            heatmap = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize((width, height), Image.BILINEAR))
            x, y = min(int(x * width / args.resize[0]), width - 1), min(int(y * height / args.resize[1]), height - 1)
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "frames" / f"{index:04d}_mask.png")
        overlay(frame, heatmap, mask).save(out / "frames" / f"{index:04d}_heatmap.png")
        records.append({"frame": index, "point": [x, y], "area": float(mask.mean()),
                        "latent_frame": seg.settings.get("latent_frame")})
    frame_keys = ("frame", "latent_frame")
    settings = {k: v for k, v in segs[0].settings.items() if k not in frame_keys}
    info = {"expression": args.expression, "settings": settings, "frames": records, "sinks": segs[0].sinks}
    (out / "video.json").write_text(json.dumps(info, indent=1))
    print(f"{len(segs)} frames ({settings['path']} path, {settings['family']}); wrote {out / 'frames'} and "
          f"{out / 'video.json'}")
    if truth is not None:
        from grounding.metrics import SegmentationScores

        scores = SegmentationScores()
        for seg, mask in zip(segs, truth):
            scores.add(seg.mask, mask, sequence="clip")
        summary = scores.summary()
        print(f"J&F with the referent's true masks: {summary['J&F']:.3f} (J {summary['J']:.3f}, F {summary['F']:.3f})")
    return 0


def segment_command(args: argparse.Namespace) -> int:
    """Segment one image, or every frame of a video file or a folder of frames (see ``video_command``);
    write mask.png, heatmap.png and segmentation.json to ``--out``."""
    from PIL import Image

    from vlmtools.masks import iou

    from grounding.refam import RefAM
    from grounding.refam.evaluate import Sample, refam_segmenter
    from vlmtools_zoo.refam import zoo_samples

    if args.video or (args.image is not None and args.expression is not None and is_video(args.image)):
        if args.video and args.image is not None:
            raise ValueError("--video segments a held-out zoo clip; give a video file or a folder of frames "
                             "instead, without --video")
        return video_command(args)
    if args.image is None:  # the zoo's first held-out expression, as flux-shapes sees its scene
        sample = zoo_samples(1, split="test")[0]
        image, args.expression, truth = sample.image, sample.expression, sample.mask
        print(f"a held-out zoo scene (test split, scene 0): {args.expression!r}")
    elif args.expression is None:
        missing = "" if Path(args.image).exists() else f"no image file {args.image!r}: "
        raise ValueError(f"{missing}give an image and its referring expression (segment photo.jpg "
                         "'the red mug on the left'), or neither for a held-out zoo scene")
    else:
        image, truth = Image.open(args.image), None
    refam = RefAM(load_model(args.model), settings_from(args))
    if args.resize:
        mask, point = refam_segmenter(refam, tuple(args.resize))(Sample(image.convert("RGB"), args.expression, None))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(Path(args.out) / "mask.png")
        print(f"point (x, y): {point}; wrote {Path(args.out) / 'mask.png'}")
    else:
        seg = refam.segment(image, args.expression)
        paths = seg.save(args.out)
        mask = seg.mask
        print(f"point (x, y): {seg.point}; mask area {mask.mean():.1%}; wrote " + ", ".join(map(str, paths.values())))
    if truth is not None:
        print(f"IoU with the referent's true mask: {iou(mask, truth):.3f}")
    return 0


def segment_bench_command(args: argparse.Namespace) -> int:
    """mIoU, oIoU and point accuracy of RefAM, its ablations and two baselines, as a Markdown table.
    Shards the expressions across processes under torchrun / accelerate launch (same numbers)."""
    from . import shard

    from grounding.metrics import SegmentationScores
    from grounding.refam import RefAM
    from grounding.refam.evaluate import ABLATIONS, baseline, refam_segmenter, refcoco_samples, score, table
    from vlmtools_zoo.refam import zoo_samples

    if args.refs:
        samples = list(refcoco_samples(args.refs, args.instances, args.images, args.split or "val", args.n))
    else:
        samples = zoo_samples(args.n, split=args.split or "test")
    pipeline = load_model(args.model)
    size = tuple(args.resize) if args.resize else None
    methods = list(ABLATIONS.items()) if args.ablations else [("full", {})]
    segmenters = [refam_segmenter(RefAM(pipeline, settings_from(args, **changes)), size) for _, changes in methods]
    n = len(samples)

    def run(batch: list[int]) -> list:  # one sample: its own scores (sums and counts) and seconds
        return [score(segmenters[batch[0] // n], [samples[batch[0] % n]])]

    records = shard.evaluate(shard.batches(range(len(methods) * n), 1), run, desc="segment-bench")
    if records is None:
        return 0
    rows, seconds = {}, {}
    for m, (name, _) in enumerate(methods):
        mine = records[m * n:(m + 1) * n]
        rows[name] = SegmentationScores()
        for scores, _ in mine:  # merged in sample order: the sums of one process exactly
            rows[name].merge(scores)
        seconds[name] = sum(s for _, s in mine) / max(n, 1)
        print(f"{name}: {rows[name].summary()}", flush=True)
    for kind in ("whole image", "centre box"):
        rows[kind], _ = score(lambda s, kind=kind: baseline(kind, s.mask.shape), samples)
    text = table(rows, seconds)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def register(subparsers) -> None:
    segment = subparsers.add_parser(
        "segment", help="referring segmentation of one image with RefAM", description=segment_command.__doc__
    )
    segment.add_argument("image", nargs="?",
                         help="an image file, a video file or a folder of frames (default: a held-out zoo scene, "
                              "with its first referring expression)")
    segment.add_argument("expression", nargs="?", help="the referring expression (needed with an image or video)")
    segment.add_argument("--out", default="refam-out",
                         help="folder for mask.png, heatmap.png, segmentation.json (video: frames/, video.json)")
    segment.add_argument("--video", action="store_true",
                         help="a held-out zoo clip and its first expression, scored with J&F against its true masks")
    segment.add_argument("--path", choices=["auto", "clip", "frames"], default="auto",
                         help="video: one pass over the clip (a video DiT's default) or frame by frame (an image "
                              "DiT's, the baseline)")
    segment.add_argument("--smoothing", type=float,
                         help="video: moving average of the normalised heatmaps over frames, in [0, 1) "
                              "(default 0.5 frame by frame, 0 on the clip path)")
    segment.add_argument("--max-frames", type=at_least(1), help="video: read at most this many frames")
    add_settings_arguments(segment)
    segment.set_defaults(run=segment_command)
    bench = subparsers.add_parser(
        "segment-bench",
        help="RefAM scores on held-out zoo expressions or RefCOCO",
        description=segment_bench_command.__doc__,
    )
    bench.add_argument("--expressions", "--n", dest="n", type=at_least(1), default=300,
                       help="number of expressions (under torchrun write --expressions: torchrun reads --n as its own)")
    bench.add_argument("--split", help="zoo: test (default) or val; RefCOCO: val, testA, ...")
    bench.add_argument("--refs", help="REFER refs(*).p file (RefCOCO/+/g); default: zoo held-out scenes")
    bench.add_argument("--instances", help="COCO instances.json of the refs")
    bench.add_argument("--images", help="folder of the COCO images")
    bench.add_argument("--no-ablations", dest="ablations", action="store_false", help="the full method only")
    bench.add_argument("--out", help="also write the table to this file")
    add_settings_arguments(bench)
    bench.set_defaults(run=segment_bench_command)
