"""POPE and CHAIR on the zoo's llava-shapes: ``vlmtools hallucination-bench`` (``vlmtools_app/hallucination_bench.py``).

Every argument goes to ``vlmtools hallucination-bench`` unchanged (``vlmtools hallucination-bench --help``).
Run: ``python benchmarks/hallucination_quality.py [--scenes 40] [--captions 60]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

# this folder holds hallucination.py, which shadows the package while the folder is first on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from vlmtools_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["hallucination-bench", *sys.argv[1:]]))
