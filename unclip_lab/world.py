"""The shapes world: the embedded model's training data, and an independent judge of its pictures.

One filled shape on a plain background, 64x64 px. A seeded generator makes any number of
(image, caption) pairs; ``judge`` reads background colour, shape colour, shape kind, size and position
back from any picture by plain geometry (border median, nearest palette colour, the drawn shape that
best matches the foreground in its bounding box, side and centre), without the model's own CLIP, so the
evaluation and the semantic tests cannot flatter the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {  # far apart in RGB so a blurry generated pixel still has one clear nearest colour
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 120, 0),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {**COLOURS, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
RADII = {"small": 9, "large": 17}  # half the side of the shape's bounding box
POSITIONS = ("center", "left", "right", "top", "bottom", "top left", "top right", "bottom left", "bottom right")
MARGIN = 5  # the shape keeps this far from the edge, so the border shows only background
JITTER = 2
# The shape's bounding box: 19 px a side when small, 35 when large; the judge splits at 27. Its centre sits
# 8-12 px from the picture's middle (32) along an axis when it is at that side, 0-2 px when not: split at 5.
LARGE_SIDE = 27
OFF_CENTRE = 5
MIN_FOREGROUND = 12  # pixels: fewer and the judge says nothing was drawn
# One shape has one colour: if no colour holds this share of the foreground, nothing was drawn. Measured:
# uniform noise's largest colour holds 20% of it; renders blurred by 1 px, 59% at least, 92% on average.
MIN_PURITY = 0.35


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str
    dx: int = 0
    dy: int = 0

    def __post_init__(self):
        if self.colour not in COLOURS or self.background not in BACKGROUNDS or self.colour == self.background:
            raise ValueError(f"bad colours {self.colour!r} on {self.background!r}")
        if self.shape not in SHAPES or self.size not in RADII or self.position not in POSITIONS:
            raise ValueError(f"bad scene {self}")

    def centre(self) -> tuple[int, int]:
        r = RADII[self.size]
        near, far = MARGIN + r, SIZE - 1 - MARGIN - r
        x = near if "left" in self.position else far if "right" in self.position else SIZE // 2
        y = near if "top" in self.position else far if "bottom" in self.position else SIZE // 2
        return int(np.clip(x + self.dx, near - 2, far + 2)), int(np.clip(y + self.dy, near - 2, far + 2))

    def box(self) -> tuple[int, int, int, int]:
        (x, y), r = self.centre(), RADII[self.size]
        return x - r, y - r, x + r, y + r


def random_scene(rng: np.random.Generator, **fixed) -> Scene:
    """A uniformly random scene; any attribute passed by name is kept as given."""
    colour = fixed.get("colour") or str(rng.choice(list(COLOURS)))
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    background = fixed.get("background") or str(rng.choice(backgrounds))
    return Scene(
        colour=colour,
        shape=fixed.get("shape") or str(rng.choice(SHAPES)),
        size=fixed.get("size") or str(rng.choice(list(RADII))),
        position=fixed.get("position") or str(rng.choice(POSITIONS)),
        background=background,
        dx=int(rng.integers(-JITTER, JITTER + 1)),
        dy=int(rng.integers(-JITTER, JITTER + 1)),
    )


def render(scene: Scene, *more: Scene) -> np.ndarray:
    """HxWx3 uint8 picture of the scene, with the shapes of ``more`` drawn on its background too."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in (scene, *more):
        _draw(draw, shape.shape, shape.box(), COLOURS[shape.colour])
    return np.asarray(image)


def separations(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> dict[str, int]:
    """Pixels between ``box`` and ``other`` on each side of ``box`` (negative where they overlap on that axis)."""
    return {
        "right": other[0] - box[2] - 1,
        "left": box[0] - other[2] - 1,
        "down": other[1] - box[3] - 1,
        "up": box[1] - other[3] - 1,
    }


def gap(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> int:
    """Pixels between two boxes along the axis that separates them most (negative when they overlap)."""
    return max(separations(box, other).values())


def pairs(n: int, seed: int, min_gap: int = 4) -> tuple[np.ndarray, list[Scene], list[Scene]]:
    """n seeded two-shape pictures: a scene and a small shape of another colour on its background, their
    boxes at least ``min_gap`` px apart (an inpaint mask can cover the first and leave the second)."""
    rng = np.random.default_rng(seed)
    firsts: list[Scene] = []
    seconds: list[Scene] = []
    while len(firsts) < n:
        first = random_scene(rng)
        colours = [c for c in COLOURS if c not in (first.background, first.colour)]
        second = random_scene(rng, size="small", background=first.background, colour=str(rng.choice(colours)))
        if gap(first.box(), second.box()) >= min_gap:
            firsts.append(first)
            seconds.append(second)
    images = [render(a, b) for a, b in zip(firsts, seconds)]
    return np.stack(images) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8), firsts, seconds


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator, *, mention: float = 0.5) -> tuple[str, dict]:
    """A caption that always names colour and shape; size, position and background each with odds
    ``mention``. Returns the caption and the attributes it names (what a matching picture must show)."""
    named = {"colour": scene.colour, "shape": scene.shape}
    for key in ("size", "position", "background"):
        if rng.random() < mention:
            named[key] = getattr(scene, key)
    return describe(named, template=int(rng.integers(3))), named


