"""vlmtools: attention-sink tools around Hugging Face VLMs and diffusion transformers.

>>> import vlmtools
>>> vlm = vlmtools.wrap(model, processor)
>>> with vlm.use(vlmtools.RecordRows(["text.2"])) as trace:
...     model(**inputs)
"""
from .layout import DiTLayout, ImageTokens, SampleLayout, Span, TokenLayout
from .plan import ALL, AttentionCall, AttentionHook, AttentionSite, LayerHook, Plan, StopForward, Trace
from .record import RecordBlock, RecordColumnMass, RecordHidden, RecordRows, RecordValueNorms
from .sinks import SinkDetector, SinkReport
from .wrap import WrappedDiT, WrappedModel, wrap

__all__ = [
    "ALL", "AttentionCall", "AttentionHook", "AttentionSite", "DiTLayout", "ImageTokens", "LayerHook", "Plan",
    "RecordBlock", "RecordColumnMass", "RecordHidden", "RecordRows", "RecordValueNorms", "SampleLayout", "SinkDetector",
    "SinkReport", "Span", "StopForward", "TokenLayout", "Trace", "WrappedDiT", "WrappedModel", "wrap",
]
