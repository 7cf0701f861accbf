"""The shapes world in motion: seeded short clips with exact masks per frame and referring
expressions that need motion or persistence.

A clip is a pure function of its seed (splits own the seed ranges of ``world.SPLITS``,
offset so that no clip shares a seed with a scene): a canvas and background as in a scene,
and 2 to 4 shapes, each moving in a straight line (left, right, up or down, 2 to 3.5 px a
frame) or standing still, half of them repeating an earlier shape's look; in half the clips
a large still shape stands in front of a moving one's path two thirds of the way. Shapes are
drawn back to front in a fixed depth order, so shapes that cross occlude each other. Frame ``f`` is the :class:`~vlmtools_zoo.world.Scene` of the shapes at
their positions then; the truth of an object in a frame is what is visible of it (its
pixels not covered by a shape in front), which may be empty.

Expressions (:meth:`Clip.referring_expressions`), at most one per object, each unique in the clip:

- ``motion``: "the red circle that moves left", "the square that stays still": the
  appearance alone names several shapes, their motion tells them apart;
- ``persistence``: "the blue cross that goes behind the green square": the referent is
  hidden by half or more in some frame, and the mask must follow it there;
- ``appearance``: "the red circle": unique by appearance (the image world's kind).

No video model is trained on these clips: RefAM's quality on them is measured with the
zoo's image DiT (flux-shapes) frame by frame, and an image model cannot see motion, so the
``motion`` kind is where it is expected to fail (see :func:`video_scores`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image

from . import world
from .world import CANVASES, COLOURS, SHAPES, SIZES, Obj, Scene

FRAMES = 9
"""Frames per clip: 1 + 8, a whole number of Wan latent frames (1 + 4 k) as well as 1 + 6 + 2."""
SEED_OFFSET = 500_000_000
"""Clip seeds start here within each split's range (scene indices stay far below)."""
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
KINDS = ("motion", "persistence", "appearance")


@dataclass(frozen=True)
class Track:
    """One shape: its appearance and first position (``obj``), its motion and speed (px per frame)."""

    obj: Obj
    motion: str
    speed: float

    def at(self, frame: int) -> Obj:
        dx, dy = MOTIONS[self.motion]
        return Obj(self.obj.shape, self.obj.colour, self.obj.size, self.obj.cx + dx * self.speed * frame,
                   self.obj.cy + dy * self.speed * frame, self.obj.r)

    @property
    def name(self) -> str:
        return self.obj.name

    @property
    def phrase(self) -> str:
        return "stays still" if self.motion == "still" else f"moves {self.motion}"


@dataclass(frozen=True)
class VideoRefExp:
    text: str
    target: int  # index into clip.tracks
    kind: str  # motion / persistence / appearance
    occluded: bool = False  # the referent is hidden by half or more in some frame


@dataclass
class Clip:
    seed: int
    width: int
    height: int
    background: str
    bg_colour: tuple
    tracks: list[Track] = field(default_factory=list)
    frames: int = FRAMES

    def scene(self, frame: int) -> Scene:
        """Frame ``frame`` as a scene: the shapes where they are then, back to front."""
        return Scene(self.seed, self.width, self.height, self.background, self.bg_colour,
                     [track.at(frame) for track in self.tracks])

    @cached_property
    def images(self) -> list[Image.Image]:
        return [self.scene(f).image for f in range(self.frames)]

    @cached_property
    def visible(self) -> np.ndarray:
        """Boolean ``(frames, objects, height, width)``: the pixels of each shape no shape in front covers."""
        out = np.zeros((self.frames, len(self.tracks), self.height, self.width), bool)
        for f in range(self.frames):
            labels = self.scene(f).label_map
            for i in range(len(self.tracks)):
                out[f, i] = labels == i + 1
        return out

    @cached_property
    def shape_masks(self) -> np.ndarray:
        """Boolean ``(frames, objects, height, width)``: each shape whole, hidden parts included."""
        return np.stack([self.scene(f).masks for f in range(self.frames)])

    def hidden(self, i: int) -> np.ndarray:
        """Per frame, the share of shape ``i`` covered by shapes in front of it."""
        whole = self.shape_masks[:, i].sum((1, 2))
        return 1 - self.visible[:, i].sum((1, 2)) / np.maximum(whole, 1)

    def referring_expressions(self) -> list[VideoRefExp]:
        """At most one expression per object (motion first, then persistence, then appearance), each unique."""
        tracks, out = self.tracks, []

        def count(pred):
            return sum(pred(t) for t in tracks)

        for i, t in enumerate(tracks):
            text, kind = None, None
            for label, same in ((t.name, lambda u: u.name == t.name), (t.obj.shape, lambda u: u.obj.shape == t.obj.shape)):
                if count(same) > 1 and count(lambda u: same(u) and u.motion == t.motion) == 1:
                    text, kind = f"the {label} that {t.phrase}", "motion"
                    break
            if text is None and self.hidden(i).max() >= 0.5:
                front = [j for j in range(i + 1, len(tracks)) if _covers(self, j, i)]
                if len(front) == 1 and count(lambda u: u.name == t.name) == 1 \
                        and count(lambda u: u.name == tracks[front[0]].name) == 1:
                    text, kind = f"the {t.name} that goes behind the {tracks[front[0]].name}", "persistence"
            if text is None and count(lambda u: u.name == t.name) == 1:
                text, kind = f"the {t.name}", "appearance"
            if text is not None:
                out.append(VideoRefExp(text, i, kind, bool(self.hidden(i).max() >= 0.5)))
        return out


