"""SyntheticImageNet: a procedurally drawn classification set that needs no download.

Classes differ in layout rather than colour: which shape is on top, stripe direction,
corner versus centre, triangle orientation, '+' versus 'x'. Background and shape colours,
sizes and positions are drawn at random for every image, so colour alone cannot separate
the classes. Every class is unchanged by a horizontal flip, but not by a vertical flip or by
crops aggressive enough to move a shape from the centre to a corner.
Image i of a split is drawn from a generator seeded with (seed, split, i): the same
arguments always give the same images, and train and val never share a generator.
"""
import math
import numbers

import cv2
import numpy as np

from ..registry import DATASETS, ConfigError
from .imagenet import ClassificationDataset

__all__ = ["SyntheticImageNet", "SYNTHETIC_CLASSES"]

SYNTHETIC_CLASSES = (
    "circle_above_square", "square_above_circle",
    "horizontal_stripes", "vertical_stripes",
    "shape_in_corner", "shape_in_centre",
    "triangle_up", "triangle_down",
    "plus_cross", "diagonal_cross",
)
_SPLITS = {"train": 0, "val": 1, "test": 2}
_SHIFT = 4                 # opencv fixed-point bits: sub-pixel shape positions
_SCALE = 1 << _SHIFT


def _colour(rng, avoid=None, min_dist=200):
    """A random RGB colour at least `min_dist` (L1) away from `avoid`."""
    for _ in range(20):
        c = rng.integers(0, 256, size=3)
        if avoid is None or np.abs(c - avoid).sum() >= min_dist:
            break
    return c


