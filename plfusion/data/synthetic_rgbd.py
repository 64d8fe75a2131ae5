"""SyntheticRGBD: procedurally generated indoor RGB-D scenes with labels, for demos and tests.

Every sample is generated on the fly from a seed derived from (seed, split, index), so the
dataset is deterministic, needs no download, and train/val never share a scene.

A scene is a wall (a slightly tilted plane 3.5-6 m away) above a floor (depth falling
from the wall to ~1-2 m at the bottom row) with objects on both:

==  ===========  ==================================================  =====================
id  class        appearance / geometry                               separable by
==  ===========  ==================================================  =====================
0   wall         pale, low-saturation colour, faint texture          both
1   floor        brown wood, plank stripes, depth ramp               both
2   box          wall-object palette; protrudes 0.5-1 m from wall    depth only (vs poster)
3   poster       same palette, sizes and places as box; flat on the  colour only (vs wall),
                 wall (same depth as the wall behind it)             never vs box
4   red_object   stands on the floor; red colours                    colour only (vs blue)
5   blue_object  identical geometry distribution; blue colours       colour only (vs red)
==  ===========  ==================================================  =====================

So depth alone cannot tell a poster from the wall or a red from a blue object, and colour
alone cannot tell a box from a poster: a fused model can beat either single modality.
Boxes deliberately cast no shadow, so no colour cue leaks which wall objects protrude.
A few "clutter" patches of random colour and depth are labelled 255 (unlabelled), like
the unlabelled pixels of real datasets. Noise: per-pixel RGB noise and a random lighting
gain/gradient; depth noise growing with distance squared plus ~1.5% dropped (zero) pixels.

Depth is returned as HxWx1 float32 metres / 10, i.e. in [0, 1] like the 8/16-bit readers.
"""
import colorsys
import logging
import os
from typing import Tuple, Union

import cv2
import numpy as np

from plfusion.data.rgbd import SegmentationDataset
from plfusion.registry import DATASETS, ConfigError

__all__ = ["SyntheticRGBD", "SYNTHETIC_CLASSES"]

logger = logging.getLogger(__name__)

SYNTHETIC_CLASSES = ["wall", "floor", "box", "poster", "red_object", "blue_object"]
WALL, FLOOR, BOX, POSTER, RED, BLUE = range(6)
MAX_DEPTH_M = 10.0
IGNORE = 255
_SPLIT_CODES = {"train": 0, "val": 1}
_GEN_TAG = 0x5EED  # keeps scene streams apart from augmentation streams seeded with the same number

# Colour families as (hue range in degrees, saturation range, value range).
_FAMILY = {
    "wall": ((0, 360), (0.0, 0.15), (0.70, 0.90)),
    "floor": ((20, 40), (0.35, 0.60), (0.30, 0.55)),
    "wall_object": ((60, 160), (0.40, 0.90), (0.45, 0.95)),  # shared by box and poster
    "red": ((-15, 15), (0.55, 0.95), (0.35, 0.90)),
    "blue": ((205, 245), (0.55, 0.95), (0.35, 0.90)),
}


