"""The ``vlmtools`` model of lmms-eval: any lmms-eval task on any wrapped VLM, with any pruning and
hallucination method in use (``pip install "vlmtools[lmms-eval]"``).

lmms-eval finds it through the ``lmms_eval.models`` entry point that pyproject.toml declares
(:func:`manifest`), so nothing is copied into lmms-eval::

    python -m lmms_eval --model vlmtools \\
        --model_args pretrained=/models/llava-1.5-7b-hf,method=fastv+var,keep=64,debias=true \\
        --tasks pope --batch_size 8 --output_path out/ --log_samples

``--model_args`` (:func:`parse_model_args`):

* ``pretrained``: a zoo VLM name (``llava-shapes``, ``qwen2vl-shapes``) or a local Hugging Face folder;
* ``method``: ``none`` (default) or methods joined by ``+`` (``fastv``, ``fastv+var``), run in that order in one
  ``vlm.use`` block per batch: the pruning hosts of :data:`pruning.HOSTS` (fastv, pdrop, sparsevlm, visionzip,
  fastervlm, dart, random, grid) and var, gift, paint (GIFT reads each prompt's text as its question);
* each method's settings as ``KEY=VALUE``, the keywords of its class (``keep=64``, ``layer=3``,
  ``layers=[8,16]``, ``rho=0.8``, ``variant=released``); a key that two chosen methods take is written
  ``METHOD.KEY`` (``fastv.keep=64``). Attention-ranking hosts also take ``debias=true``, with
  ``trend=calibrated|none|FILE`` (default ``calibrated``: the file ``vlmtools calibrate`` writes for this model,
  host and layer, looked for in ``calibration=DIR``, default the cache's) -- a missing file is refused when the
  model loads, before any task runs;
* ``device`` (default: ``cuda`` when there is one, else ``cpu``; under a multi-process launch each process takes
  ``cuda:LOCAL_RANK``), ``dtype`` (``float16``, ``bfloat16``, ``float32``; default: as saved), ``batch_size``
  (lmms-eval's ``--batch_size``; a number, not ``auto``).

An unknown key, a method's key no chosen method takes, or a setting its class refuses ends the run with a
message naming the valid keys.

Generation (:meth:`VLMTools.generate_until`): requests are batched in the task's document order, ``batch_size``
at a time (requests with other generation settings never share a batch), as chat prompts with the images first
then the task's text, left-padded (:func:`vlmtools.chat.chat_inputs`), so a batch's answers equal those of the
vlmtools benches run on the same items with the same batch size (an answer can depend on its batch-mates:
left padding, and pruning keeps as many tokens in every row). The task's ``generation_kwargs`` are honoured:
``max_new_tokens`` (default 1024, as lmms-eval's own models), ``temperature`` 0 (or absent) greedy, above 0
sampling with ``top_p`` / ``top_k``, ``num_beams``, ``repetition_penalty``, and ``until``: generation stops at
those strings and the answer is cut before the first of them. Loglikelihood requests (multiple choice by
likelihood) are refused: the methods act at the prefill of a prompt and at each generated token, which
scoring a given continuation does not reproduce.
"""
from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass, field

try:  # the optional extra: without it the parsing below still works and the model refuses to start
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # pragma: no cover - exercised only without the extra
    _Base = None

MODEL_ID = "vlmtools"
MODEL_KEYS = ("pretrained", "method", "device", "dtype", "batch_size", "max_batch_size")
"""``--model_args`` keys that are no method's settings (``max_batch_size``: lmms-eval's, unused)."""
DEBIAS_KEYS = ("debias", "trend", "calibration")
"""The settings of an attention-ranking pruning host's debiasing (:class:`pruning.Debias`)."""
HIDDEN = ("questions", "padding")
"""Constructor keywords that are not settings here: GIFT's questions (each prompt's text) and a host's
letterbox mask (the wrapped model flags letterbox padding itself)."""
DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_MAX_NEW_TOKENS = 1024
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                   "repetition_penalty")
"""The ``generation_kwargs`` read; others are ignored with a warning (once per set of keys)."""


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's registration of the ``vlmtools`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VLMTools")


