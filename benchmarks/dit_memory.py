"""Peak memory of recording one FLUX block's image x text attention, against a plain forward.

A FLUX-shaped random transformer (FLUX.1's block width: 24 heads x 128, T5-sized text
features; one double and one single block, so that it runs on a CPU) on a 64 x 64
latent grid (4096 image tokens) with 512 text tokens, fp32. The probe records
``dit.double.0``'s image-query x text-key block with
heads averaged, the map RefAM reads: over all 512 text keys (``text``, which R
reports) and over the 8 tokens of a referring expression (``expression``).
The explicit path's chunk budget is ``vlmtools.attention.CHUNK_BYTES`` unless
``--chunk-mib`` sets it.

Measurement: torch keeps no allocator statistics on CPU, so each variant runs in a
fresh subprocess and reports its peak resident set (``ru_maxrss``) minus the
resident set just before the forward, i.e. what the forward itself needed. glibc's
mmap threshold is pinned at 128 KiB so that every larger tensor is mapped when
allocated and unmapped when freed: the resident set then follows live tensor
memory instead of malloc's cache. The median of ``--repeats`` subprocesses is kept.

Prints ``name: value`` lines; the last is ``dit_probe_peak_ratio: R`` (probe / plain).
Run: ``python benchmarks/dit_memory.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

import vlmtools
import vlmtools.attention

GRID = (64, 64)
TEXT = 512
SITE = "dit.double.0"
EXPRESSION = 8
VARIANTS = ("plain", "expression", "text")


def build():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)).eval()
    inputs = {
        "hidden_states": torch.randn(1, GRID[0] * GRID[1], 64),
        "encoder_hidden_states": torch.randn(1, TEXT, 4096),
        "pooled_projections": torch.randn(1, 768),
        "timestep": torch.tensor([0.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, *GRID, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT, 3),
        "return_dict": False,
    }
    return model, inputs


def resident_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(variant: str, chunk_mib: float | None) -> dict[str, float]:
    """Run one forward of ``variant`` in this process; what it needed on top of the loaded model."""
    if chunk_mib is not None:
        vlmtools.attention.CHUNK_BYTES = int(chunk_mib * 2**20)
    model, inputs = build()
    dit = vlmtools.wrap(model)
    joint = dit.layout(TEXT, GRID)
    keys = {"text": joint.text, "expression": vlmtools.Span(joint.text.start, joint.text.start + EXPRESSION)}
    recorders = [] if variant == "plain" else [
        vlmtools.RecordBlock([SITE], queries=joint.image.span, keys=keys[variant], mean_heads=True)]
    before = resident_kib()
    with torch.inference_mode(), dit.use(*recorders) as trace:
        model(**inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"before_mib": before / 1024, "peak_mib": peak / 1024, "forward_mib": (peak - before) / 1024,
              "chunk_mib": vlmtools.attention.CHUNK_BYTES / 2**20}
    if recorders:
        block = vlmtools.RecordBlock.collect(trace, SITE)[0]
        result["kept_mib"] = block.numel() * block.element_size() / 2**20
    return result


def in_subprocess(variant: str, chunk_mib: float | None) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    chunk = [] if chunk_mib is None else ["--chunk-mib", str(chunk_mib)]
    done = subprocess.run([sys.executable, __file__, "--variant", variant, *chunk], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, help="measure one variant in this process (internal)")
    parser.add_argument("--chunk-mib", type=float, help="explicit-path chunk budget (default: the library's)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.chunk_mib)))
        return
    runs = {v: [in_subprocess(v, args.chunk_mib) for _ in range(args.repeats)] for v in VARIANTS}
    median = {v: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for v, rs in runs.items()}
    forward = {v: median[v]["forward_mib"] for v in VARIANTS}
    print("method: ru_maxrss - resident set before the forward, fresh subprocess, MALLOC_MMAP_THRESHOLD_=128KiB")
    print(f"tokens: {GRID[0] * GRID[1]} image + {TEXT} text")
    print(f"chunk_mib: {median['plain']['chunk_mib']:g}")
    print(f"model_loaded_mib: {median['plain']['before_mib']:.1f}")
    print(f"full_attention_would_be_mib: {24 * (GRID[0] * GRID[1] + TEXT) ** 2 * 4 / 2**20:.1f}")
    print(f"plain_forward_peak_mib: {forward['plain']:.1f}")
    for v in ("expression", "text"):
        print(f"{v}_probe_forward_peak_mib: {forward[v]:.1f}")
        print(f"{v}_probe_kept_mib: {median[v]['kept_mib']:.3f}")
    print(f"expression_probe_peak_ratio: {forward['expression'] / forward['plain']:.4f}")
    print(f"dit_probe_peak_ratio: {forward['text'] / forward['plain']:.4f}")


if __name__ == "__main__":
    main()
