"""The shapes world: seeded scenes with exact masks, captions, referring
expressions, questions and POPE triples.

Every scene is a pure function of its seed. Splits own disjoint seed ranges
(``SPLITS``), so held-out scenes never share a seed with training scenes.
Some canvases are not square, so a LLaVA-style processor letterboxes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 225),
    "yellow": (235, 200, 30), "purple": (140, 60, 185), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 7.0, "large": 13.0}  # circumradius in pixels
BACKGROUNDS = ("plain", "striped", "checked", "noisy")
CANVASES = ((96, 96),) * 5 + ((128, 96), (96, 128), (128, 64))
NUMBERS = ("zero", "one", "two", "three", "four", "five")
# Seed ranges: training draws indices below 10**9, held-out splits live above.
SPLITS = {"train": 0, "val": 2_000_000_000, "test": 3_000_000_000}
QUESTION_TYPES = ("existence", "colour", "shape", "count", "position")
DESCRIBE_PROMPT = "Describe the image."  # answered with Scene.listing() in the VLMs' training chats


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cx: float  # centre in pixels
    cy: float
    r: float  # circumradius in pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    width: int
    height: int
    background: str
    bg_colour: tuple
    objects: list[Obj] = field(default_factory=list)

    @cached_property
    def masks(self) -> np.ndarray:
        """Boolean masks, one per object, shape (n, height, width)."""
        return np.stack([_mask(o, self.width, self.height) for o in self.objects])

    @cached_property
    def label_map(self) -> np.ndarray:
        """uint8 map: 0 for background, i + 1 where object i is drawn."""
        lab = np.zeros((self.height, self.width), np.uint8)
        for i, m in enumerate(self.masks):
            lab[m] = i + 1
        return lab

    @cached_property
    def image(self) -> Image.Image:
        rng = np.random.default_rng(self.seed + 7)
        img = _background(self.background, self.bg_colour, self.width, self.height, rng)
        for o, m in zip(self.objects, self.masks):
            img[m] = COLOURS[o.colour]
        return Image.fromarray(img)

    # ---- text -------------------------------------------------------------
    def caption(self) -> str:
        """Short caption naming every object, e.g. 'a large red circle and a small blue cross'."""
        return f"{_join([_a(f'{o.size} {o.colour} {o.shape}') for o in self.objects])} on a {self.background} background"

    def listing(self) -> str:
        """Every object by colour and shape, left to right: 'A red circle, a blue cross and a
        green square.' (what the zoo VLMs learn to say to ``DESCRIBE_PROMPT``; CHAIR reads it)."""
        body = _join([_a(o.name) for o in sorted(self.objects, key=lambda o: o.cx)])
        return body[0].upper() + body[1:] + "."

    def description(self) -> str:
        """Longer description: the count, then each object with its place."""
        n = len(self.objects)
        lines = [f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' * (n > 1)} "
                 f"on a {self.background} background."]
        for o in self.objects:
            lines.append(f"A {o.size} {o.name} is at the {self.place(o)}.")
        return " ".join(lines)

    def place(self, o: Obj) -> str:
        v = "top" if o.cy < self.height / 3 else "bottom" if o.cy > 2 * self.height / 3 else "middle"
        h = "left" if o.cx < self.width / 3 else "right" if o.cx > 2 * self.width / 3 else "centre"
        return "centre" if v == h == "centre" or (v, h) == ("middle", "centre") else (
            v if h == "centre" else h if v == "middle" else f"{v} {h}")

    def referring_expressions(self) -> list["RefExp"]:
        """Expressions with a unique referent, at most one per object, shortest first."""
        out = []
        for i, o in enumerate(self.objects):
            for text in _candidates(self, i):
                if text is not None:
                    head = text.split(" on the ")[0].split(" left of ")[0].split(" right of ")[0]
                    out.append(RefExp(text, i, head.split()[1:]))
                    break
        return out

    def questions(self) -> list["Question"]:
        """Every well-posed question about this scene (answers are one word)."""
        rng = np.random.default_rng(self.seed + 11)
        objs, qs = self.objects, []
        present = {o.name for o in objs}
        # existence: one positive, one negative that shares colour or shape when possible
        pos = objs[rng.integers(len(objs))]
        qs.append(Question(f"Is there {_a(pos.name)}?", "yes", "existence"))
        negs = [n for n in _all_names() if n not in present]
        near = _near_misses(present)
        pool = near if near and rng.random() < 0.7 else negs
        neg = pool[rng.integers(len(pool))]
        qs.append(Question(f"Is there {_a(neg)}?", "no", "existence"))
        for o in objs:
            if sum(p.shape == o.shape for p in objs) == 1:
                qs.append(Question(f"What colour is the {o.shape}?", o.colour, "colour"))
            if sum(p.colour == o.colour for p in objs) == 1:
                qs.append(Question(f"What shape is the {o.colour} object?", o.shape, "shape"))
            unique = sum(p.name == o.name for p in objs) == 1
            if unique and abs(o.cx - self.width / 2) > 0.12 * self.width:
                side = "left" if o.cx < self.width / 2 else "right"
                qs.append(Question(f"Is the {o.name} on the left or the right?", side, "position"))
        qs.append(Question("How many shapes are there?", str(len(objs)), "count"))
        qs.append(self._shape_count(objs[rng.integers(len(objs))].shape))
        return qs

    def shape_counts(self) -> list["Question"]:
        """"How many <shape>s are there?" for every shape present (``questions()`` asks one, at random)."""
        return [self._shape_count(s) for s in dict.fromkeys(o.shape for o in self.objects)]

    def _shape_count(self, shape: str) -> "Question":
        return Question(f"How many {_plural(shape)} are there?", str(sum(o.shape == shape for o in self.objects)),
                        "count")

    def existence_probes(self) -> list["Question"]:
        """Existence questions for training beyond ``questions()``'s two: "yes" for every
        object present and as many "no" for absent names that share a colour or a shape
        with a present one (the near misses that POPE's adversarial split asks)."""
        rng = np.random.default_rng(self.seed + 13)
        present = {o.name for o in self.objects}
        near = _near_misses(present)
        absent = [near[i] for i in rng.permutation(len(near))[:len(present)]]
        return ([Question(f"Is there {_a(n)}?", "yes", "existence") for n in sorted(present)]
                + [Question(f"Is there {_a(n)}?", "no", "existence") for n in absent])


