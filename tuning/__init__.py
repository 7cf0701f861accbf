"""Attention calibration around sinks: ACT and ZeroTuning, each one intervention reading the shared detector,
with the head search both share (:func:`calibrate`) and its stored result (:class:`HeadSelection`)."""
from .act import ACT, ACTRun
from .calibrate import accuracy, calibrate, candidate_heads, labelled_samples, search_heads
from .selection import HeadSelection, selection_path
from .zerotuning import ZeroTuning, ZeroTuningRun

__all__ = ["ACT", "ACTRun", "HeadSelection", "ZeroTuning", "ZeroTuningRun", "accuracy", "calibrate",
           "candidate_heads", "labelled_samples", "search_heads", "selection_path"]
