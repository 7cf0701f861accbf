"""What a transformers KV cache holds, for any ``Cache`` (a full ``DynamicCache``, a sink cache, a pruned prompt's)."""
from __future__ import annotations

import torch


def kv_bytes(cache) -> int:
    """Bytes of the keys and values ``cache`` holds now, over its layers."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
