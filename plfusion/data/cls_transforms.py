"""Classification transforms in the DeiT recipe, on HWC uint8 RGB numpy images (opencv/numpy only).

Every transform is called as `t(img, rng=None)`. Random ones draw from `rng` when given
(the dataset passes one per sample) and otherwise from their own generator made from
`seed`, so a seeded pipeline is reproducible. `Normalize` turns uint8 HWC into float32
HWC, `ToCHW` makes it CHW, and `RandomErasing` works on the CHW result as in timm.
"""
import inspect
import logging
import math
import numbers
import re

import cv2
import numpy as np

from ..registry import TRANSFORMS, ConfigError, check_kwargs

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "IMAGENET_INCEPTION_MEAN", "IMAGENET_INCEPTION_STD",
    "RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "parse_rand_augment",
    "RandomErasing", "ResizeCenterCrop", "Normalize", "ToCHW", "ClsCompose", "build_cls_transforms",
    "resize", "RAND_AUGMENT_OPS", "RAND_AUGMENT_INCREASING_OPS",
]

logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)   # timm AugReg ViTs
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)

_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


# ---------------------------------------------------------------- parameter checks

def _where(obj, key):
    return f"{type(obj).__name__}.{key}"


def _check_interp(obj, value):
    if value not in _INTERP:
        raise ConfigError(f"{_where(obj, 'interpolation')}: expected one of {sorted(_INTERP)}, got {value!r}")
    return value


def _check_size(obj, value, key="size"):
    """An int or [h, w] of positive ints -> (h, w)."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(vals) == 1:
        vals = vals * 2
    ok = len(vals) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                                for v in vals)
    if not ok:
        raise ConfigError(f"{_where(obj, key)}: expected a positive int or [height, width], got {value!r}")
    return int(vals[0]), int(vals[1])


def _check_range(obj, key, value, low=None, high=None, positive=False):
    """A (min, max) pair with min <= max, optionally inside [low, high] or > 0."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{_where(obj, key)}: expected [min, max] numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ConfigError(f"{_where(obj, key)}: expected min <= max, got {value!r}")
    if positive and lo <= 0:
        raise ConfigError(f"{_where(obj, key)}: values must be > 0, got {value!r}")
    if (low is not None and lo < low) or (high is not None and hi > high):
        raise ConfigError(f"{_where(obj, key)}: values must lie in [{low}, {high}], got {value!r}")
    return lo, hi


def _check_prob(obj, key, value):
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{_where(obj, key)}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def _check_image(obj, img):
    if not isinstance(img, np.ndarray) or img.ndim != 3:
        got = f"array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{type(obj).__name__}: expected an HWC image array, got {got}")


class _Transform:
    """Base: holds the fallback generator used when the caller passes no `rng`."""

    def __init__(self, seed=None):
        self.rng = np.random.default_rng(seed)

    def _rng(self, rng):
        return self.rng if rng is None else rng

    def __repr__(self):
        keys = [k for k in vars(self) if k != "rng" and not k.startswith("_")]
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"


