"""Deterministic synthetic data set with the exact layout of the ILSVRC-2012 download.

The tree written by :func:`generate_sample` looks like the Kaggle form of ILSVRC-2012
(ImageNet CLS-LOC), so every reader in the pipeline can run on it unchanged::

    <out_dir>/train/<wnid>/<wnid>_<id>.JPEG       ids: sorted, unique, non-contiguous
    <out_dir>/val/ILSVRC2012_val_<8 digits>.JPEG  flat, numbered 1.., classes interleaved
    <out_dir>/LOC_val_solution.csv                ImageId,PredictionString (wnid x0 y0 x1 y1 ...)
    <out_dir>/LOC_synset_mapping.txt              "wnid name, name" for the chosen classes

Classes are real ILSVRC-2012 wnids and names (the package's copy of the 1000-line
LOC_synset_mapping.txt), spread evenly over the sorted list: class ``j`` of ``n`` is
synset ``j * 1000 // n`` (10 classes: synsets 0, 100, ..., 900).

Image content: class ``j`` of the generated set (its rank, not its wnid) gets design
``j``. A design is a shape (40 kinds) x a fill (solid, outline, stripes, checker, dots)
x a modifier (plain, squashed, halved, bordered, paired): 1000 designs. Designs 0-9
are the ten most distinct ones (disc, ring, square, triangle, star, plus, striped patch,
checkerboard patch, dot-grid patch, crescent); the rest follow in modifier, fill, shape
order. Each object is drawn at a random position, size (circumscribed circle 35-75% of the short side),
rotation and colour (always contrasting with the background in luminance, so the class
survives greyscale) over clutter: smooth colour blotches, low-frequency shading, pixel
noise and a few small strokes and blobs that are never class shapes.

File quirks of the real set are reproduced (see the spec's "Known quirks"): mostly
500x375 / 375x500 / 500x333 pictures, ~5% small ones, ~1.5% over 1000 px, JPEG quality
75-95, ~10% progressive, ~2% greyscale, CMYK JPEGs and one PNG saved under a .JPEG name
in train. The first training images carry one of each quirk, so even a 2-class set
holds them all.

Everything is a pure function of the parameters: every image draws from its own
``numpy.random.SeedSequence([seed, split, ...])`` stream, and no time or global state
is used, so the same parameters give byte-identical files.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from scipy import ndimage

MAPPING_FILE = "LOC_synset_mapping.txt"
SOLUTION_FILE = "LOC_val_solution.csv"
NUM_SYNSETS = 1000
# ILSVRC-2012 has at most 1300 training and exactly 50 validation images per class.
MAX_TRAIN_PER_CLASS = 1300
MAX_VAL_PER_CLASS = 50

# SeedSequence "split" words: keep every random stream independent of the others.
_TRAIN, _VAL, _TRAIN_IDS, _VAL_ORDER, _CSV_ORDER = range(5)

# One of each quirk goes to the first training images (spread over the classes), so
# that tiny sets still contain all of them.
_FORCED_TRAITS = ("png", "cmyk", "grey", "progressive", "small", "large")

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, what PIL's convert("L") uses
_LUM_GAP = 80.0  # minimum luminance distance between object and background

_SIZE_KINDS = (
    "500x375",
    "375x500",
    "500x333",
    "333x500",
    "landscape",
    "portrait",
    "small",
    "large",
)
_SIZE_PROBS = (0.51, 0.18, 0.12, 0.04, 0.065, 0.02, 0.05, 0.015)

Component = tuple[np.ndarray, bool]  # polygon in unit coordinates, True adds / False cuts
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel coordinates)


# --------------------------------------------------------------------------- synsets


def load_synsets(path: Path | str | None = None) -> list[tuple[str, str]]:
    """Reads a LOC_synset_mapping.txt file.

    Args:
        path: The file to read; by default the package's copy of the ILSVRC-2012 list
            (1000 lines, sorted by wnid, class index = line number).

    Returns:
        ``(wnid, names)`` pairs in file order, e.g. ``("n01440764", "tench, Tinca tinca")``.

    Raises:
        ValueError: A line is not ``n<8 digits> <names>``.
    """
    if path is None:
        text = resources.files("pipeline.data").joinpath(MAPPING_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    synsets = []
    for number, line in enumerate(text.splitlines(), start=1):
        wnid, _, names = line.partition(" ")
        if len(wnid) != 9 or wnid[0] != "n" or not wnid[1:].isdigit() or not names.strip():
            raise ValueError(f"{path or MAPPING_FILE}:{number}: expected 'n<8 digits> <names>', got {line!r}")
        synsets.append((wnid, names))
    return synsets


def select_classes(num_classes: int) -> list[tuple[str, str]]:
    """Picks ``num_classes`` ILSVRC-2012 synsets spread evenly over the sorted 1000.

    Class ``j`` is synset ``j * 1000 // num_classes``, so the choice is deterministic,
    stays sorted by wnid and covers the whole hierarchy (animals and objects alike).

    Args:
        num_classes: How many classes, 2 to 1000.

    Returns:
        ``(wnid, names)`` pairs, sorted by wnid.

    Raises:
        ValueError: ``num_classes`` is out of range.
    """
    _check_int("num_classes", num_classes, 2, NUM_SYNSETS)
    synsets = load_synsets()
    return [synsets[j * NUM_SYNSETS // num_classes] for j in range(num_classes)]


# --------------------------------------------------------------------------- designs


def _circle(
    r: float = 1.0, cx: float = 0.0, cy: float = 0.0, start: float = 0.0, stop: float = 2 * math.pi
) -> np.ndarray:
    t = np.linspace(start, stop, 48, endpoint=stop - start < 2 * math.pi)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _ngon(n: int, phase_deg: float) -> np.ndarray:
    t = math.radians(phase_deg) + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=float)


def _wedge(half_angle_deg: float) -> np.ndarray:
    a = math.radians(half_angle_deg)
    return _poly((0, 0), (3 * math.cos(a), 3 * math.sin(a)), (3, 0), (3 * math.cos(a), -3 * math.sin(a)))


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    return np.stack([x, y], axis=1)


def _bar(angle_deg: float, half_width: float) -> np.ndarray:
    a = math.radians(angle_deg)
    along, across = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    return np.array([s * along + w * half_width * across for s, w in ((-1, -1), (1, -1), (1, 1), (-1, 1))])


def _add(*polygons: np.ndarray) -> tuple[Component, ...]:
    return tuple((p, True) for p in polygons)


# Every shape is a short list of polygons drawn in order (True fills, False cuts). The
# first six plus "crescent" make the curated first classes; all are rotation-distinct
# from each other (no shape is another one turned).
_SHAPE_LIST: tuple[tuple[str, tuple[Component, ...]], ...] = (
    ("disc", _add(_circle())),
    ("square", _add(_ngon(4, 45))),
    ("triangle", _add(_ngon(3, -90))),
    ("star", _add(_star(5, 0.45))),
    ("plus", _add(_rect(-1, -0.3, 1, 0.3), _rect(-0.3, -1, 0.3, 1))),
    ("crescent", ((_circle(), True), (_circle(0.85, cx=0.45), False))),
    ("hexagon", _add(_ngon(6, 0))),
    (
        "arrow",
        _add(_poly((-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22))),
    ),
    ("heart", _add(_heart())),
    ("pentagon", _add(_ngon(5, -90))),
    ("octagon", _add(_ngon(8, 22.5))),
    ("diamond", _add(_poly((0, -1), (0.6, 0), (0, 1), (-0.6, 0)))),
    ("asterisk", _add(_bar(0, 0.16), _bar(60, 0.16), _bar(120, 0.16))),
    ("semicircle", _add(_circle(start=math.pi, stop=2 * math.pi))),
    ("star4", _add(_star(4, 0.38))),
    ("star6", _add(_star(6, 0.5))),
    ("star8", _add(_star(8, 0.55))),
    ("gear", _add(_star(12, 0.78))),
    ("ell", _add(_poly((-0.6, -1), (-0.1, -1), (-0.1, 0.5), (0.6, 0.5), (0.6, 1), (-0.6, 1)))),
    ("tee", _add(_rect(-1, -1, 1, -0.5), _rect(-0.25, -0.5, 0.25, 1))),
    ("aitch", _add(_rect(-1, -1, -0.5, 1), _rect(0.5, -1, 1, 1), _rect(-0.5, -0.22, 0.5, 0.22))),
    ("cup", _add(_rect(-1, -1, -0.5, 1), _rect(0.5, -1, 1, 1), _rect(-1, 0.5, 1, 1))),
    ("arc", ((_circle(), True), (_circle(0.6), False), (_wedge(45), False))),
    (
        "chevron",
        _add(_poly((-1, -0.8), (-0.45, -0.8), (0.35, 0), (-0.45, 0.8), (-1, 0.8), (-0.2, 0))),
    ),
    ("trapezoid", _add(_poly((-1, 0.6), (1, 0.6), (0.5, -0.6), (-0.5, -0.6)))),
    ("parallelogram", _add(_poly((-1, 0.5), (0.4, 0.5), (1, -0.5), (-0.4, -0.5)))),
    ("right_triangle", _add(_poly((-1, 1), (1, 1), (-1, -1)))),
    ("bowtie", _add(_poly((-1, -0.8), (0.1, 0), (-1, 0.8)), _poly((1, -0.8), (-0.1, 0), (1, 0.8)))),
    (
        "bolt",
        _add(
            _poly(
                (0.1, -1),
                (-0.6, 0.15),
                (-0.05, 0.15),
                (-0.3, 1),
                (0.6, -0.25),
                (0.05, -0.25),
                (0.35, -1),
            )
        ),
    ),
    ("house", _add(_poly((-0.8, 1), (0.8, 1), (0.8, -0.1), (0, -1), (-0.8, -0.1)))),
    ("dumbbell", _add(_circle(0.4, cx=-0.6), _circle(0.4, cx=0.6), _rect(-0.6, -0.15, 0.6, 0.15))),
    (
        "capsule",
        _add(_rect(-0.55, -0.45, 0.55, 0.45), _circle(0.45, cx=-0.55), _circle(0.45, cx=0.55)),
    ),
    ("teardrop", _add(_circle(0.6, cy=0.4), _poly((-0.57, 0.22), (0.57, 0.22), (0, -1)))),
    ("latin_cross", _add(_rect(-0.18, -1, 0.18, 1), _rect(-0.6, -0.55, 0.6, -0.2))),
    ("kite", _add(_poly((0, -1), (0.55, -0.3), (0, 1), (-0.55, -0.3)))),
    (
        "trefoil",
        _add(
            _circle(0.3),
            *(
                _circle(0.45, 0.5 * math.cos(a), 0.5 * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ),
        ),
    ),
    (
        "quatrefoil",
        _add(
            _circle(0.3),
            *(_circle(0.42, 0.55 * math.cos(a), 0.55 * math.sin(a)) for a in np.arange(4) * math.pi / 2),
        ),
    ),
    (
        "zed",
        _add(
            _poly(
                (-1, -0.66),
                (0.33, -0.66),
                (0.33, 0),
                (1, 0),
                (1, 0.66),
                (-0.33, 0.66),
                (-0.33, 0),
                (-1, 0),
            )
        ),
    ),
    (
        "stairs",
        _add(
            _poly(
                (-1, 1),
                (-1, 0.33),
                (-0.33, 0.33),
                (-0.33, -0.33),
                (0.33, -0.33),
                (0.33, -1),
                (1, -1),
                (1, 1),
            )
        ),
    ),
    ("pacman", ((_circle(), True), (_wedge(30), False))),
)


def _normalise(components: tuple[Component, ...]) -> tuple[Component, ...]:
    """Centres a shape on its bounding box and scales it to fit the unit circle."""
    filled = np.concatenate([p for p, add in components if add])
    centre = (filled.min(axis=0) + filled.max(axis=0)) / 2
    scale = np.linalg.norm(filled - centre, axis=1).max()
    return tuple(((p - centre) / scale, add) for p, add in components)


_SHAPES = {name: _normalise(components) for name, components in _SHAPE_LIST}
_FILLS = ("solid", "outline", "stripes", "checker", "dots")
_MODIFIERS = ("plain", "squashed", "halved", "bordered", "paired")

# The ten most distinct designs at ~128 px, for the default 10-class set.
_CURATED = (
    ("disc", "solid", "plain"),
    ("disc", "outline", "plain"),  # ring
    ("square", "solid", "plain"),
    ("triangle", "solid", "plain"),
    ("star", "solid", "plain"),
    ("plus", "solid", "plain"),
    ("square", "stripes", "plain"),
    ("square", "checker", "plain"),
    ("disc", "dots", "plain"),  # on a disc: differs from the two square patches twice
    ("crescent", "solid", "plain"),
)
_DESIGNS = _CURATED + tuple(
    design
    for design in ((s, f, m) for m in _MODIFIERS for f in _FILLS for s in _SHAPES)
    if design not in _CURATED
)


def design_name(rank: int) -> str:
    """Names the content drawn for the class of a given rank in a generated set.

    Args:
        rank: Position of the class among the generated ones (0 = first wnid), 0 to 999.

    Returns:
        ``"shape/fill/modifier"``, e.g. ``"disc/outline/plain"`` (a ring).
    """
    _check_int("rank", rank, 0, NUM_SYNSETS - 1)
    return "/".join(_DESIGNS[rank])


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Frame:
    """Maps unit shape coordinates onto a square canvas: rotation, radius, squash."""

    size: int
    radius: float
    theta: float
    squash: float = 1.0

    def to_pixels(
        self, points: np.ndarray, scale: float = 1.0, shift: float = 0.0
    ) -> list[tuple[float, float]]:
        u = points[:, 0] * scale + shift
        v = points[:, 1] * scale * self.squash
        cos, sin = math.cos(self.theta), math.sin(self.theta)
        x = self.size / 2 + self.radius * (u * cos - v * sin)
        y = self.size / 2 + self.radius * (u * sin + v * cos)
        return list(zip(x.tolist(), y.tolist(), strict=True))

    def uv(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit object coordinates of every canvas pixel (for textures and cuts)."""
        grid = (np.arange(self.size, dtype=np.float32) + 0.5 - self.size / 2) / self.radius
        cos, sin = math.cos(self.theta), math.sin(self.theta)
        u = grid[None, :] * cos + grid[:, None] * sin
        v = -grid[None, :] * sin + grid[:, None] * cos
        return u, v


