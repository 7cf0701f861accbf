"""grounding: built on vlmtools only.

>>> from grounding import RefAM
>>> import vlmtools_zoo as zoo
>>> seg = RefAM(zoo.load("flux-shapes")).segment(image, "the large red circle")
"""

_LAZY = {"RefAM", "RefAMSettings", "Segmentation"}


def __getattr__(name):
    # RefAM imports diffusers; the metrics and masks modules stay light without it
    if name in _LAZY:
        from . import refam

        return getattr(refam, name)
    raise AttributeError(f"module 'grounding' has no attribute {name!r}")