def describe(named: dict, template: int = 0) -> str:
    words = [named.get("size", ""), named["colour"], named["shape"]]
    thing = " ".join(w for w in words if w)
    thing = f"{_article(thing)} {thing}"
    where = ""
    if "position" in named:
        where = " in the center" if named["position"] == "center" else f" at the {named['position']}"
    ground = ""
    if "background" in named:
        ground = f" on {_article(named['background'])} {named['background']} background"
    if template == 1:
        return f"a picture of {thing}{where}{ground}"
    if template == 2:
        return f"{thing}{ground}{where}"
    return f"{thing}{where}{ground}"


def vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = {"a", "an", "picture", "of", "in", "the", "at", "on", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *RADII}
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def samples(n: int, seed: int, mention: float = 0.5) -> tuple[np.ndarray, list[str], list[Scene], list[dict]]:
    """n seeded (image, caption) pairs, with their scenes and the attributes each caption names."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    captions, named = zip(*(caption(s, rng, mention=mention) for s in scenes)) if n else ((), ())
    return (
        np.stack([render(s) for s in scenes]) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8),
        list(captions),
        scenes,
        list(named),
    )


# -- the judge ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Judgement:
    background: str
    colour: str | None  # None when nothing stands out from the background
    shape: str | None
    fill: float  # share of the foreground's bounding box that the foreground covers
    size: str | None = None  # from the bounding box's longer side
    position: str | None = None  # from the bounding box's centre, named as POSITIONS name it
    match: float = 0.0  # share of the box's pixels where the foreground agrees with the shape judged


def nearest(rgb, palette: dict) -> str:
    names = list(palette)
    distances = np.abs(np.asarray([palette[n] for n in names], float) - np.asarray(rgb, float)).sum(axis=1)
    return names[int(np.argmin(distances))]


def _labels(image: np.ndarray) -> np.ndarray:
    """Index into BACKGROUNDS of every pixel's nearest palette colour."""
    palette = np.asarray(list(BACKGROUNDS.values()), np.int32)
    return np.abs(image[..., None, :] - palette).sum(axis=-1).argmin(axis=-1)


def judge(image: np.ndarray) -> Judgement:
    """Background from the border, foreground from the rest; colour by nearest palette colour, shape
    by which of the world's shapes, drawn as ``render`` draws it in the foreground's bounding box, agrees
    with the foreground on the most pixels."""
    image = np.asarray(image)[..., :3].astype(np.int32)
    border = np.concatenate(
        [image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]
    )
    background = nearest(np.median(border, axis=0), BACKGROUNDS)
    labels = _labels(image)
    names = list(BACKGROUNDS)
    foreground = labels != names.index(background)
    counts = np.bincount(labels[foreground], minlength=len(names))[: len(COLOURS)]  # gray is never a shape
    if foreground.sum() < MIN_FOREGROUND or counts.max(initial=0) < MIN_PURITY * foreground.sum():
        return Judgement(background, None, None, 0.0)  # nothing drawn, or no one colour (noise)
    colour = names[int(np.argmax(counts))]
    rows, cols = _extent(foreground.sum(axis=1)), _extent(foreground.sum(axis=0))
    box = foreground[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1]
    # Where the pixels are, not only how many: a split on the fill ratio (square >= 0.9 of the box, circle
    # >= 0.64) called squares with wavy sides circles, and small triangles put through the model's own
    # MoVQ too (11 of 300 world pictures; a small triangle's drawn fill, 0.61, sits next to the split).
    matches = {shape: float((box == _silhouette(shape, *box.shape)).mean()) for shape in SHAPES}
    shape = max(matches, key=matches.get)
    side = max(box.shape)
    size = "large" if side >= LARGE_SIDE else "small"
    position = _position(sum(rows) / 2, sum(cols) / 2)
    return Judgement(background, colour, shape, float(box.mean()), size, position, match=matches[shape])


@lru_cache(maxsize=4096)
def _silhouette(shape: str, height: int, width: int) -> np.ndarray:
    """The shape as ``render`` draws it filling a height x width box: a boolean mask."""
    image = Image.new("L", (width, height), 0)
    _draw(ImageDraw.Draw(image), shape, (0, 0, width - 1, height - 1), 1)
    return np.asarray(image, bool)


def _position(y: float, x: float) -> str:
    """ "top left", "bottom", "center", ...: which side of the middle the centre (y, x) is on, per axis."""
    middle = SIZE // 2
    vertical = "top" if y <= middle - OFF_CENTRE else "bottom" if y >= middle + OFF_CENTRE else ""
    horizontal = "left" if x <= middle - OFF_CENTRE else "right" if x >= middle + OFF_CENTRE else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def _extent(counts: np.ndarray) -> tuple[int, int]:
    """First and last line with at least two foreground pixels (a stray pixel does not widen the box)."""
    lines = np.flatnonzero(counts >= 2)
    if not len(lines):
        lines = np.flatnonzero(counts)
    return int(lines[0]), int(lines[-1])


def region_mask(scene: Scene, grow: int = 4) -> np.ndarray:
    """HxW uint8 mask, 255 over the scene's shape box grown by ``grow`` px: where an inpaint may draw."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    x0, y0, x1, y1 = scene.box()
    mask[max(0, y0 - grow) : y1 + grow + 1, max(0, x0 - grow) : x1 + grow + 1] = 255
    return mask