def _rasterise(
    components: tuple[Component, ...], frame: _Frame, scale: float = 1.0, shift: float = 0.0
) -> np.ndarray:
    canvas = Image.new("1", (frame.size, frame.size), 0)
    draw = ImageDraw.Draw(canvas)
    for points, add in components:
        draw.polygon(frame.to_pixels(points, scale, shift), fill=1 if add else 0)
    return np.asarray(canvas)


def _shape_mask(shape: str, modifier: str, frame: _Frame) -> np.ndarray:
    """Boolean mask of the shape with its modifier applied (squash is in the frame)."""
    components = _SHAPES[shape]
    if modifier == "bordered":
        band = _rasterise(components, frame) & ~_rasterise(components, frame, 0.84)
        return band | _rasterise(components, frame, 0.66)
    if modifier == "paired":
        return _rasterise(components, frame, 0.5, -0.5) | _rasterise(components, frame, 0.5, 0.5)
    mask = _rasterise(components, frame)
    if modifier == "halved":
        mask = mask & (frame.uv()[1] > 0)
    return mask


def _fill_masks(
    rng: np.random.Generator, fill: str, mask: np.ndarray, frame: _Frame
) -> tuple[np.ndarray, np.ndarray | None]:
    """Splits an object into (base, pattern) masks; pattern None means one colour.

    Texture periods are relative to the object size (about 3 stripes per
    diameter), coarse enough to survive scaling to ~128 px and a stride-4 first layer.
    """
    if fill == "solid":
        return mask, None
    if fill == "outline":
        return mask & (ndimage.distance_transform_edt(mask) <= 0.22 * frame.radius), None
    u, v = frame.uv()
    period = rng.uniform(0.5, 0.6)
    phase_u, phase_v = rng.uniform(0, 1, 2)
    fu, fv = u / period + phase_u, v / period + phase_v
    if fill == "stripes":
        pattern = fu % 1 < 0.5
    elif fill == "checker":
        pattern = (np.floor(fu) + np.floor(fv)) % 2 == 0
    else:  # dots
        pattern = (fu % 1 - 0.5) ** 2 + (fv % 1 - 0.5) ** 2 < 0.25**2
    return mask, mask & pattern