def resize(img, size_hw, interpolation="bicubic", antialias=True):
    """Resize to (h, w). opencv's cubic/linear kernels do not low-pass when shrinking (PIL's do),
    so with `antialias` a pure shrink uses INTER_AREA, which is close to PIL's antialiased result."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if (h, w) == img.shape[:2]:
        return img
    flag = _INTERP[interpolation]
    if antialias and interpolation in ("bilinear", "bicubic", "lanczos") and h <= img.shape[0] and w <= img.shape[1]:
        flag = cv2.INTER_AREA
    out = cv2.resize(img, (w, h), interpolation=flag)
    if out.ndim == 2 and img.ndim == 3:  # opencv drops a single channel axis
        out = out[:, :, None]
    return out


# ---------------------------------------------------------------- geometry

@TRANSFORMS.register
class RandomResizedCrop(_Transform):
    """Crop a random area fraction in `scale` with log-uniform aspect `ratio`, resize to `size`.

    Sampling as torchvision: 10 tries, then a central crop clamped to the ratio range."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bicubic",
                 antialias=True, seed=None):
        super().__init__(seed)
        self.size = _check_size(self, size)
        self.scale = _check_range(self, "scale", scale, low=0.0, high=1.0)
        if self.scale[1] <= 0:
            raise ConfigError(f"{_where(self, 'scale')}: max must be > 0, got {scale!r}")
        self.ratio = _check_range(self, "ratio", ratio, positive=True)
        self.interpolation = _check_interp(self, interpolation)
        self.antialias = bool(antialias)

    def get_params(self, height, width, rng):
        """(top, left, h, w) of the crop box."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, rng=None):
        _check_image(self, img)
        top, left, h, w = self.get_params(img.shape[0], img.shape[1], self._rng(rng))
        return resize(img[top:top + h, left:left + w], self.size, self.interpolation, self.antialias)


@TRANSFORMS.register
class RandomHorizontalFlip(_Transform):
    def __init__(self, prob=0.5, seed=None):
        super().__init__(seed)
        self.prob = _check_prob(self, "prob", prob)

    def __call__(self, img, rng=None):
        _check_image(self, img)
        if self._rng(rng).random() < self.prob:
            return np.ascontiguousarray(img[:, ::-1])
        return img


@TRANSFORMS.register
class ResizeCenterCrop(_Transform):
    """Eval transform: resize the short side to int(size / crop_ratio), then centre-crop `size`.

    crop_ratio 0.875 (ViT/DeiT, 224 -> 256) or 0.9 (T2T-ViT, 224 -> 248). A non-square `size`
    whose scaled sides differ is resized to exactly those sides first, as timm does."""

    def __init__(self, size, crop_ratio=0.875, interpolation="bicubic", antialias=True):
        super().__init__(None)
        self.size = _check_size(self, size)
        if not (isinstance(crop_ratio, numbers.Real) and not isinstance(crop_ratio, bool)
                and 0.0 < crop_ratio <= 1.0):
            raise ConfigError(f"{_where(self, 'crop_ratio')}: expected a number in (0, 1], got {crop_ratio!r}")
        self.crop_ratio = float(crop_ratio)
        self.interpolation = _check_interp(self, interpolation)
        self.antialias = bool(antialias)

    def resize_shape(self, height, width):
        """(h, w) after the resize step."""
        sh, sw = (int(s / self.crop_ratio) for s in self.size)
        if sh != sw:
            return sh, sw
        if width <= height:  # torchvision: long side = int(short_target * long / short)
            return int(sh * height / width), sh
        return sh, int(sh * width / height)

    def __call__(self, img, rng=None):
        _check_image(self, img)
        rh, rw = self.resize_shape(img.shape[0], img.shape[1])
        img = resize(img, (rh, rw), self.interpolation, self.antialias)
        th, tw = self.size
        top = int(round((rh - th) / 2.0))
        left = int(round((rw - tw) / 2.0))
        return img[top:top + th, left:left + tw]


# ---------------------------------------------------------------- RandAugment (timm)

_LEVEL_DENOM = 10.0

RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# 'inc1' swaps in the variants whose severity grows with the magnitude (DeiT uses these).
RAND_AUGMENT_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


def _lut(img, table):
    return cv2.LUT(img, np.clip(table, 0, 255).astype(np.uint8))


def _gray(img):
    # PIL's RGB -> L weights (ITU-R 601-2), kept as float
    return img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114


def _blend(degenerate, img, factor):
    """PIL ImageEnhance: degenerate + factor * (img - degenerate), clipped to uint8."""
    out = degenerate + factor * (img.astype(np.float32) - degenerate)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _affine_pil(img, matrix, interp, fill):
    """Apply a PIL-style inverse affine (a, b, c, d, e, f): output (x, y) samples input
    (a x + b y + c, d x + e y + f), PIL measuring from pixel corners and opencv from centres."""
    a, b, c, d, e, f = matrix
    m = np.array([[a, b, c + 0.5 * (a + b - 1.0)],
                  [d, e, f + 0.5 * (d + e - 1.0)]], dtype=np.float64)
    h, w = img.shape[:2]
    return cv2.warpAffine(img, m, (w, h), flags=interp | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(float(v) for v in fill))


def _auto_contrast(img, _):
    lo = img.reshape(-1, img.shape[2]).min(0).astype(np.float64)
    hi = img.reshape(-1, img.shape[2]).max(0).astype(np.float64)
    out = np.empty_like(img)
    ramp = np.arange(256, dtype=np.float64)
    for ch in range(img.shape[2]):
        if hi[ch] <= lo[ch]:
            out[..., ch] = img[..., ch]
            continue
        scale = 255.0 / (hi[ch] - lo[ch])
        out[..., ch] = _lut(img[..., ch], np.trunc(ramp * scale - lo[ch] * scale))
    return out


def _equalize(img, _):
    # PIL ImageOps.equalize: per-channel lut from the cumulative histogram
    out = np.empty_like(img)
    for ch in range(img.shape[2]):
        hist = np.bincount(img[..., ch].ravel(), minlength=256)
        nonzero = hist[hist > 0]
        step = (nonzero.sum() - nonzero[-1]) // 255 if nonzero.size > 1 else 0
        if step == 0:
            out[..., ch] = img[..., ch]
            continue
        before = np.concatenate([[0], np.cumsum(hist)[:-1]])
        out[..., ch] = _lut(img[..., ch], (step // 2 + before) // step)
    return out


def _invert(img, _):
    return 255 - img


def _posterize(img, bits):
    if bits >= 8:
        return img
    return img & np.uint8((0xFF << (8 - bits)) & 0xFF)


def _solarize(img, thresh):
    ramp = np.arange(256)
    return _lut(img, np.where(ramp < thresh, ramp, 255 - ramp))


def _solarize_add(img, add, thresh=128):
    ramp = np.arange(256)
    return _lut(img, np.where(ramp < thresh, np.minimum(255, ramp + add), ramp))


def _color(img, factor):
    gray = _gray(img.astype(np.float32))
    return _blend(np.rint(gray)[..., None], img, factor)


def _contrast(img, factor):
    mean = float(int(_gray(img.astype(np.float32)).mean() + 0.5))
    return _blend(np.float32(mean), img, factor)


def _brightness(img, factor):
    return _blend(np.float32(0.0), img, factor)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def _sharpness(img, factor):
    # PIL blends with its SMOOTH filter; the one-pixel border keeps the original pixels
    degenerate = img.astype(np.float32)
    smooth = cv2.filter2D(degenerate, -1, _SMOOTH, borderType=cv2.BORDER_REFLECT)
    degenerate[1:-1, 1:-1] = np.rint(smooth[1:-1, 1:-1])
    return _blend(degenerate, img, factor)


class _Op:
    """One RandAugment operation: a level -> argument map and the image function."""

    def __init__(self, fn, level_fn=None, geometric=False):
        self.fn, self.level_fn, self.geometric = fn, level_fn, geometric


def _negate(v, rng):
    return -v if rng.random() > 0.5 else v


def _rotate_arg(level, rng, hp):
    return _negate(level / _LEVEL_DENOM * 30.0, rng)


def _enhance_arg(level, rng, hp):
    return level / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_inc_arg(level, rng, hp):
    return max(0.1, 1.0 + _negate(level / _LEVEL_DENOM * 0.9, rng))


def _shear_arg(level, rng, hp):
    return _negate(level / _LEVEL_DENOM * 0.3, rng)


def _translate_rel_arg(level, rng, hp):
    return _negate(level / _LEVEL_DENOM * hp["translate_pct"], rng)


def _posterize_arg(level, rng, hp):
    return int(level / _LEVEL_DENOM * 4)


def _posterize_inc_arg(level, rng, hp):
    return 4 - int(level / _LEVEL_DENOM * 4)


def _solarize_arg(level, rng, hp):
    return min(256, int(level / _LEVEL_DENOM * 256))


def _solarize_inc_arg(level, rng, hp):
    return 256 - min(256, int(level / _LEVEL_DENOM * 256))


def _solarize_add_arg(level, rng, hp):
    return min(128, int(level / _LEVEL_DENOM * 110))


def _rotate(img, degrees, interp, fill):
    # PIL Image.rotate: counter-clockwise about the image centre, expressed as an inverse affine
    h, w = img.shape[:2]
    cx, cy = w / 2.0, h / 2.0
    ang = -math.radians(degrees)
    a, b, d, e = math.cos(ang), math.sin(ang), -math.sin(ang), math.cos(ang)
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return _affine_pil(img, (a, b, c, d, e, f), interp, fill)


def _shear_x(img, factor, interp, fill):
    return _affine_pil(img, (1, factor, 0, 0, 1, 0), interp, fill)


def _shear_y(img, factor, interp, fill):
    return _affine_pil(img, (1, 0, 0, factor, 1, 0), interp, fill)


def _translate_x_rel(img, pct, interp, fill):
    return _affine_pil(img, (1, 0, pct * img.shape[1], 0, 1, 0), interp, fill)


def _translate_y_rel(img, pct, interp, fill):
    return _affine_pil(img, (1, 0, 0, 0, 1, pct * img.shape[0]), interp, fill)


_OPS = {
    "AutoContrast": _Op(_auto_contrast),
    "Equalize": _Op(_equalize),
    "Invert": _Op(_invert),
    "Rotate": _Op(_rotate, _rotate_arg, geometric=True),
    "Posterize": _Op(_posterize, _posterize_arg),
    "PosterizeIncreasing": _Op(_posterize, _posterize_inc_arg),
    "Solarize": _Op(_solarize, _solarize_arg),
    "SolarizeIncreasing": _Op(_solarize, _solarize_inc_arg),
    "SolarizeAdd": _Op(_solarize_add, _solarize_add_arg),
    "Color": _Op(_color, _enhance_arg),
    "ColorIncreasing": _Op(_color, _enhance_inc_arg),
    "Contrast": _Op(_contrast, _enhance_arg),
    "ContrastIncreasing": _Op(_contrast, _enhance_inc_arg),
    "Brightness": _Op(_brightness, _enhance_arg),
    "BrightnessIncreasing": _Op(_brightness, _enhance_inc_arg),
    "Sharpness": _Op(_sharpness, _enhance_arg),
    "SharpnessIncreasing": _Op(_sharpness, _enhance_inc_arg),
    "ShearX": _Op(_shear_x, _shear_arg, geometric=True),
    "ShearY": _Op(_shear_y, _shear_arg, geometric=True),
    "TranslateXRel": _Op(_translate_x_rel, _translate_rel_arg, geometric=True),
    "TranslateYRel": _Op(_translate_y_rel, _translate_rel_arg, geometric=True),
}

_RA_KEYS = {"m": "magnitude", "n": "num_layers", "p": "prob", "mstd": "magnitude_std",
            "mmax": "magnitude_max", "inc": "increasing"}


def parse_rand_augment(config_str):
    """Parse a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' into a dict of
    magnitude, num_layers, prob, magnitude_std, magnitude_max, increasing.

    Defaults as timm: m10, n2, p0.5, mstd0, no mmax (cap 10), inc0. mstd > 100 means
    uniform sampling in [0, m]. Unlike timm, an unknown or malformed section is an error and
    'inc0' means off. Transform-set sections ('t...') are not supported."""
    where = f"RandAugment.config_str {config_str!r}"
    if not isinstance(config_str, str):
        raise ConfigError(f"RandAugment.config_str: expected a string like 'rand-m9-mstd0.5-inc1', "
                          f"got {config_str!r}")
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"{where}: must start with 'rand', e.g. 'rand-m9-mstd0.5-inc1'")
    out = dict(magnitude=10.0, num_layers=2, prob=0.5, magnitude_std=0.0, magnitude_max=None, increasing=False)
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
        if match is None or match.group(1) not in _RA_KEYS:
            raise ConfigError(f"{where}: cannot parse section {part!r}; expected <key><number> with key one of "
                              f"{sorted(_RA_KEYS)} (e.g. m9, n2, p0.5, mstd0.5, mmax10, inc1)")
        key, val = match.groups()
        try:
            if key in ("n", "mmax", "inc", "m"):
                num = int(val)
            else:
                num = float(val)
        except ValueError:
            raise ConfigError(f"{where}: section {part!r} needs an integer value") from None
        if key == "mstd":
            out["magnitude_std"] = math.inf if num > 100 else num
        elif key == "inc":
            if num not in (0, 1):
                raise ConfigError(f"{where}: section {part!r} must be inc0 or inc1")
            out["increasing"] = bool(num)
        elif key == "m":
            out["magnitude"] = float(num)
        elif key == "p":
            if num > 1:
                raise ConfigError(f"{where}: probability section {part!r} must be <= 1")
            out["prob"] = num
        elif key == "n":
            if num < 1:
                raise ConfigError(f"{where}: section {part!r} must choose at least one op")
            out["num_layers"] = num
        else:
            out["magnitude_max"] = float(num)
    return out


@TRANSFORMS.register
class RandAugment(_Transform):
    """timm's RandAugment as DeiT uses it ('rand-m9-mstd0.5-inc1').

    Per image: pick `n` ops with replacement; each runs with probability `p` at a magnitude
    drawn from N(m, mstd) (uniform [0, m] when mstd is inf) clipped to [0, mmax or 10].
    Geometric ops fill with `img_mean` (timm: round(255 * mean)) and use `interpolation`;
    TranslateX/YRel move by up to `translate_pct` of the side at magnitude 10."""

    def __init__(self, config_str="rand-m9-mstd0.5-inc1", img_mean=(124, 116, 104), translate_pct=0.45,
                 interpolation="bicubic", seed=None):
        super().__init__(seed)
        self.config_str = config_str
        cfg = parse_rand_augment(config_str)
        self.magnitude = cfg["magnitude"]
        self.num_layers = cfg["num_layers"]
        self.prob = cfg["prob"]
        self.magnitude_std = cfg["magnitude_std"]
        self.magnitude_max = cfg["magnitude_max"]
        self.op_names = RAND_AUGMENT_INCREASING_OPS if cfg["increasing"] else RAND_AUGMENT_OPS
        cap = self.magnitude_max or _LEVEL_DENOM
        if self.magnitude > cap:
            logger.warning("RandAugment %r: magnitude %g is above the cap %g and acts as %g; add 'mmax%d' to "
                           "raise the cap", config_str, self.magnitude, cap, cap, int(math.ceil(self.magnitude)))
        if not (isinstance(img_mean, (list, tuple)) and len(img_mean) == 3
                and all(isinstance(v, numbers.Real) and 0 <= v <= 255 for v in img_mean)):
            raise ConfigError(f"{_where(self, 'img_mean')}: expected 3 fill values in [0, 255], got {img_mean!r}")
        self.img_mean = tuple(int(round(v)) for v in img_mean)
        if not (isinstance(translate_pct, numbers.Real) and 0 <= translate_pct <= 1):
            raise ConfigError(f"{_where(self, 'translate_pct')}: expected a fraction in [0, 1], got {translate_pct!r}")
        self.translate_pct = float(translate_pct)
        self.interpolation = _check_interp(self, interpolation)
        self._hp = {"translate_pct": self.translate_pct}

    def sample_magnitude(self, rng):
        m = self.magnitude
        if self.magnitude_std == math.inf:
            m = rng.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        upper = self.magnitude_max if self.magnitude_max else _LEVEL_DENOM
        return max(0.0, min(m, upper))

    def apply_op(self, img, name, magnitude, rng):
        """Run op `name` at `magnitude` (level 0..10); sign flips are drawn from `rng`."""
        op = _OPS[name]
        arg = op.level_fn(magnitude, rng, self._hp) if op.level_fn is not None else None
        if op.geometric:
            return op.fn(img, arg, _INTERP[self.interpolation], self.img_mean)
        return op.fn(img, arg)

    def __call__(self, img, rng=None):
        _check_image(self, img)
        if img.dtype != np.uint8 or img.shape[2] != 3:
            raise ValueError(f"RandAugment: expected an HxWx3 uint8 RGB image, got {img.dtype} {img.shape}")
        rng = self._rng(rng)
        for idx in rng.integers(0, len(self.op_names), size=self.num_layers):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            img = self.apply_op(img, self.op_names[idx], self.sample_magnitude(rng), rng)
        return img


# ---------------------------------------------------------------- to tensors

@TRANSFORMS.register
class Normalize(_Transform):
    """HWC image -> float32 HWC: (img * scale - mean) / std, mean/std in [0, 1] units."""

    def __init__(self, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, scale=1.0 / 255.0):
        super().__init__(None)
        for key, val in (("mean", mean), ("std", std)):
            if not (isinstance(val, (list, tuple)) and len(val) > 0
                    and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in val)):
                raise ConfigError(f"{_where(self, key)}: expected a list of per-channel numbers, got {val!r}")
        if len(mean) != len(std):
            raise ConfigError(f"{_where(self, 'std')}: has {len(std)} values but mean has {len(mean)}")
        if any(v <= 0 for v in std):
            raise ConfigError(f"{_where(self, 'std')}: values must be > 0, got {std!r}")
        if not (isinstance(scale, numbers.Real) and scale > 0):
            raise ConfigError(f"{_where(self, 'scale')}: expected a positive number, got {scale!r}")
        if scale < 0.01 and max(mean) > 1.0:
            raise ConfigError(f"{_where(self, 'mean')}: {list(mean)} looks like 0-255 units while pixels are scaled "
                              f"by {scale:g} to [0, 1]; give mean/std in [0, 1] units or set scale: 1.0")
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.scale = float(scale)

    def __call__(self, img, rng=None):
        _check_image(self, img)
        if img.shape[2] != self.mean.size:
            raise ValueError(f"Normalize: image has {img.shape[2]} channels (HWC shape {img.shape}) but "
                             f"mean has {self.mean.size} values")
        return (img.astype(np.float32) * np.float32(self.scale) - self.mean) / self.std


@TRANSFORMS.register
class ToCHW(_Transform):
    """HWC -> contiguous float32 CHW."""

    def __init__(self):
        super().__init__(None)

    def __call__(self, img, rng=None):
        _check_image(self, img)
        return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


@TRANSFORMS.register
class RandomErasing(_Transform):
    """timm RandomErasing on a normalised float CHW image: with probability `prob`, fill
    1..`max_count` boxes (area fraction in [min_area, max_area] split over the count, log-uniform
    aspect) with per-pixel N(0,1) noise ('pixel'), one N(0,1) colour per channel ('rand') or 0 ('const')."""

    def __init__(self, prob=0.25, mode="pixel", min_area=0.02, max_area=1.0 / 3.0, min_aspect=0.3,
                 max_aspect=None, min_count=1, max_count=None, seed=None):
        super().__init__(seed)
        self.prob = _check_prob(self, "prob", prob)
        if mode not in ("pixel", "rand", "const"):
            raise ConfigError(f"{_where(self, 'mode')}: expected 'pixel', 'rand' or 'const', got {mode!r}")
        self.mode = mode
        self.min_area, self.max_area = _check_range(self, "max_area", (min_area, max_area), low=0.0, high=1.0)
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect else max_aspect
        lo, hi = _check_range(self, "max_aspect", (min_aspect, max_aspect), positive=True)
        self.log_aspect = (math.log(lo), math.log(hi))
        max_count = min_count if max_count is None else max_count
        for key, val in (("min_count", min_count), ("max_count", max_count)):
            if not (isinstance(val, numbers.Integral) and val >= 1):
                raise ConfigError(f"{_where(self, key)}: expected an int >= 1, got {val!r}")
        if max_count < min_count:
            raise ConfigError(f"{_where(self, 'max_count')}: {max_count} is below min_count {min_count}")
        self.min_count, self.max_count = int(min_count), int(max_count)

    def __call__(self, img, rng=None):
        if not (isinstance(img, np.ndarray) and img.ndim == 3 and np.issubdtype(img.dtype, np.floating)):
            got = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"RandomErasing: expected a normalised float CHW image (put it after Normalize and "
                             f"ToCHW), got {got}")
        rng = self._rng(rng)
        if rng.random() >= self.prob:
            return img
        img = img.copy()
        chans, height, width = img.shape
        count = self.min_count if self.min_count == self.max_count else \
            int(rng.integers(self.min_count, self.max_count + 1))
        for _ in range(count):
            for _attempt in range(10):
                area = rng.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top = int(rng.integers(0, height - h + 1))
                    left = int(rng.integers(0, width - w + 1))
                    if self.mode == "pixel":
                        fill = rng.standard_normal((chans, h, w), dtype=np.float32)
                    elif self.mode == "rand":
                        fill = rng.standard_normal((chans, 1, 1), dtype=np.float32)
                    else:
                        fill = 0.0
                    img[:, top:top + h, left:left + w] = fill
                    break
        return img


# ---------------------------------------------------------------- pipeline

def _takes_rng(fn):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "rng" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class ClsCompose:
    """Run transforms in order, handing each random one the same per-sample generator.

    Not registered: datasets build their `transforms` list into one of these."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        self._pass_rng = [_takes_rng(t) for t in self.transforms]

    def __call__(self, img, rng=None):
        for t, pass_rng in zip(self.transforms, self._pass_rng):
            img = t(img, rng=rng) if pass_rng else t(img)
        return img

    def __len__(self):
        return len(self.transforms)

    def __repr__(self):
        return "ClsCompose([\n  " + ",\n  ".join(repr(t) for t in self.transforms) + "\n])"


def _check_required(spec, where):
    """Name a missing required argument as a config error instead of a TypeError from the call."""
    if not hasattr(spec, "get") or spec.get("name") not in TRANSFORMS:
        return  # the registry reports these
    cls = TRANSFORMS.get(spec["name"])
    check_kwargs(cls, {k: v for k, v in spec.items() if k != "name"}, where)  # unknown keys first
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name != "self" and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in spec:
            raise ConfigError(f"{where}: {spec['name']} needs '{p.name}'")


def build_cls_transforms(specs, where="transforms"):
    """Build a ClsCompose from a list of `{name: ..., **kwargs}` dicts and/or callables."""
    if specs is None:
        specs = []
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of transforms ({{name: ..., ...}} or callables), got {specs!r}")
    built = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if callable(spec) and not hasattr(spec, "get"):
            built.append(spec)
            continue
        try:
            _check_required(spec, at)
            built.append(TRANSFORMS.build(spec, where=at))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(at) else f"{at}: {msg}") from None
    return ClsCompose(built)
