"""What the benchmarks share: timing ratios against a baseline in one process, Markdown results,
LLaVA-shaped random models, and the training of probes."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def ratios(baseline: Callable[[], object], variants: dict[str, Callable[[], object]], repeats: int = 7,
           warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
           measure: Callable[[Callable, Callable[[], float]], float] = timed) -> tuple[float, dict[str, float]]:
    """Median baseline seconds and, per variant, the median of per-round time ratios.

    ``clock=time.process_time`` counts this process's CPU seconds instead of wall time:
    on a machine shared with other jobs it is far less noisy (but hides idle waits).
    ``measure(fn, clock)`` gives one run's seconds (default: the whole call; :func:`decoding_step` times
    only the steps of a ``generate``).

    Rounds interleave baseline and variants so that machine noise hits both alike.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            baseline()
            for fn in variants.values():
                fn()
        base_times, per_variant = [], {name: [] for name in variants}
        for _ in range(repeats):
            base = measure(baseline, clock)
            base_times.append(base)
            for name, fn in variants.items():
                per_variant[name].append(measure(fn, clock) / base)
    return statistics.median(base_times), {name: statistics.median(r) for name, r in per_variant.items()}


class _StepClock:
    """A stopping criterion that stops nothing and notes the clock after each generated token."""

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.times = clock, []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decoding_step(generate: Callable[..., object], clock: Callable[[], float]) -> float:
    """Mean seconds of one cached decoding step of ``generate(stopping_criteria=[...])`` (at least two tokens):
    the time between the first token (after the prefill) and the last, over the steps between them, so that
    the prefill's time (and its noise) is no part of it."""
    from transformers import StoppingCriteriaList

    step_clock = _StepClock(clock)
    generate(stopping_criteria=StoppingCriteriaList([step_clock]))
    times = step_clock.times
    if len(times) < 2:
        raise ValueError("decoding_step needs a generate of at least two tokens")
    return (times[-1] - times[0]) / (len(times) - 1)


def write_section(path, heading: str, text: str) -> None:
    """Replace the ``## {heading}`` section of a Markdown file with ``text`` (or append it), leaving the rest."""
    from pathlib import Path

    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    out, skipping = [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() == f"## {heading}"
        if not skipping:
            out.append(line)
    path.write_text("\n".join(out).rstrip() + "\n\n" + text.rstrip() + "\n")


def refuse_unrunnable(parser, full: bool, attn: str = "sdpa") -> None:
    """Exit 2 with one line, before any model is built, where this machine cannot run the command: ``--full``
    without a GPU, or a FlashAttention ``attn`` without a GPU or without its package."""
    from transformers import utils

    problem = None
    if full and not torch.cuda.is_available():
        problem = "--full needs a GPU (CUDA), and none is visible"
    elif attn.startswith("flash_attention_"):
        version = attn.removeprefix("flash_attention_")
        if not torch.cuda.is_available() or not getattr(utils, f"is_flash_attn_{version}_available")():
            problem = f"--attn {attn} needs a GPU and FlashAttention {version}'s package"
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")


IMAGE_TOKEN = 31999


def llava_shaped(full: bool, text_hidden: int = 512, text_intermediate: int = 1408, vision_hidden: int = 128,
                 vision_layers: int = 2):
    """A random LLaVA-1.5-shaped model: 336 px / patch 14 (576 visual tokens), a Llama LM of 8 layers.

    ``full``: LLaVA-1.5-7B's sizes (CLIP ViT-L/14-336, a 32-layer 4096-wide LM), built in place on CUDA in bf16.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if full:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064)
    else:
        vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                  num_hidden_layers=vision_layers, num_attention_heads=max(2, vision_hidden // 32),
                                  image_size=336, patch_size=14)
        text = LlamaConfig(hidden_size=text_hidden, intermediate_size=text_intermediate, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=32064)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    if full:
        from vlmtools.testing.published import built_in_place

        model = built_in_place(LlavaForConditionalGeneration, config, torch.bfloat16, "cuda")
    else:
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def llava_prompt(device="cpu", dtype=torch.float32, visual: int = 576, text: int = 64) -> dict:
    """One random prompt for :func:`llava_shaped`: 5 text tokens, ``visual`` image tokens, the rest text."""
    ids = torch.randint(0, 31000, (1, visual + text))
    ids[0, 5:5 + visual] = IMAGE_TOKEN
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(1, 3, 336, 336, dtype=dtype, device=device)}


def llava_bench(full: bool):
    """``(model, prompt, sync)`` of the seam-cost benchmarks: the default :func:`llava_shaped` model on one
    :func:`llava_prompt`, fp32 on CPU or (``full``) LLaVA-1.5-7B sizes in bf16 on CUDA; ``sync`` waits for the device."""
    device = "cuda" if full else "cpu"
    dtype = torch.bfloat16 if full else torch.float32
    torch.manual_seed(0)
    model = llava_shaped(full).to(device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return model, llava_prompt(device, dtype), sync


def family_bench(family: str, full: bool, text: int = 64):
    """``(model, prompt, sync, description)`` of the benchmarks on any family: LLaVA-1.5 on a CPU is the default
    :func:`llava_bench` model; every other family (and ``full``) is ``vlmtools.testing.full_width``'s, one prompt of
    its published image processor with ``text`` text tokens after the image: on a CPU three LM layers at the
    published width, fp32, at the reduced resolution; ``full``: every layer, bf16, on CUDA, at the published
    resolution."""
    if family == "llava" and not full:
        model, batch, sync = llava_bench(False)
        return model, batch, sync, "LLaVA-1.5 shapes, CPU-sized"
    from vlmtools.testing.published import FAMILIES, full_width, published_inputs

    device = "cuda" if full else "cpu"
    dtype = torch.bfloat16 if full else torch.float32
    model, _ = full_width(family, layers=None if full else 3, reduced=not full, dtype=dtype, device=device)
    batch = published_inputs(family, model.config, reduced=not full, samples=1, text=text)
    batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if full else (lambda: None)
    checkpoint = FAMILIES[family].checkpoint
    return model, batch, sync, f"{checkpoint} sizes" + ("" if full else ", reduced resolution")


def fit(make_probe, size: int, inputs, answers: torch.Tensor, epochs: int, batch: int, name: str) -> nn.Module:
    """``make_probe()`` (seeded) trained on ``size`` examples, ``probe(*inputs(index))`` against
    ``answers[index]``, the learning rate decaying linearly to 0 so that the last epoch settles."""
    torch.manual_seed(0)
    probe = make_probe()
    opt = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=1e-2)
    steps = epochs * -(-size // batch)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    for _ in tqdm(range(epochs), desc=name):
        probe.train()
        for index in torch.randperm(size).split(batch):
            loss = F.cross_entropy(probe(*inputs(index)), answers[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: nn.Module, size: int, inputs) -> torch.Tensor:
    """The classes ``probe`` picks for ``probe(*inputs(index))`` over ``size`` examples, 256 at a time."""
    return torch.cat([probe(*inputs(index)).argmax(-1) for index in torch.arange(size).split(256)])
