"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``; the MoE class in ``qwen3_5_moe.py``): a hybrid LM.

Three of every four decoder layers mix tokens with Gated DeltaNet (``layer.linear_attn``: linear attention
with a causal depthwise conv and a recurrent state, no attention map); the fourth is softmax attention whose
output a sigmoid gate scales (``layer.self_attn``, its ``q_proj`` puts each head's gate after its query).
The seam's sites are those full-attention layers only (``text.{i}`` for ``i`` in ``vlm.attention_layers``);
asking for the site of a Gated DeltaNet layer is refused with :data:`NO_ATTENTION`. Every layer is hooked
(``vlm.layers``): a token drop passes the kept tokens through the linear layers too, whose cached conv and
recurrent states are then those of the kept tokens alone (:mod:`vlmtools.drop`).

Images, videos (frames after their timestamps), the vision tower and interleaved M-RoPE are Qwen3-VL's
(``qwen3_vl.py``), without DeepStack; rotary embeddings cover a quarter of each head
(``partial_rotary_factor``).
"""
from __future__ import annotations

from .base import Adapter
from .qwen3_vl import frames_last_to_lm, qwen3_vl_layout
from .vision import VisionEncoder

NO_ATTENTION = ("a Gated DeltaNet layer: linear attention with a recurrent state, no softmax over keys; read "
                "and edit the full-attention layers instead")


def no_cls(name: str) -> str:
    return (f"{name}'s vision encoder has no [CLS] token: use FastV, PDrop, SparseVLM or DART reading its "
            "full-attention layers, or random / grid")


def hybrid_kinds(model) -> list[str]:
    """``linear`` for the Gated DeltaNet layers, ``gated_attention`` for the full-attention ones."""
    return ["linear" if kind == "linear_attention" else "gated_attention"
            for kind in model.config.get_text_config().layer_types]


ADAPTER = Adapter(
    family="qwen3_5",
    classes=("Qwen3_5ForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.visual.blocks",
    vision_attn="attn",
    layout=qwen3_vl_layout,
    vision=VisionEncoder(to_lm=frames_last_to_lm, no_cls=no_cls("Qwen3.5")),
    layer_kinds=hybrid_kinds,
    no_attention=NO_ATTENTION,
)
