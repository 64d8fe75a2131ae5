"""Classification data: transforms, RandAugment, mixup/cutmix, list/folder datasets, SyntheticImageNet."""
import logging
import math
import os

import cv2
import numpy as np
import paddle
import pytest

from plfusion.data.cls_transforms import (
    RAND_AUGMENT_INCREASING_OPS, RAND_AUGMENT_OPS, ClsCompose, Normalize, RandAugment, RandomErasing,
    RandomHorizontalFlip, RandomResizedCrop, ResizeCenterCrop, ToCHW, build_cls_transforms,
    parse_rand_augment, resize)
from plfusion.data.image_io import DataError
from plfusion.data.imagenet import ImageFolder, ImageNet
from plfusion.data.mixup import Mixup, mixup_target
from plfusion.data.synthetic_imagenet import SYNTHETIC_CLASSES, SyntheticImageNet
from plfusion.registry import DATASETS, TRANSFORMS, ConfigError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _noise(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


class _FixedRng:
    """Stands in for a Generator where RandAugment only draws sign flips: random() -> value."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


DEIT_TRAIN = [
    {"name": "RandomResizedCrop", "size": 32},
    {"name": "RandomHorizontalFlip"},
    {"name": "RandAugment", "config_str": "rand-m9-mstd0.5-inc1"},
    {"name": "Normalize"},
    {"name": "ToCHW"},
    {"name": "RandomErasing", "prob": 0.25, "mode": "pixel"},
]


# ---------------------------------------------------------------- geometry transforms

def test_registered_transform_names():
    for name in ("RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "RandomErasing",
                 "ResizeCenterCrop", "Normalize", "ToCHW"):
        assert name in TRANSFORMS
    assert "Compose" not in TRANSFORMS and "ClsCompose" not in TRANSFORMS


def test_random_resized_crop_box_statistics():
    t = RandomResizedCrop(16, scale=(0.2, 0.6), ratio=(0.5, 2.0), seed=0)
    rng = np.random.default_rng(1)
    areas = []
    for _ in range(300):
        top, left, h, w = t.get_params(60, 80, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        areas.append(h * w / (60 * 80))
        # rounding h and w to ints moves the ratio a little past the range on small boxes
        assert 0.5 * 0.8 <= w / h <= 2.0 * 1.25
    areas = np.array(areas)
    assert areas.min() > 0.15 and areas.max() < 0.7 and areas.std() > 0.05


def test_random_resized_crop_central_fallback():
    # a whole-image area at aspect >= 2 never fits a square image: 10 failed tries, then the
    # central crop clamped to the smallest allowed ratio
    t = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    assert t.get_params(50, 50, np.random.default_rng(0)) == (12, 0, 25, 50)
    t = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(0.2, 0.25))
    assert t.get_params(40, 40, np.random.default_rng(0)) == (0, 15, 40, 10)
    t = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert t.get_params(30, 30, np.random.default_rng(0)) == (0, 0, 30, 30)


def test_random_resized_crop_output_is_resized_box():
    img = _noise(60, 70)
    t = RandomResizedCrop((24, 20), interpolation="bilinear")
    out = t(img, rng=np.random.default_rng(5))
    top, left, h, w = t.get_params(60, 70, np.random.default_rng(5))
    expected = resize(img[top:top + h, left:left + w], (24, 20), "bilinear")
    assert out.shape == (24, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_random_resized_crop_seeded_determinism():
    img = _noise(64, 64)
    a = RandomResizedCrop(32, seed=3)
    b = RandomResizedCrop(32, seed=3)
    c = RandomResizedCrop(32, seed=4)
    outs_a = [a(img) for _ in range(3)]
    outs_b = [b(img) for _ in range(3)]
    for x, y in zip(outs_a, outs_b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(outs_a[0], outs_a[1])
    assert not np.array_equal(outs_a[0], c(img))


@pytest.mark.parametrize("kwargs, key", [
    ({"size": -3}, "RandomResizedCrop.size"),
    ({"size": 0}, "RandomResizedCrop.size"),
    ({"size": "224"}, "RandomResizedCrop.size"),
    ({"size": [224, 224, 3]}, "RandomResizedCrop.size"),
    ({"size": 224, "scale": (1.0, 0.08)}, "RandomResizedCrop.scale"),
    ({"size": 224, "scale": (0.5, 1.5)}, "RandomResizedCrop.scale"),
    ({"size": 224, "ratio": (4 / 3, 3 / 4)}, "RandomResizedCrop.ratio"),
    ({"size": 224, "ratio": (0.0, 1.0)}, "RandomResizedCrop.ratio"),
    ({"size": 224, "interpolation": "cubic"}, "RandomResizedCrop.interpolation"),
])
def test_random_resized_crop_bad_params(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        RandomResizedCrop(**kwargs)


def test_horizontal_flip():
    img = _noise(5, 7)
    np.testing.assert_array_equal(RandomHorizontalFlip(prob=1.0)(img), img[:, ::-1])
    np.testing.assert_array_equal(RandomHorizontalFlip(prob=0.0)(img), img)
    t = RandomHorizontalFlip(seed=0)
    flips = [not np.array_equal(t(img), img) for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6
    with pytest.raises(ConfigError, match="RandomHorizontalFlip.prob"):
        RandomHorizontalFlip(prob=1.5)


def _gradient(h, w):
    """Channel 0 = x / 2, channel 1 = y / 2, channel 2 constant: positions are readable from values."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([xx / 2, yy / 2, np.full_like(xx, 77)], -1).round().astype(np.uint8)


@pytest.mark.parametrize("h, w", [(300, 400), (120, 100)])
def test_resize_center_crop_geometry(h, w):
    t = ResizeCenterCrop(224, crop_ratio=0.875)
    rh, rw = t.resize_shape(h, w)
    short = 256  # int(224 / 0.875)
    assert min(rh, rw) == short
    assert max(rh, rw) == int(short * max(h, w) / min(h, w))
    out = t(_gradient(h, w))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    top, left = int(round((rh - 224) / 2)), int(round((rw - 224) / 2))
    jj, ii = np.meshgrid(np.arange(224), np.arange(224))
    # output pixel (i, j) is resized pixel (top + i, left + j); map its centre back to the source
    src_x = (left + jj + 0.5) * w / rw - 0.5
    src_y = (top + ii + 0.5) * h / rh - 0.5
    inner = (slice(4, -4), slice(4, -4))
    for ch, src in ((0, src_x), (1, src_y)):
        err = out[..., ch][inner] - (src / 2)[inner]
        assert np.abs(err).max() <= 1.5
        assert abs(err.mean()) < 0.2  # a one-pixel offset would bias this by about 0.5
    assert np.all(out[..., 2] == 77)


def test_resize_center_crop_landscape_numbers_and_t2t_ratio():
    t = ResizeCenterCrop(224)
    assert t.resize_shape(300, 400) == (256, 341)
    out = t(_gradient(300, 400))
    # crop starts at x = round((341 - 224) / 2) = 58 in the resized image; source x = (58.5) * 400/341 - 0.5
    assert abs(float(out[112, 0, 0]) - ((58 + 0.5) * 400 / 341 - 0.5) / 2) <= 1.0
    assert abs(float(out[0, 112, 1]) - ((16 + 0.5) * 300 / 256 - 0.5) / 2) <= 1.0
    assert ResizeCenterCrop(224, crop_ratio=0.9).resize_shape(300, 400) == (248, 330)
    assert ResizeCenterCrop(384, crop_ratio=1.0).resize_shape(400, 400) == (384, 384)
    with pytest.raises(ConfigError, match="ResizeCenterCrop.crop_ratio"):
        ResizeCenterCrop(224, crop_ratio=1.2)
    with pytest.raises(ConfigError, match="ResizeCenterCrop.size"):
        ResizeCenterCrop(-1)


def test_resize_antialias_shrink_averages():
    img = np.zeros((8, 8, 3), np.uint8)
    img[::2] = 200  # one-pixel stripes alias badly without a low-pass
    assert np.all(resize(img, (4, 4), "bicubic") == 100)


# ---------------------------------------------------------------- normalise / CHW / erasing

def test_normalize_and_to_chw_values():
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 0, 128, 255
    out = Normalize()(img)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3)
    np.testing.assert_allclose(out[0, 0], (np.array([0, 128, 255]) / 255 - MEAN) / STD, rtol=1e-6)
    half = Normalize(mean=[0.5] * 3, std=[0.5] * 3)(img)
    np.testing.assert_allclose(half[0, 0], [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    chw = ToCHW()(out)
    assert chw.shape == (3, 2, 3) and chw.dtype == np.float32 and chw.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(chw[1], out[..., 1])


@pytest.mark.parametrize("kwargs, match", [
    ({"mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4]}, "looks like 0-255 units"),
    ({"std": [0.2, 0.0, 0.2]}, r"Normalize.std: values must be > 0"),
    ({"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}, "has 3 values but mean has 2"),
    ({"mean": "imagenet"}, "Normalize.mean"),
])
def test_normalize_bad_params(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Normalize(**kwargs)


def test_normalize_channel_mismatch():
    with pytest.raises(ValueError, match="image has 1 channels"):
        Normalize()(np.zeros((4, 4, 1), np.uint8))


def test_random_erasing_box():
    img = np.random.default_rng(0).normal(size=(3, 40, 50)).astype(np.float32)
    for seed in range(20):
        out = RandomErasing(prob=1.0, mode="const", seed=seed)(img)
        erased = np.all(out == 0, axis=0)
        ys, xs = np.nonzero(erased)
        assert ys.size > 0
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert erased.sum() == h * w  # one rectangle
        assert 0.02 * 2000 * 0.8 <= h * w <= 2000 / 3 * 1.2
        np.testing.assert_array_equal(out[:, ~erased], img[:, ~erased])
    np.testing.assert_array_equal(RandomErasing(prob=0.0)(img), img)


def test_random_erasing_pixel_mode_and_probability():
    img = np.full((3, 64, 64), 5.0, np.float32)
    out = RandomErasing(prob=1.0, mode="pixel", seed=1)(img)
    noise = out[out != 5.0]
    assert noise.size > 0.02 * img.size * 0.8
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2  # N(0, 1) fill
    t = RandomErasing(prob=0.25, seed=0)
    hits = np.mean([not np.array_equal(t(img), img) for _ in range(400)])
    assert 0.18 < hits < 0.32
    with pytest.raises(ValueError, match="put it after Normalize and ToCHW"):
        t(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="RandomErasing.mode"):
        RandomErasing(mode="noise")


# ---------------------------------------------------------------- RandAugment

def test_parse_rand_augment_deit_string():
    cfg = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert cfg == dict(magnitude=9.0, num_layers=2, prob=0.5, magnitude_std=0.5, magnitude_max=None,
                       increasing=True)
    cfg = parse_rand_augment("rand-n3-m7-p0.7-mstd101-mmax12")
    assert cfg["num_layers"] == 3 and cfg["magnitude"] == 7 and cfg["prob"] == 0.7
    assert cfg["magnitude_std"] == math.inf and cfg["magnitude_max"] == 12 and not cfg["increasing"]
    assert parse_rand_augment("rand")["magnitude"] == 10.0
    assert RandAugment("rand-m9-mstd0.5-inc1").op_names == RAND_AUGMENT_INCREASING_OPS
    assert RandAugment("rand-m9-mstd0.5").op_names == RAND_AUGMENT_OPS
    assert RandAugment("rand-m9-inc0").op_names == RAND_AUGMENT_OPS
    assert len(RAND_AUGMENT_OPS) == 15


@pytest.mark.parametrize("bad", ["auto-m9", "rand-x9", "rand-m9.5", "rand-inc2", "rand-m", "", "rand-tweights",
                                 "rand-p1.5", "rand-n0", "rand--m9", "rand-m9-mstd0.5-inc1 "])
def test_parse_rand_augment_bad_strings(bad):
    with pytest.raises(ConfigError, match="RandAugment.config_str"):
        parse_rand_augment(bad)


def test_parse_rand_augment_not_a_string():
    with pytest.raises(ConfigError, match="expected a string"):
        RandAugment(config_str=9)


def test_rand_augment_magnitude_sampling():
    rng = np.random.default_rng(0)
    m = np.array([RandAugment("rand-m9-mstd0.5").sample_magnitude(rng) for _ in range(2000)])
    assert m.max() <= 10.0 and abs(m.mean() - 8.98) < 0.05 and 0.4 < m.std() < 0.55
    u = np.array([RandAugment("rand-m9-mstd101").sample_magnitude(rng) for _ in range(2000)])
    assert u.min() >= 0 and u.max() <= 9 and abs(u.mean() - 4.5) < 0.2
    assert RandAugment("rand-m15-mmax20").sample_magnitude(rng) == 15.0
    assert RandAugment("rand-m15").sample_magnitude(rng) == 10.0


def test_rand_augment_warns_when_magnitude_is_capped(caplog):
    with caplog.at_level(logging.WARNING, logger="plfusion.data.cls_transforms"):
        RandAugment("rand-m9")
        assert caplog.text == ""
        RandAugment("rand-m15")
    assert "magnitude 15 is above the cap 10" in caplog.text and "mmax15" in caplog.text


def test_rand_augment_pixel_ops_hand_computed():
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    keep = _FixedRng(0.0)   # never negate
    img = np.array([[[20, 100, 200], [127, 128, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(ra.apply_op(img, "Invert", 9, keep), 255 - img)
    # 4 - int(9 / 10 * 4) = 1 bit kept
    np.testing.assert_array_equal(ra.apply_op(img, "PosterizeIncreasing", 9, keep), img & 0x80)
    np.testing.assert_array_equal(ra.apply_op(img, "PosterizeIncreasing", 10, keep), np.zeros_like(img))
    np.testing.assert_array_equal(ra.apply_op(img, "Posterize", 5, keep), img & 0xC0)  # int(2.0) bits
    # threshold 256 - int(5 / 10 * 256) = 128: values >= 128 are inverted
    np.testing.assert_array_equal(ra.apply_op(img, "SolarizeIncreasing", 5, keep),
                                  np.where(img >= 128, 255 - img, img))
    # SolarizeAdd at m10 adds 110 below 128, saturating
    np.testing.assert_array_equal(ra.apply_op(img, "SolarizeAdd", 10, keep),
                                  [[[130, 210, 200], [237, 128, 255]]])
    # BrightnessIncreasing at m5: factor 1 + 0.45; negated (random() > 0.5): 1 - 0.45
    grey = np.full((2, 2, 3), 100, np.uint8)
    assert np.all(ra.apply_op(grey, "BrightnessIncreasing", 5, keep) == 145)
    assert np.all(ra.apply_op(grey, "BrightnessIncreasing", 5, _FixedRng(0.9)) == 55)
    assert np.all(ra.apply_op(grey, "Brightness", 5, keep) == 100)  # 5/10*1.8+0.1 = 1.0
    # colour and contrast of a grey image are no-ops
    np.testing.assert_array_equal(ra.apply_op(grey, "ColorIncreasing", 9, keep), grey)
    np.testing.assert_array_equal(ra.apply_op(grey, "ContrastIncreasing", 9, keep), grey)
    # Color at factor 0.1 pulls a saturated pixel almost to its grey level (PIL weights)
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 200
    gray_level = round(200 * 0.299)
    out = ra.apply_op(red, "Color", 0, keep)[0, 0].astype(float)  # 0 / 10 * 1.8 + 0.1
    np.testing.assert_allclose(out, gray_level + 0.1 * (np.array([200, 0, 0]) - gray_level), atol=1)


def test_rand_augment_auto_contrast_and_equalize():
    ra = RandAugment()
    rng = np.random.default_rng(0)
    img = rng.integers(50, 151, size=(64, 64, 3)).astype(np.uint8)
    out = ra.apply_op(img, "AutoContrast", 9, rng)
    for c in range(3):
        lo, hi = img[..., c].min(), img[..., c].max()
        scale = 255.0 / (float(hi) - float(lo))  # PIL: int(v * scale - lo * scale)
        np.testing.assert_array_equal(out[..., c], np.trunc(img[..., c] * scale - lo * scale))
        assert out[..., c].min() == 0 and out[..., c].max() == 255
    eq = ra.apply_op(img, "Equalize", 9, rng)
    for c in range(3):
        hist = np.bincount(img[..., c].ravel(), minlength=256)
        step = (hist.sum() - hist[np.nonzero(hist)[0][-1]]) // 255
        lut, n = [], step // 2
        for i in range(256):
            lut.append(min(255, n // step))
            n += hist[i]
        np.testing.assert_array_equal(eq[..., c], np.array(lut)[img[..., c]])
    assert eq.min() <= 5 and eq.max() >= 240


def _dot_image(size=41, x=30, y=20):
    img = np.zeros((size, size, 3), np.uint8)
    img[y - 1:y + 2, x - 1:x + 2] = 255
    return img


def _peak(img):
    ys, xs = np.nonzero(img[..., 0] > 100)
    return xs.mean(), ys.mean()


def test_rand_augment_geometric_ops():
    ra = RandAugment(img_mean=(1, 2, 3), interpolation="bilinear")
    keep = _FixedRng(0.0)
    img = _dot_image()          # dot at (x=30, y=20), centre of the image at 20
    # Rotate at m10 = 30 degrees counter-clockwise: (cx + 10, cy) -> (cx + 10 cos30, cy - 10 sin30)
    x, y = _peak(ra.apply_op(img, "Rotate", 10, keep))
    assert abs(x - (20 + 10 * math.cos(math.radians(30)))) < 0.6
    assert abs(y - (20 - 10 * math.sin(math.radians(30)))) < 0.6
    x, y = _peak(ra.apply_op(img, "Rotate", 10, _FixedRng(0.9)))  # negated: clockwise
    assert abs(y - (20 + 10 * math.sin(math.radians(30)))) < 0.6
    # TranslateXRel at m10: the output samples x + 0.45 * W, so content moves left by 18.45 px
    moved = ra.apply_op(img, "TranslateXRel", 10, keep)
    x, y = _peak(moved)
    assert abs(x - (30 - 0.45 * 41)) < 0.6 and abs(y - 20) < 0.3
    assert tuple(moved[20, -1]) == (1, 2, 3)  # vacated area filled with img_mean
    x, y = _peak(ra.apply_op(img, "TranslateYRel", 10, keep))
    assert abs(y - (20 - 0.45 * 41)) < 0.6 and abs(x - 30) < 0.3
    # ShearX at m10 (factor 0.3): output (x, y) samples (x + 0.3 y, y)
    x, y = _peak(ra.apply_op(img, "ShearX", 10, keep))
    assert abs(x - (30 - 0.3 * 20)) < 0.6 and abs(y - 20) < 0.3
    x, y = _peak(ra.apply_op(img, "ShearY", 10, keep))
    assert abs(y - (20 - 0.3 * 30)) < 0.6 and abs(x - 30) < 0.3


def test_rand_augment_call_determinism_and_prob():
    img = _noise(32, 32)
    a = RandAugment(seed=0)
    b = RandAugment(seed=0)
    outs = [a(img) for _ in range(10)]
    for o, p in zip(outs, [b(img) for _ in range(10)]):
        assert o.dtype == np.uint8 and o.shape == img.shape
        np.testing.assert_array_equal(o, p)
    assert sum(not np.array_equal(o, img) for o in outs) >= 5
    assert not all(np.array_equal(x, y) for x, y in zip(outs, [RandAugment(seed=1)(img) for _ in range(10)]))
    never = RandAugment("rand-m9-p0", seed=0)
    assert all(np.array_equal(never(img), img) for _ in range(10))
    with pytest.raises(ValueError, match="uint8 RGB"):
        a(img.astype(np.float32))


def test_rand_augment_bad_params():
    with pytest.raises(ConfigError, match="RandAugment.img_mean"):
        RandAugment(img_mean=(300, 0, 0))
    with pytest.raises(ConfigError, match="RandAugment.translate_pct"):
        RandAugment(translate_pct=2)


# ---------------------------------------------------------------- pipelines

def test_seeded_deit_pipeline_determinism():
    img = _noise(48, 56)
    pipe = build_cls_transforms(DEIT_TRAIN, where="dataloader.train.dataset.transforms")
    assert isinstance(pipe, ClsCompose) and len(pipe) == 6
    a = [pipe(img, rng=np.random.default_rng([7, i])) for i in range(5)]
    b = [pipe(img, rng=np.random.default_rng([7, i])) for i in range(5)]
    c = [pipe(img, rng=np.random.default_rng([8, i])) for i in range(5)]
    for x, y in zip(a, b):
        assert x.shape == (3, 32, 32) and x.dtype == np.float32
        np.testing.assert_array_equal(x, y)
    assert not any(np.array_equal(x, z) for x, z in zip(a, c))
    assert not np.array_equal(a[0], a[1])
    # pixels before erasing lie in the normalised range of [0, 255]
    lo, hi = (0 - MEAN.max()) / STD.min(), (1 - MEAN.min()) / STD.min()
    assert all(x.min() >= min(lo, -6) and x.max() <= max(hi, 6) for x in a)


def test_eval_pipeline_and_plain_callables():
    pipe = build_cls_transforms([{"name": "ResizeCenterCrop", "size": 16}, lambda im: im[:, ::-1],
                                 Normalize(mean=[0.5] * 3, std=[0.5] * 3), {"name": "ToCHW"}])
    img = _noise(20, 30)
    out = pipe(img)
    np.testing.assert_array_equal(out, pipe(img, rng=np.random.default_rng(1)))
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1


def test_build_transforms_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"ds.transforms\[1\].name: .*Did you mean: RandomResizedCrop"):
        build_cls_transforms([{"name": "ToCHW"}, {"name": "RandomResizeCrop", "size": 8}], where="ds.transforms")
    with pytest.raises(ConfigError, match=r"ds.transforms\[0\]: unknown key 'sizes'"):
        build_cls_transforms([{"name": "RandomResizedCrop", "sizes": 8}], where="ds.transforms")
    with pytest.raises(ConfigError, match=r"ds.transforms\[0\]: RandomResizedCrop.size"):
        build_cls_transforms([{"name": "RandomResizedCrop", "size": -8}], where="ds.transforms")
    with pytest.raises(ConfigError, match="expected a list"):
        build_cls_transforms({"name": "ToCHW"}, where="ds.transforms")


# ---------------------------------------------------------------- mixup / cutmix

def _batch(b=4, c=3, h=8, w=10, seed=0):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.normal(size=(b, c, h, w)).astype(np.float32))
    y = paddle.to_tensor(rng.integers(0, 5, size=b), dtype="int64")
    return x, y


def _smoothed(labels, k, eps):
    t = np.full((len(labels), k), eps / k)
    t[np.arange(len(labels)), labels] += 1 - eps
    return t


def test_mixup_only_matches_formula():
    x, y = _batch()
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5, seed=0)
    xm, target = mix(x, y)
    lam = mix.last_lam
    assert mix.last_mode == "mixup" and 0 < lam < 1
    xn, yn = x.numpy(), y.numpy()
    np.testing.assert_allclose(xm.numpy(), lam * xn + (1 - lam) * xn[::-1], rtol=1e-5, atol=1e-6)
    expected = lam * _smoothed(yn, 5, 0.1) + (1 - lam) * _smoothed(yn[::-1], 5, 0.1)
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(target.numpy().sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(x.numpy(), xn)  # input not modified in place


def test_cutmix_box_and_corrected_lambda():
    x, y = _batch(h=16, w=20)
    xn, yn = x.numpy(), y.numpy()
    seen_clipped = False
    for seed in range(12):
        mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=5, seed=seed)
        xm, target = mix(x, y)
        assert mix.last_mode == "cutmix"
        top, bottom, left, right = mix.last_box
        inside = np.zeros((16, 20), bool)
        inside[top:bottom, left:right] = True
        out = xm.numpy()
        np.testing.assert_array_equal(out[:, :, inside], xn[::-1][:, :, inside])
        np.testing.assert_array_equal(out[:, :, ~inside], xn[:, :, ~inside])
        lam = 1 - inside.sum() / inside.size
        assert mix.last_lam == pytest.approx(lam)
        np.testing.assert_allclose(target.numpy(), lam * np.eye(5)[yn] + (1 - lam) * np.eye(5)[yn[::-1]],
                                   rtol=1e-5, atol=1e-7)
        seen_clipped |= top == 0 or left == 0 or bottom == 16 or right == 20
    assert seen_clipped  # the correction mattered for at least one box


def test_mixup_switch_prob_and_determinism():
    x, y = _batch()
    a = Mixup(num_classes=5, seed=3)
    b = Mixup(num_classes=5, seed=3)
    modes = []
    for _ in range(40):
        xa, ta = a(x, y)
        xb, tb = b(x, y)
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ta.numpy(), tb.numpy())
        np.testing.assert_allclose(ta.numpy().sum(1), 1.0, rtol=1e-5)
        modes.append(a.last_mode)
    assert 8 < modes.count("cutmix") < 32 and modes.count("mixup") + modes.count("cutmix") == 40
    c = Mixup(num_classes=5, seed=4)
    assert not np.array_equal(c(x, y)[0].numpy(), Mixup(num_classes=5, seed=3)(x, y)[0].numpy())
    always_cut = Mixup(num_classes=5, switch_prob=1.0, seed=0)
    for _ in range(5):
        always_cut(x, y)
        assert always_cut.last_mode == "cutmix"


def test_mixup_prob_zero_gives_smoothed_one_hot():
    x, y = _batch()
    xm, target = Mixup(prob=0.0, num_classes=5, label_smoothing=0.1, seed=0)(x, y[:, None])
    np.testing.assert_array_equal(xm.numpy(), x.numpy())
    np.testing.assert_allclose(target.numpy(), _smoothed(y.numpy(), 5, 0.1), rtol=1e-6)
    np.testing.assert_allclose(mixup_target(y, 5, 0.25, 0.0).numpy(),
                               0.25 * np.eye(5)[y.numpy()] + 0.75 * np.eye(5)[y.numpy()[::-1]], rtol=1e-6)


def test_cutmix_minmax_box_sizes():
    x, y = _batch(h=20, w=20)
    mix = Mixup(mixup_alpha=0.0, cutmix_minmax=(0.3, 0.6), num_classes=5, seed=0)
    for _ in range(10):
        mix(x, y)
        top, bottom, left, right = mix.last_box
        assert 6 <= bottom - top < 12 and 6 <= right - left < 12


@pytest.mark.parametrize("kwargs, match", [
    ({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, "nothing would be mixed"),
    ({"prob": 2.0}, "Mixup.prob"),
    ({"switch_prob": -0.1}, "Mixup.switch_prob"),
    ({"label_smoothing": 1.0}, "Mixup.label_smoothing"),
    ({"num_classes": 0}, "Mixup.num_classes"),
    ({"mixup_alpha": -1}, "Mixup.mixup_alpha"),
    ({"cutmix_minmax": (0.6, 0.3)}, "Mixup.cutmix_minmax"),
])
def test_mixup_bad_params(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Mixup(**kwargs)


def test_mixup_bad_inputs():
    x, y = _batch()
    mix = Mixup(num_classes=5, seed=0)
    with pytest.raises(ValueError, match="outside"):
        mix(x, paddle.to_tensor([0, 1, 2, 5], dtype="int64"))
    with pytest.raises(ValueError, match="class indices"):
        mix(x, paddle.to_tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        mix(x[0], y)
    with pytest.raises(ValueError, match="shape"):
        mix(x, y[:3])


# ---------------------------------------------------------------- ImageNet list layout

def _write_images(root, rels, size=(20, 24)):
    for i, rel in enumerate(rels):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img = np.full((size[0], size[1], 3), (10 * i) % 256, np.uint8)
        img[..., 0] = 200  # red in RGB
        img[..., 2] = np.arange(size[1]) * 10  # a ramp, so that different crops differ
        assert cv2.imwrite(path, img[..., ::-1])


def _imagenet_root(tmp_path, lines=None):
    rels = ["train/n01/a.png", "train/n01/b.png", "train/n02/c.png", "train/n03/d.png"]
    _write_images(str(tmp_path), rels)
    lines = lines if lines is not None else [f"{r} {lab}" for r, lab in zip(rels, [0, 0, 1, 2])]
    (tmp_path / "train_list.txt").write_text("\n".join(lines) + "\n")
    return rels


def test_imagenet_list_layout(tmp_path):
    rels = _imagenet_root(tmp_path, lines=None)
    (tmp_path / "names.txt").write_text("0 tench\n1 goldfish\n2 great white shark\n")
    ds = DATASETS.build({"name": "ImageNet", "root": str(tmp_path), "split": "train",
                         "class_names": str(tmp_path / "names.txt")}, where="dataloader.train.dataset")
    assert isinstance(ds, paddle.io.Dataset) and len(ds) == 4
    assert ds.num_classes == 3 and ds.class_names == ["tench", "goldfish", "great white shark"]
    assert ds.samples[2] == (os.path.join(str(tmp_path), rels[2]), 1)
    image, label = ds[2]
    assert isinstance(label, np.int64) and label == 1
    assert image.shape == (3, 20, 24) and image.dtype == np.float32
    np.testing.assert_allclose(image[0], (200 / 255 - MEAN[0]) / STD[0], rtol=1e-5)  # RGB order
    np.testing.assert_allclose(image[1], (20 / 255 - MEAN[1]) / STD[1], rtol=1e-5)
    assert ds[-1][1] == 2
    with pytest.raises(IndexError):
        ds[4]


def test_imagenet_list_file_override_and_whitespace(tmp_path):
    _imagenet_root(tmp_path)
    (tmp_path / "sub.txt").write_text("\n# comment\ntrain/n02/c.png\t1\n\ntrain/n01/a.png    0  \n")
    ds = ImageNet(str(tmp_path), list_file="sub.txt", num_classes=1000)
    assert [s[1] for s in ds.samples] == [1, 0] and ds.num_classes == 1000 and len(ds.class_names) == 1000
    ds = ImageNet(str(tmp_path), list_file=str(tmp_path / "sub.txt"), class_names=["a", "b"])
    assert ds.class_names == ["a", "b"]


def test_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        ImageNet(str(tmp_path / "nope"))
    rels = _imagenet_root(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val_list.txt.*train_list.txt"):
        ImageNet(str(tmp_path), split="val")
    with pytest.raises(FileNotFoundError, match="ImageNet.list_file"):
        ImageNet(str(tmp_path), list_file="missing.txt")
    cases = [
        ([f"{rels[0]} 0", "train/my image.png 1"], r"train_list.txt:2: expected 'relative/path label'.*spaces"),
        ([f"{rels[0]} 0", f"{rels[1]} zero"], r"train_list.txt:2: label 'zero' is not an integer"),
        ([f"{rels[0]} 0", f"{rels[1]} -1"], r"train_list.txt:2: label -1 is outside \[0, 1\)"),
        ([f"{rels[0]}"], r"train_list.txt:1: expected"),
        (["# only a comment"], "has no samples"),
    ]
    for lines, match in cases:
        (tmp_path / "train_list.txt").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=match):
            ImageNet(str(tmp_path))
    (tmp_path / "train_list.txt").write_text(f"{rels[0]} 0\n{rels[1]} 7\n")
    with pytest.raises(DataError, match=r"train_list.txt:2: label 7 is outside \[0, 5\)"):
        ImageNet(str(tmp_path), num_classes=5)
    (tmp_path / "train_list.txt").write_text("train/n09/missing.png 0\n")
    with pytest.raises(FileNotFoundError, match=r"train_list.txt:1: image file not found"):
        ImageNet(str(tmp_path))
    (tmp_path / "train_list.txt").write_text(f"{rels[0]} 0\ntrain/n09/missing.png 0\n")
    assert len(ImageNet(str(tmp_path))) == 2  # only the first image is checked by default
    with pytest.raises(FileNotFoundError, match=r"train_list.txt:2: image file not found"):
        ImageNet(str(tmp_path), verify_files=True)
    (tmp_path / "train_list.txt").write_text(f"{rels[0]} 0\n{rels[1]} 1\n")
    with pytest.raises(ConfigError, match="gives 3 class names but there are 2 classes"):
        ImageNet(str(tmp_path), class_names=["a", "b", "c"])
    (tmp_path / rels[1]).write_bytes(b"not an image")
    ds = ImageNet(str(tmp_path))
    with pytest.raises(DataError, match="b.png"):
        ds[1]


# ---------------------------------------------------------------- ImageFolder layout

def test_image_folder_layout(tmp_path):
    rels = ["train/n02/x.JPEG", "train/n01/b.png", "train/n01/a.jpg", "train/n01/deeper/c.bmp",
            "train/n10/z.webp"]
    _write_images(str(tmp_path), [r for r in rels if not r.endswith(".webp")])
    _write_images(str(tmp_path), ["train/n10/z.png"])
    os.rename(tmp_path / "train/n10/z.png", tmp_path / "train/n10/z.webp")  # content need not match suffix
    (tmp_path / "train/n01/notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path), split="train", transforms=[{"name": "ResizeCenterCrop", "size": 8},
                                                               {"name": "Normalize"}, {"name": "ToCHW"}])
    assert ds.class_names == ["n01", "n02", "n10"] and ds.num_classes == 3
    assert ds.class_to_idx == {"n01": 0, "n02": 1, "n10": 2}
    names = [os.path.relpath(p, str(tmp_path)).replace(os.sep, "/") for p, _ in ds.samples]
    assert names == ["train/n01/a.jpg", "train/n01/b.png", "train/n01/deeper/c.bmp", "train/n02/x.JPEG",
                     "train/n10/z.webp"]
    assert [lab for _, lab in ds.samples] == [0, 0, 0, 1, 2]
    image, label = ds[3]
    assert image.shape == (3, 8, 8) and label == 1 and isinstance(label, np.int64)
    assert len(ImageFolder(str(tmp_path / "train"))) == 5


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolder(str(tmp_path / "none"))
    (tmp_path / "flat").mkdir()
    _write_images(str(tmp_path), ["flat/a.png"])
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolder(str(tmp_path / "flat"))
    _write_images(str(tmp_path), ["tree/cat/a.png"])
    (tmp_path / "tree" / "dog").mkdir()
    (tmp_path / "tree" / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images .* class folder\(s\) \['dog'\]"):
        ImageFolder(str(tmp_path / "tree"))


def test_dataset_transform_contract_and_seeding(tmp_path):
    _imagenet_root(tmp_path)
    with pytest.raises(DataError, match="must produce a float32 CHW array"):
        ImageNet(str(tmp_path), transforms=[])[0]
    specs = [{"name": "RandomResizedCrop", "size": 12}, {"name": "Normalize"}, {"name": "ToCHW"}]
    a, b = ImageNet(str(tmp_path), transforms=specs, seed=1), ImageNet(str(tmp_path), transforms=specs, seed=1)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    first = a[0][0]
    a.set_epoch(1)
    assert not np.array_equal(first, a[0][0])
    with pytest.raises(ConfigError, match=r"ImageNet.transforms\[0\]: RandomResizedCrop needs 'size'"):
        ImageNet(str(tmp_path), transforms=[{"name": "RandomResizedCrop"}])


# ---------------------------------------------------------------- SyntheticImageNet

def test_synthetic_determinism_balance_and_splits():
    ds = DATASETS.build({"name": "SyntheticImageNet", "num_samples": 60, "image_size": 32, "num_classes": 6})
    again = SyntheticImageNet(num_samples=60, image_size=32, num_classes=6)
    assert len(ds) == 60 and ds.num_classes == 6 and ds.class_names == list(SYNTHETIC_CLASSES[:6])
    labels = [int(ds[i][1]) for i in range(60)]
    assert np.bincount(labels).tolist() == [10] * 6
    for i in (0, 7, 59):
        np.testing.assert_array_equal(ds[i][0], again[i][0])
        assert ds[i][0].shape == (3, 32, 32) and ds[i][0].dtype == np.float32
    train = [ds.load(i) for i in range(60)]
    val = [SyntheticImageNet(num_samples=60, image_size=32, num_classes=6, split="val").load(i) for i in range(60)]
    assert not any(np.array_equal(t, v) for t in train for v in val)
    other = SyntheticImageNet(num_samples=60, image_size=32, num_classes=6, seed=1)
    assert not np.array_equal(other.load(0), train[0])
    assert len({t.tobytes() for t in train}) == 60


def test_synthetic_colour_alone_does_not_classify():
    ds = SyntheticImageNet(num_samples=400, image_size=32, num_classes=10)
    feats = np.array([ds.load(i).reshape(-1, 3).mean(0) for i in range(400)])
    labels = np.array([s[1] for s in ds.samples])
    tr, te = slice(0, 300), slice(300, 400)
    centroids = np.array([feats[tr][labels[tr] == k].mean(0) for k in range(10)])
    pred = np.argmin(((feats[te][:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == labels[te]).mean() < 0.3   # chance is 0.1


def test_synthetic_classes_have_their_layout():
    ds = SyntheticImageNet(num_samples=200, image_size=48, num_classes=10)
    for i in range(200):
        img = cv2.GaussianBlur(ds.load(i).astype(np.float32).mean(-1), (5, 5), 1.0)  # damp pixel noise
        gx = np.abs(np.diff(img, axis=1)).sum()
        gy = np.abs(np.diff(img, axis=0)).sum()
        label = ds.samples[i][1]
        if label == SYNTHETIC_CLASSES.index("horizontal_stripes"):
            assert gy > 2 * gx
        elif label == SYNTHETIC_CLASSES.index("vertical_stripes"):
            assert gx > 2 * gy
        if label in (SYNTHETIC_CLASSES.index("shape_in_corner"), SYNTHETIC_CLASSES.index("shape_in_centre")):
            colour = ds.load(i).astype(np.float32)
            border = np.concatenate([colour[0], colour[-1], colour[:, 0], colour[:, -1]])
            ys, xs = np.nonzero(np.abs(colour - np.median(border, 0)).sum(-1) > 120)
            dist = math.hypot(xs.mean() - 23.5, ys.mean() - 23.5) / 48
            assert (dist > 0.3) if label == SYNTHETIC_CLASSES.index("shape_in_corner") else (dist < 0.15)


def test_synthetic_dataloader_batch():
    ds = SyntheticImageNet(num_samples=8, image_size=32,
                           transforms=[{"name": "RandomHorizontalFlip"}, {"name": "Normalize", "mean": [0.5] * 3,
                                                                          "std": [0.5] * 3}, {"name": "ToCHW"}],
                           aug_seed=0)
    images, labels = next(iter(paddle.io.DataLoader(ds, batch_size=4, shuffle=False)))
    assert images.shape == [4, 3, 32, 32] and images.dtype == paddle.float32
    assert labels.numpy().tolist() == [0, 1, 2, 3] and labels.dtype == paddle.int64
    assert float(images.min()) >= -1 and float(images.max()) <= 1


@pytest.mark.parametrize("kwargs, key", [
    ({"num_classes": 11}, "SyntheticImageNet.num_classes"),
    ({"num_classes": 1}, "SyntheticImageNet.num_classes"),
    ({"image_size": 8}, "SyntheticImageNet.image_size"),
    ({"num_samples": 0}, "SyntheticImageNet.num_samples"),
    ({"split": "valid"}, "SyntheticImageNet.split"),
    ({"seed": -1}, "SyntheticImageNet.seed"),
])
def test_synthetic_bad_params(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SyntheticImageNet(**kwargs)
