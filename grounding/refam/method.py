"""RefAM: referring segmentation from a diffusion transformer's joint attention, as pipeline steps.

``segment`` reads as the steps of METHODS.md section 4: check the inputs, encode the
image, build the prompt, probe (one forward per timestep and seed, averaged in a
:class:`~grounding.refam.maps.MapAccumulator`), aggregate the content words' maps,
then turn the heatmap into a mask (training-free, or SAM when one is given).

``segment_clip`` is the same on a video DiT (Mochi, Wan): one forward per timestep and
seed over the whole clip's latents gives a heatmap per latent frame; each video frame
takes its latent frame's heatmap through the same mask step.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

import vlmtools
from grounding.masks import heatmap_to_mask, overlay, peak_point, upsample
from vlmtools.adapters.dit_source import EncodedPrompt
from vlmtools.plan import AttentionHook, StopForward
from vlmtools.record import last_row
from vlmtools.sinks import RecordJointColumns

from .maps import MapAccumulator, PaddingMode, RecordImageText, SinkMode, WordMode, global_sinks, word_maps
from .prompt import DEFAULT_MAGNETS, PromptTokens, build_prompt, check_expression, token_roles
from .source import source_for


@dataclass(frozen=True)
class RefAMSettings:
    """Every choice RefAM makes; recorded in each result (``seg.settings``).

    ``blocks`` are site names (``dit.double.0``); None takes the source's blocks (its family's
    rule, FLUX: the first half of the single-stream blocks, or those measured best on its model,
    flux-shapes: ``vlmtools_zoo.flux.REFAM_BLOCKS``), else :func:`default_blocks`.
    ``heads`` index the heads averaged (None: all). ``words``: ``content`` reads the
    content words, ``head`` only the content words of the head noun phrase ("the red mug
    on the left of the plate" -> red, mug: the noun chunk of spaCy's parse that holds the
    expression's root; without spaCy the leading words up to the first stop word after a
    content word; see :func:`~grounding.refam.prompt.head_phrase`), ``expression`` every word
    of the expression (no stop-word filtering), ``all`` every real token (magnets and
    special tokens too).
    ``padding="budget"`` keeps pad keys' mass in each query's text budget (they act
    as magnets, as FLUX's T5 padding does); ``"exclude"`` renormalises without it.
    ``threshold`` is ``"otsu"`` or a level in [0, 1) of the min-max-normalised heatmap.
    """

    timesteps: tuple[float, ...] = (0.3,)
    seeds: tuple[int, ...] = (0,)
    magnets: tuple[str, ...] = DEFAULT_MAGNETS
    colour: str | None = None
    sinks: SinkMode = "suppress"
    sink_ratio: float = 5.0
    sink_max_cv: float = 0.5
    words: WordMode = "content"
    padding: PaddingMode = "budget"
    blocks: tuple[str, ...] | None = None
    heads: tuple[int, ...] | None = None
    threshold: Literal["otsu"] | float = "otsu"
    keep: Literal["largest", "peak", "all"] = "largest"
    tagger: Literal["auto", "spacy", "stopwords"] = "auto"

    def __post_init__(self):
        if not self.timesteps or not all(0 < t < 1 for t in self.timesteps):
            raise ValueError(f"timesteps must be flow-matching times in (0, 1), got {self.timesteps}")
        if not self.seeds:
            raise ValueError("seeds must name at least one noise seed")
        for name, allowed in (("sinks", SinkMode), ("words", WordMode), ("padding", PaddingMode)):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"{name} must be one of {allowed.__args__}, got {getattr(self, name)!r}")
        if self.threshold != "otsu" and not 0 <= float(self.threshold) < 1:
            raise ValueError(f"threshold must be 'otsu' or in [0, 1), got {self.threshold!r}")


def default_blocks(dit) -> tuple[str, ...]:
    """The middle third of the sites (SD3's joint blocks), where the family's source names no blocks.

    The paper reads "middle-to-late blocks" of real checkpoints; nothing of full size was
    measured here. A family's source may name its own (FLUX: the first half of the
    single-stream blocks), and a source that knows its model's best blocks names those (the
    zoo's flux-shapes localises best in its first single-stream block:
    ``vlmtools_zoo.flux.REFAM_BLOCKS``, measured with ``benchmarks/grounding_quality.py --sweep-blocks``).
    """
    names = [site.name for site in dit.sites]
    return tuple(names[len(names) // 3 : max(len(names) // 3 + 1, 2 * len(names) // 3)])


@dataclass
class Segmentation:
    """One RefAM result: ``mask`` (H, W) bool, ``heatmap`` (H, W), ``point`` (x, y), and how they came about."""

    mask: np.ndarray
    heatmap: np.ndarray
    point: tuple[int, int]
    grid_heatmap: np.ndarray
    word_maps: dict[str, np.ndarray]
    tokens: PromptTokens
    sinks: list[dict]
    settings: dict
    image: Image.Image | None = field(default=None, repr=False)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``mask.png``, ``heatmap.png`` (overlay on the image) and ``segmentation.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {name: folder / name for name in ("mask.png", "heatmap.png", "segmentation.json")}
        Image.fromarray(self.mask.astype(np.uint8) * 255).save(paths["mask.png"])
        background = self.image if self.image is not None else Image.new("RGB", self.mask.shape[::-1])
        overlay(background, self.heatmap, self.mask).save(paths["heatmap.png"])
        info = {
            "point": list(self.point),
            "settings": self.settings,
            "sinks": self.sinks,
            "tokens": [
                {"position": i, "role": r, "word": None if w is None else self.tokens.words[w].word}
                for i, (r, w) in enumerate(zip(self.tokens.roles, self.tokens.word_of))
                if r != "padding"
            ],
        }
        paths["segmentation.json"].write_text(json.dumps(info, indent=1))
        return paths


def execution_order(dit) -> list[str]:
    """Site names in the order a forward runs them: block after block, and within a block (Wan's) its
    self-attention before its cross-attention; the sites' own order where they do not say their block."""
    if not all(getattr(site, "block", "") for site in dit.sites):
        return [site.name for site in dit.sites]
    paths: list[str] = []
    for site in dit.sites:
        path = site.block.rsplit(".", 1)[0]
        paths += [] if path in paths else [path]
    key = {site.name: (paths.index(site.block.rsplit(".", 1)[0]), site.index, i) for i, site in enumerate(dit.sites)}
    return sorted(key, key=key.__getitem__)


def _named(names: list[str]) -> str:
    return f"{names[0]} .. {names[-1]}" if len(names) > 3 else ", ".join(names)


def sink_sites(dit, blocks) -> tuple[str, ...]:
    """The sites whose global sinks RefAM reads: the blocks read and, for a cross-attention block (Wan),
    the self-attention of the same block (where the video sinks are)."""
    out: list[str] = []
    for name in blocks:
        out += [site for site in (name, *_partners(dit, name)) if site not in out]
    return tuple(out)


def _partners(dit, name: str) -> list[str]:
    site = dit.site(name)
    if getattr(site, "keys", "joint") != "text":
        return []
    return [other.name for other in dit.sites if other.name != name and getattr(other, "block", None) == site.block]


class StopAfter(AttentionHook):
    """Ends the forward once ``site``, the last block read, has run (nothing later is needed)."""

    def __init__(self, site: str):
        self.site = site

    def attach(self, vlm, plan) -> None:
        plan.attention(vlm.site(self.site), self)

    def rows(self, call):
        return last_row(call)  # in the last chunk of rows

    def record(self, call, rows, probs):
        raise StopForward


class RefAM:
    """Zero-shot referring segmentation with a FLUX or SD3 pipeline (or the zoo's flux-shapes).

    >>> refam = RefAM(zoo.load("flux-shapes"))  # import vlmtools_zoo as zoo
    >>> seg = refam.segment(image, "the large red circle on the left")
    >>> seg.mask, seg.heatmap, seg.point; seg.save("out/")

    ``sam=(model, processor)`` (transformers ``SamModel``/``Sam2Model`` and its processor)
    refines the mask from the peak point; ``source_options`` go to the pipeline's source
    (FLUX: ``guidance``, ``max_sequence_length``).
    """

    def __init__(self, model, settings: RefAMSettings | None = None, sam=None, **source_options):
        self.source = source_for(model, **source_options)
        self.dit = vlmtools.wrap(self.source.transformer)
        self.settings = settings or RefAMSettings()
        self.blocks = self.settings.blocks or self.source.blocks or default_blocks(self.dit)
        for name in self.blocks:
            if getattr(self.dit.site(name), "keys", "joint") == "image":  # (LookupError naming the sites first)
                text = [site.name for site in self.dit.sites if getattr(site, "keys", "joint") != "image"]
                raise ValueError(f"RefAM: {name} attends over the image alone, with no text keys to read; read "
                                 f"sites whose keys hold the text ({_named(text)})")
        self.sink_sites = sink_sites(self.dit, self.blocks)
        self.partners = {name: _partners(self.dit, name) for name in self.blocks}
        order = execution_order(self.dit)
        self.last_block = max((*self.blocks, *self.sink_sites), key=order.index)
        self.sam = sam
        self.accumulator = MapAccumulator()
        self.experts = {self.source.transformer: self.dit}

    def segment(self, image: Image.Image, expression: str) -> Segmentation:
        """Mask, heatmap and peak point of ``expression`` in ``image``."""
        check_expression(expression, self.settings.tagger)
        image = self.source.check_image(image)
        with torch.no_grad():
            latents, grid = self.source.latents(image)
            prompt = self.source.prompt(self.prompt(expression))
        return self.segment_encoded(latents, grid, prompt, expression, image=image)

    def prompt(self, expression: str) -> str:
        return build_prompt(expression, self.settings.magnets, self.settings.colour)

    def segment_encoded(
        self,
        latents: torch.Tensor,
        grid: tuple[int, int],
        prompt: EncodedPrompt,
        expression: str,
        image: Image.Image | None = None,
        size: tuple[int, int] | None = None,
    ) -> Segmentation:
        """RefAM on clean ``latents`` as the transformer takes them and ``prompt`` encoded from
        ``self.prompt(expression)``; the mask has ``image``'s size, else ``size`` (H, W), else the grid's."""
        if len(grid) != 2:
            raise ValueError(f"RefAM: segment_encoded takes an image's (rows, cols) grid, got {tuple(grid)}; "
                             "a clip's (frames, rows, cols) goes to segment_clip_encoded")
        tokens = self.tokens(prompt, expression)
        maps, sinks = self.probe(latents, grid, prompt, tokens)
        return self._segmentation({k: v.view(grid) for k, v in maps.items()}, tokens, sinks, image, size or grid)

    def segment_clip(self, frames: Sequence[Image.Image], expression: str) -> list[Segmentation]:
        """One :class:`Segmentation` per frame of a clip, from one pass per timestep and seed of a video DiT."""
        check_expression(expression, self.settings.tagger)
        frames = self.source.check_clip(frames)
        with torch.no_grad():
            latents, grid = self.source.clip_latents(frames)
            prompt = self.source.prompt(self.prompt(expression))
        return self.segment_clip_encoded(latents, grid, prompt, expression, frames=frames)

    def segment_clip_encoded(
        self,
        latents: torch.Tensor,
        grid: tuple[int, int, int],
        prompt: EncodedPrompt,
        expression: str,
        frames: Sequence[Image.Image] | None = None,
        size: tuple[int, int] | None = None,
    ) -> list[Segmentation]:
        """RefAM on a clip's clean ``latents`` (grid ``(latent frames, rows, cols)``): with the video
        ``frames`` one segmentation per frame, each from the latent frame that holds it
        (``source.latent_frame``), else one per latent frame (masks of ``size`` (H, W), else the grid's).
        ``seg.settings`` records ``path="clip"``, ``frame`` and ``latent_frame``; every frame's ``sinks``
        are the clip's (a video sink names its ``frame``, ``row`` and ``col``)."""
        if len(grid) != 3:
            raise ValueError(f"RefAM: segment_clip_encoded takes a clip's (frames, rows, cols) grid, got {tuple(grid)}")
        count = grid[0]
        if frames is not None:
            last = self.source.latent_frame(len(frames) - 1)
            if last != count - 1:
                raise ValueError(f"RefAM: {len(frames)} video frames fill {last + 1} latent frames of "
                                 f"{self.source.family}, but the latents have {count}")
        tokens = self.tokens(prompt, expression)
        maps, sinks = self.probe(latents, grid, prompt, tokens)
        maps = {k: v.view(grid) for k, v in maps.items()}
        out = []
        for index in range(count if frames is None else len(frames)):
            latent = index if frames is None else self.source.latent_frame(index)
            image = None if frames is None else frames[index]
            seg = self._segmentation({k: v[latent] for k, v in maps.items()}, tokens, sinks, image, size or grid[1:])
            seg.settings.update(path="clip", frame=index, latent_frame=latent)
            out.append(seg)
        return out

    def tokens(self, prompt: EncodedPrompt, expression: str) -> PromptTokens:
        """The role and word of every text position of ``prompt``, encoded from ``self.prompt(expression)``."""
        tokens = token_roles(
            expression, self.prompt(expression), prompt.segments, check_expression(expression, self.settings.tagger)
        )
        if len(tokens.roles) != prompt.embeds.shape[1]:
            raise ValueError(
                f"RefAM: the prompt has {prompt.embeds.shape[1]} text positions but its segments "
                f"describe {len(tokens.roles)}"
            )
        return tokens

    def _segmentation(self, maps, tokens: PromptTokens, sinks, image, size) -> Segmentation:
        """Heatmap to mask (the image method's step) for one image or frame; ``maps`` on its grid."""
        s = self.settings
        maps = dict(maps)
        grid_heatmap = maps.pop("heatmap").cpu().numpy()
        size = image.size[::-1] if image is not None else size
        heatmap = upsample(grid_heatmap, size)
        mask, point = self.mask(heatmap, image)
        settings = {
            **dataclasses.asdict(s),
            "blocks": list(self.blocks),
            "family": self.source.family,
            "prompt": tokens.text,
            "tagger": tokens.words.tagger,
            "mask_from": "sam" if self.sam is not None and image is not None else "heatmap",
        }
        if s.words == "head":
            settings["head_phrase"] = [tokens.words[i].word for i in tokens.head]
        return Segmentation(
            mask,
            heatmap,
            point,
            grid_heatmap,
            {k: v.cpu().numpy() for k, v in maps.items()},
            tokens,
            sinks,
            settings,
            image,
        )

    def mask(self, heatmap: np.ndarray, image: Image.Image | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """Mask and peak point of a full-size heatmap: SAM from the peak when given (and an image), else
        the training-free threshold and connected components."""
        point = peak_point(heatmap)
        if self.sam is not None and image is not None:
            from .sam import refine

            return refine(self.sam, image, point), point
        s = self.settings
        method = "otsu" if s.threshold == "otsu" else "threshold"
        return heatmap_to_mask(heatmap, method, 0.5 if s.threshold == "otsu" else float(s.threshold), s.keep), point

    def dit_at(self, t: float):
        """The wrapped transformer that denoises at flow time ``t`` (``self.dit`` but for Wan 2.2's low-noise
        expert below its boundary); experts share the sites' names, so the blocks read are the same."""
        model = self.source.transformer_at(t)
        if model not in self.experts:
            self.experts[model] = vlmtools.wrap(model)
        return self.experts[model]

    def probe(self, latents, grid, prompt: EncodedPrompt, tokens: PromptTokens):
        """Averaged maps ``{"heatmap", word keys...}`` (flat over the grid: an image's ``(rows, cols)``, a
        clip's ``(frames, rows, cols)``) and the sinks found per call."""
        s = self.settings
        frames, rows, cols = (1, *grid) if len(grid) == 2 else tuple(grid)
        layout = self.dit.layout(prompt.embeds.shape[1], (frames * rows, cols))
        recorders = [RecordImageText(self.blocks, s.heads)]
        if s.sinks != "none":
            recorders.append(RecordJointColumns(list(self.sink_sites), layout.image.positions))
        recorders.append(StopAfter(self.last_block))
        self.accumulator.reset()
        found = []
        for t in s.timesteps:
            for seed in s.seeds:
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
                x_t = (1 - t) * latents + t * noise.to(latents)
                dit = self.dit_at(t)
                with torch.no_grad(), dit.use(*recorders) as trace:
                    dit.model(**self.source.call(x_t, t, prompt, grid))
                sinks = {}
                if s.sinks != "none":
                    columns = {i: trace[f"{name}.joint_columns"][0] for i, name in enumerate(self.sink_sites)}
                    sinks = {self.sink_sites[i]: found_at
                             for i, found_at in global_sinks(columns, layout, s.sink_ratio, s.sink_max_cv).items()}
                words: dict[str, list[torch.Tensor]] = {}
                for name in self.blocks:
                    text = []
                    for site in [name] + self.partners.get(name, []):
                        for p in sinks.get(site, []):
                            in_text = layout.text.start <= p < layout.text.stop
                            role = tokens.roles[p - layout.text.start] if in_text else "image"
                            sink = {"t": t, "seed": seed, "block": name, "site": site, "position": p, "role": role}
                            if not in_text:  # where the image sink is: frame (of a clip) and grid cell
                                raster = p - layout.image.span.start
                                place = {"frame": raster // (rows * cols)} if frames > 1 else {}
                                sink.update(place, row=raster % (rows * cols) // cols, col=raster % cols)
                            found.append(sink)
                            text += [p - layout.text.start] if in_text and site == name else []
                    block = trace[f"{name}.image_text"][0][0]
                    for key, value in word_maps(block, tokens, text, s.words, s.sinks, s.padding).items():
                        words.setdefault(key, []).append(value)
                words = {key: torch.stack(maps).mean(0) for key, maps in words.items()}
                # every word read was a global sink in every block: its attention is uniform over the image,
                # so this pass locates nothing (a flat map; seg.sinks says why)
                flat = torch.zeros(len(layout.image), device=block.device)
                heatmap = torch.stack(list(words.values())).mean(0) if words else flat
                self.accumulator.add({"heatmap": heatmap, **words})
        return self.accumulator.mean(), found