def _colour(rng, family):
    (h0, h1), (s0, s1), (v0, v1) = _FAMILY[family]
    rgb = colorsys.hsv_to_rgb((rng.uniform(h0, h1) % 360) / 360.0, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return np.array(rgb, dtype=np.float32)


def _smooth_noise(rng, h, w, cells):
    """Zero-mean, roughly unit-scale low-frequency noise of shape (h, w)."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)


def _pattern(rng, h, w):
    """A texture in [0, 1] shared by all object classes: solid, stripes, checker or blobs."""
    kind = rng.integers(4)
    if kind == 0:
        return np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(3.0, 10.0)
    if kind == 1:
        angle = rng.uniform(0, np.pi)
        return (0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))).astype(np.float32)
    if kind == 2:
        return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    return np.clip(0.5 + 0.5 * _smooth_noise(rng, h, w, 4), 0.0, 1.0)


@DATASETS.register
class SyntheticRGBD(SegmentationDataset):
    """Deterministic procedural RGB-D segmentation scenes (see the module docstring for classes).

    Args:
        num_samples: dataset length.
        image_size: (H, W).
        num_classes: must be 6 (the class list is fixed); accepted so configs are uniform.
        split: "train" or "val"; the two use disjoint scene seeds.
        seed: scene seed; scenes depend only on (seed, split, index).
        aug_seed, modalities, transforms, ignore_index: as for every segmentation dataset.
    """

    def __init__(self, num_samples=200, image_size=(120, 160), num_classes=6, split="train", seed=0,
                 ignore_index=255, modalities: Union[str, Tuple[str, ...]] = ("rgb", "depth"), transforms=None,
                 aug_seed=None):
        if num_classes != len(SYNTHETIC_CLASSES):
            raise ConfigError(f"SyntheticRGBD: num_classes must be {len(SYNTHETIC_CLASSES)} "
                              f"({', '.join(SYNTHETIC_CLASSES)}), got {num_classes!r}")
        if split not in _SPLIT_CODES:
            raise ConfigError(f"SyntheticRGBD: split must be one of {list(_SPLIT_CODES)}, got {split!r}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
            raise ConfigError(f"SyntheticRGBD: num_samples must be a positive int, got {num_samples!r}")
        if (not isinstance(image_size, (list, tuple)) or len(image_size) != 2
                or not all(isinstance(v, int) and v >= 16 for v in image_size)):
            raise ConfigError(f"SyntheticRGBD: image_size must be [H, W] ints >= 16, got {image_size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"SyntheticRGBD: seed must be a non-negative int, got {seed!r}")
        super().__init__(num_classes, SYNTHETIC_CLASSES, ignore_index, modalities, transforms, aug_seed)
        self.seed = seed
        self.num_samples = num_samples
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.split = split

    def __len__(self):
        return self.num_samples

    def load(self, index):
        rgb, depth, label = self.generate(index)
        arrays = {"rgb": rgb, "depth": depth}
        return arrays, self.check_label(label, f"SyntheticRGBD[{index}]"), f"SyntheticRGBD[{index}]"

    def generate(self, index):
        """Scene `index` as (rgb HxWx3 uint8, depth HxWx1 float32 in [0,1], label HxW uint8)."""
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], int(index), _GEN_TAG])
        H, W = self.image_size
        ys = np.arange(H, dtype=np.float32)[:, None]
        xs = np.arange(W, dtype=np.float32)[None, :]
        focal = 0.9 * W

        # Wall plane above the horizon, floor below it.
        horizon = int(rng.uniform(0.45, 0.65) * H)
        wall_depth = rng.uniform(3.5, 6.0) + rng.uniform(-0.6, 0.6) * (xs / W - 0.5)  # (1, W)
        near = rng.uniform(1.0, 1.8)
        t = np.clip((ys - horizon) / max(H - 1 - horizon, 1), 0.0, 1.0)
        floor_depth = 1.0 / ((1.0 - t) / wall_depth + t / near)  # perspective-correct ramp
        is_wall = np.broadcast_to(ys < horizon, (H, W))
        depth = np.where(is_wall, np.broadcast_to(wall_depth, (H, W)), floor_depth).astype(np.float32)
        label = np.where(is_wall, WALL, FLOOR).astype(np.uint8)

        rgb = np.empty((H, W, 3), np.float32)
        wall_tex = 1.0 + 0.06 * _smooth_noise(rng, H, W, 6)
        plank = 1.0 + 0.12 * np.sign(np.sin(xs * (2 * np.pi / rng.uniform(8, 20))))
        rgb[:] = np.where(is_wall[..., None], (_colour(rng, "wall") * wall_tex[..., None]),
                          (_colour(rng, "floor") * (plank * wall_tex)[..., None]))

        def paint(y0, y1, x0, x1, family):
            c1, c2 = _colour(rng, family), _colour(rng, family)
            p = _pattern(rng, y1 - y0, x1 - x0)[..., None]
            rgb[y0:y1, x0:x1] = c1 + (c2 - c1) * p

        # Wall objects: posters first, then boxes, so a box is never behind a flat poster.
        wall_objs = []
        for _ in range(rng.integers(1, 5)):
            oh = max(int(rng.uniform(0.2, 0.4) * H), 3)
            ow = max(int(rng.uniform(0.15, 0.35) * W), 3)
            oh = min(oh, max(horizon - 2, 3))
            y0 = int(rng.integers(1, max(horizon - oh, 1) + 1))
            x0 = int(rng.integers(0, W - ow + 1))
            cls = BOX if rng.random() < 0.5 else POSTER
            wall_objs.append((cls == BOX, y0, x0, oh, ow, rng.uniform(0.5, 1.0)))
        for is_box, y0, x0, oh, ow, protrusion in sorted(wall_objs, key=lambda o: o[0]):
            y1, x1 = min(y0 + oh, horizon), x0 + ow
            if y1 <= y0:
                continue
            paint(y0, y1, x0, x1, "wall_object")
            label[y0:y1, x0:x1] = BOX if is_box else POSTER
            if is_box:
                depth[y0:y1, x0:x1] = wall_depth[0, x0:x1] - protrusion

        # Floor objects (and unlabelled clutter), drawn far to near for correct occlusion.
        floor_objs = []
        for kind in ["object"] * int(rng.integers(1, 4)) + ["clutter"] * int(rng.integers(0, 2)):
            yb = int(rng.uniform(horizon + 0.15 * (H - horizon), H))
            cx = int(rng.integers(0, W))
            d = float(floor_depth[min(yb, H - 1), cx])
            size = (0.4, 0.9) if kind == "object" else (0.15, 0.4)
            ow = max(int(rng.uniform(*size) * focal / d), 2)
            oh = max(int(rng.uniform(*size) * focal / d), 2)
            floor_objs.append((d, kind, yb, cx, ow, oh))
        for d, kind, yb, cx, ow, oh in sorted(floor_objs, key=lambda o: -o[0]):
            y0, y1 = max(yb - oh, 0), min(yb, H)
            x0, x1 = max(cx - ow // 2, 0), min(cx - ow // 2 + ow, W)
            if y1 <= y0 or x1 <= x0:
                continue
            if kind == "clutter":
                rgb[y0:y1, x0:x1] = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
                depth[y0:y1, x0:x1] = d * rng.uniform(0.6, 1.0)
                label[y0:y1, x0:x1] = IGNORE
                continue
            cls = RED if rng.random() < 0.5 else BLUE
            paint(y0, y1, x0, x1, "red" if cls == RED else "blue")
            depth[y0:y1, x0:x1] = d
            label[y0:y1, x0:x1] = cls

        # Lighting and sensor noise.
        light = rng.uniform(0.75, 1.15) * (1.0 + rng.uniform(-0.15, 0.15) * 2.0 * (xs / W - 0.5))
        rgb *= light[..., None]
        rgb += rng.normal(0.0, 0.025, size=rgb.shape).astype(np.float32)
        rgb_u8 = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)

        depth += rng.standard_normal(depth.shape).astype(np.float32) * (0.01 + 0.004 * depth * depth)
        depth[rng.random(depth.shape) < 0.015] = 0.0  # sensor dropouts read as 0, like Kinect holes
        depth01 = np.clip(depth / MAX_DEPTH_M, 0.0, 1.0)[..., None]
        return rgb_u8, depth01, label

    def export(self, root, split=None):
        """Write every sample in the NYUDv2 (TokenFusion) layout: rgb/, masks/, depth/ PNGs
        (depth as 16-bit, value * 65535) and `<split>.txt`. Returns the list file's path."""
        split = split or self.split
        if split not in ("train", "val"):
            raise ConfigError(f"SyntheticRGBD.export: split must be 'train' or 'val', got {split!r}")
        for sub in ("rgb", "masks", "depth"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        lines = []
        for i in range(len(self)):
            rgb, depth, label = self.generate(i)
            name = f"{split}_{i:06d}.png"
            rel = (f"rgb/{name}", f"masks/{name}", f"depth/{name}")
            writes = ((rel[0], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), (rel[1], label),
                      (rel[2], np.rint(depth[..., 0] * 65535.0).astype(np.uint16)))
            for path, img in writes:
                if not cv2.imwrite(os.path.join(root, path), img):
                    raise OSError(f"SyntheticRGBD.export: could not write {os.path.join(root, path)}")
            lines.append("\t".join(rel))
        list_path = os.path.join(root, f"{split}.txt")
        with open(list_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        logger.info("SyntheticRGBD: wrote %d %s samples to %s", len(lines), split, root)
        return list_path