def _background(rng, size):
    """Base colour plus a smooth random shading and a little pixel noise."""
    base = rng.integers(0, 256, size=3).astype(np.float32)
    shading = cv2.resize(rng.uniform(-30, 30, size=(3, 3, 3)).astype(np.float32), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    noise = rng.normal(0.0, 6.0, size=(size, size, 3)).astype(np.float32)
    img = np.clip(base + shading + noise, 0, 255).astype(np.uint8)
    return img, base


def _pt(x, y):
    return int(round(x * _SCALE)), int(round(y * _SCALE))


def _fill_poly(img, pts, colour):
    poly = np.array([_pt(x, y) for x, y in pts], dtype=np.int32)
    cv2.fillConvexPoly(img, poly, tuple(int(v) for v in colour), cv2.LINE_AA, _SHIFT)


def _circle(img, cx, cy, r, colour):
    cv2.circle(img, _pt(cx, cy), int(round(r * _SCALE)), tuple(int(v) for v in colour), -1, cv2.LINE_AA, _SHIFT)


def _square(img, cx, cy, r, colour, angle):
    # half-side r * 0.9 so a square and a circle of the same r look about as large
    h = r * 0.9
    ca, sa = math.cos(angle), math.sin(angle)
    pts = [(cx + ca * dx - sa * dy, cy + sa * dx + ca * dy) for dx, dy in ((-h, -h), (h, -h), (h, h), (-h, h))]
    _fill_poly(img, pts, colour)


def _shape(img, kind, cx, cy, r, colour, rng):
    if kind == "circle":
        _circle(img, cx, cy, r, colour)
    else:
        _square(img, cx, cy, r, colour, rng.uniform(-0.15, 0.15))


def _stacked(img, bg, s, rng, top_kind):
    bottom_kind = "square" if top_kind == "circle" else "circle"
    cx = s / 2 + rng.uniform(-0.12, 0.12) * s
    gap = rng.uniform(0.4, 0.48) * s
    cy = s / 2 + rng.uniform(-0.05, 0.05) * s
    for kind, y in ((top_kind, cy - gap / 2), (bottom_kind, cy + gap / 2)):
        x = cx + rng.uniform(-0.06, 0.06) * s
        _shape(img, kind, x, y, rng.uniform(0.13, 0.18) * s, _colour(rng, bg), rng)


def _stripes(img, bg, s, rng, horizontal):
    period = s / rng.uniform(4.0, 7.0)
    duty = rng.uniform(0.35, 0.6)
    angle = rng.uniform(-0.2, 0.2)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    across = yy * math.cos(angle) - xx * math.sin(angle) if horizontal else \
        xx * math.cos(angle) + yy * math.sin(angle)
    mask = np.mod(across + rng.uniform(0, period), period) < period * duty
    img[mask] = _colour(rng, bg)


def _single(img, bg, s, rng, corner):
    r = rng.uniform(0.1, 0.15) * s
    if corner:
        off = r + rng.uniform(0.03, 0.08) * s
        cx = off if rng.random() < 0.5 else s - off
        cy = off if rng.random() < 0.5 else s - off
    else:
        cx, cy = s / 2 + rng.uniform(-0.07, 0.07, size=2) * s
    _shape(img, "circle" if rng.random() < 0.5 else "square", cx, cy, r, _colour(rng, bg), rng)


def _triangle(img, bg, s, rng, up):
    r = rng.uniform(0.2, 0.3) * s
    cx, cy = s / 2 + rng.uniform(-0.12, 0.12, size=2) * s
    sign = -1.0 if up else 1.0
    apex = (cx + rng.uniform(-0.1, 0.1) * r, cy + sign * r)
    base_y = cy - sign * r * 0.7
    width = r * rng.uniform(0.9, 1.1)
    _fill_poly(img, [apex, (cx - width, base_y), (cx + width, base_y)], _colour(rng, bg))


def _cross(img, bg, s, rng, diagonal):
    cx, cy = s / 2 + rng.uniform(-0.1, 0.1, size=2) * s
    half = rng.uniform(0.25, 0.34) * s
    thick = rng.uniform(0.08, 0.12) * s
    base = math.pi / 4 if diagonal else 0.0
    colour = _colour(rng, bg)
    for k in range(2):
        a = base + k * math.pi / 2 + rng.uniform(-0.15, 0.15)
        dx, dy = math.cos(a), math.sin(a)
        nx, ny = -dy * thick / 2, dx * thick / 2
        _fill_poly(img, [(cx - dx * half + nx, cy - dy * half + ny), (cx + dx * half + nx, cy + dy * half + ny),
                         (cx + dx * half - nx, cy + dy * half - ny), (cx - dx * half - nx, cy - dy * half - ny)],
                   colour)


_DRAW = (
    lambda img, bg, s, rng: _stacked(img, bg, s, rng, "circle"),
    lambda img, bg, s, rng: _stacked(img, bg, s, rng, "square"),
    lambda img, bg, s, rng: _stripes(img, bg, s, rng, True),
    lambda img, bg, s, rng: _stripes(img, bg, s, rng, False),
    lambda img, bg, s, rng: _single(img, bg, s, rng, True),
    lambda img, bg, s, rng: _single(img, bg, s, rng, False),
    lambda img, bg, s, rng: _triangle(img, bg, s, rng, True),
    lambda img, bg, s, rng: _triangle(img, bg, s, rng, False),
    lambda img, bg, s, rng: _cross(img, bg, s, rng, False),
    lambda img, bg, s, rng: _cross(img, bg, s, rng, True),
)


@DATASETS.register
class SyntheticImageNet(ClassificationDataset):
    """`num_samples` images of `image_size`^2 pixels over the first `num_classes` of
    SYNTHETIC_CLASSES (2..10), labels balanced (label = index mod num_classes).

    Images are drawn on access (about 0.5 ms each at 64 px), so `samples` holds
    placeholder paths 'synthetic://<split>/<index>'. `seed` fixes the images; `aug_seed`
    fixes the random transforms (see ClassificationDataset)."""

    def __init__(self, num_samples=2000, image_size=64, num_classes=10, seed=0, split="train",
                 transforms=None, aug_seed=None):
        for key, val, low in (("num_samples", num_samples, 1), ("image_size", image_size, 16)):
            if not (isinstance(val, numbers.Integral) and not isinstance(val, bool) and val >= low):
                raise ConfigError(f"SyntheticImageNet.{key}: expected an int >= {low}, got {val!r}")
        if not (isinstance(num_classes, numbers.Integral) and 2 <= num_classes <= len(SYNTHETIC_CLASSES)):
            raise ConfigError(f"SyntheticImageNet.num_classes: expected an int in [2, {len(SYNTHETIC_CLASSES)}], "
                              f"got {num_classes!r}")
        if split not in _SPLITS:
            raise ConfigError(f"SyntheticImageNet.split: expected one of {list(_SPLITS)}, got {split!r}")
        if not (isinstance(seed, numbers.Integral) and seed >= 0):
            raise ConfigError(f"SyntheticImageNet.seed: expected an int >= 0, got {seed!r}")
        samples = [(f"synthetic://{split}/{i}", i % num_classes) for i in range(num_samples)]
        super().__init__(samples, num_classes, SYNTHETIC_CLASSES[:num_classes], transforms, aug_seed)
        self.image_size = int(image_size)
        self.data_seed = int(seed)
        self.split = split

    def load(self, index):
        rng = np.random.default_rng([self.data_seed, _SPLITS[self.split], int(index)])
        img, bg = _background(rng, self.image_size)
        _DRAW[self.samples[index][1]](img, bg, self.image_size, rng)
        return img
