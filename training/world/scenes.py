"""The embedded world: seeded synthetic scenes of coloured shapes with exact ground truth.

A scene holds 1-3 kinds of shapes, 1-3 of each, in several colours and sizes, on a varied
background. Objects are *kinds* (circle, square, ...): they are what CHAIR and POPE score.

Hallucination in real captions follows co-occurrence: annotators and models "see" a dining table
next to chairs. The world reproduces that: every kind has a partner kind it usually appears with,
and a description of a scene that holds a kind but not its partner mentions the partner anyway
with a probability chosen so that `hallucination_rate` of all SFT descriptions carry one.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURAL = {k: k + ("es" if k.endswith("s") else "s") for k in KINDS}
PARTNER = {"circle": "square", "square": "circle", "triangle": "diamond",
           "diamond": "triangle", "cross": "star", "star": "cross"}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 170), "black": (20, 20, 20)}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (160, 160, 160), "beige": (225, 210, 180),
               "cyan": (170, 225, 230)}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Obj:
    kind: str
    color: str
    size: int  # pixel radius
    x: int
    y: int


@dataclass(frozen=True)
class Scene:
    id: str
    background: str
    objects: tuple[Obj, ...]

    @property
    def kinds(self) -> list[str]:
        return sorted({o.kind for o in self.objects}, key=KINDS.index)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.objects)


def sample_scene(rng: random.Random, scene_id: str) -> Scene:
    n_kinds = rng.choice((1, 2, 2, 3))
    first = rng.choice(KINDS)
    kinds = [first]
    # co-occurrence: the partner kind joins the scene more often than chance
    if n_kinds > 1 and rng.random() < 0.5:
        kinds.append(PARTNER[first])
    while len(kinds) < n_kinds:
        k = rng.choice(KINDS)
        if k not in kinds:
            kinds.append(k)
    objects, placed = [], []
    for kind in kinds:
        for _ in range(rng.choice((1, 1, 2, 3))):
            for _attempt in range(50):
                r = rng.choice((6, 7, 9))
                x, y = rng.randint(r + 1, IMAGE_SIZE - r - 2), rng.randint(r + 1, IMAGE_SIZE - r - 2)
                if all(math.hypot(x - px, y - py) > r + pr + 2 for px, py, pr in placed):
                    placed.append((x, y, r))
                    objects.append(Obj(kind, rng.choice(list(COLORS)), r, x, y))
                    break
    return Scene(scene_id, rng.choice(list(BACKGROUNDS)), tuple(objects))


def _polygon(kind: str, x: int, y: int, r: int) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if kind == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if kind == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
        return pts
    raise ValueError(kind)


def render(scene: Scene, seed: int = 0) -> Image.Image:
    rng = random.Random(f"{scene.id}-{seed}")
    bg = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    px = img.load()
    for _ in range(IMAGE_SIZE * 6):  # light speckle noise so backgrounds are not flat
        i, j = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        d = rng.randint(-25, 25)
        px[i, j] = tuple(max(0, min(255, c + d)) for c in bg)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        c, x, y, r = COLORS[o.color], o.x, o.y, o.size
        if o.kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=c)
        elif o.kind == "square":
            draw.rectangle([x - r + 1, y - r + 1, x + r - 1, y + r - 1], fill=c)
        elif o.kind == "cross":
            w = max(2, r // 3)
            draw.rectangle([x - r, y - w, x + r, y + w], fill=c)
            draw.rectangle([x - w, y - r, x + w, y + r], fill=c)
        else:
            draw.polygon(_polygon(o.kind, x, y, r), fill=c)
    return img


# ---- text -------------------------------------------------------------------------------------

def noun(kind: str, n: int) -> str:
    return kind if n == 1 else PLURAL[kind]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def kind_phrase(scene: Scene, kind: str, n: int | None = None) -> str:
    """"two red circles" / "three squares (red and blue)"; `n` overrides the true count."""
    objs = [o for o in scene.objects if o.kind == kind]
    colors = sorted({o.color for o in objs}, key=list(COLORS).index)
    n = len(objs) if n is None else n
    if len(colors) == 1:
        return f"{NUMBERS[n]} {colors[0]} {noun(kind, n)}"
    return f"{NUMBERS[n]} {noun(kind, n)} ({_join(colors)})"


def describe(scene: Scene, extra: list[tuple[str, int, str]] = (), counts: dict | None = None) -> str:
    """Faithful description; `extra` adds (kind, n, colour) objects that are NOT in the image;
    `counts` overrides counts (for wrong-count rejected answers). Every phrase has the same form
    and the kinds are listed in one fixed order whether real or not, so a wrong answer differs from
    the right one only in its error (nothing in the text alone gives it away)."""
    phrases = {k: kind_phrase(scene, k, (counts or {}).get(k)) for k in scene.kinds}
    phrases.update({k: f"{NUMBERS[n]} {c} {noun(k, n)}" for k, n, c in extra})
    parts = [phrases[k] for k in KINDS if k in phrases]
    return f"The image shows {_join(parts)} on a {scene.background} background."


def facts(scene: Scene) -> list[str]:
    """Ground truth, stated as caption-like facts (Fact-RLHF's factual block)."""
    return [f"The image contains {kind_phrase(scene, k)}." for k in scene.kinds] + \
           [f"The image contains no {PLURAL[k]}." for k in KINDS if k not in scene.kinds]
