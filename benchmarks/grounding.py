"""RefAM speed on the zoo DiT and peak memory of its probed forward on a FLUX-shaped model.

Speed: seconds per image of ``RefAM.segment`` (encode, prompt, probe, mask) on CPU
with the zoo's flux-shapes pipeline (its shipped weights when present, else the same
architecture with random weights: the cost is the same), default settings, median
over ``--images`` held-out expressions after one warm-up.

Memory: ``benchmarks/dit_memory.py``'s FLUX-shaped random transformer (64 x 64
latent grid, 512 text tokens) and its measurement (``ru_maxrss`` minus the resident
set before the forward, fresh subprocess, mmap threshold pinned), here for RefAM's
probe of ``dit.double.1`` (the image x text block, head mean, and the global-sink
columns over all queries; the forward stops after that block) against the plain
forward of the whole transformer, and the same two recorders through a whole forward
(what the probe costs without the early stop).

Prints ``name: value`` lines. Run: ``python benchmarks/grounding.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import write_section
from dit_memory import GRID, SITE, TEXT, build, resident_kib

# this script shares the grounding package's name: drop its folder so that `import grounding` finds the package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

EXPRESSION = "the large red circle on the left"
VARIANTS = ("plain", "refam", "recorders")


def refam_probe_inputs(model, inputs):
    """RefAM on dit_memory's inputs: its text features stand for the expression, magnets and padding."""
    from grounding.refam import EncodedPrompt, RefAM, RefAMSettings, build_prompt
    from grounding.refam.prompt import Segment
    from vlmtools.text import content_words

    prompt = build_prompt(EXPRESSION)
    offsets, start = [], 0
    for word in prompt.split():
        start = prompt.index(word, start)
        offsets.append((start, start + len(word)))
        start += len(word)
    real = [1] * len(offsets) + [0] * (TEXT - len(offsets))
    segment = Segment(offsets + [(0, 0)] * (TEXT - len(offsets)), real)
    encoded = EncodedPrompt(inputs["encoder_hidden_states"], inputs["pooled_projections"], [segment])
    refam = RefAM(model, RefAMSettings(blocks=(SITE,)))
    refam.prompt(EXPRESSION) and content_words(EXPRESSION)  # load the tagger before memory is measured
    return refam, (inputs["hidden_states"], GRID, encoded, EXPRESSION)


def measure(variant: str) -> dict[str, float]:
    """``plain``: the transformer alone; ``refam``: RefAM.segment_encoded (stops after the block);
    ``recorders``: RefAM's two recorders on that block through a whole forward."""
    from grounding.refam import RecordImageText
    from vlmtools.sinks import RecordJointColumns

    model, inputs = build()
    refam, args = refam_probe_inputs(model, inputs)
    recorders = [RecordImageText([SITE]), RecordJointColumns([SITE], refam.dit.layout(TEXT, GRID).image.positions)]
    before = resident_kib()
    with torch.inference_mode():
        if variant == "refam":
            refam.segment_encoded(*args)
        elif variant == "recorders":
            with refam.dit.use(*recorders):
                model(**inputs)
        else:
            model(**inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_mib": before / 1024, "forward_mib": (peak - before) / 1024}


def in_subprocess(variant: str) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(
        [sys.executable, __file__, "--variant", variant], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def zoo_speed(images: int) -> tuple[float, str]:
    from grounding.refam import RefAM
    from vlmtools_zoo.refam import zoo_samples
    from vlmtools_zoo import flux

    shipped = (flux.WEIGHTS / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    pipeline = flux.load() if shipped else flux.build_pipeline()
    refam = RefAM(pipeline)
    samples = zoo_samples(images + 1)
    refam.segment(samples[0].image, samples[0].expression)  # warm-up (spaCy, first-call allocations)
    times = []
    for sample in samples[1:]:
        start = time.perf_counter()
        refam.segment(sample.image, sample.expression)
        times.append(time.perf_counter() - start)
    return statistics.median(times), "shipped weights" if shipped else "random weights, same architecture"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, help="measure one variant here (internal)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the lines to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant)))
        return
    torch.set_num_threads(2)
    lines = []
    if not args.skip_speed:
        seconds, which = zoo_speed(args.images)
        lines += [
            (
                f"zoo_model: flux-shapes ({which}), 64x64 images, {args.images} images, CPU threads 2, "
                f"load average {os.getloadavg()[0]:.1f}"
            ),
            f"zoo_seconds_per_image: {seconds:.3f}",
        ]
        print("\n".join(lines[-2:]), flush=True)
    runs = {v: [in_subprocess(v) for _ in range(args.repeats)] for v in VARIANTS}
    forward = {v: statistics.median(r["forward_mib"] for r in rs) for v, rs in runs.items()}
    lines += [
        f"memory_model: dit_memory.build(), {GRID[0] * GRID[1]} image + {TEXT} text tokens, probe {SITE}",
        f"plain_forward_peak_mib: {forward['plain']:.1f}",
        f"refam_probe_peak_mib: {forward['refam']:.1f}",
        f"recorders_whole_forward_peak_mib: {forward['recorders']:.1f}",
        f"recorders_whole_forward_peak_ratio: {forward['recorders'] / forward['plain']:.4f}",
        f"refam_probe_peak_ratio: {forward['refam'] / forward['plain']:.4f}",
    ]
    print("\n".join(lines[-6:]))
    if args.write:
        command = "python benchmarks/grounding.py" + " --skip-speed" * args.skip_speed + " --write"
        body = [
            "## Grounding speed and memory",
            "",
            f"Command: `{command}` (what each line means: the script's docstring).",
            "",
            "```",
            *lines,
            "```",
        ]
        write_section(Path(__file__).parent / "RESULTS.md", "Grounding speed and memory", "\n".join(body))


if __name__ == "__main__":
    main()