def method_classes() -> dict[str, type]:
    """Method name -> class: the pruning hosts, then VAR, GIFT and PAINT."""
    from hallucination import GIFT, PAINT, VAR
    from pruning import HOSTS

    return {**HOSTS, "var": VAR, "gift": GIFT, "paint": PAINT}


def method_names() -> tuple[str, ...]:
    return ("none", *method_classes())


def options(name: str) -> tuple[str, ...]:
    """The ``--model_args`` settings of method ``name``: its class's keywords, and for an attention-ranking
    pruning host the debias ones."""
    from pruning import Host

    cls = method_classes()[name]
    keys = [p.name for p in inspect.signature(cls).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in HIDDEN]
    if issubclass(cls, Host) and cls.attention_based:
        keys += DEBIAS_KEYS
    return tuple(keys)


def literal(value):
    """A setting's value: lmms-eval gives true / false / numbers converted; other text is true / false (any
    case), a Python literal (``[8,16]``, ``None``) or else the word itself."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


@dataclass(frozen=True)
class Method:
    """One chosen method and its settings (``--model_args`` values), built afresh for every batch."""

    name: str
    settings: dict = field(default_factory=dict)

    def build(self, questions: list[str]):
        """The intervention for one batch whose prompts' texts are ``questions``."""
        cls = method_classes()[self.name]
        settings = dict(self.settings)
        if self.name == "gift":
            settings["questions"] = list(questions)
        debias = {key: settings.pop(key) for key in DEBIAS_KEYS if key in settings}
        if debias:
            settings["debias"] = _debias(debias)
        return cls(**settings)


def _debias(given: dict):
    """``debias`` / ``trend`` / ``calibration`` as a host's ``debias`` argument."""
    from pruning import Debias

    debias = given.get("debias", False)
    if not isinstance(debias, bool):
        raise ValueError(f"debias is true or false, got {debias!r}")
    extra = [key for key in ("trend", "calibration") if key in given]
    if not debias:
        if extra:
            raise ValueError(f"{' and '.join(extra)} {'goes' if len(extra) == 1 else 'go'} with debias=true")
        return False
    trend = given.get("trend", "calibrated")
    trend = None if trend in (None, "none") else str(trend)
    return Debias(trend=trend, directory=given.get("calibration"))


@dataclass(frozen=True)
class Config:
    """What ``--model_args`` asks for."""

    pretrained: str
    methods: tuple[Method, ...] = ()
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1

    def build(self, questions: list[str]) -> list:
        """One batch's interventions, in the order the methods were named."""
        return [method.build(questions) for method in self.methods]


