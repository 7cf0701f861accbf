"""RefAM quality on the zoo DiT: held-out referring expressions, full method, ablations, baselines.

Samples are the first ``--n`` referring expressions of the world's ``test`` scenes
(disjoint seeds from training), letterboxed to 64 x 64 as flux-shapes sees them;
targets are the referents' exact masks. Rows: the full method (default settings),
each ablation of ``grounding.refam.evaluate.ABLATIONS``, a few alternative
settings (``--extra``), and the whole-image and centre-box baselines.
``--sweep-blocks`` / ``--sweep-heads`` score each block / head alone on ``val`` scenes (how the
defaults are chosen: on ``val``, never on the ``test`` expressions of the table).
``--write`` puts the table under the "Grounding" heading of benchmarks/RESULTS.md.

Run: ``python benchmarks/grounding_quality.py --n 300 --extra --sweep-blocks --sweep-heads --write``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import write_section

# benchmarks/grounding.py shares the grounding package's name: drop this folder from the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from grounding.refam import RefAM, RefAMSettings
from grounding.refam.evaluate import ABLATIONS, baseline, score, table
from vlmtools_zoo.refam import zoo_samples

RESULTS = Path(__file__).parent / "RESULTS.md"
EXTRA = {
    "sinks: redirect": {"sinks": "redirect"},
    "padding: excluded from the budget": {"padding": "exclude"},
    "t = 0.5": {"timesteps": (0.5,)},
    "t = 0.3 and 0.5, seeds 0 and 1": {"timesteps": (0.3, 0.5), "seeds": (0, 1)},
}


def run(pipeline, samples, settings: RefAMSettings, sinks_seen: list | None = None):
    refam = RefAM(pipeline, settings)
    refam.segment(samples[0].image, samples[0].expression)  # warm-up (tagger load, first-call allocations): untimed

    def segment(sample):
        seg = refam.segment(sample.image, sample.expression)
        if sinks_seen is not None:
            sinks_seen.append(len(seg.sinks))
        return seg.mask, seg.point

    return score(segment, samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--extra", action="store_true", help="also score alternative settings")
    parser.add_argument("--sweep-blocks", action="store_true", help="score each block alone")
    parser.add_argument("--sweep-heads", action="store_true", help="score each head alone")
    parser.add_argument("--sweep-n", type=int, default=None, help="expressions for the sweep (default: --n)")
    parser.add_argument("--write", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import vlmtools_zoo as zoo
    from vlmtools_zoo import flux, flux_train

    pipeline = zoo.load("flux-shapes")
    weights = flux.WEIGHTS / "transformer" / "diffusion_pytorch_model.safetensors"
    trained = (f"weights of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(weights.stat().st_mtime))}, "
               f"training step {flux_train.STEPS}")
    samples = zoo_samples(args.n)
    default = RefAMSettings()
    rows, seconds, sinks_seen = {}, {}, []
    variants = {**ABLATIONS, **(EXTRA if args.extra else {})}
    for name, changes in variants.items():
        rows[name], seconds[name] = run(
            pipeline, samples, dataclasses.replace(default, **changes), sinks_seen if name == "full" else None
        )
        print(name, rows[name].summary(), flush=True)
    for kind in ("whole image", "centre box"):
        rows[kind], _ = score(lambda s, kind=kind: baseline(kind, s.mask.shape), samples)
    refam = RefAM(pipeline)
    blocks = refam.blocks
    text = [
        "## Grounding",
        "",
        (
            f"RefAM on the zoo DiT flux-shapes ({trained}), {args.n} held-out referring expressions (world `test` scenes, "
            "64 x 64 letterboxed), CPU. Full method: default `RefAMSettings()` (blocks "
            f"{', '.join(blocks)}, all heads, t = 0.3, seed 0, magnets `. a with`, global sinks suppressed, "
            "content words, Otsu + largest component). Ablations change one setting each "
            "(`grounding.refam.evaluate.ABLATIONS`; `all words` also reads magnets and special tokens)."
        ),
        "",
        table(rows, seconds),
        "",
        f"s/image: wall time on this shared 2-core CPU (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        (
            "Global sinks found per image (full method, over the blocks read): mean "
            f"{statistics.mean(sinks_seen):.2f}, max {max(sinks_seen)}."
        ),
    ]
    few = zoo_samples(args.sweep_n or args.n, split="val")  # defaults are chosen on val, reported on test
    sweeps = {}
    if args.sweep_blocks:
        sweeps["Each block alone"] = {f"{site.name} alone": {"blocks": (site.name,)} for site in refam.dit.sites}
    if args.sweep_heads:
        heads = refam.dit.site(refam.blocks[0]).heads
        sweeps["Each head alone (default blocks)"] = {f"head {h} alone": {"heads": (h,)} for h in range(heads)}
    for title, variants in sweeps.items():
        rows = {}
        for name, changes in variants.items():
            rows[name], _ = run(pipeline, few, dataclasses.replace(default, **changes))
            print(name, rows[name].summary(), flush=True)
        text += ["", f"{title} (full method otherwise), {len(few)} `val` expressions:", "", table(rows)]
    flags = [
        f"--n {args.n}",
        "--extra" * args.extra,
        "--sweep-blocks" * args.sweep_blocks,
        "--sweep-heads" * args.sweep_heads,
        f"--sweep-n {len(few)}" * bool(sweeps),
        "--write" * args.write,
    ]
    text += ["", f"Command: `python benchmarks/grounding_quality.py {' '.join(f for f in flags if f)}`"]
    print("\n".join(text))
    if args.write:
        write_section(RESULTS, "Grounding", "\n".join(text))


if __name__ == "__main__":
    main()
