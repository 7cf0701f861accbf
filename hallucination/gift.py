"""GIFT ("Capturing Gaze Shifts for Guidance"): boost the image regions the question
made the model look at.

Why: while a model reads the question, the visual tokens whose attention *rises*
from one word to the next are the ones the words point at. Summing those gaze
shifts over the question's content words gives a saliency map of the image; at
every decoding step the last query row's attention on salient visual tokens is then
amplified in the heads that look at the image, and the question span is amplified by
the same ratio so that the answer stays tied to what was asked.

Where saliency comes from:

* ``saliency_layer="auto"`` (the paper): the layer with the largest total shift, searched
  over ALL layers. That needs the whole prompt's attention before the first edited layer
  runs, so GIFT makes a second prefill: at the input of layer 0 it runs the decoder layers
  once more, unedited and without a cache, on the prompt's own embeddings and masks,
  reading the question rows of every layer; then the real prefill runs with the saliency
  known (about one extra prefill per prompt; decoding steps cost nothing more).
* a fixed layer before every edited layer (the released code's LLaVA settings): read
  causally during the generate's own prefill, no second prefill.
* a fixed layer at or after an edited layer (the Qwen2-VL-7B preset: saliency 14, layers
  5-18): the second prefill again, so the prefill's last row is edited in every layer.

The authors' per-model settings (:attr:`GIFT.PRESETS`) are picked by the model's family and
LM signature when ``layers`` / ``alpha`` are not given (``settings["preset"]``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from vlmtools.plan import ACTIVE_PLAN, AttentionHook, LayerHook, Plan, key_positions
from vlmtools.record import last_row
from vlmtools.sinks.dims import model_signature
from vlmtools.text import content_words, word_ids_for_tokens

from .common import key_mask, keys_of, visual_mask, widen

TINY = 1e-12


def top_half(score: torch.Tensor) -> torch.Tensor:
    """Bool mask, True for the ``max(1, H // 2)`` largest entries along dim 1 (heads)."""
    keep = max(1, score.shape[1] // 2)
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter(1, score.topk(keep, dim=1).indices, True)


def gaze_shift(attn: torch.Tensor, previous: torch.Tensor, rows: torch.Tensor,
               visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency of one layer from the gaze shifts ``max(A[i, j] - A[i-1, j], 0)``.

    ``attn`` ``(B, H, R, K)``: rows ``i`` (question content words), ``previous`` the rows
    ``i - 1``; ``rows`` ``(B, R)`` bool marks the rows that are content words of each
    sample; ``visual`` ``(B, K)``. Returns the map ``(B, K)`` (shift summed over rows,
    averaged over the half of heads with the largest total shift; 0 off the image) and
    the layer's total shift ``(B,)`` over all heads.
    """
    mask = rows[:, None, :, None] & visual[:, None, None]
    shift = (attn - previous).clamp(min=0) * mask
    per_row = shift.sum(2)  # (B, H, K)
    per_head = per_row.sum(-1)  # (B, H)
    kept = top_half(per_head)
    return (per_row * kept[..., None]).sum(1) / kept.sum(1, keepdim=True), per_head.sum(1)


def saliency_factor(saliency: torch.Tensor, visual: torch.Tensor, alpha: float, clamp_sd: float = 3.0) -> torch.Tensor:
    """``F_j = exp(alpha * S_j)`` on each sample's visual keys (1 elsewhere), ``(B, K)``.

    ``S`` is the map clamped to mean +- ``clamp_sd`` standard deviations (over the
    sample's visual tokens) and min-max scaled to [0, 1] (0 when the map is flat).
    """
    factor = torch.ones_like(saliency)
    for b in range(saliency.shape[0]):
        values = saliency[b, visual[b]]
        mean, sd = values.mean(), values.std(unbiased=False)
        values = values.clamp(mean - clamp_sd * sd, mean + clamp_sd * sd)
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
        factor[b, visual[b]] = torch.exp(alpha * scaled)
    return factor


def enhance(probs: torch.Tensor, factor: torch.Tensor, visual: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """GIFT's edit of post-softmax rows ``(B, H, R, K)`` (the last query row).

    In the half of heads with the most visual attention, visual attention is multiplied
    by ``factor`` ``(B, K)``; every head's ratio ``r`` = boosted visual mass / visual mass;
    in the half of heads with the most attention on the ``question`` span ``(B, K)``, that
    span is multiplied by the head's ``r``; rows are renormalised to sum 1.
    """
    visual, question = visual[:, None, None], question[:, None, None]
    factor = factor[:, None, None]
    mass = (probs * visual).sum(-1)
    ratio = (probs * visual * factor).sum(-1) / mass.clamp(min=TINY)
    on_image = top_half(mass)[..., None] & visual
    on_question = top_half((probs * question).sum(-1))[..., None] & question
    scale = torch.where(on_image, factor, 1.0) * torch.where(on_question, ratio[..., None], 1.0)
    edited = probs * scale
    return edited / edited.sum(-1, keepdim=True)


def question_tokens(ids: torch.Tensor, start: int, tokenizer, question: str | None,
                    tagger: str) -> tuple[list[int], list[int], str]:
    """Positions of the question's tokens and of its content-word tokens in one prompt.

    ``ids`` are the prompt's text tokens from position ``start`` on. Without a
    tokenizer every one of them is a question content token (tagger ``"none"``).
    With one, the text is decoded (prefix by prefix, for character offsets) and the
    tokens inside ``question`` (default: the whole text) mapped to words.
    """
    positions = list(range(start, start + len(ids)))
    if tokenizer is None:
        return positions, positions, "none"
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    text = tokenizer.decode(ids)
    offsets = list(zip([0] + ends[:-1], ends))
    question = text if question is None else question
    at = text.find(question)
    if at < 0:
        raise ValueError(f"GIFT: question {question!r} is not in the prompt's text {text!r}")
    words = content_words(question, tagger)
    word_ids = word_ids_for_tokens(question, offsets, words, start=at)
    inside = [p for p, w in zip(positions, word_ids) if w is not None]
    content = [p for p, w in zip(positions, word_ids) if w is not None and words[w].is_content]
    return inside, content, words.tagger


class GIFT:
    """Gaze-shift guided enhancement of the last query row on ``layers``.

    ``saliency_layer``: ``"auto"`` is the paper's choice (the layer with the largest total
    shift, over all layers: a second prefill), an int the released code's (fixed per model),
    ``"preset"`` the fixed layer of this model's preset. ``layers`` / ``alpha`` default to the
    model's preset (:attr:`PRESETS`, matched by :attr:`SIGNATURES`), else LLaVA-1.5-7B's layers
    scaled to the model and alpha 5. ``questions``: the user's question per sample (or one for
    all); without them the whole text after the image is the question.

    What one block computed is its :class:`GIFTRun`, ``trace[gift]``:

    >>> gift = GIFT(questions=["Is there a dog?"])      # on LLaVA-1.5-7B: layers 12-22, alpha 5
    >>> with vlm.use(gift) as trace:
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> trace[gift].saliency, trace[gift].factor, trace[gift].settings["chosen_layer"]
    """

    PRESETS: ClassVar[dict[str, dict]] = {
        "llava-1.5-7b": {"saliency_layer": 11, "layers": tuple(range(12, 23)), "alpha": 5.0},
        "llava-1.5-13b": {"saliency_layer": 10, "layers": tuple(range(14, 21)), "alpha": 5.0},
        "qwen2-vl-7b": {"saliency_layer": 14, "layers": tuple(range(5, 19)), "alpha": 4.0},
    }
    """The authors' released settings (0-indexed layers)."""

    SIGNATURES: ClassVar[dict[tuple, str]] = {
        ("llava", ("llama", 4096, 32, 11008)): "llava-1.5-7b",
        ("llava", ("llama", 5120, 40, 13824)): "llava-1.5-13b",
        ("qwen2_vl", ("qwen2_vl", 3584, 28, 18944)): "qwen2-vl-7b",
    }
    """(family, :func:`~vlmtools.sinks.dims.model_signature`) -> preset: the models the presets were made for."""

    def __init__(self, alpha: float | None = None, saliency_layer: int | Literal["auto", "preset"] = "auto",
                 layers: Sequence[int] | None = None, questions: str | Sequence[str] | None = None,
                 tagger: Literal["auto", "spacy", "stopwords"] = "auto"):
        if isinstance(saliency_layer, str) and saliency_layer not in ("auto", "preset"):
            raise ValueError(f"GIFT saliency_layer must be an int, 'auto' or 'preset', got {saliency_layer!r}")
        self.alpha, self.saliency_layer, self.layers, self.tagger = alpha, saliency_layer, layers, tagger
        self.questions = [questions] if isinstance(questions, str) else questions

    @classmethod
    def preset(cls, name: str, **overrides) -> GIFT:
        if name not in cls.PRESETS:
            raise KeyError(f"no GIFT preset {name!r}; presets are {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def preset_for(cls, vlm) -> str | None:
        """The preset made for this model (by family and LM signature), or None."""
        return cls.SIGNATURES.get((vlm.family, model_signature(vlm.model.config)))

    def attach(self, vlm, plan) -> GIFTRun:
        run = plan.trace[self] = GIFTRun(self, vlm, plan)
        return run


class GIFTRun(AttentionHook, LayerHook):
    """One block of :class:`GIFT` (``trace[gift]``): its hooks and, from the latest prefill, ``saliency``
    (``(B, L)`` gaze-shift map of each sample's chosen layer), ``factor`` (``(B, L)``, ``exp(alpha * S)``
    on visual keys, 1 elsewhere) and ``settings`` (with the preset, the tagger, whether a second prefill
    ran and each sample's chosen layer)."""

    def __init__(self, gift: GIFT, vlm, plan):
        num_layers = vlm.num_layers
        preset_name = GIFT.preset_for(vlm)
        preset = GIFT.PRESETS.get(preset_name, {})
        if gift.layers is not None:
            edit = sorted(gift.layers)
        elif preset:
            edit = list(preset["layers"])
        else:  # a hybrid family's (Qwen3.5) layers without attention have nothing to edit
            edit = [index for index in range(round(num_layers * 12 / 32), round(num_layers * 23 / 32))
                    if index in vlm.attention_layers]
        alpha = gift.alpha if gift.alpha is not None else preset.get("alpha", 5.0)
        if gift.saliency_layer == "auto":
            candidates = list(vlm.attention_layers)
        elif gift.saliency_layer == "preset":
            if not preset:
                raise ValueError(f"GIFT: no preset for this {vlm.family} model (presets: {sorted(GIFT.PRESETS)}); "
                                 "pass saliency_layer= an int or 'auto'")
            candidates = [preset["saliency_layer"]]
        else:
            candidates = [int(gift.saliency_layer)]
        if not edit or max(edit + candidates) >= num_layers or min(edit + candidates) < 0:
            raise ValueError(f"GIFT: layers {edit} / saliency layer(s) {candidates} do not fit a "
                             f"{num_layers}-layer model; pass layers= and saliency_layer=")
        self.second_prefill = gift.saliency_layer == "auto" or min(edit) <= max(candidates)
        if self.second_prefill:
            text = vlm.model.config.get_text_config()
            types = set(getattr(text, "layer_types", None) or ["full_attention"])
            if not types <= {"full_attention", "sliding_attention"}:
                raise ValueError(f"GIFT: the second prefill reuses layer 0's attention mask, and this model mixes "
                                 f"attention types {sorted(types)}; pass a saliency_layer before every edited layer")
            # full and sliding layers share one mask while the prompt fits the window (checked per prompt)
            self._window = getattr(text, "sliding_window", None) if len(types) > 1 else None
            if vlm.adapter.residual_adds:
                raise ValueError(f"GIFT: the second prefill runs the decoder layers alone, without what {vlm.family}'s "
                                 "language model adds between them (DeepStack's vision features); pass a "
                                 "saliency_layer before every edited layer")
        self.gift, self.vlm, self.alpha = gift, vlm, alpha
        self.edit, self.candidates, self.state = set(edit), candidates, plan.state
        self.tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
        self.settings = {"method": "GIFT", "variant": "paper" if gift.saliency_layer == "auto" else "released",
                         "preset": preset_name, "alpha": alpha, "saliency_layer": gift.saliency_layer,
                         "candidates": candidates, "layers": edit, "second_prefill": self.second_prefill,
                         "tagger": None, "chosen_layer": None}
        self.saliency: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        self._layout = None
        if self.second_prefill:
            plan.layer(0, vlm.layers[0], self)
            sites = self.edit
        else:
            sites = self.edit | set(candidates)
        for index in sorted(sites):
            plan.attention(vlm.site(f"text.{index}"), self)

    def _new_prompt(self) -> None:
        """Question and content tokens of every sample; forget the previous prompt's saliency."""
        layout, ids = self.state.layout, self.state.input_ids
        questions = self.gift.questions or [None] * len(layout)
        if len(questions) == 1:
            questions = questions * len(layout)
        found = [question_tokens(ids[b, s.text.start:s.text.stop].tolist(), s.text.start, self.tokenizer, q,
                                 self.gift.tagger) for b, (s, q) in enumerate(zip(layout.samples, questions))]
        if any(not content for _, content, _ in found):
            raise ValueError("GIFT: a prompt's question has no content word to read gaze shifts from")
        self.settings["tagger"] = found[0][2]
        self.visual = visual_mask(layout)
        self.question = key_mask([torch.tensor(q) for q, _, _ in found], layout.seq_len)
        content = key_mask([torch.tensor(c) for _, c, _ in found], layout.seq_len)
        self.content_rows = content.any(0).nonzero()[:, 0]
        self.row_mask = content[:, self.content_rows]
        self.saliency_rows = torch.unique(torch.cat([self.content_rows, self.content_rows - 1]))
        self._layout, self._buffers, self._maps, self.saliency, self.factor = layout, {}, {}, None, None

    def before_layer(self, index, hidden, kwargs):
        """The second prefill, at the input of layer 0 of each prompt's prefill (see the module docstring)."""
        if self.state.step != 0 or self._layout is self.state.layout:
            return
        self._new_prompt()
        if hidden.shape[1] != self.state.layout.seq_len:
            raise ValueError(f"GIFT: a token drop at layer 0 (VisionZip, FasterVLM, ...) kept {hidden.shape[1]} of the "
                             f"prompt's {self.state.layout.seq_len} tokens before GIFT's second prefill, which reads "
                             "the whole prompt; GIFT composes with hosts that drop from layer 1 on (FastV, PDrop)")
        if self._window is not None and hidden.shape[1] > self._window:
            raise ValueError(f"GIFT: this {hidden.shape[1]}-token prompt is longer than the sliding window "
                             f"({self._window}), so layer 0's mask is not every layer's and the second prefill "
                             "cannot reuse it; pass a saliency_layer before every edited layer")
        reader = _SaliencyReader(self)
        probe = Plan()
        for layer in self.candidates:
            probe.attention(self.vlm.site(f"text.{layer}"), reader)
        plain = {**kwargs, "use_cache": False}
        for name in ("cache", "past_key_values", "past_key_value"):
            if name in plain:
                plain[name] = None
        token = ACTIVE_PLAN.set(probe)  # only the reader sees this pass; no other hook of the block
        try:
            with torch.no_grad():
                for block in self.vlm.layers[: max(self.candidates) + 1]:
                    out = block(hidden, **plain)
                    hidden = out[0] if isinstance(out, tuple) else out
        finally:
            ACTIVE_PLAN.reset(token)
        if self.factor is None:
            raise RuntimeError("GIFT: the second prefill did not reach every saliency layer")

    def rows(self, call):
        index, device = call.site.index, call.query.device
        if self.state.step == 0:
            if self._layout is not self.state.layout:
                self._new_prompt()
            wanted = [self.saliency_rows] if index in self.candidates and index not in self._maps else []
            positions = key_positions(self.state, index, call.k_len)
            if wanted and positions is not None:
                raise ValueError(f"GIFT: saliency layer {index} is read in the prefill and a token drop shortened it; "
                                 "pass saliency_layer='auto' (a second prefill over the whole prompt) or a layer "
                                 "before the drop")
            if index in self.edit and self.factor is not None:
                if positions is not None and not bool((positions[:, -1] == self.state.layout.seq_len - 1).all()):
                    raise ValueError(f"GIFT: the token drop before layer {index} dropped the prompt's last token, "
                                     "the query GIFT edits")
                wanted.append(torch.tensor([call.q_len - 1]))
            return torch.unique(torch.cat(wanted)).to(device) if wanted else None
        return last_row(call) if index in self.edit and self.factor is not None else None

    def edit_probs(self, call, rows, probs):
        last = (rows == call.q_len - 1).nonzero()[:, 0]
        if call.site.index not in self.edit or self.factor is None or not last.numel():
            return probs
        device, index, k_len, state = probs.device, call.site.index, call.k_len, self.state
        probs = probs.clone()
        probs[:, :, last] = enhance(probs[:, :, last], keys_of(self.factor, state, index, k_len, device),
                                    keys_of(self.visual, state, index, k_len, device),
                                    keys_of(self.question, state, index, k_len, device))
        return probs

    def record(self, call, rows, probs):
        if self.state.step == 0:
            self.read_saliency(call, rows, probs)

    def read_saliency(self, call, rows, probs) -> None:
        """Keep the question rows of a candidate layer; a layer's map once its rows are all in."""
        index = call.site.index
        if index not in self.candidates or index in self._maps:
            return
        buffer = self._buffers.setdefault(index, {})
        for position, row in zip(rows.tolist(), probs.unbind(2)):
            buffer[position] = row.float().cpu()
        if any(int(r) not in buffer for r in self.saliency_rows):
            return  # the seam may hand rows over in chunks
        del self._buffers[index]
        attn = torch.stack([buffer[int(r)] for r in self.content_rows], 2)
        previous = torch.stack([buffer[int(r) - 1] for r in self.content_rows], 2)
        self._maps[index] = gaze_shift(attn, previous, self.row_mask, widen(self.visual, call.k_len))
        if len(self._maps) == len(self.candidates):
            self._choose()

    def _choose(self) -> None:
        totals = torch.stack([self._maps[index][1] for index in self.candidates], 1)  # (B, candidates)
        chosen = totals.argmax(1)
        self.saliency = torch.stack([self._maps[self.candidates[int(c)]][0][b] for b, c in enumerate(chosen)])
        self.settings["chosen_layer"] = [self.candidates[int(c)] for c in chosen]
        self.factor = saliency_factor(self.saliency, self.visual, self.alpha)


class _SaliencyReader(AttentionHook):
    """The hook of GIFT's second prefill: the question rows of every candidate layer, unedited."""

    def __init__(self, run: GIFTRun):
        self.run = run

    def rows(self, call):
        return self.run.saliency_rows.to(call.query.device)

    def record(self, call, rows, probs):
        self.run.read_saliency(call, rows, probs)
