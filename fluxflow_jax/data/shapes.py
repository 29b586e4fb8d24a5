"""Procedural demo data: coloured shapes with compositional captions and known ground truth.

``scene(i)`` is a pure function of (index, seed): one or two objects (shape, colour, position,
radius) and, for two, a spatial relation - "a red circle above a blue square". Because the truth is
known, text conditioning can be measured (does the sample put red where the prompt says?), and the
demo config and tests run offline with no shipped images. Rendering is 4x supersampled and box
filtered so edges are anti-aliased like photographs rather than aliased masks.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("above", "below", "left of", "right of")
_SALT = 0x5AA9E5
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object; centre and radius are fractions of the image height/width (radius: of the
    shorter side) so a scene renders at any size."""

    shape: str
    color: str
    cy: float
    cx: float
    radius: float

    @property
    def phrase(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class ShapeScene:
    """Ground truth of one sample: ``objects[0] <relation> objects[1]`` when there are two."""

    objects: tuple[ShapeObject, ...]
    relation: str | None
    background: tuple[int, int, int]

    @property
    def caption(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"

    def to_dict(self) -> dict:
        return {"caption": self.caption, "relation": self.relation,
                "background": list(self.background),
                "objects": [dataclasses.asdict(o) for o in self.objects]}


def scene(index: int, seed: int = 0, max_objects: int = 2) -> ShapeScene:
    """The scene of sample ``index`` (deterministic in ``(index, seed)``)."""
    rng = np.random.default_rng([_SALT, int(seed) % 2**32, int(index)])
    colors = list(COLORS)
    gray = int(rng.integers(95, 165))
    background = (gray, gray, gray)
    n = 1 if max_objects == 1 or rng.random() < 0.25 else 2
    if n == 1:
        obj = ShapeObject(
            shape=SHAPES[rng.integers(len(SHAPES))], color=colors[rng.integers(len(colors))],
            cy=float(rng.uniform(0.35, 0.65)), cx=float(rng.uniform(0.35, 0.65)),
            radius=float(rng.uniform(0.18, 0.28)))
        return ShapeScene((obj,), None, background)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    ca, cb = rng.choice(len(colors), size=2, replace=False)
    sa, sb = rng.integers(len(SHAPES), size=2)
    # Along the relation axis the subject sits in one half and the reference object in the other;
    # radii <= 0.17 and centres >= 0.36 apart keep the two from touching.
    near, far = float(rng.uniform(0.22, 0.32)), float(rng.uniform(0.68, 0.78))
    first_is_near = relation in ("above", "left of")
    pa, pb = (near, far) if first_is_near else (far, near)
    qa, qb = rng.uniform(0.35, 0.65, size=2)
    ra, rb = rng.uniform(0.11, 0.17, size=2)
    vertical = relation in ("above", "below")

    def make(shape, color, p, q, r):
        cy, cx = (p, q) if vertical else (q, p)
        return ShapeObject(SHAPES[shape], colors[color], float(cy), float(cx), float(r))

    return ShapeScene((make(sa, ca, pa, qa, ra), make(sb, cb, pb, qb, rb)), relation, background)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render(sc: ShapeScene, size: int | Sequence[int] = 64) -> np.ndarray:
    """uint8 ``[h, w, 3]`` image of a scene (``size`` is an int or ``(h, w)``)."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (w * s, h * s), sc.background)
    draw = ImageDraw.Draw(canvas)
    side = min(h, w) * s
    for o in sc.objects:
        cx, cy, r = o.cx * w * s, o.cy * h * s, o.radius * side
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            a = 0.85 * r
            draw.rectangle([cx - a, cy - a, cx + a, cy + a], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.uint8)


def sample(index: int, seed: int = 0, size: int | Sequence[int] = 64,
           max_objects: int = 2) -> tuple[np.ndarray, str, ShapeScene]:
    """``(image uint8 [h, w, 3], caption, scene)`` of sample ``index``."""
    sc = scene(index, seed, max_objects)
    return render(sc, size), sc.caption, sc


def vocabulary() -> list[str]:
    """Every word a shapes caption can contain (the demo tokenizer covers them)."""
    words = {"a", "an"} | set(COLORS) | set(SHAPES)
    for rel in RELATIONS:
        words.update(rel.split())
    return sorted(words)


def object_mask(obj: ShapeObject, size: int | Sequence[int]) -> np.ndarray:
    """Boolean ``[h, w]`` mask of one object (for conditioning metrics: the colour inside it)."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    sc = ShapeScene((dataclasses.replace(obj, color="red"),), None, (0, 0, 0))
    return render(sc, (h, w))[..., 0] > 110
