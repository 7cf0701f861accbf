"""A StreamingLLM sink cache: the first tokens (found by the shared detector) plus a recent window, for long chats and video streams.

>>> cache = SinkCache.detect(vlm, inputs, window=256)      # k from vlmtools.sinks (default: positional, k = 4)
>>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=1000)
>>> cache.peak_kv_bytes
"""

from .cache import SinkCache, SinkLayer
from .sinks import lasting_sinks, leading_sinks

__all__ = ["SinkCache", "SinkLayer", "lasting_sinks", "leading_sinks"]