def _colour(rng: np.random.Generator, lum: float) -> tuple[int, int, int]:
    """A random colour of (about) the given luminance: hue and saturation are noise."""
    rgb = rng.uniform(0, 255, 3)
    for _ in range(3):
        rgb = np.clip(rgb + (lum - rgb @ _LUMA), 0, 255)
    return tuple(int(c) for c in np.rint(rgb))


def _contrasting(rng: np.random.Generator, lum: float) -> float:
    """A luminance at least _LUM_GAP away from ``lum`` (darker or lighter)."""
    ranges = [(lo, hi) for lo, hi in ((0.0, lum - _LUM_GAP), (lum + _LUM_GAP, 255.0)) if hi >= lo]
    lo, hi = ranges[rng.integers(len(ranges))]
    return float(rng.uniform(lo, hi))


def _soft(mask: np.ndarray) -> Image.Image:
    # A slight blur anti-aliases the polygon edges, like the soft edges of a photo.
    return Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(0.7))


def _paste_object(
    rng: np.random.Generator,
    image: Image.Image,
    design: tuple[str, str, str],
    lum_bg: float,
    max_frac: float,
) -> Box:
    """Draws one class object at a random place, size, angle and colour; returns its box."""
    shape, fill, modifier = design
    width, height = image.size
    radius = rng.uniform(0.35, max_frac) * min(width, height) / 2
    frame = _Frame(
        size=2 * math.ceil(radius) + 4,
        radius=radius,
        theta=rng.uniform(0, 2 * math.pi),
        squash=0.6 if modifier == "squashed" else 1.0,
    )
    base, pattern = _fill_masks(rng, fill, _shape_mask(shape, modifier, frame), frame)
    x0 = int(rng.integers(0, width - frame.size + 1))
    y0 = int(rng.integers(0, height - frame.size + 1))
    box = (x0, y0, x0 + frame.size, y0 + frame.size)
    lum_obj = _contrasting(rng, lum_bg)
    if pattern is None:
        image.paste(_colour(rng, lum_obj), box, _soft(base))
    else:
        # The patch colour may match the background: the pattern alone carries the class.
        image.paste(_colour(rng, _contrasting(rng, lum_obj)), box, _soft(base))
        image.paste(_colour(rng, lum_obj), box, _soft(pattern))
    ys, xs = np.nonzero(base)
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()), y0 + int(ys.max()))


