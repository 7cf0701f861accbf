"""Speed of pruning for real: FastV 576 -> 64 visual tokens at K = 2 on a LLaVA-1.5-shaped random model, or any
family.

Prints ``name: value`` lines: prefill ``speedup_measured`` against ``speedup_predicted`` (the
FLOPs of the unpruned over the pruned prefill, counted by ``torch.utils.flop_counter`` on the
same forwards), per-token decode latency with the cache, KV-cache bytes, and the scoring
overhead of debiasing (end to end, and its own work timed alone as a share of the prefill).
Timings are medians of interleaved rounds in one process (``common.ratios``).
Run: ``python benchmarks/pruning.py [--family F] [--full] [--attn IMPL]`` (``--family``: any family of
``vlmtools.testing.published.FAMILIES``, default llava: the LLaVA-1.5-shaped model; another family is its published
width with three LM layers at a reduced resolution on a CPU, one prompt of its image processor and 64 text tokens,
keeping at most half its visual tokens; ``--full``: the family's published sizes, every layer, in bf16, at the
published resolution, needs a GPU; ``--attn``: the implementation the model is loaded with, plain and pruned alike:
sdpa, eager, flex_attention, flash_attention_2 (on a GPU with flash_attn), ...; the line names are the same for every
one). FastV drops at the first layer from ``--layer`` on whose previous layer has attention; a family with none
there (Qwen3.5's cut: attention in its last layer only) runs PDrop at its first attention layer from ``--layer``.
The FLOPs count attention where torch's counter knows the kernel (SDPA and eager's matmuls, not flash_attn's own
operators).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmtools
from vlmtools.attention import SERVED
from vlmtools.kv_cache import kv_bytes

HERE = sys.path.pop(0)  # this script shares the package's name: find the package first
from pruning import Debias, FastV, PDrop, Trend, debiased

sys.path.insert(0, HERE)
from common import family_bench, llava_prompt, llava_shaped, ratios, refuse_unrunnable, timed



def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="llava", help="the family (default llava); see vlmtools.testing.published")
    parser.add_argument("--full", action="store_true", help="the family's published sizes, every layer, bf16, on CUDA")
    parser.add_argument("--attn", choices=SERVED, default="sdpa",
                        help="attention implementation the model is loaded with (default sdpa)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared CPU, per-op waits for a second thread are fixed "
                             "costs that no FLOPs count sees)")
    args = parser.parse_args()
    refuse_unrunnable(parser, args.full, args.attn)
    device = "cuda" if args.full else "cpu"
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.full else torch.float32
    torch.manual_seed(0)
    if args.family == "llava" and not args.full:
        with torch.device(device):
            # the LM's matmuls dominate, as in LLaVA-1.5-7B (a tiny tower, a 7B-proportioned LM)
            model = llava_shaped(False, text_hidden=1024, text_intermediate=2752, vision_hidden=64)
        batch, described = llava_prompt(device, dtype), "LLaVA-1.5 shapes, CPU-sized"
    else:
        model, batch, _, described = family_bench(args.family, args.full)
    model.set_attn_implementation(args.attn)
    model.requires_grad_(False)  # torch's FLOP counter tracks modules by grad hooks, which inference tensors lack
    vlm = vlmtools.wrap(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    visual = len(vlm.layout(batch).samples[0].visual_positions())
    keep = min(args.keep, visual // 2)
    host, layer, host_name = _host(vlm, args.layer)
    trend = Trend(fit="exponential", coef=[1.2, -7.0], key="benchmark")
    hosts = {"plain": None, "fastv": lambda: host(keep, layer),
             "fastv_debias": lambda: host(keep, layer, debias=Debias(trend=trend))}

    def under(name, fn):
        def run():
            if hosts[name] is None:
                out = fn()
            else:
                with vlm.use(hosts[name]()):
                    out = fn()
            sync()
            return out
        return run

    def prefill():
        return model(**batch, logits_to_keep=1)

    def generate(tokens):
        return lambda: model.generate(**batch, max_new_tokens=tokens, do_sample=False, return_dict_in_generate=True)

    with torch.inference_mode():
        flops = {}
        for name in ("plain", "fastv"):
            with FlopCounterMode(display=False) as counter:
                under(name, prefill)()
            flops[name] = counter.get_total_flops()
        cache_bytes = {name: kv_bytes(_cache(under(name, generate(1))())) for name in ("plain", "fastv")}
        debias_s = _debias_seconds(vlm, batch, hosts["fastv_debias"](), args.repeats)

    base, r = ratios(under("plain", prefill), {"fastv": under("fastv", prefill),
                                               "fastv_debias": under("fastv_debias", prefill)}, repeats=args.repeats)
    decode = _per_token({name: (under(name, generate(1)), under(name, generate(1 + args.new_tokens)))
                         for name in ("plain", "fastv")}, args.new_tokens, args.repeats)
    print(f"device: {device} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus, "
          f"{torch.get_num_threads()} torch threads)")
    print(f"dtype: {str(dtype).removeprefix('torch.')}")
    print(f"attn: {args.attn}")
    print(f"model: {args.family}: {described}, random weights, {vlm.num_layers} layers, "
          f"hidden {model.config.get_text_config().hidden_size}")
    print(f"tokens: {visual} visual + {batch['input_ids'].shape[1] - visual} text -> {keep} visual from layer {layer}"
          + ("" if host_name == "fastv" else " (PDrop: no attention before it)"))
    print(f"plain_prefill_s: {base:.4f}")
    print(f"prefill_flops_plain: {flops['plain']:.3e}")
    print(f"prefill_flops_pruned: {flops['fastv']:.3e}")
    print(f"decode_s_per_token_plain: {decode['plain']:.5f}")
    print(f"decode_s_per_token_pruned: {decode['fastv']:.5f}")
    print(f"kv_cache_bytes_plain: {cache_bytes['plain']}")
    print(f"kv_cache_bytes_pruned: {cache_bytes['fastv']}")
    print(f"debias_overhead_timed: {(r['fastv_debias'] / r['fastv'] - 1):.4f}")
    print(f"debias_share_of_prefill: {debias_s / base:.4f}")
    print(f"speedup_predicted: {flops['plain'] / flops['fastv']:.3f}")
    print(f"speedup_measured: {1 / r['fastv']:.3f}")


def _host(vlm, first: int):
    """FastV at the first layer from ``first`` on whose previous layer has attention, or PDrop at the first
    attention layer from ``first`` on (the last one if none is)."""
    attention = vlm.attention_layers
    fastv = next((k for k in range(max(first, 1), vlm.num_layers) if k - 1 in attention), None)
    if fastv is not None:
        return (lambda keep, layer, **kw: FastV(keep=keep, layer=layer, **kw)), fastv, "fastv"
    layer = next((k for k in attention if k >= first), attention[-1])
    return (lambda keep, layer, **kw: PDrop(keep=keep, layers=(layer,), **kw)), layer, "pdrop"


def _debias_seconds(vlm, batch, host, repeats: int) -> float:
    """Seconds of the work debiasing adds to one prefill (sink check, padding, trend), timed alone:
    the end-to-end difference is below the noise of a shared CPU."""
    with torch.inference_mode(), vlm.use(vlmtools.RecordHidden([host.layers[0]]), host) as trace:
        vlm.model(**batch, logits_to_keep=1)
    hidden, run = trace[f"text.{host.layers[0]}.resid_pre"][0], trace[host]
    layout = vlm.layout(batch)
    kept = torch.arange(hidden.shape[1], device=hidden.device)[None]
    visual = layout.samples[0].visual_positions().to(hidden.device)
    scores = torch.rand(len(visual), device=hidden.device)

    def work():
        padded, sinks = run._suppressed(0, hidden, kept, layout)[0]
        debiased(scores, torch.arange(len(visual), device=hidden.device), len(visual), run.trends[0],
                 torch.isin(visual, torch.cat([padded, sinks])))

    with torch.inference_mode():
        work()
        return statistics.median(timed(work) for _ in range(repeats))


def _cache(out):
    """A ``generate`` output's cache (``cache``; ``past_key_values`` before transformers 5.25)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _per_token(runs: dict, tokens: int, repeats: int) -> dict[str, float]:
    """Per name, the median over interleaved rounds of (long generate - short generate) / extra tokens."""
    seconds = {name: [] for name in runs}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for name, (short, long) in runs.items():
                elapsed = (timed(long) - timed(short)) / tokens
                if round_:  # the first round warms up
                    seconds[name].append(elapsed)
    return {name: statistics.median(values) for name, values in seconds.items()}


if __name__ == "__main__":
    main()
