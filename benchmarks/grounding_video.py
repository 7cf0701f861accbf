"""J&F of RefAM on the zoo's shapes clips, with the zoo's image DiT frame by frame.

No video model is trained: every frame of a held-out clip (``vlmtools_zoo.video``, ``test``
split, letterboxed to 64 x 64) is segmented by flux-shapes alone (``segment_video``,
``path="frames"``), and each mask is scored against the referent's visible pixels in that
frame (J: IoU, F: boundary F; J&F per sequence, then averaged). Rows: every expression, then
by kind (``motion``: the look names several shapes and the motion one, ``persistence``: the
referent goes behind another shape, ``appearance``: unique by look) and the expressions whose
referent is hidden by half or more in some frame (``occluded``). An image model cannot see
motion: ``motion`` is where it should fail. The one-pass video path is checked for mechanics
only, on random Mochi and Wan weights (tests/test_refam_families.py).

Run: ``python benchmarks/grounding_video.py --n 40`` (``--smoothing 0.5`` for the moving average).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# this folder holds grounding.py, which shadows the grounding package: drop it from the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="referring expressions (in clip order)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--smoothing", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import vlmtools_zoo as zoo
    from grounding import RefAM
    from vlmtools_zoo.video import video_samples, video_scores

    refam = RefAM(zoo.load("flux-shapes"))
    samples = video_samples(args.n, args.split)
    start = time.perf_counter()
    scores = video_scores(refam, samples, smoothing=args.smoothing, path="frames")
    seconds = time.perf_counter() - start
    clips = len({s.name.rsplit("/", 1)[0] for s in samples})
    print(f"model: flux-shapes (shipped weights), frame by frame, smoothing {args.smoothing}; {args.n} expressions "
          f"of {clips} {args.split} clips of {len(samples[0].frames)} frames; {seconds / args.n:.1f} s per expression "
          f"(load average {os.getloadavg()[0]:.1f})")
    print("| expressions | n | J | F | J&F |")
    print("|---|---|---|---|---|")
    for key, value in scores.items():
        s = value.summary()
        print(f"| {key} | {len(value.sequences)} | {s['J']:.3f} | {s['F']:.3f} | {s['J&F']:.3f} |")


if __name__ == "__main__":
    main()
