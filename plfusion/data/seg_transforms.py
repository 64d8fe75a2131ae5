"""Transforms for multimodal segmentation samples that keep every modality and the label aligned.

A sample is a dict::

    {"inputs": [HxWxC arrays, ...], "modalities": ["rgb", "depth", ...],
     "label": HxW array, "rng": numpy.random.Generator (optional)}

Geometric transforms (resize, crop, flip) act on every input and on the label with the
same parameters: inputs are resampled bilinearly, the label with centre-aligned nearest
neighbour so it stays on the same pixel grid. Photometric transforms act on `rgb` only.

Value-range convention while a sample is in HxWxC form: uint8 arrays hold 0..255, uint16
arrays hold 0..65535 and float arrays are already scaled (depth readers give floats in
[0, 1]). `Normalize` turns integer arrays into [0, 1] floats before subtracting the mean,
so the same pipeline serves 8-bit and 16-bit data.

All of them are registered in SEG_TRANSFORMS (see below for why not in TRANSFORMS).
Random transforms draw from `sample["rng"]` when present (datasets put a per-index
generator there so a pipeline is reproducible from a seed and differs across loader
workers); otherwise from their own generator seeded with their `seed` argument.
"""
import copy
import numbers

import cv2
import numpy as np

from plfusion.registry import ConfigError, Registry

__all__ = ["SEG_TRANSFORMS", "Compose", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter",
           "Resize", "Normalize", "ToCHW", "IMAGENET_MEAN", "IMAGENET_STD"]