def parse_model_args(args: dict) -> Config:
    """``--model_args`` (as lmms-eval hands them to the model: a dict, values maybe converted) as a
    :class:`Config`; every method is built once here, so a bad key or setting fails before the model loads."""
    args = dict(args)
    if not args.get("pretrained"):
        raise ValueError("vlmtools: model_args needs pretrained=ZOO_NAME_OR_FOLDER (a zoo VLM such as "
                         "llava-shapes, or a local Hugging Face folder)")
    names = method_names()
    text = str(args.get("method") or "none")
    chosen = text.split("+")
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise ValueError(f"vlmtools: unknown method {', '.join(map(repr, unknown))} in method={text}; "
                         f"methods: {', '.join(names)} (several joined by +, e.g. fastv+var)")
    if len(set(chosen)) < len(chosen):
        raise ValueError(f"vlmtools: method={text} names a method twice")
    if "none" in chosen and len(chosen) > 1:
        raise ValueError(f"vlmtools: method={text}: none runs the plain model and joins no other method")
    chosen = [] if chosen == ["none"] else chosen
    valid = {name: options(name) for name in chosen}
    settings: dict[str, dict] = {name: {} for name in chosen}
    for key, value in args.items():
        if key in MODEL_KEYS:
            continue
        name, dot, option = key.partition(".")
        if dot:
            if name not in valid:
                raise ValueError(f"vlmtools: {key}={value} is a setting of {name}, which method={text} does not run")
            if option not in valid[name]:
                raise ValueError(f"vlmtools: {name} has no setting {option!r}; its settings: "
                                 + ", ".join(valid[name]))
            owners = [name]
        else:
            option = key
            owners = [name for name in chosen if key in valid[name]]
        if not owners:
            raise ValueError(f"vlmtools: unknown model_args key {key!r}; valid: {', '.join(MODEL_KEYS[:5])}"
                             + "".join(f"; {name}: {', '.join(keys)}" for name, keys in valid.items())
                             + ("" if chosen else " (method=none takes no settings)"))
        if len(owners) > 1:
            raise ValueError(f"vlmtools: {key} is a setting of {' and '.join(owners)}; say which: "
                             + " or ".join(f"{name}.{key}={value}" for name in owners))
        if option in settings[owners[0]]:
            raise ValueError(f"vlmtools: {owners[0]}'s {option} is given twice")
        settings[owners[0]][option] = literal(value)
    methods = tuple(Method(name, settings[name]) for name in chosen)
    for method in methods:  # a setting the class refuses ends the run here, before the model loads
        try:
            method.build(["Is there a red circle in the image?"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"vlmtools: {method.name} with {method.settings}: {error}") from None
    dtype = args.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"vlmtools: dtype={dtype}: one of {', '.join(DTYPES)}")
    batch = args.get("batch_size", 1)
    try:
        batch = int(batch if batch is not None else 1)
    except (TypeError, ValueError):
        raise ValueError(f"vlmtools: batch_size={batch}: a number (prompts per generate call; no 'auto')") from None
    if batch < 1:
        raise ValueError(f"vlmtools: batch_size={batch}: at least 1")
    return Config(pretrained=str(args["pretrained"]), methods=methods, device=args.get("device"), dtype=dtype,
                  batch_size=batch)


def generation(gen_kwargs: dict) -> tuple[dict, list[str], list[str]]:
    """A task's ``generation_kwargs`` as (``generate`` keywords, stop strings, ignored keys)."""
    given = dict(gen_kwargs or {})
    until = given.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"vlmtools: generation_kwargs until is a string or a list of strings, got {until!r}")
    until = [s for s in until if s]
    temperature = float(given.get("temperature") or 0)
    sample = temperature > 0 and given.get("do_sample") is not False
    out = {"max_new_tokens": int(given.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), "do_sample": sample}
    if sample:
        out["temperature"] = temperature
        for key in ("top_p", "top_k"):
            if given.get(key) is not None:
                out[key] = given[key]
    if int(given.get("num_beams") or 1) > 1:
        out["num_beams"] = int(given["num_beams"])
    if given.get("repetition_penalty") not in (None, 1, 1.0):
        out["repetition_penalty"] = float(given["repetition_penalty"])
    return out, until, sorted(set(given) - set(GENERATION_KEYS))


def cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the stop strings ``until``."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def prompt_inputs(processor, images: list[list], texts: list[str], device) -> dict:
    """A left-padded chat batch: each prompt's images then its text. One image each:
    :func:`vlmtools.chat.chat_inputs` (what the vlmtools benches give the model); otherwise the same chat
    turn with as many image entries as the prompt has images (none: text only)."""
    from vlmtools.chat import chat_inputs

    if all(len(shown) == 1 for shown in images):
        return chat_inputs(processor, [shown[0] for shown in images], texts, device)
    chats = [processor.apply_chat_template(
        [{"role": "user", "content": [*({"type": "image"} for _ in shown), {"type": "text", "text": text}]}],
        add_generation_prompt=True) for shown, text in zip(images, texts)]
    processor.tokenizer.padding_side = "left"
    flat = [image for shown in images for image in shown]
    batch = processor(images=flat or None, text=chats, return_tensors="pt", padding=True)
    return {key: value.to(device) for key, value in batch.items()}


