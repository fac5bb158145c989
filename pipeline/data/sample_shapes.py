"""The sample generator's class designs: 40 shapes x 5 fills x 5 modifiers = 1000.

A shape is a short list of polygons in unit coordinates, drawn in order (True fills,
False cuts), centred on its bounding box and scaled to fit the unit circle. A design is
``(shape, fill, modifier)``; :data:`DESIGNS` lists all 1000 in class-rank order: the ten
most distinct ones first (disc, ring, square, triangle, star, plus, striped patch,
checkerboard patch, dot-grid patch, crescent), then the rest in modifier, fill, shape
order. :mod:`pipeline.data.sample_render` draws them.
"""

from __future__ import annotations

import math

import numpy as np

Component = tuple[np.ndarray, bool]  # (k, 2) polygon in unit coordinates, True adds / False cuts
Design = tuple[str, str, str]  # (shape, fill, modifier), e.g. ("disc", "outline", "plain")


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


SHAPES: dict[str, tuple[Component, ...]] = {name: _normalise(components) for name, components in _SHAPE_LIST}
FILLS = ("solid", "outline", "stripes", "checker", "dots")
MODIFIERS = ("plain", "squashed", "halved", "bordered", "paired")

# The ten most distinct designs at ~128 px, for the default 10-class set.
_CURATED: tuple[Design, ...] = (
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
DESIGNS: tuple[Design, ...] = _CURATED + tuple(
    design
    for design in ((s, f, m) for m in MODIFIERS for f in FILLS for s in SHAPES)
    if design not in _CURATED
)