@dataclass(frozen=True)
class RefExp:
    text: str
    target: int  # index into scene.objects
    content_words: list  # the words of the referent's own noun phrase ('red', 'circle')

    @property
    def kind(self) -> str:
        """``shape`` ("the circle"), ``attributes`` (a colour or size before the shape) or ``place``
        (an absolute place or a relation to another object): what singles the referent out."""
        if " on the " in self.text or " of the " in self.text:
            return "place"
        return "shape" if len(self.content_words) == 1 else "attributes"


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    type: str


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _near_misses(present) -> list[str]:
    """The absent colour-shape names that share a colour or a shape with a ``present`` one."""
    return [n for n in _all_names() if n not in present
            and any(p.split()[0] == n.split()[0] or p.split()[1] == n.split()[1] for p in present)]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _all_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def scene(split: str, index: int) -> Scene:
    """The ``index``-th scene of a split (``train`` indices must stay below 10**9)."""
    if split == "train" and index >= 10**9:
        raise ValueError("train indices stop at 10**9 so they never reach held-out seeds")
    return make_scene(SPLITS[split] + index)


def draw_background(rng) -> tuple[str, tuple[int, int, int]]:
    """A background kind and its base colour, the next draws of ``rng`` (scenes and clips draw them alike)."""
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))] if rng.random() < 0.6 else "plain"
    grey = int(rng.integers(185, 245))
    tint = rng.integers(-12, 13, size=3)
    return bg, tuple(int(v) for v in np.clip(grey + tint, 0, 255))


def make_scene(seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    w, h = CANVASES[rng.integers(len(CANVASES))]
    sc = Scene(seed, w, h, *draw_background(rng))
    n = int(rng.integers(1, 6))
    for _ in range(200):
        if len(sc.objects) == n:
            break
        size = "small" if rng.random() < 0.5 else "large"
        r = SIZES[size]
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.r + 3 for o in sc.objects):
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            sc.objects.append(Obj(SHAPES[rng.integers(len(SHAPES))], colour, size, cx, cy, r))
    return sc


def _mask(o: Obj, w: int, h: int) -> np.ndarray:
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    x, y, r = o.cx, o.cy, o.r
    if o.shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=1)
    elif o.shape == "square":
        s = r * 0.78
        d.rectangle([x - s, y - s, x + s, y + s], fill=1)
    elif o.shape == "triangle":
        d.polygon([(x, y - r), (x - 0.87 * r, y + 0.5 * r), (x + 0.87 * r, y + 0.5 * r)], fill=1)
    else:  # cross
        a, b = r * 0.85, r * 0.3
        d.rectangle([x - a, y - b, x + a, y + b], fill=1)
        d.rectangle([x - b, y - a, x + b, y + a], fill=1)
    return np.asarray(im, dtype=bool)


