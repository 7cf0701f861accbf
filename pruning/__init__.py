"""pruning: visual token pruning hosts with debiasing, dropping tokens for real. Built on vlmtools only.

>>> from pruning import FastV
>>> with vlm.use(FastV(keep=64, layer=2, debias=True)):
...     out = model.generate(**inputs)
"""
from .calibrate import calibrate
from .debias import Debias, Trend, calibration_path, debiased, fit_trend, model_key
from .host import Host
from .samples import DEFAULT_QUESTION, calibration_samples, image_question_pairs
from .hosts import DART, FastV, PDrop, RandomPrune, SparseVLM, UniformGrid
from .vision import FasterVLM, VisionZip

HOSTS = {host.name: host for host in (FastV, PDrop, SparseVLM, VisionZip, FasterVLM, DART, RandomPrune, UniformGrid)}
"""Host name -> class, as used in calibration file names and benchmark tables."""

__all__ = [
    "DEFAULT_QUESTION",
    "DART",
    "HOSTS",
    "Debias",
    "FastV",
    "FasterVLM",
    "Host",
    "PDrop",
    "RandomPrune",
    "SparseVLM",
    "Trend",
    "UniformGrid",
    "VisionZip",
    "calibrate",
    "calibration_path",
    "calibration_samples",
    "debiased",
    "fit_trend",
    "image_question_pairs",
    "model_key",
]
