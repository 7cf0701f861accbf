"""From recorded joint attention to one heatmap: the probe, sink handling, word maps, the average.

The probe keeps, per chosen block and call, only the image-query x text-key block of
the joint attention, averaged over the chosen heads: ``(B, N_image, T)``, filled
chunk by chunk by the seam (no ``L x L`` tensor). A word's map is the share of each
image query's *text* attention that goes to the word's sub-tokens (softmax restricted
to the text keys, as a cross-attention map), averaged over its sub-tokens. That
share is what magnets change: appended stop words take the text attention of image
regions the expression does not describe.

Global sinks (the shared detector's ``global_sink`` criterion, on each block's
:class:`~vlmtools.sinks.JointColumns` of the same forward) that are text keys are
handled in one of three ways: ``none`` (kept like any token), ``suppress`` (their
maps dropped and their mass removed from every query's text budget, i.e. the
remaining text attention renormalised) or ``redirect`` (their maps dropped and their
mass handed to the magnets, whose maps are never read: it stays in the budget).
Sinks among the image keys do not enter a text-normalised map; they are reported.

On a DiT whose text enters by cross-attention (Wan), the blocks read are cross-attention
sites: their keys are the text alone, so the image-query x text-key block is the whole of
each call's attention (the site's :meth:`~vlmtools.adapters.dit.DiTSite.key_offset` places it
in the layout), and a word's map is its share there, as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from vlmtools.plan import Plan
from vlmtools.record import SiteRecorder
from vlmtools.sinks import GlobalSink, JointColumns, SinkTensors, plain_layout

from .prompt import PromptTokens

SinkMode = Literal["suppress", "redirect", "none"]
WordMode = Literal["content", "head", "expression", "all"]
PaddingMode = Literal["budget", "exclude"]
READ = {
    "content": ("content",),
    "head": ("content",),  # of the head noun phrase only
    "expression": ("content", "stop"),
    "all": ("content", "stop", "magnet", "special"),
}


class RecordImageText(SiteRecorder):
    """``trace["{site}.image_text"]``: per call, image-query x text-key attention ``(B, N_image, T)``,
    fp32, averaged over ``heads`` (all when None)."""

    what = "image_text"

    def __init__(self, sites: Sequence[str], heads: Sequence[int] | None = None):
        super().__init__(sites)
        self.heads = None if heads is None else list(heads)

    def attach(self, vlm, plan: Plan):
        for name in self.site_names:
            site = vlm.site(name)
            if self.heads is not None and not all(0 <= h < site.heads for h in self.heads):
                raise ValueError(f"RefAM: heads {self.heads} out of range for {name}, which has {site.heads} heads")
        return super().attach(vlm, plan)

    def rows(self, block, call):
        return block.state.layout.image.positions.to(call.query.device)

    def observe(self, block, call):
        layout = block.state.layout
        image_text = torch.zeros(call.query.shape[0], len(layout.image), len(layout.text), device=call.query.device)
        block.entries(call).append(image_text)

    def record(self, block, call, rows, probs):
        layout = block.state.layout
        heads = probs if self.heads is None else probs[:, self.heads]
        image_text = block.entries(call)[-1]
        offset = call.site.key_offset(layout) if hasattr(call.site, "key_offset") else 0
        text = slice(layout.text.start - offset, layout.text.stop - offset)
        image_text[:, rows - layout.image.span.start] = heads.mean(1)[..., text]


def global_sinks(columns: dict[int, JointColumns], layout, ratio: float, max_cv: float) -> dict[int, list[int]]:
    """``{block: sink positions in the joint sequence}`` of sample 0, by the shared ``global_sink`` criterion."""
    criterion = GlobalSink(ratio=ratio, max_cv=max_cv, layers=tuple(columns))
    batch = next(iter(columns.values())).total.shape[0]
    # every key of the joint sequence may be a sink, pads included: a layout with no padding
    tensors = SinkTensors(
        layout=plain_layout(batch, len(layout.text) + len(layout.image)),
        num_layers=max(columns) + 1,
        joint_columns=columns,
    )
    found: dict[int, list[int]] = {block: [] for block in columns}
    for finding in criterion.evaluate(tensors).findings:
        if finding.sample == 0:
            found[finding.layer].append(finding.token)
    return found


def word_maps(
    block: torch.Tensor,
    tokens: PromptTokens,
    sinks: Sequence[int],
    words: WordMode = "content",
    sink_mode: SinkMode = "suppress",
    padding: PaddingMode = "budget",
) -> dict[str, torch.Tensor]:
    """Text-normalised maps ``(N_image,)`` of the words read, from one block ``(N_image, T)``.

    ``sinks`` are text positions (0 = first text token). Keys are ``"{index}:{word}"``
    for expression words and ``"{position}:{token role}"`` for magnets and special
    tokens (read only with ``words="all"``); padding is never read. ``words="head"``
    reads the content words of ``tokens.head``, the head noun phrase.
    """
    if words == "head" and tokens.head is None:
        raise ValueError("words='head' needs tokens.head, the head noun phrase (token_roles fills it)")
    sinks = set(sinks)
    budget = [
        i
        for i, role in enumerate(tokens.roles)
        if not (role == "padding" and padding == "exclude") and not (i in sinks and sink_mode == "suppress")
    ]
    share = block[:, budget].sum(-1).clamp(min=1e-12)
    grouped: dict[str, list[int]] = {}
    for i, role in enumerate(tokens.roles):
        if role not in READ[words] or (i in sinks and sink_mode != "none"):
            continue
        word = tokens.word_of[i]
        if words == "head" and word not in tokens.head:
            continue
        key = f"{word}:{tokens.words[word].word}" if word is not None else f"{i}:{role}"
        grouped.setdefault(key, []).append(i)
    return {key: block[:, positions].mean(-1) / share for key, positions in grouped.items()}


class MapAccumulator:
    """Running sums of named maps over the forward passes of one segmentation (timesteps x seeds).

    Resettable and independent of the model, so one RefAM instance serves many images
    (and video frames) without state in module attributes. A key missing from a pass
    (a word that was a global sink there) counts as zero in that pass.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.calls = 0

    def add(self, maps: dict[str, torch.Tensor]) -> None:
        for key, value in maps.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.calls += 1

    def mean(self) -> dict[str, torch.Tensor]:
        if not self.calls:
            raise RuntimeError("MapAccumulator: nothing accumulated yet")
        return {key: value / self.calls for key, value in self.sums.items()}
