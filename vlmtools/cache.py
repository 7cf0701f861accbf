"""Where vlmtools keeps what it makes: ``$VLMTOOLS_CACHE``, else ``~/.cache/vlmtools``; never inside the
installed package, which a system install makes read-only. Calibrations (pruning trends, tuning head
selections) live in :func:`calibration_dir`, one file per model named by :func:`model_key`."""
from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("VLMTOOLS_CACHE", Path.home() / ".cache" / "vlmtools"))


def calibration_dir(directory: str | Path | None = None) -> Path:
    """``directory``, else ``$PRUNING_CALIBRATION``, else ``calibration/`` in :func:`cache_dir`."""
    return Path(directory or os.environ.get("PRUNING_CALIBRATION") or cache_dir() / "calibration")


def model_key(vlm) -> str:
    """The model part of a calibration file name: the checkpoint folder's name, else family and sizes."""
    name = Path(str(getattr(vlm.model.config, "_name_or_path", "") or "")).name
    if name:
        return name
    text = vlm.model.config.get_text_config()
    return f"{vlm.family}-h{text.hidden_size}-l{text.num_hidden_layers}"


def write_json(path: str | Path, record: dict) -> Path:
    """Write ``record`` to ``path`` as JSON, making its folder, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)
    return path
