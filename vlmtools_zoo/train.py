"""``python -m vlmtools_zoo.train NAME``: reproduce a zoo model from scratch.

Every stage checkpoints under ``<cache>/train/NAME/`` and resumes from there;
the shipped weights are exported to ``vlmtools_zoo/weights/NAME/`` (flux-shapes: or ``--out``).
Training runs on the first GPU where there is one (``--device``), in bf16 autocast there.
The defaults are the shipped weights' step counts, with the warm restarts of their
learning-rate schedules where a stage was resumed with a longer one (llava-shapes' tower,
reread, reprobe, count-tower, recount, tally and census stages, flux-shapes:
``train_utils.schedule_end``). On 2 CPU cores stages 1-3 of a VLM take 1.5-2 hours, its refine
stage about 50 minutes, its bind stage about 90 and its probe stage about 60 minutes more
(llava-shapes' reread stage about 75, its reprobe stage about 260, its widen stage about 65,
its recount stage about 60 for the tower and 140 for the LM, its tally stage about 35 for the
tower and 70 for the LM, its census stage about 26 for the tower and 52 for the LM), past
the 2 hours, as ZOO-NOTES' priorities allow for accuracy.
flux-shapes' 6000 steps take 65-85 minutes (0.64 s/step in bf16 on a CPU that computes it
natively, 0.85 in fp32; measured times: docs/zoo.md). ``--dit HEADS DOUBLE SINGLE`` trains a
larger DiT than the shipped one from scratch, to ``--out`` (what its grounding needs a GPU for).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import MODELS

# the VLM trainers' stages 4-12, each with a flag of its steps: the models it applies to, what it is
VLMS = ("llava-shapes", "qwen2vl-shapes")
LATER_STAGES = {"refine": (VLMS, "stage 4"),
                "bind": (VLMS, "stage 5"),
                "probe": (VLMS, "stage 6"),
                "reread": (("llava-shapes",), "stage 7 through the LM"),
                "reprobe": (("llava-shapes",), "stage 8"),
                "widen": (("llava-shapes",), "stage 9"),
                "recount": (("llava-shapes",), "stage 10"),
                "tally": (("llava-shapes",), "stage 11"),
                "census": (("llava-shapes",), "stage 12")}
FLAGS = [f"--{stage}" for stage in LATER_STAGES]


def listing(flags: list[str], last: str) -> str:
    """'--a, --b and --c' (``last``: the word before the last flag); '--a' alone."""
    return f"{', '.join(flags[:-1])} {last} {flags[-1]}" if len(flags) > 1 else flags[0]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vlmtools_zoo.train")
    ap.add_argument("name", choices=MODELS)
    ap.add_argument("--steps", type=int, nargs="*",
                    help="llava-shapes, qwen2vl-shapes: TOWER WORDS ALIGN [ALIGN_BATCH]; flux-shapes: STEPS [BATCH]")
    for stage, (models, what) in LATER_STAGES.items():
        ap.add_argument(f"--{stage}", type=int, metavar="STEPS",
                        help=f"{', '.join(models)}: steps of {what} (default: what the shipped weights had)")
    ap.add_argument("--from-shipped", action="store_true",
                    help="llava-shapes, qwen2vl-shapes: skip stages 1-3 and run the stages given steps "
                         f"({', '.join(FLAGS)}) from the shipped weights, e.g. to train "
                         "them further on a GPU; flux-shapes: go on from the shipped DiT in a new round to --steps")
    ap.add_argument("--seed", type=int, default=0,
                    help="flux-shapes: the DiT's initial weights and noise (0: the shipped run's); the data stay")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="flux-shapes: export the DiT to DIR/transformer instead of the package's shipped weights")
    ap.add_argument("--dit", type=int, nargs=3, metavar=("HEADS", "DOUBLE", "SINGLE"),
                    help="flux-shapes: train a DiT of HEADS heads of 32 dims, DOUBLE double-stream and SINGLE "
                         "single-stream blocks from scratch, e.g. on a GPU (default: the shipped 4 4 2; "
                         "another size needs --out)")
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU where there is one, else the CPU)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.name == "llava-shapes":
        from .llava_train import main as run
    elif args.name == "qwen2vl-shapes":
        from .qwen2vl_train import main as run
    else:
        from .flux_train import main as run
    later = {k: v for k in LATER_STAGES if (v := getattr(args, k)) is not None}
    misplaced = [k for k in later if args.name not in LATER_STAGES[k][0]]
    if misplaced:
        models = LATER_STAGES[misplaced[0]][0]
        flags = [f"--{k}" for k, (applies_to, _) in LATER_STAGES.items() if applies_to == models]
        ap.error(f"{listing(flags, 'and')} apply to {listing(list(models), 'and')}")
    if args.name == "flux-shapes":
        from .flux import DIT_SIZE
        from .flux_train import STEPS, check_size

        if args.from_shipped and (args.steps or [STEPS])[0] <= STEPS:
            ap.error(f"--from-shipped goes on from the shipped DiT's {STEPS} steps: give --steps above that")
        dit_size = tuple(args.dit or DIT_SIZE)
        try:
            check_size(dit_size, args.from_shipped, args.out)
        except ValueError as refusal:
            ap.error(str(refusal))
        run(*(args.steps or []), seed=args.seed, device=args.device, out=args.out, from_shipped=args.from_shipped,
            dit_size=dit_size)
        return
    if args.seed or args.out or args.dit:
        ap.error("--seed, --out and --dit apply to flux-shapes")
    if args.from_shipped and not later:
        ap.error(f"--from-shipped needs {listing(FLAGS, 'and/or')} STEPS")
    run(*(args.steps or []), later=later, from_shipped=args.from_shipped, device=args.device)


if __name__ == "__main__":
    main()