def _distractor(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """A small stroke or irregular blob: clutter that is never a class shape."""
    short = min(width, height)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    if rng.random() < 0.5:
        steps = rng.uniform(0.04, 0.1, (int(rng.integers(1, 3)), 1)) * short
        angles = rng.uniform(0, 2 * math.pi, (len(steps), 1))
        offsets = np.cumsum(steps * np.concatenate([np.cos(angles), np.sin(angles)], axis=1), axis=0)
        points = [(x, y)] + [(x + dx, y + dy) for dx, dy in offsets.tolist()]
        draw.line(points, fill=colour, width=max(1, int(short * rng.uniform(0.008, 0.02))))
    else:
        angles = np.sort(rng.uniform(0, 2 * math.pi, 7))
        radii = short * rng.uniform(0.02, 0.05) * rng.uniform(0.5, 1.2, 7)
        xs, ys = (x + radii * np.cos(angles)).tolist(), (y + radii * np.sin(angles)).tolist()
        draw.polygon(list(zip(xs, ys, strict=True)), fill=colour)


def _background(rng: np.random.Generator, width: int, height: int, lum: float) -> Image.Image:
    """Smooth colour blotches (a 2x3 grid of colours near luminance ``lum``, upscaled)."""
    grid = [_colour(rng, lum + rng.uniform(-20, 20)) for _ in range(6)]
    coarse = Image.fromarray(np.array(grid, dtype=np.uint8).reshape(2, 3, 3))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def _finish(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """Adds low-frequency shading (over objects too) and per-pixel sensor noise."""
    width, height = image.size
    # PIL's C arithmetic keeps this cheap: full-size numpy float passes cost ~2x the time.
    coarse = Image.fromarray(rng.integers(200, 256, (3, 4), dtype=np.uint8))
    shade = coarse.resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(2, 7) + 128
    grain = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    shaded = ImageChops.multiply(image, Image.merge("RGB", (shade,) * 3))
    return ImageChops.add(shaded, Image.merge("RGB", (grain,) * 3), offset=-128)


def _render(
    rng: np.random.Generator, design: tuple[str, str, str], size: tuple[int, int]
) -> tuple[Image.Image, list[Box]]:
    """Draws a full picture of one class; returns it with the objects' boxes."""
    lum_bg = float(rng.uniform(40, 215))
    image = _background(rng, *size, lum_bg)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        _distractor(rng, draw, *size)
    # Like real val images, a few hold two objects of the class (two boxes).
    count = 2 if rng.random() < 0.06 else 1
    boxes = [_paste_object(rng, image, design, lum_bg, 0.75 if count == 1 else 0.5) for _ in range(count)]
    if rng.random() < 0.3:
        _distractor(rng, draw, *size)  # in front of the object: a little occlusion
    return _finish(rng, image), boxes


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _Encoding:
    kind: str  # "rgb", "grey", "cmyk" (JPEGs) or "png" (PNG bytes under a .JPEG name)
    quality: int
    progressive: bool


def _choose_encoding(rng: np.random.Generator, split: int, trait: str | None) -> _Encoding:
    quality = int(rng.integers(75, 96))
    progressive = trait == "progressive" or rng.random() < 0.1
    draw = rng.random()
    if trait in ("png", "cmyk", "grey"):
        kind = trait
    elif draw < 0.02:
        kind = "grey"
    elif split == _TRAIN and draw < 0.022:  # CMYK JPEGs only occur in train, as in ImageNet
        kind = "cmyk"
    else:
        kind = "rgb"
    return _Encoding(kind, quality, progressive)


def _choose_size(rng: np.random.Generator, trait: str | None) -> tuple[int, int]:
    kind = trait if trait in ("small", "large") else str(rng.choice(_SIZE_KINDS, p=_SIZE_PROBS))
    if "x" in kind:
        width, height = kind.split("x")
        return int(width), int(height)
    if kind == "landscape":
        return 500, int(rng.integers(280, 500))
    if kind == "portrait":
        return int(rng.integers(280, 500)), 500
    long_side = int(rng.integers(200, 301) if kind == "small" else rng.integers(1024, 1601))
    short_side = round(long_side * float(rng.choice((0.75, 2 / 3))))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def _save(image: Image.Image, encoding: _Encoding, path: Path) -> None:
    if encoding.kind == "png":
        image.save(path, format="PNG")
        return
    if encoding.kind != "rgb":
        image = image.convert("L" if encoding.kind == "grey" else "CMYK")
    image.save(path, format="JPEG", quality=encoding.quality, progressive=encoding.progressive)


def _write_image(
    seed: int,
    split: int,
    key: tuple[int, ...],
    design: tuple[str, str, str],
    trait: str | None,
    path: Path,
) -> tuple[_Encoding, list[Box]]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, *key]))
    encoding = _choose_encoding(rng, split, trait)
    image, boxes = _render(rng, design, _choose_size(rng, trait))
    _save(image, encoding, path)
    return encoding, boxes