# Segmentation transforms live in their own registry: they take sample dicts, and the
# classification transforms in the shared TRANSFORMS registry already use the same names
# (RandomResizedCrop, Normalize, ...) for single images. A segmentation dataset builds its
# `transforms` list from this registry, so configs use the familiar names in both places.
SEG_TRANSFORMS = Registry("segmentation transform")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- helpers
def _pair(value, key, owner):
    """A positive (h, w) int pair from an int or a 2-sequence; ConfigError naming `owner.key`."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{owner}.{key} must be a positive int or an [h, w] pair of ints, got {value!r}")
    if min(value) <= 0:
        raise ConfigError(f"{owner}.{key} must be positive, got {list(value)}")
    return int(value[0]), int(value[1])


def _prob(value, key, owner):
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{owner}.{key} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _sample_rng(sample, own):
    rng = sample.get("rng")
    return rng if rng is not None else own


def _check_sample(sample, owner):
    for key in ("inputs", "modalities", "label"):
        if key not in sample:
            raise KeyError(f"{owner}: sample has no '{key}' entry (keys: {sorted(sample)}); "
                           f"samples are dicts with 'inputs', 'modalities' and 'label'")
    if len(sample["inputs"]) != len(sample["modalities"]):
        raise ValueError(f"{owner}: {len(sample['inputs'])} inputs but "
                         f"{len(sample['modalities'])} modalities {sample['modalities']}")


def _resize_input(img, hw):
    out = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return out.reshape(hw[0], hw[1], *img.shape[2:])  # cv2 drops a trailing 1-channel axis


def _resize_label(label, hw):
    # INTER_NEAREST_EXACT samples pixel centres, matching INTER_LINEAR's grid; plain
    # INTER_NEAREST is shifted by half a pixel and would misalign label and image.
    out = cv2.resize(label, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.astype(label.dtype, copy=False)


def _pad_value_for(pad_value, modality):
    if isinstance(pad_value, dict):
        return pad_value.get(modality, 0)
    return pad_value


def _pad_to(img, hw, value):
    """Pad at the bottom/right up to `hw` with a scalar or per-channel constant."""
    ph, pw = max(hw[0] - img.shape[0], 0), max(hw[1] - img.shape[1], 0)
    if ph == 0 and pw == 0:
        return img
    out_shape = (img.shape[0] + ph, img.shape[1] + pw) + img.shape[2:]
    value = np.asarray(value, dtype=img.dtype)
    channels = img.shape[2] if img.ndim == 3 else 1
    if value.size not in (1, channels):
        raise ValueError(f"pad value {value.tolist()} has {value.size} entries for an input with {channels} channels")
    out = np.empty(out_shape, dtype=img.dtype)
    out[...] = value.reshape(-1) if value.size > 1 else value.reshape(())
    out[:img.shape[0], :img.shape[1]] = img
    return out


# ----------------------------------------------------------------------------- Compose
@SEG_TRANSFORMS.register
class Compose:
    """Apply transforms in order. Items are `{name: ..., **kwargs}` dicts or callables."""

    def __init__(self, transforms=(), where="transforms"):
        if transforms is None:
            transforms = ()
        if not isinstance(transforms, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of transforms, got {type(transforms).__name__}")
        self.transforms = []
        for i, t in enumerate(transforms):
            item_where = f"{where}[{i}]"
            if callable(t):
                self.transforms.append(t)
                continue
            try:
                self.transforms.append(SEG_TRANSFORMS.build(t, where=item_where))
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith(item_where) else f"{item_where}: {msg}") from None

    def __call__(self, sample):
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __len__(self):
        return len(self.transforms)

    def __repr__(self):
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


# ----------------------------------------------------------------------------- geometric
@SEG_TRANSFORMS.register
class RandomResizedCrop:
    """Rescale by a random ratio in `scale`, then take a random `crop_size` window.

    relative_to="image" scales the image's own size by the ratio (for NYUDv2 480x640 with a
    480x640 crop this is what GeminiFusion does); "crop" first fits the image's short side
    to the crop's short side, then applies the ratio (GeminiFusion's SUN RGB-D behaviour).
    Where the rescaled image is smaller than the crop it is padded at the bottom/right:
    inputs with `pad_value` (a number, a per-channel list, or a {modality: value} dict),
    the label with `label_pad` (the ignore index).
    """

    def __init__(self, crop_size, scale=(0.5, 2.0), relative_to="image", pad_value=0,
                 label_pad=255, seed=None):
        owner = "RandomResizedCrop"
        self.crop_size = _pair(crop_size, "crop_size", owner)
        if (not isinstance(scale, (list, tuple)) or len(scale) != 2
                or not all(isinstance(s, numbers.Real) for s in scale)):
            raise ConfigError(f"{owner}.scale must be a [min, max] pair of numbers, got {scale!r}")
        if not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"{owner}.scale must satisfy 0 < min <= max, got {list(scale)}")
        if relative_to not in ("image", "crop"):
            raise ConfigError(f"{owner}.relative_to must be 'image' or 'crop', got {relative_to!r}")
        if not isinstance(pad_value, (numbers.Real, list, tuple, dict)):
            raise ConfigError(f"{owner}.pad_value must be a number, a per-channel list or a "
                              f"{{modality: value}} dict, got {pad_value!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.relative_to = relative_to
        self.pad_value = pad_value
        self.label_pad = int(label_pad)
        self._rng = np.random.default_rng(seed)

    def __call__(self, sample):
        _check_sample(sample, "RandomResizedCrop")
        rng = _sample_rng(sample, self._rng)
        h, w = sample["label"].shape[:2]
        ch, cw = self.crop_size
        ratio = rng.uniform(*self.scale)
        if self.relative_to == "crop":
            ratio *= min(ch, cw) / min(h, w)
        nh, nw = max(int(round(h * ratio)), 1), max(int(round(w * ratio)), 1)
        top = int(rng.integers(0, max(nh - ch, 0) + 1))
        left = int(rng.integers(0, max(nw - cw, 0) + 1))
        win = (slice(top, top + ch), slice(left, left + cw))

        inputs = []
        for img, mod in zip(sample["inputs"], sample["modalities"]):
            img = _resize_input(img, (nh, nw)) if (nh, nw) != (h, w) else img
            img = _pad_to(img[win], (ch, cw), _pad_value_for(self.pad_value, mod))
            inputs.append(img)
        label = sample["label"]
        label = _resize_label(label, (nh, nw)) if (nh, nw) != (h, w) else label
        sample["inputs"] = inputs
        sample["label"] = _pad_to(label[win], (ch, cw), self.label_pad)
        return sample

    def __repr__(self):
        return (f"RandomResizedCrop(crop_size={self.crop_size}, scale={self.scale}, "
                f"relative_to={self.relative_to!r})")


@SEG_TRANSFORMS.register
class RandomHorizontalFlip:
    """Mirror every input and the label left-right with probability `prob`."""

    def __init__(self, prob=0.5, seed=None):
        self.prob = _prob(prob, "prob", "RandomHorizontalFlip")
        self._rng = np.random.default_rng(seed)

    def __call__(self, sample):
        _check_sample(sample, "RandomHorizontalFlip")
        if _sample_rng(sample, self._rng).random() < self.prob:
            sample["inputs"] = [np.ascontiguousarray(img[:, ::-1]) for img in sample["inputs"]]
            sample["label"] = np.ascontiguousarray(sample["label"][:, ::-1])
        return sample

    def __repr__(self):
        return f"RandomHorizontalFlip(prob={self.prob})"


@SEG_TRANSFORMS.register
class Resize:
    """Resize every input (bilinear) and, unless resize_label=False, the label (nearest) to `size`."""

    def __init__(self, size, resize_label=True):
        self.size = _pair(size, "size", "Resize")
        self.resize_label = bool(resize_label)

    def __call__(self, sample):
        _check_sample(sample, "Resize")
        sample["inputs"] = [img if img.shape[:2] == self.size else _resize_input(img, self.size)
                            for img in sample["inputs"]]
        if self.resize_label and sample["label"].shape[:2] != self.size:
            sample["label"] = _resize_label(sample["label"], self.size)
        return sample

    def __repr__(self):
        return f"Resize(size={self.size}, resize_label={self.resize_label})"


# ----------------------------------------------------------------------------- photometric
@SEG_TRANSFORMS.register
class ColorJitter:
    """Random brightness, contrast and saturation on the `rgb` input only, within its value range.

    Each factor is drawn from [1 - x, 1 + x]. Works on uint8 (0..255) or float ([0, 1])
    images and returns the same dtype, clipped to that range. Contrast blends towards the
    image's mean grey level and saturation towards each pixel's grey level, so both keep the
    mean brightness; only the brightness factor moves it.
    """

    _GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, prob=0.5, seed=None):
        for key, val in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not isinstance(val, numbers.Real) or not 0.0 <= float(val) <= 1.0:
                raise ConfigError(f"ColorJitter.{key} must be in [0, 1] (factor drawn from "
                                  f"[1-{key}, 1+{key}]), got {val!r}")
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)
        self.prob = _prob(prob, "prob", "ColorJitter")
        self._rng = np.random.default_rng(seed)

    def __call__(self, sample):
        _check_sample(sample, "ColorJitter")
        rng = _sample_rng(sample, self._rng)
        # Draw every number even when not applied, so later transforms see the same stream.
        apply = rng.random() < self.prob
        b, c, s = (rng.uniform(1 - x, 1 + x) for x in (self.brightness, self.contrast, self.saturation))
        if not apply or "rgb" not in sample["modalities"]:
            return sample
        i = list(sample["modalities"]).index("rgb")
        img = sample["inputs"][i]
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"ColorJitter: the rgb input must be HxWx3, got shape {img.shape}")
        if img.dtype == np.uint8:
            top = 255.0
        elif np.issubdtype(img.dtype, np.floating):
            top = 1.0
        else:
            raise ValueError(f"ColorJitter: rgb must be uint8 (0..255) or float ([0, 1]), got {img.dtype}")
        x = img.astype(np.float32)
        x *= b
        np.clip(x, 0.0, top, out=x)
        grey = x @ self._GREY
        x = (x - grey.mean()) * c + grey.mean()
        np.clip(x, 0.0, top, out=x)
        grey = (x @ self._GREY)[..., None]
        x = (x - grey) * s + grey
        np.clip(x, 0.0, top, out=x)
        sample["inputs"][i] = np.rint(x).astype(np.uint8) if img.dtype == np.uint8 else x.astype(img.dtype)
        return sample

    def __repr__(self):
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, prob={self.prob})")


# ----------------------------------------------------------------------------- to model input
_DEFAULT_STATS = {
    "rgb": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "channels": 3},
    # GeminiFusion: depth /255 into [0, 1], no mean/std, tiled to 3 channels.
    "depth": {"mean": [0.0], "std": [1.0], "channels": 3},
}
_STAT_KEYS = ("mean", "std", "channels")


@SEG_TRANSFORMS.register
class Normalize:
    """Scale integer inputs to [0, 1] (uint8 /255, uint16 /65535; floats are taken as
    already scaled), then `(x - mean) / std` per modality, then tile single-channel inputs
    to `channels`.

    `stats` maps modality -> {mean, std, channels} and is merged over the defaults:
    rgb = ImageNet mean/std, 3 channels; depth = mean 0, std 1, tiled to 3 channels.
    A modality without defaults (e.g. 'hha') must be given in `stats`.
    """

    def __init__(self, stats=None):
        stats = {} if stats is None else stats
        if not isinstance(stats, dict):
            raise ConfigError(f"Normalize.stats must be a {{modality: {{mean, std, channels}}}} dict, got {stats!r}")
        self.stats = copy.deepcopy(_DEFAULT_STATS)
        for mod, st in stats.items():
            where = f"Normalize.stats.{mod}"
            if not isinstance(st, dict):
                raise ConfigError(f"{where} must be a dict with keys {list(_STAT_KEYS)}, got {st!r}")
            for key in st:
                if key not in _STAT_KEYS:
                    raise ConfigError(f"{where}: unknown key '{key}', expected one of {list(_STAT_KEYS)}")
            merged = dict(self.stats.get(mod, {}), **st)
            missing = [k for k in ("mean", "std") if k not in merged]
            if missing:
                raise ConfigError(f"{where}: missing {missing} (no defaults for modality '{mod}')")
            self.stats[mod] = merged
        self._prepared = {}
        for mod, st in self.stats.items():
            where = f"Normalize.stats.{mod}"
            mean = np.atleast_1d(np.asarray(st["mean"], dtype=np.float32))
            std = np.atleast_1d(np.asarray(st["std"], dtype=np.float32))
            if mean.ndim != 1 or std.ndim != 1:
                raise ConfigError(f"{where}: mean/std must be numbers or flat lists, got {st['mean']!r}, {st['std']!r}")
            if np.any(std <= 0):
                raise ConfigError(f"{where}.std must be positive, got {std.tolist()}")
            channels = st.get("channels")
            if channels is not None and (not isinstance(channels, numbers.Integral) or channels <= 0):
                raise ConfigError(f"{where}.channels must be a positive int or null, got {channels!r}")
            self._prepared[mod] = (mean, std, channels)

    def __call__(self, sample):
        _check_sample(sample, "Normalize")
        out = []
        for img, mod in zip(sample["inputs"], sample["modalities"]):
            if mod not in self._prepared:
                raise ConfigError(f"Normalize: no statistics for modality '{mod}'; give "
                                  f"stats={{'{mod}': {{'mean': [...], 'std': [...]}}}}")
            mean, std, channels = self._prepared[mod]
            x = img if img.ndim == 3 else img[:, :, None]
            if x.dtype == np.uint8:
                x = x.astype(np.float32) * (1.0 / 255.0)
            elif x.dtype == np.uint16:
                x = x.astype(np.float32) * (1.0 / 65535.0)
            elif np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            else:
                raise ValueError(f"Normalize: modality '{mod}' has dtype {x.dtype}; expected uint8, uint16 or float")
            c = x.shape[2]
            if mean.size not in (1, c) or std.size not in (1, c):
                raise ValueError(f"Normalize: modality '{mod}' has {c} channels but mean/std have "
                                 f"{mean.size}/{std.size} values")
            x = (x - mean) / std
            if channels is not None and channels != c:
                if c != 1:
                    raise ValueError(f"Normalize: modality '{mod}' has {c} channels; can only tile a "
                                     f"1-channel input to channels={channels}")
                x = np.repeat(x, channels, axis=2)
            out.append(x)
        sample["inputs"] = out
        return sample

    def __repr__(self):
        return f"Normalize(stats={self.stats})"


@SEG_TRANSFORMS.register
class ToCHW:
    """HxWxC inputs -> float32 CxHxW arrays (HxW -> 1xHxW); label -> int64 HxW."""

    def __call__(self, sample):
        _check_sample(sample, "ToCHW")
        out = []
        for img in sample["inputs"]:
            x = img[:, :, None] if img.ndim == 2 else img
            out.append(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))
        sample["inputs"] = out
        sample["label"] = np.ascontiguousarray(sample["label"], dtype=np.int64)
        return sample

    def __repr__(self):
        return "ToCHW()"
