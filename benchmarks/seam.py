"""Cost of the seam on a LLaVA-1.5-shaped random model (576 visual + 64 text tokens), or any family.

Prints ``name: value`` lines; the last is ``seam_overhead: R`` (nothing planned / plain).
Run: ``python benchmarks/seam.py [--family F] [--full] [--attn IMPL]`` (``--family``: any family of
``vlmtools.testing.published.FAMILIES``, default llava: the LLaVA-1.5-shaped model; another family is its
published width with three LM layers at a reduced resolution on a CPU; ``--full``: the family's published sizes,
every layer, in bf16, at the published resolution, needs a GPU; ``--attn``: the implementation the model is loaded
with, which plain and every block run: sdpa, eager, flex_attention, flash_attention_2 (on a GPU with flash_attn),
...). The line names are the same for every one; the recorded layer is the third (or the nearest one with
attention: Qwen3.5).
"""
from __future__ import annotations

import argparse
import time

import torch

import vlmtools
from common import family_bench, ratios, refuse_unrunnable
from vlmtools.attention import SERVED

def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="llava", help="the family (default llava); see vlmtools.testing.published")
    parser.add_argument("--full", action="store_true", help="the family's published sizes, every layer, bf16, on CUDA")
    parser.add_argument("--attn", choices=SERVED, default="sdpa",
                        help="attention implementation the model is loaded with (default sdpa)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: least noise when shared)")
    parser.add_argument("--clock", choices=["process", "wall"], default="process",
                        help="process CPU time (default, robust to other jobs) or wall clock")
    args = parser.parse_args()
    refuse_unrunnable(parser, args.full, args.attn)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" and not args.full else time.perf_counter
    model, batch, sync, described = family_bench(args.family, args.full)
    model.set_attn_implementation(args.attn)
    vlm = vlmtools.wrap(model)
    layer = next((i for i in vlm.attention_layers if i >= 2), vlm.attention_layers[-1])

    def plain():
        model(**batch)
        sync()

    def under(*interventions):
        def run():
            with vlm.use(*interventions):
                model(**batch)
            sync()
        return run

    def eager_everywhere():
        model.set_attn_implementation({"text_config": "eager"})
        try:
            model(**batch)
            sync()
        finally:
            model.set_attn_implementation({"text_config": args.attn})

    base, r = ratios(plain, {
        "nothing_planned": under(),
        "last_row_one_layer": under(vlmtools.RecordRows([f"text.{layer}"], "last")),
        "column_mass_one_layer": under(vlmtools.RecordColumnMass([f"text.{layer}"])),
        "eager_every_layer": eager_everywhere,
    }, repeats=args.repeats, clock=clock)
    print(f"device: {batch['input_ids'].device.type} ({args.family}: {described}, random weights, "
          f"{vlm.num_layers} layers, hidden {model.config.get_text_config().hidden_size})")
    print(f"attn: {args.attn}")
    print(f"clock: {'process CPU time' if clock is time.process_time else 'wall'}, threads: {args.threads}")
    print(f"dtype: {str(next(model.parameters()).dtype).removeprefix('torch.')}")
    print(f"tokens: {batch['input_ids'].shape[1]}")
    print(f"plain_prefill_s: {base:.4f}")
    print(f"last_row_overhead: {r['last_row_one_layer']:.4f}")
    print(f"column_mass_overhead: {r['column_mass_one_layer']:.4f}")
    print(f"eager_every_layer_ratio: {r['eager_every_layer']:.4f}")
    print(f"seam_overhead: {r['nothing_planned']:.4f}")


if __name__ == "__main__":
    main()
