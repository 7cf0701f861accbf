"""Cost of the sink detector on a LLaVA-1.5-shaped random model (576 visual + 64 text tokens).

Prints ``name: value`` lines; the last is ``sinks_hidden_overhead: R``: one
``detect`` with the hidden-state criteria (positional, massive, sink_dims,
primary_cosine: recording plus evaluation) over one plain prefill, median of
interleaved rounds. Run: ``python benchmarks/sinks.py [--full]`` (``--full``:
LLaVA-1.5-7B sizes in bf16, needs a GPU).
"""

from __future__ import annotations

import argparse

from common import llava_bench, ratios, refuse_unrunnable

import vlmtools
from vlmtools.sinks import DEFAULT, HIDDEN, SinkDetector


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes, bf16, on CUDA")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    refuse_unrunnable(parser, args.full)
    model, batch, sync = llava_bench(args.full)
    vlm = vlmtools.wrap(model)

    def plain():
        model(**batch)
        sync()

    def detect(criteria):
        detector = SinkDetector(criteria)

        def run():
            detector.detect(vlm, batch)
            sync()

        return run

    base, r = ratios(plain, {"hidden": detect(HIDDEN), "all": detect(DEFAULT)}, repeats=args.repeats)
    print(f"device: {batch['input_ids'].device.type}")
    print(f"dtype: {str(batch['pixel_values'].dtype).removeprefix('torch.')}")
    print(f"tokens: {batch['input_ids'].shape[1]}")
    print(f"plain_prefill_s: {base:.4f}")
    print(f"sinks_all_criteria_ratio: {r['all']:.4f}")
    print(f"sinks_hidden_overhead: {r['hidden']:.4f}")


if __name__ == "__main__":
    main()
