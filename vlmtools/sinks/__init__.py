"""One sink detector shared by every method (METHODS.md section 1).

>>> from vlmtools.sinks import SinkDetector
>>> report = SinkDetector().detect(vlm, inputs)
>>> print(report.table()); report.plot("sinks.png")
"""

from .attention import ColumnMassSink, Positional, ValueDrain
from .base import Criterion, Evaluation, Finding, SinkTensors, plain_layout
from .detector import CRITERIA, DEFAULT, HIDDEN, SinkDetector
from .dims import (
    PUBLISHED_SINK_DIMS,
    ModelSinkDims,
    SinkDimensions,
    discover_model_sink_dims,
    discover_sink_dims,
    model_signature,
    model_sink_dims,
    visual_sink_positions,
)
from .dit import GlobalSink, JointColumns, RecordJointColumns
from .hidden import MassiveActivation, PrimaryCosine
from .report import SinkReport

__all__ = [
    "CRITERIA",
    "DEFAULT",
    "HIDDEN",
    "PUBLISHED_SINK_DIMS",
    "ColumnMassSink",
    "Criterion",
    "Evaluation",
    "Finding",
    "GlobalSink",
    "JointColumns",
    "MassiveActivation",
    "ModelSinkDims",
    "Positional",
    "PrimaryCosine",
    "RecordJointColumns",
    "SinkDetector",
    "SinkDimensions",
    "SinkReport",
    "SinkTensors",
    "ValueDrain",
    "discover_model_sink_dims",
    "discover_sink_dims",
    "model_signature",
    "model_sink_dims",
    "plain_layout",
    "visual_sink_positions",
]
