"""llava-shapes: a LLaVA-1.5-shaped VLM around SmolLM2-135M-Instruct.

The pieces are the real Hugging Face classes, so everything that runs on a
LLaVA-1.5 checkpoint runs here unchanged:

- a ``CLIPVisionModel`` tower (with a CLS token) trained from scratch on the
  shapes world, 96 px images in 8 px patches: 144 patch tokens per image;
- LLaVA's 2-layer GELU projector and the ``default`` select strategy (CLS
  dropped); the LM reads the tower's last layer (``vision_feature_layer=-1``),
  which training stage 7 taught to put each object's shape into each of its
  patches (and stage 10, every layer, to hold the object count in their mean).
  Stages 2-6 read layer -2, as LLaVA-1.5 does, and weights exported
  before stage 7 record that (``feature_layer``);
- SmolLM2 as the language model, frozen except for a LoRA on every linear
  layer (rank 8, widened to 16 by training stage 9; shipped as low-rank factors,
  merged at scale ``LORA_ALPHA / LORA_RANK`` when the folder is assembled);
- a ``LlavaProcessor`` with a ``LlavaImageProcessor`` that letterboxes
  non-square images (``do_pad``, filled with the mean colour, as LLaVA-1.5)
  and an unused SmolLM2 special token as the ``<image>`` token.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .lm import assembled, cache_dir, folder_lock, smollm2_dir, stamp, write_folder

IMAGE_SIZE, PATCH = 96, 8
IMAGE_TOKEN = "<empty_output>"  # SmolLM2 special token id 16, never used by the chat model
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2
WEIGHTS = Path(__file__).parent / "weights" / "llava-shapes"
FEATURE_LAYER = -1  # the tower layer the LM reads once stage 7 ran
FEATURE_LAYER_BEFORE_REREAD = -2  # what stages 2-6 read, as LLaVA-1.5 does
LORA_RANK, LORA_ALPHA = 8, 16  # a fresh LoRA's; stage 9 widens it at the same scale
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ChatML as SmolLM2 uses it, minus its default system prompt; images go first
# in the user turn, as in LLaVA-1.5.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
                            projection_dim=192)


def build_config(feature_layer: int = FEATURE_LAYER):
    from transformers import AutoConfig, LlavaConfig

    text = AutoConfig.from_pretrained(smollm2_dir())
    return LlavaConfig(vision_config=vision_config(), text_config=text,
                       image_token_id=16, projector_hidden_act="gelu",
                       vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                       image_seq_length=NUM_PATCHES, tie_word_embeddings=True)


def build_processor():
    from transformers import AutoTokenizer, LlavaImageProcessor, LlavaProcessor

    ip = LlavaImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pad=True)
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    tok.padding_side = "left"
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def build_model(feature_layer: int = FEATURE_LAYER):
    """A fresh model: random tower and projector, SmolLM2 weights in the LM."""
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(build_config(feature_layer))
    lm = LlamaForCausalLM.from_pretrained(smollm2_dir())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model


def trained_state(model, lora: dict) -> dict:
    """The shipped part: tower, projector and LoRA factors (nothing from SmolLM2)."""
    out = {f"vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    out.update({f"multi_modal_projector.{k}": v
                for k, v in model.model.multi_modal_projector.state_dict().items()})
    out.update({f"lora.{k}": v for k, v in lora.items()})
    return {k: v.detach().to(torch.float16 if k.startswith("lora.") else torch.float32).contiguous()
            for k, v in out.items()}


def merge_lora(model, lora: dict, scale: float = LORA_ALPHA / LORA_RANK) -> None:
    """W += scale * B @ A for every shipped (A, B) pair, keyed by the LM module path."""
    lm = model.model.language_model
    for key in {k.rsplit(".", 1)[0] for k in lora}:
        lin = lm.get_submodule(key)
        a, b = lora[f"{key}.A"].float(), lora[f"{key}.B"].float()
        lin.weight.data += scale * (b @ a)


def assemble(folder: Path | None = None, weights: Path = WEIGHTS) -> Path:
    """Build the full HF folder (model + processor) from SmolLM2 and the shipped parts."""
    folder = folder or cache_dir() / "llava-shapes"
    src = weights / "model.safetensors"
    layer = feature_layer(src)
    with folder_lock(folder):
        if not assembled(folder, made := stamp(src, build_config(layer).to_json_string(use_diff=False))):
            model = build_model(layer)
            merge_lora(model, load_trained(model, load_file(src)))
            write_folder(folder, made, model, build_processor())
    return folder


def feature_layer(path: Path) -> int:
    """The tower layer the LM of the weights at ``path`` reads, as their export recorded it
    (-2 where it recorded none: weights from before stage 7)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("vision_feature_layer", FEATURE_LAYER_BEFORE_REREAD))


def load_trained(model, state: dict) -> dict:
    """Load a shipped state's tower and projector into ``model``; return its LoRA factors."""
    model.model.vision_tower.load_state_dict(
        {k[13:]: v for k, v in state.items() if k.startswith("vision_tower.")})
    model.model.multi_modal_projector.load_state_dict(
        {k[22:]: v for k, v in state.items() if k.startswith("multi_modal_projector.")})
    return {k[5:]: v for k, v in state.items() if k.startswith("lora.")}


def load(folder: Path | None = None, weights: Path = WEIGHTS):
    """(model, processor) for llava-shapes, assembled into the cache on first use."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = assemble(folder, weights)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"  # batched generation; not kept by save_pretrained
    return model, processor


def prompt(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)
