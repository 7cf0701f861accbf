"""Cost of the seam on a LLaVA-1.5-shaped random model (576 visual + 64 text tokens).

Prints ``name: value`` lines; the last is ``seam_overhead: R`` (nothing planned / plain).
Run: ``python benchmarks/seam.py [--full]`` (``--full``: LLaVA-1.5-7B sizes in bf16, needs a GPU).
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmtools
from common import ratios

IMAGE_TOKEN = 31999


def build(full: bool):
    if full:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064)
    else:
        vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=336, patch_size=14)
        text = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=32064)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config).eval()


def inputs(device, dtype):
    ids = torch.randint(0, 31000, (1, 640))
    ids[0, 5:5 + 576] = IMAGE_TOKEN
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(1, 3, 336, 336, dtype=dtype, device=device)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes, bf16, on CUDA")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: least noise when shared)")
    parser.add_argument("--clock", choices=["process", "wall"], default="process",
                        help="process CPU time (default, robust to other jobs) or wall clock")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" and not args.full else time.perf_counter
    device = "cuda" if args.full else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    torch.manual_seed(0)
    model = build(args.full).to(device, dtype)
    batch = inputs(device, dtype)
    vlm = vlmtools.wrap(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

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
            model.set_attn_implementation({"text_config": "sdpa"})

    base, r = ratios(plain, {
        "nothing_planned": under(),
        "last_row_one_layer": under(vlmtools.RecordRows(["text.2"], "last")),
        "column_mass_one_layer": under(vlmtools.RecordColumnMass(["text.2"])),
        "eager_every_layer": eager_everywhere,
    }, repeats=args.repeats, clock=clock)
    print(f"device: {device}")
    print(f"clock: {'process CPU time' if clock is time.process_time else 'wall'}, threads: {args.threads}")
    print(f"dtype: {str(dtype).removeprefix('torch.')}")
    print(f"tokens: {batch['input_ids'].shape[1]}")
    print(f"plain_prefill_s: {base:.4f}")
    print(f"last_row_overhead: {r['last_row_one_layer']:.4f}")
    print(f"column_mass_overhead: {r['column_mass_one_layer']:.4f}")
    print(f"eager_every_layer_ratio: {r['eager_every_layer']:.4f}")
    print(f"seam_overhead: {r['nothing_planned']:.4f}")


if __name__ == "__main__":
    main()
