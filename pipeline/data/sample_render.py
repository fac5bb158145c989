"""Draws one picture of a sample class: an object of its design over clutter.

Each object is drawn at a random position, size (circumscribed circle 35-75% of the
short side), rotation and colour, always contrasting with the background in luminance
so the class survives greyscale, over smooth colour blotches, low-frequency shading,
pixel noise and a few small strokes and blobs that are never class shapes. Every draw
comes from the ``numpy.random.Generator`` passed in, so a seeded generator gives the
same picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from scipy import ndimage

from pipeline.data.sample_shapes import SHAPES, Component, Design

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, what PIL's convert("L") uses
_LUM_GAP = 80.0  # minimum luminance distance between object and background

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel coordinates)


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
    components = SHAPES[shape]
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
    design: Design,
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
    # Mixed with PIL's uint8 arithmetic (ImageChops), not full-size float arrays: cheaper per image.
    coarse = Image.fromarray(rng.integers(200, 256, (3, 4), dtype=np.uint8))
    shade = coarse.resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(2, 7) + 128
    grain = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    shaded = ImageChops.multiply(image, Image.merge("RGB", (shade,) * 3))
    return ImageChops.add(shaded, Image.merge("RGB", (grain,) * 3), offset=-128)


def render(rng: np.random.Generator, design: Design, size: tuple[int, int]) -> tuple[Image.Image, list[Box]]:
    """Draws a full picture of one class.

    Args:
        rng: The picture's own random stream; every random choice comes from it.
        design: What the class looks like, one of ``sample_shapes.DESIGNS``.
        size: ``(width, height)`` in pixels.

    Returns:
        The RGB picture and the box of each class object in it (one, or two in ~6%).
    """
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