def _background(kind: str, colour: tuple, w: int, h: int, rng) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = colour
    yy, xx = np.mgrid[:h, :w]
    if kind == "striped":
        period = int(rng.integers(6, 14))
        img[((xx + yy if rng.random() < 0.5 else xx) // (period // 2)) % 2 == 1] -= 25
    elif kind == "checked":
        c = int(rng.integers(6, 14))
        img[((xx // c) + (yy // c)) % 2 == 1] -= 22
    elif kind == "noisy":
        img += rng.normal(0, 12, size=(h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _candidates(sc: Scene, i: int):
    """Referring expressions for object i, shortest first; None where not unique."""
    objs, o = sc.objects, sc.objects[i]

    def unique(pred):
        return sum(pred(p) for p in objs) == 1

    yield f"the {o.shape}" if unique(lambda p: p.shape == o.shape) else None
    yield f"the {o.name}" if unique(lambda p: p.name == o.name) else None
    yield (f"the {o.size} {o.name}"
           if unique(lambda p: (p.size, p.name) == (o.size, o.name)) else None)
    same = [p for p in objs if p.name == o.name]
    for word, key, sign in (("left", "cx", -1), ("right", "cx", 1), ("top", "cy", -1), ("bottom", "cy", 1)):
        vals = sorted(sign * getattr(p, key) for p in same)
        if sign * getattr(o, key) == vals[-1] and vals[-1] - vals[-2] > 0.15 * sc.width:
            yield f"the {o.name} on the {word}"
    for j, p in enumerate(objs):
        if j != i and unique(lambda q: q.name == p.name) and abs(o.cx - p.cx) > o.r + p.r:
            rel = "left of" if o.cx < p.cx else "right of"
            cands = [q for q in same if (q.cx < p.cx) == (o.cx < p.cx) and abs(q.cx - p.cx) > q.r + p.r]
            if len(cands) == 1:
                yield f"the {o.name} {rel} the {p.name}"


def pope(split: str, n_scenes: int, kind: str) -> list[tuple[int, str, str]]:
    """POPE triples (scene index, 'Is there a X in the image?', 'yes'/'no').

    Objects are colour-shape names. Per scene: every present name (up to 3)
    and as many absent ones, drawn by ``kind``: ``random`` (uniform),
    ``popular`` (most frequent names over the split's scenes) or ``adversarial``
    (names that share a colour or a shape with a present object).
    """
    scenes = [scene(split, i) for i in range(n_scenes)]
    freq: dict[str, int] = {}
    for s in scenes:
        for o in s.objects:
            freq[o.name] = freq.get(o.name, 0) + 1
    popular = sorted(_all_names(), key=lambda k: (-freq.get(k, 0), k))
    out = []
    for idx, s in enumerate(scenes):
        rng = np.random.default_rng(SPLITS[split] + idx + 101)
        present = sorted({o.name for o in s.objects})
        pos = [present[j] for j in rng.permutation(len(present))[:3]]
        absent = [k for k in _all_names() if k not in present]
        if kind == "random":
            negs = [absent[j] for j in rng.permutation(len(absent))]
        elif kind == "popular":
            negs = [k for k in popular if k not in present]
        elif kind == "adversarial":
            share = _near_misses(present)
            negs = [share[j] for j in rng.permutation(len(share))] + [k for k in absent if k not in share]
        else:
            raise ValueError(kind)
        for name in pos:
            out.append((idx, f"Is there {_a(name)} in the image?", "yes"))
        for name in negs[: len(pos)]:
            out.append((idx, f"Is there {_a(name)} in the image?", "no"))
    return out


def qa_items(split: str, n: int, start: int = 0) -> list[tuple[int, Question]]:
    """``n`` (scene index, question) pairs, cycling over question types so each gets n/5."""
    out, idx = [], start
    t = 0
    while len(out) < n:
        qs = [q for q in scene(split, idx).questions() if q.type == QUESTION_TYPES[t % 5]]
        if qs:
            rng = np.random.default_rng(SPLITS[split] + idx + 13)
            out.append((idx, qs[rng.integers(len(qs))]))
            t += 1
        idx += 1
    return out
