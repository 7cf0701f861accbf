"""Pruning quality on the zoo's llava-shapes: ``vlmtools prune-bench`` (``vlmtools_app/prune_bench.py``), plus ``--snapshot``.

``--snapshot`` evaluates a copy of the shipped weights (a training run may rewrite them meanwhile);
every other argument goes to ``vlmtools prune-bench`` unchanged (``vlmtools prune-bench --help``).
Run: ``python benchmarks/pruning_quality.py [--snapshot] [--n 200] [--hosts fastv,visionzip]``.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

# this folder holds pruning.py, which shadows the package while the folder is first on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from vlmtools_app.cli import main


def snapshot() -> str:
    """A llava-shapes folder assembled from a copy of the shipped weights (named llava-shapes: the calibration key)."""
    from vlmtools_zoo import llava

    copy = Path(tempfile.mkdtemp(prefix="llava-shapes-snapshot-"))
    shutil.copy(llava.WEIGHTS / "model.safetensors", copy / "model.safetensors")
    print(f"weights: snapshot of {llava.WEIGHTS} taken {time.strftime('%H:%M:%S')}", file=sys.stderr)
    return str(llava.assemble(copy / "llava-shapes", weights=copy))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--snapshot" in argv:
        argv = [a for a in argv if a != "--snapshot"] + ["--model", snapshot()]
    sys.exit(main(["prune-bench", *argv]))