def _train_ids(seed: int, rank: int, count: int) -> list[int]:
    # Real file numbers are sparse (n01440764_10026.JPEG), so readers must not assume 1..N.
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TRAIN_IDS, rank]))
    return sorted(int(i) + 1 for i in rng.choice(max(16000, 4 * count), size=count, replace=False))


def _forced_trait(rank: int, index: int, num_classes: int) -> str | None:
    position = index * num_classes + rank  # quirk q goes to class q % n, image q // n
    return _FORCED_TRAITS[position] if position < len(_FORCED_TRAITS) else None


class _Tally:
    """Counts the quirks written, for the summary."""

    def __init__(self) -> None:
        self.png_as_jpeg: list[str] = []
        self.cmyk: list[str] = []
        self.greyscale = 0
        self.progressive = 0

    def add(self, encoding: _Encoding, relative: str) -> None:
        if encoding.kind == "png":
            self.png_as_jpeg.append(relative)
        elif encoding.kind == "cmyk":
            self.cmyk.append(relative)
        self.greyscale += encoding.kind == "grey"
        self.progressive += encoding.progressive and encoding.kind != "png"

    def as_dict(self) -> dict:
        return {
            "png_as_jpeg": self.png_as_jpeg,
            "cmyk": self.cmyk,
            "greyscale": self.greyscale,
            "progressive": self.progressive,
        }


