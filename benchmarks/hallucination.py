"""Latency of VAR, GIFT and PAINT under ``generate`` relative to greedy decoding.

A LLaVA-1.5-shaped random model (576 visual tokens, text hidden 512, 8 layers) decodes
16 tokens for a batch of two left-padded prompts; rounds interleave greedy and the
methods (benchmarks/common.py ``ratios``: medians of per-round ratios). Prints
``name: value`` lines, ending with ``var_latency_ratio``, ``gift_latency_ratio`` and
``paint_latency_ratio`` (wall time per generated token / greedy's); ``*_cpu_ratio`` is
the same in process CPU time, which background jobs disturb far less; ``--decode``
adds the ratio of the decoding steps alone (prefill subtracted), since on a CPU the
576-token prefill dominates a 16-token generate.
Run: ``python benchmarks/hallucination.py [--full]`` (``--full``: LLaVA-1.5-7B sizes
in bf16 with the published GIFT preset, needs a GPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import vlmtools
from common import IMAGE_TOKEN, llava_shaped, ratios, refuse_unrunnable

# this file's name shadows the package while its folder is first on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from hallucination import GIFT, PAINT, VAR

def inputs(device, dtype):
    """Two prompts (system text, 576 image tokens, a question), the second 8 tokens shorter, left-padded."""
    ids = torch.randint(1, 31000, (2, 620))
    ids[:, 5:5 + 576] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    ids[1] = torch.cat([torch.zeros(8, dtype=ids.dtype), ids[1, :-8]])
    mask[1, :8] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": torch.randn(2, 3, 336, 336, dtype=dtype, device=device)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes, bf16, on CUDA")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--decode", action="store_true", help="also time prefill alone: the decoding steps' ratio")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine OpenMP waits between small ops are noise)")
    args = parser.parse_args()
    refuse_unrunnable(parser, args.full)
    torch.set_num_threads(args.threads)
    device = "cuda" if args.full else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    torch.manual_seed(0)
    model = llava_shaped(args.full, vision_layers=3).to(device, dtype)
    batch = inputs(device, dtype)
    vlm = vlmtools.wrap(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gift = GIFT.preset("llava-1.5-7b") if args.full else GIFT(alpha=5.0, saliency_layer=2, layers=range(3, 6))
    # random weights grow no sink dimensions: plant two so that VAR really redistributes
    var = VAR() if args.full else VAR(dims=(0, 1), tau=3.0)
    methods = {"var": var, "gift": gift, "paint": PAINT()}
    settings = {}  # method -> what it ran with in its latest block

    def run(tokens, method=None):
        def go():
            if method is None:
                model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            else:
                with vlm.use(method) as trace:
                    model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                settings[method] = trace[method].settings
            sync()
        return go

    print(f"device: {device}")
    print(f"dtype: {str(dtype).removeprefix('torch.')}")
    print(f"batch: {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens (left-padded)")
    print(f"generated_tokens: {args.tokens}")
    print(f"threads: {torch.get_num_threads()}", flush=True)
    generate_all = {name: run(args.tokens, m) for name, m in methods.items()}
    base_cpu, cpu = ratios(run(args.tokens), generate_all, repeats=args.repeats, clock=time.process_time)
    print(f"greedy_cpu_seconds_per_token: {base_cpu / args.tokens:.4f}")
    for name, method in methods.items():
        print(f"{name}_settings: {settings[method]}")
        print(f"{name}_cpu_ratio: {cpu[name]:.3f}", flush=True)
    if args.decode:
        prefill, first = ratios(run(1), {name: run(1, m) for name, m in methods.items()}, repeats=args.repeats,
                                clock=time.process_time)
        print(f"greedy_prefill_cpu_seconds: {prefill:.4f}")
        for name in methods:
            decode = (cpu[name] * base_cpu - first[name] * prefill) / (base_cpu - prefill)
            print(f"{name}_decode_cpu_ratio: {decode:.3f}", flush=True)
    base, wall = ratios(run(args.tokens), generate_all, repeats=args.repeats)
    print(f"greedy_seconds_per_token: {base / args.tokens:.4f}")
    for name in methods:
        print(f"{name}_latency_ratio: {wall[name]:.3f}")


if __name__ == "__main__":
    main()
