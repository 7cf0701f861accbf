"""qwen2vl-shapes: a Qwen2-VL-shaped VLM around SmolLM2-135M-Instruct.

The pieces are the real Hugging Face classes, so everything that runs on a
Qwen2-VL checkpoint runs here unchanged:

- SmolLM2 ported into Qwen2-VL's text model: Llama-shaped except for q/k/v
  biases (set to zero) and multimodal RoPE, which on text-only input (equal
  t/h/w positions) reduces to SmolLM2's 1-D RoPE, so ``port()`` reproduces
  SmolLM2's text-only logits (tested within 1e-4);
- Qwen2-VL's native-resolution vision tower, sized like llava-shapes' CLIP
  tower (6 blocks, width 192, 4 heads, MLP 768), 8 px patches merged 2 x 2 by
  its ``PatchMerger`` (768 -> 768 -> 576) into one LM token per 16 x 16 pixels:
  36 visual tokens for a 96 x 96 scene, 48 for 128 x 96 or 96 x 128, 32 for
  128 x 64 (144 would need 2x upsampling and make the LM ~2.7x slower per
  training step, ZOO-NOTES);
- a ``Qwen2VLProcessor`` with a ``Qwen2VLImageProcessor`` whose
  ``min_pixels``/``max_pixels`` keep every world canvas at its own size and
  aspect (all sides are multiples of 16), SmolLM2's tokenizer and ChatML
  template with SmolLM2 tokens that the chat model never uses as Qwen's
  vision start / image pad / vision end (ids 13 / 16 / 14; 15 for videos):
  their input embeddings are one shared vector up to the Q4_1 quantisation
  step, i.e. never trained apart.

Trained parts (``python -m vlmtools_zoo.train qwen2vl-shapes``) are shipped
under ``weights/qwen2vl-shapes/``: the vision tower with its merger and a
rank-8 LoRA on every LM linear layer, merged into the weights when the folder is
assembled. Without shipped weights the folder gets a seeded random tower.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from . import llava
from .lm import assembled, cache_dir, folder_lock, smollm2_dir, stamp, write_folder

PATCH, MERGE = 8, 2
MIN_PIXELS, MAX_PIXELS = 64 * 64, 128 * 128  # world canvases: 96x96, 128x96, 96x128, 128x64
MROPE_SECTION = [2, 4, 26]  # sums to head_dim / 2 = 32; why: docs/zoo.md, qwen2vl-shapes
TOKENS = {"vision_start": ("<jupyter_code>", 13), "vision_end": ("<jupyter_output>", 14),
          "video": ("<jupyter_script>", 15), "image": ("<empty_output>", 16)}
WEIGHTS = Path(__file__).parent / "weights" / "qwen2vl-shapes"

# llava-shapes' ChatML template with Qwen's vision block in place of LLaVA's image token
VISION_BLOCK = TOKENS["vision_start"][0] + TOKENS["image"][0] + TOKENS["vision_end"][0]
CHAT_TEMPLATE = llava.CHAT_TEMPLATE.replace(llava.IMAGE_TOKEN + "\n", VISION_BLOCK)
assert CHAT_TEMPLATE.count(VISION_BLOCK) == 1


def vision_config() -> dict:
    return {"depth": 6, "embed_dim": 192, "mlp_ratio": 4, "num_heads": 4, "hidden_size": 576, "patch_size": PATCH,
            "spatial_merge_size": MERGE, "temporal_patch_size": 2}


def build_config():
    from transformers import AutoConfig, Qwen2VLConfig

    src = AutoConfig.from_pretrained(smollm2_dir())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
            "eos_token_id", "pad_token_id")
    text = {k: getattr(src, k) for k in keys}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": src.rope_parameters["rope_theta"],
                               "mrope_section": MROPE_SECTION}
    return Qwen2VLConfig(text_config=text, vision_config=vision_config(), tie_word_embeddings=True,
                         **{f"{k}_token_id": i for k, (_, i) in TOKENS.items()})


def build_processor():
    from transformers import (
        AutoTokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    sizes = {"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2, "min_pixels": MIN_PIXELS,
             "max_pixels": MAX_PIXELS}
    tok = AutoTokenizer.from_pretrained(
        smollm2_dir(), extra_special_tokens={f"{k}_token": t for k, (t, _) in TOKENS.items()})
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in TOKENS.values())
    tok.padding_side = "left"
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)


@torch.no_grad()
def port():
    """A fresh model: SmolLM2's weights in the text model (zero q/k/v biases), a
    random vision tower (seeded, so every fresh model is the same)."""
    from transformers import LlamaForCausalLM, Qwen2VLForConditionalGeneration

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(build_config())
    src = LlamaForCausalLM.from_pretrained(smollm2_dir()).model.state_dict()
    lm = model.model.language_model
    missing, unexpected = lm.load_state_dict(src, strict=False)
    assert not unexpected and all(k.endswith(".bias") for k in missing), (missing, unexpected)
    for k in missing:
        lm.get_parameter(k).zero_()
    model.lm_head.weight = lm.embed_tokens.weight
    return model.eval()


def trained_state(model, lora: dict) -> dict:
    """The shipped part: vision tower with its merger, and LoRA factors (nothing from SmolLM2),
    in fp16 (~12 MB, so that the zoo's shipped weights stay under 50 MB in all)."""
    out = {f"visual.{k}": v for k, v in model.model.visual.state_dict().items()}
    out.update({f"lora.{k}": v for k, v in lora.items()})
    return {k: v.detach().half().contiguous() for k, v in out.items()}


def assemble(folder: Path | None = None, weights: Path = WEIGHTS) -> Path:
    """Build the full HF folder (model + processor) from SmolLM2 and the shipped parts, if any."""
    folder = folder or cache_dir() / "qwen2vl-shapes"
    src = weights / "model.safetensors"
    with folder_lock(folder):
        if not assembled(folder, made := stamp(src, build_config().to_json_string(use_diff=False))):
            model = port()
            if src.exists():
                llava.merge_lora(model, load_trained(model, load_file(src)))
            write_folder(folder, made, model, build_processor())
    return folder


def load_trained(model, state: dict) -> dict:
    """Load a shipped state's vision tower (with its merger) into ``model``; return its LoRA factors."""
    model.model.visual.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("visual.")})
    return {k[5:]: v for k, v in state.items() if k.startswith("lora.")}


def load(folder: Path | None = None, weights: Path = WEIGHTS):
    """(model, processor) for qwen2vl-shapes, assembled into the cache on first use.

    Prompts: ``vlmtools_zoo.llava.prompt(processor, question)`` (image first in the user turn).
    """
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    folder = assemble(folder, weights)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"  # batched generation; not kept by save_pretrained
    return model, processor
