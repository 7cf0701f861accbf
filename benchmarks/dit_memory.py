"""Peak memory of the DiT probe against a plain forward, per family, at the published block width.

``--family flux`` (the default, as before): a FLUX-shaped random transformer (FLUX.1's block
width: 24 heads x 128, T5-sized text features; one double and one single block) on a 64 x 64
latent grid (4096 image tokens) with 512 text tokens, fp32. The probe records ``dit.double.0``'s
image-query x text-key block with heads averaged, the map RefAM reads: over all 512 text keys
(``text``, which R reports) and over the 8 tokens of a referring expression (``expression``).

``--family NAME`` (flux, flux2, qwen_image, sd3, mochi, wan; ``all`` runs each): one or two
blocks of that family at a published width, random weights, fp32, latents of 512 x 512 px (a
few latent frames for the video DiTs) and the family's text length. Variants: ``plain`` (the
transformer alone) and ``probe``: RefAM's recorders on its first block read through a whole
forward: the image x text block (``RecordImageText``) and the global-sink columns over every
query (``RecordJointColumns``; on Wan the cross-attention and the same block's
self-attention). ``probe_peak_ratio`` = probe / plain, target <= 1.1. Every unplanned module keeps
the processor's own kernel; the planned one recomputes its rows in chunks of at most
``vlmtools.attention.CHUNK_BYTES`` (``--chunk-mib``): no ``L x L`` tensor is held.

======== ============================ ============================ ====================================
family   width (heads x dim), blocks  CPU sizes (default)           ``--full`` sizes (GPU)
======== ============================ ============================ ====================================
flux     FLUX.1 24 x 128, 1 + 1       64 x 64 grid, 512 text        same
flux2    Klein 4B 24 x 128, 1 + 1     512 px: 32 x 32, 512 text     [dev] 48 x 128, 1024 px: 64 x 64
qwen     Qwen-Image 24 x 128, 1       512 px: 32 x 32, 128 text     1024 px: 64 x 64
sd3      SD3.5 Large 38 x 64, 1       512 px: 32 x 32, 333 text     1024 px: 64 x 64
mochi    Mochi 24 x 128, 1            512 px x 3 latent frames      480 x 848 x 163 frames: 28 x 30 x 53
wan      Wan 2.1 14B 40 x 128, 1      512 px x 3 latent frames      480 x 832 x 81 frames: 21 x 30 x 52
======== ============================ ============================ ====================================

Measurement on a CPU: torch keeps no allocator statistics there, so each variant runs in a
fresh subprocess and reports its peak resident set (``ru_maxrss``) minus the resident set
just before the forward, i.e. what the forward itself needed. glibc's mmap threshold is
pinned at 128 KiB so that every larger tensor is mapped when allocated and unmapped when
freed: the resident set then follows live tensor memory instead of malloc's cache. On a GPU
(``--full``, bf16): ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
forward, in the same fresh subprocesses. The median of ``--repeats`` subprocesses is kept.

Prints ``name: value`` lines. Run: ``python benchmarks/dit_memory.py`` (FLUX),
``python benchmarks/dit_memory.py --family all`` (every family on a CPU: several minutes),
``python benchmarks/dit_memory.py --family all --full`` on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

import vlmtools
import vlmtools.attention
from common import refuse_unrunnable

# this folder holds grounding.py, which shadows the grounding package: drop it from the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

GRID = (64, 64)
TEXT = 512
SITE = "dit.double.0"
EXPRESSION = 8
VARIANTS = ("plain", "expression", "text")
FAMILY_VARIANTS = ("plain", "probe")
FAMILIES = ("flux", "flux2", "qwen_image", "sd3", "mochi", "wan")


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


def build_family(family: str, full: bool = False):
    """``(model, inputs, description)``: one or two blocks of ``family`` at a published width (see the table)."""
    torch.manual_seed(0)
    if family == "flux":
        model, inputs = build()
        return model, inputs, f"FLUX.1 width, 1 double + 1 single block, {GRID[0] * GRID[1]} image + {TEXT} text"
    if family == "flux2":
        from diffusers import Flux2Transformer2DModel

        from vlmtools.adapters.flux2 import latent_ids, text_ids

        heads, context, side, text = (48, 15360, 64, 512) if full else (24, 7680, 32, 512)
        model = Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                        num_attention_heads=heads, joint_attention_dim=context,
                                        guidance_embeds=full).eval()
        inputs = {"hidden_states": torch.randn(1, side * side, 128), "encoder_hidden_states": torch.randn(1, text, context),
                  "timestep": torch.tensor([0.5]), "img_ids": latent_ids(1, (side, side)), "txt_ids": text_ids(1, text),
                  "return_dict": False}
        if full:
            inputs["guidance"] = torch.tensor([4.0])
        name = "FLUX.2 [dev]" if full else "FLUX.2 [klein] 4B"
        return model, inputs, f"{name} width ({heads} x 128), 1 double + 1 single block, {side * side} image + {text} text"
    if family == "qwen_image":
        from diffusers import QwenImageTransformer2DModel

        side, text = (64, 128) if full else (32, 128)
        model = QwenImageTransformer2DModel(num_layers=1).eval()
        inputs = {"hidden_states": torch.randn(1, side * side, 64), "encoder_hidden_states": torch.randn(1, text, 3584),
                  "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long), "timestep": torch.tensor([0.5]),
                  "img_shapes": [[(1, side, side)]], "return_dict": False}
        return model, inputs, f"Qwen-Image width (24 x 128), 1 block, {side * side} image + {text} text"
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        side, text = (128, 333) if full else (64, 333)
        model = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=16, num_layers=1,
                                      attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                      caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                      pos_embed_max_size=192, qk_norm="rms_norm").eval()
        inputs = {"hidden_states": torch.randn(1, 16, side, side), "encoder_hidden_states": torch.randn(1, text, 4096),
                  "pooled_projections": torch.randn(1, 2048), "timestep": torch.tensor([500.0]), "return_dict": False}
        return model, inputs, f"SD3.5 Large width (38 x 64), 1 joint block, {(side // 2) ** 2} image + {text} text"
    if family == "mochi":
        from diffusers import MochiTransformer3DModel

        frames, height, width = (28, 60, 106) if full else (3, 64, 64)
        model = MochiTransformer3DModel(num_layers=1).eval()
        mask = torch.ones(1, 256, dtype=torch.bool)
        inputs = {"hidden_states": torch.randn(1, 12, frames, height, width),
                  "encoder_hidden_states": torch.randn(1, 256, 4096), "encoder_attention_mask": mask,
                  "timestep": torch.tensor([500.0]), "return_dict": False}
        tokens = frames * (height // 2) * (width // 2)
        return model, inputs, f"Mochi width (24 x 128), 1 block, {frames} latent frames, {tokens} video + 256 text"
    if family == "wan":
        from diffusers import WanTransformer3DModel

        frames, height, width = (21, 60, 104) if full else (3, 64, 64)
        model = WanTransformer3DModel(num_layers=1, num_attention_heads=40, ffn_dim=13824).eval()
        inputs = {"hidden_states": torch.randn(1, 16, frames, height, width),
                  "encoder_hidden_states": torch.randn(1, 512, 4096), "timestep": torch.tensor([500.0]),
                  "return_dict": False}
        tokens = frames * (height // 2) * (width // 2)
        return model, inputs, f"Wan 2.1 14B width (40 x 128), 1 block, {frames} latent frames, {tokens} video + 512 text"
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


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


def refam_recorders(dit, inputs):
    """RefAM's recorders on the family's first block read: the image x text block and the sink columns."""
    from grounding.refam import RecordImageText
    from grounding.refam.method import sink_sites
    from vlmtools.sinks import RecordJointColumns

    text, grid = dit.adapter.sizes(dit.model, inputs)
    first = next(site.name for site in dit.sites if getattr(site, "keys", "joint") == "text") \
        if any(getattr(site, "keys", "joint") == "text" for site in dit.sites) else dit.sites[0].name
    columns = sink_sites(dit, (first,))
    return [RecordImageText([first]), RecordJointColumns(list(columns), dit.layout(text, grid).image.positions)], \
        [first, *columns[1:]]


def measure_family(family: str, variant: str, chunk_mib: float | None, full: bool) -> dict[str, float]:
    """One forward of ``family``'s model (``plain`` or ``probe``) in this process: what it needed on top of the
    loaded model (CPU: resident set; GPU: allocated memory)."""
    if chunk_mib is not None:
        vlmtools.attention.CHUNK_BYTES = int(chunk_mib * 2**20)
    model, inputs, description = build_family(family, full)
    cuda = full
    if cuda:
        model = model.to("cuda", torch.bfloat16)
        inputs = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point()
                  else v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()}
    dit = vlmtools.wrap(model)
    recorders, sites = refam_recorders(dit, inputs) if variant == "probe" else ([], [])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resident_kib() / 1024
    with torch.inference_mode(), dit.use(*recorders):
        model(**inputs)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"before_mib": before, "forward_mib": peak - before, "chunk_mib": vlmtools.attention.CHUNK_BYTES / 2**20,
            "device": "cuda bf16" if cuda else "cpu fp32", "model": description, "sites": sites}


def in_subprocess(variant: str, chunk_mib: float | None, family: str | None = None, full: bool = False):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    extra = ([] if chunk_mib is None else ["--chunk-mib", str(chunk_mib)]) + (["--family", family] if family else []) \
        + (["--full"] if full else [])
    done = subprocess.run([sys.executable, __file__, "--variant", variant, *extra], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", help="measure one variant in this process (internal)")
    parser.add_argument("--family", help=f"one of {', '.join(FAMILIES)}, or all (default: the FLUX lines)")
    parser.add_argument("--full", action="store_true", help="the full sizes of the table, bf16 on a GPU")
    parser.add_argument("--chunk-mib", type=float, help="explicit-path chunk budget (default: the library's)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    refuse_unrunnable(parser, args.full)
    if args.variant:
        if args.family:
            print(json.dumps(measure_family(args.family, args.variant, args.chunk_mib, args.full)))
        else:
            print(json.dumps(measure(args.variant, args.chunk_mib)))
        return
    if args.family:
        families = FAMILIES if args.family == "all" else (args.family,)
        print("method: peak - memory before the forward, fresh subprocess per variant "
              + ("(GPU: max_memory_allocated)" if args.full else "(CPU: ru_maxrss, MALLOC_MMAP_THRESHOLD_=128KiB)"))
        for family in families:
            runs = {v: [in_subprocess(v, args.chunk_mib, family, args.full) for _ in range(args.repeats)]
                    for v in FAMILY_VARIANTS}
            forward = {v: statistics.median(r["forward_mib"] for r in rs) for v, rs in runs.items()}
            probe = runs["probe"][0]
            print(f"{family}_model: {probe['model']}; {probe['device']}; probe sites {', '.join(probe['sites'])}; "
                  f"chunk {probe['chunk_mib']:g} MiB")
            print(f"{family}_plain_forward_peak_mib: {forward['plain']:.1f}")
            print(f"{family}_probe_forward_peak_mib: {forward['probe']:.1f}")
            print(f"{family}_probe_peak_ratio: {forward['probe'] / forward['plain']:.4f}", flush=True)
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