def _images(visuals, where: str) -> list:
    """A document's ``doc_to_visual`` output as a list of RGB PIL images (videos and audio are refused)."""
    from PIL import Image

    visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    images = []
    for visual in visuals:
        if isinstance(visual, (list, tuple)):
            images += _images(visual, where)
        elif isinstance(visual, Image.Image):
            images.append(visual if visual.mode == "RGB" else visual.convert("RGB"))
        elif visual is not None:
            raise ValueError(f"vlmtools: {where}: doc_to_visual gave a {type(visual).__name__} ({str(visual)[:60]}); "
                             "the vlmtools model reads images (PIL) only, no video or audio")
    return images


class VLMTools(_Base or object):
    """lmms-eval's ``vlmtools`` model: a wrapped VLM that answers each batch under ``vlm.use(*methods)``."""

    is_simple = True

    def __init__(self, pretrained: str = "llava-shapes", **model_args) -> None:
        if _Base is None:  # pragma: no cover
            raise ImportError("the vlmtools model of lmms-eval needs lmms-eval: pip install 'vlmtools[lmms-eval]'")
        super().__init__()
        import torch

        from vlmtools import wrap

        from .inputs import load_vlm

        self.settings = parse_model_args({"pretrained": pretrained, **model_args})
        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self._device = torch.device(device)
        model, processor = load_vlm(self.settings.pretrained)
        if self.settings.dtype:
            model = model.to(getattr(torch, self.settings.dtype))
        self.vlm = wrap(model.to(self._device), processor)
        self._check_trends()
        self._warned: set = set()

    def _check_trends(self) -> None:
        """Load the debias trends of every host now: a missing calibration file ends the run before a task runs."""
        for intervention in self.settings.build(["Is there a red circle in the image?"]):
            debias = getattr(intervention, "debias", None)
            if debias is not None:
                for stage in range(len(intervention.layers)):
                    debias.trend_for(intervention.calibration_key(self.vlm, stage))

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def model(self):
        return self.vlm.model

    @property
    def tokenizer(self):
        return self.vlm.processor.tokenizer

    def generate_until(self, requests) -> list[str]:
        """Each request's answer: batches in document order (see the module's doc), one ``vlm.use`` block each."""
        from tqdm import tqdm

        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups.setdefault((task, split, repr(sorted((gen_kwargs or {}).items()))), []).append(index)
        batches = [indices[i:i + self.batch_size] for indices in groups.values()
                   for i in range(0, len(indices), self.batch_size)]
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vlmtools")
        for batch in batches:
            for index, text in zip(batch, self._answer([requests[i] for i in batch])):
                answers[index] = text
            progress.update(len(batch))
        progress.close()
        return answers

    def _answer(self, requests) -> list[str]:
        import torch

        contexts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            shown = _images(doc_to_visual(doc) if doc_to_visual is not None else [], f"{task} document {doc_id}")
            contexts.append(context.replace("<image>", "").strip() if "<image>" in context else context)
            images.append(shown)
        gen_kwargs = requests[0].args[1]
        kwargs, until, ignored = generation(gen_kwargs)
        if ignored and tuple(ignored) not in self._warned:
            self._warned.add(tuple(ignored))
            from loguru import logger

            logger.warning(f"vlmtools: generation_kwargs {', '.join(ignored)} are not read")
        if until:
            kwargs.update(stop_strings=until, tokenizer=self.tokenizer)
        inputs = prompt_inputs(self.vlm.processor, images, contexts, self._device)
        with torch.no_grad(), self.vlm.use(*self.settings.build(contexts)):
            out = self.vlm.model.generate(**inputs, **kwargs)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [cut(text, until) for text in texts]
        for context, text in zip(contexts, texts):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return texts

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "vlmtools: loglikelihood requests (multiple choice by likelihood) are not supported: the methods act at "
            "a prompt's prefill and at each generated token, which scoring a given continuation does not "
            "reproduce; run the task's generate_until variant")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlmtools: multi-round generation is not supported; run single-round tasks")