def _covers(clip: Clip, front: int, back: int) -> bool:
    """Shape ``front`` (drawn later) hides at least a quarter of shape ``back`` in some frame."""
    masks = clip.shape_masks
    overlap = (masks[:, front] & masks[:, back]).sum((1, 2)) / np.maximum(masks[:, back].sum((1, 2)), 1)
    return overlap.max() >= 0.25


def clip(split: str, index: int) -> Clip:
    """The ``index``-th clip of a split."""
    if split == "train" and index >= 10**8:
        raise ValueError("train clip indices stop at 10**8")
    return make_clip(world.SPLITS[split] + SEED_OFFSET + index)


def make_clip(seed: int, frames: int = FRAMES) -> Clip:
    rng = np.random.default_rng(seed)
    w, h = CANVASES[rng.integers(len(CANVASES))]
    clip_ = Clip(seed, w, h, *world.draw_background(rng), frames=frames)
    n = int(rng.integers(2, 5))
    for _ in range(300):
        if len(clip_.tracks) == n:
            break
        size = "small" if rng.random() < 0.5 else "large"
        r = SIZES[size]
        motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
        speed = 0.0 if motion == "still" else float(rng.uniform(2.0, 3.5))
        dx, dy = MOTIONS[motion]
        travel_x, travel_y = dx * speed * (frames - 1), dy * speed * (frames - 1)
        x_lo, x_hi = r + 2 - min(0, travel_x), w - r - 2 - max(0, travel_x)
        y_lo, y_hi = r + 2 - min(0, travel_y), h - r - 2 - max(0, travel_y)
        if x_lo >= x_hi or y_lo >= y_hi:
            continue
        cx, cy = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
        # half the time a shape repeats an earlier one's look (motion must then tell them apart)
        if clip_.tracks and rng.random() < 0.5:
            twin = clip_.tracks[rng.integers(len(clip_.tracks))].obj
            shape, colour = twin.shape, twin.colour
        else:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        track = Track(Obj(shape, colour, size, cx, cy, r), motion, speed)
        # shapes may cross later on, but none starts on top of another
        if all(np.hypot(cx - t.obj.cx, cy - t.obj.cy) > r + t.obj.r + 3 for t in clip_.tracks):
            clip_.tracks.append(track)
    movers = [t for t in clip_.tracks if t.motion != "still"]
    if movers and rng.random() < 0.5:  # a still shape in front, on a mover's path: it passes behind it
        unique = [t for t in movers if sum(u.name == t.name for u in clip_.tracks) == 1]
        movers = unique or movers
        mover = movers[rng.integers(len(movers))]
        where = mover.at(round(2 * (frames - 1) / 3))
        names = {t.name for t in clip_.tracks}
        looks = [(s, c) for s in SHAPES for c in COLOURS if f"{c} {s}" not in names]
        shape, colour = looks[rng.integers(len(looks))]
        r = SIZES["large"]
        cx, cy = np.clip(where.cx, r + 2, w - r - 2), np.clip(where.cy, r + 2, h - r - 2)
        clip_.tracks.append(Track(Obj(shape, colour, "large", float(cx), float(cy), r), "still", 0.0))
    return clip_


def letterboxed(clip_: Clip, size: int = 64) -> tuple[list[Image.Image], np.ndarray]:
    """The clip as flux-shapes sees images (padded to a square with the background colour, resized to
    ``size``), and the visible masks per frame ``(frames, objects, size, size)`` mapped alike."""
    from .flux import letterbox

    images, masks = [], []
    for f in range(clip_.frames):
        frame = _Frame(clip_.scene(f), clip_.visible[f])
        pixels, visible = letterbox(frame, size)
        images.append(Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        masks.append(visible.numpy())
    return images, np.stack(masks)


@dataclass
class _Frame:
    """A frame as ``flux.letterbox`` reads a scene, its masks the visible ones."""

    scene: Scene
    masks: np.ndarray

    def __getattr__(self, name):
        return getattr(self.scene, name)


@dataclass
class VideoSample:
    frames: list[Image.Image]
    expression: str
    masks: np.ndarray  # (frames, H, W) bool: the referent's visible pixels per frame
    kind: str
    name: str  # "split/clip index/expression": the J&F sequence
    occluded: bool = False


def video_samples(n: int, split: str = "test", start: int = 0, size: int = 64) -> list[VideoSample]:
    """The first ``n`` referring expressions of a split's clips, letterboxed to ``size`` as flux-shapes sees frames."""
    samples, index = [], start
    while len(samples) < n:
        clip_ = clip(split, index)
        frames, masks = letterboxed(clip_, size)
        samples += [VideoSample(frames, ref.text, masks[:, ref.target], ref.kind, f"{split}/{index}/{ref.text}",
                                ref.occluded) for ref in clip_.referring_expressions()]
        index += 1
    return samples[:n]


def video_scores(refam, samples, smoothing: float | None = None, path: str = "auto"):
    """J, F and J&F of ``segment_video`` on ``samples``: ``{"all": scores, kind: scores, "occluded": scores}``
    (``grounding.metrics.SegmentationScores``, one J&F sequence per sample; ``occluded``: the samples whose
    referent is hidden by half or more in some frame, whatever their kind)."""
    from grounding.metrics import SegmentationScores
    from grounding.refam.video import segment_video

    scores = {key: SegmentationScores() for key in ("all", *KINDS, "occluded")}
    for sample in samples:
        segs = segment_video(refam, sample.frames, sample.expression, smoothing=smoothing, path=path)
        keys = ("all", sample.kind) + (("occluded",) if sample.occluded else ())
        for seg, truth in zip(segs, sample.masks):
            for key in keys:
                scores[key].add(seg.mask, truth, sequence=sample.name)
    return {key: value for key, value in scores.items() if value.n}