def _write_train(root: Path, seed: int, wnids: list[str], per_class: int, tally: _Tally) -> None:
    for rank, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for index, file_id in enumerate(_train_ids(seed, rank, per_class)):
            relative = f"train/{wnid}/{wnid}_{file_id}.JPEG"
            trait = _forced_trait(rank, index, len(wnids))
            encoding, _ = _write_image(seed, _TRAIN, (rank, index), _DESIGNS[rank], trait, root / relative)
            tally.add(encoding, relative)


def _write_val(root: Path, seed: int, wnids: list[str], per_class: int, tally: _Tally) -> None:
    (root / "val").mkdir()
    order_rng = np.random.default_rng(np.random.SeedSequence([seed, _VAL_ORDER]))
    labels = order_rng.permutation(np.repeat(np.arange(len(wnids)), per_class))
    rows = []
    for number, rank in enumerate(labels.tolist(), start=1):
        image_id = f"ILSVRC2012_val_{number:08d}"
        relative = f"val/{image_id}.JPEG"
        encoding, boxes = _write_image(seed, _VAL, (number,), _DESIGNS[rank], None, root / relative)
        tally.add(encoding, relative)
        rows.append((image_id, " ".join(f"{wnids[rank]} {x0} {y0} {x1} {y1}" for x0, y0, x1, y1 in boxes)))
    # The real LOC_val_solution.csv is not sorted by ImageId; neither is this one.
    csv_rng = np.random.default_rng(np.random.SeedSequence([seed, _CSV_ORDER]))
    with open(root / SOLUTION_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("ImageId", "PredictionString"))
        writer.writerows(rows[i] for i in csv_rng.permutation(len(rows)))


def _publish(tmp: Path, out_dir: Path) -> None:
    """Moves a finished tree into place, replacing an older one with two renames."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    out_dir.rename(old)
    tmp.rename(out_dir)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    in_range = isinstance(value, (int, np.integer)) and low <= value and (high is None or value <= high)
    if isinstance(value, bool) or not in_range:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"sample.{name}={value!r}: expected an integer {allowed}")


def generate_sample(
    out_dir: Path | str,
    *,
    num_classes: int = 10,
    train_per_class: int = 300,
    val_per_class: int = 50,
    seed: int = 0,
) -> dict:
    """Writes a synthetic ILSVRC-2012-shaped data set (see the module docstring).

    The tree is built in a sibling ``<out_dir>.tmp-*`` folder and renamed into place
    only when complete, so an interrupted run never leaves a tree that looks finished;
    an existing ``out_dir`` is replaced.

    Args:
        out_dir: Where the tree goes (missing parent folders are created).
        num_classes: Number of classes, 2 to 1000, picked evenly from the 1000 synsets.
        train_per_class: Training images per class, 2 to 1300.
        val_per_class: Validation images per class, 1 to 50.
        seed: Any integer >= 0; equal parameters give byte-identical files.

    Returns:
        A summary: ``root``, ``seed``, ``num_classes``, ``train_images``,
        ``val_images``, ``classes`` (wnids, class index order), ``designs`` (what each
        class shows) and ``quirks`` (PNG and CMYK file paths, greyscale and progressive
        counts).

    Raises:
        ValueError: A parameter is out of range; nothing is written then.
    """
    _check_int("num_classes", num_classes, 2, NUM_SYNSETS)
    _check_int("train_per_class", train_per_class, 2, MAX_TRAIN_PER_CLASS)
    _check_int("val_per_class", val_per_class, 1, MAX_VAL_PER_CLASS)
    _check_int("seed", seed, 0)
    out_dir = Path(out_dir)
    classes = select_classes(num_classes)
    wnids = [wnid for wnid, _ in classes]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    tally = _Tally()
    try:
        (tmp / MAPPING_FILE).write_text("".join(f"{w} {n}\n" for w, n in classes), encoding="utf-8")
        _write_train(tmp, seed, wnids, train_per_class, tally)
        _write_val(tmp, seed, wnids, val_per_class, tally)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "root": str(out_dir),
        "seed": seed,
        "num_classes": num_classes,
        "train_images": num_classes * train_per_class,
        "val_images": num_classes * val_per_class,
        "classes": wnids,
        "designs": [design_name(rank) for rank in range(num_classes)],
        "quirks": tally.as_dict(),
    }
