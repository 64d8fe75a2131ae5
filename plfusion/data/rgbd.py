"""RGB-D semantic segmentation datasets: NYUDv2 (TokenFusion layout) and SUN RGB-D (DFormer /
GeminiFusion layout), plus the base class that every segmentation dataset here shares.

Sample contract: `dataset[i]` returns `(inputs, label)` where `inputs` is a list of float32
CxHxW arrays, one per entry of `modalities` and in that order, and `label` is an int64 HxW
array whose ignored pixels hold `ignore_index` (255 unless changed).

Both layouts use list files whose lines are `rgb<TAB>label<TAB>depth` paths relative to
`root`. Label files store classes 0..N-1 with 255 for "unlabelled" (NYUDv2, as TokenFusion's
masks from light-weight-refinenet do) or 1..N with 0 for "unlabelled" (SUN RGB-D, which the
official loaders shift by -1 so that 0 becomes 255).

Depth PNGs are read unchanged and scaled to [0, 1] floats: 8-bit by 1/255 (this is what
GeminiFusion does before tiling depth to 3 channels), 16-bit by 1/65535, unless
`depth_scale` gives another factor (e.g. 1/10000 for millimetres up to 10 m).
"""
import logging
import numbers
import os
from typing import Tuple, Union

import numpy as np
import paddle

from plfusion.data.image_io import DataError, read_image
from plfusion.data.seg_transforms import Compose, Normalize, ToCHW
from plfusion.registry import DATASETS, ConfigError

__all__ = ["SegmentationDataset", "RGBDListDataset", "NYUDv2", "SUNRGBD", "make_palette",
           "read_depth", "NYUDV2_CLASSES", "SUNRGBD_CLASSES"]

logger = logging.getLogger(__name__)

NYUDV2_CLASSES = [
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop"]
# SUN RGB-D's 37 classes are the first 37 of the NYUDv2 40 in the same order.
SUNRGBD_CLASSES = NYUDV2_CLASSES[:37]

STORED_IGNORE = 255  # the "unlabelled" value in stored label PNGs after any shift


def make_palette(num_classes):
    """Nx3 uint8 colours, the PASCAL VOC bit-interleaving scheme (distinct for N <= 256)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, j = k + 1, 0  # +1 so class 0 is not black (black reads as "unlabelled")
        while c:
            for ch in range(3):
                palette[k, ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
            j += 1
    return palette


def read_depth(path, depth_scale=None):
    """Read a depth image unchanged and return HxWx1 float32 (see the module docstring for scaling)."""
    raw = read_image(path, "unchanged")
    if raw.ndim == 3:
        # Some exports store depth as a 3-channel (or RGBA) PNG with equal channels.
        chans = raw[:, :, :3] if raw.shape[2] >= 3 else raw
        if chans.shape[2] > 1 and not np.array_equal(chans[:, :, :1].repeat(chans.shape[2], 2), chans):
            raise DataError(f"depth image {path} has {raw.shape[2]} channels with different values; "
                            f"expected a single-channel depth map")
        raw = chans[:, :, 0]
    if depth_scale is None:
        if raw.dtype == np.uint8:
            depth_scale = 1.0 / 255.0
        elif raw.dtype == np.uint16:
            depth_scale = 1.0 / 65535.0
        else:
            raise DataError(f"depth image {path} has dtype {raw.dtype}; expected an 8-bit or 16-bit PNG "
                            f"(or pass depth_scale for other encodings)")
    return (raw.astype(np.float32) * np.float32(depth_scale))[:, :, None]


class SegmentationDataset(paddle.io.Dataset):
    """Base class: builds the transform pipeline, seeds augmentation, returns `(inputs, label)`.

    Subclasses set `num_classes`, `class_names`, `palette`, `modalities` (via this __init__)
    and implement `__len__` and `load(index) -> ({modality: HxWxC array}, HxW label, source)`
    where `source` names the sample in error messages.

    transforms: None (Normalize + ToCHW), or a list of `{name: ..., ...}` dicts / callables.
    ToCHW is appended when the list does not end with it. aug_seed: with a seed, the
    augmentation generator for sample i in epoch e is seeded from (aug_seed, e, i), so runs
    are reproducible whatever the number of loader workers; the trainer must then call
    `set_epoch(e)` every epoch or each epoch repeats the same augmentations. Without a seed
    every call draws fresh OS entropy (so forked loader workers never share a stream).
    """

    supported_modalities = ("rgb", "depth")

    def __init__(self, num_classes, class_names=None, ignore_index=255, modalities=("rgb", "depth"),
                 transforms=None, aug_seed=None):
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
            raise ConfigError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
            raise ConfigError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
        if aug_seed is not None and not (isinstance(aug_seed, numbers.Integral) and not isinstance(aug_seed, bool)
                                         and aug_seed >= 0):
            raise ConfigError(f"{name}: aug_seed must be an int >= 0 or null, got {aug_seed!r}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(f"{name}: ignore_index={ignore_index} collides with a class id "
                              f"(num_classes={num_classes})")
        if isinstance(modalities, str):
            modalities = (modalities,)
        modalities = tuple(modalities)
        if not modalities:
            raise ConfigError(f"{name}: modalities must name at least one of {self.supported_modalities}")
        for m in modalities:
            if m not in self.supported_modalities:
                raise ConfigError(f"{name}: unknown modality {m!r} in modalities={list(modalities)}; "
                                  f"expected some of {list(self.supported_modalities)}")
        if len(set(modalities)) != len(modalities):
            raise ConfigError(f"{name}: modalities={list(modalities)} lists a modality twice")
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        self.modalities = modalities
        if class_names is not None and len(class_names) != num_classes:
            logger.warning("%s: num_classes=%d but there are %d class names; naming the classes class_0..class_%d",
                           name, num_classes, len(class_names), num_classes - 1)
            class_names = None
        if class_names is None:
            class_names = [f"class_{k}" for k in range(num_classes)]
        self.class_names = list(class_names)
        self.palette = make_palette(num_classes)
        self.aug_seed = aug_seed
        self.epoch = 0
        self.transforms = self._build_transforms(transforms, f"{name}.transforms")

    @staticmethod
    def _build_transforms(transforms, where):
        if transforms is None:
            return Compose([Normalize(), ToCHW()], where=where)
        # A copy, so appending ToCHW below never changes a Compose the caller owns.
        items = list(transforms.transforms) if isinstance(transforms, Compose) else transforms
        pipeline = Compose(items, where=where)
        if not any(isinstance(t, Normalize) for t in pipeline.transforms):
            logger.warning("%s has no Normalize: inputs reach the model unscaled (uint8 RGB as 0..255)", where)
        if not pipeline.transforms or not isinstance(pipeline.transforms[-1], ToCHW):
            pipeline.transforms.append(ToCHW())
        return pipeline

    def set_epoch(self, epoch):
        """Change the augmentation stream (only matters when `aug_seed` is set)."""
        self.epoch = int(epoch)

    def _rng_for(self, index):
        if self.aug_seed is None:
            return np.random.default_rng()
        return np.random.default_rng([int(self.aug_seed), self.epoch, int(index)])

    def load(self, index):
        raise NotImplementedError(f"{type(self).__name__} must implement load(index)")

    def check_label(self, label, source):
        """Reject values outside [0, num_classes) other than the ignore value 255.

        Transforms pad labels with 255 too; `__getitem__` maps 255 to `ignore_index` last."""
        bad = ((label >= self.num_classes) & (label != STORED_IGNORE)) | (label < 0)
        if bad.any():
            values = np.unique(label[bad])
            raise DataError(f"label values {values[:10].tolist()} in {source} are outside "
                            f"[0, {self.num_classes}) and are not the ignore value {STORED_IGNORE}")
        return label

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range for {len(self)} samples")
        index = index % len(self)
        arrays, label, source = self.load(index)
        sample = {"inputs": [arrays[m] for m in self.modalities], "modalities": list(self.modalities),
                  "label": label, "rng": self._rng_for(index)}
        sample = self.transforms(sample)
        label = sample["label"]
        if self.ignore_index != STORED_IGNORE:
            label = np.where(label == STORED_IGNORE, self.ignore_index, label).astype(np.int64)
        return sample["inputs"], label

    def colorize(self, label):
        """HxW class map -> HxWx3 uint8 image; ignored pixels are black."""
        label = np.asarray(label)
        out = np.zeros(label.shape + (3,), dtype=np.uint8)
        valid = (label >= 0) & (label < self.num_classes)
        out[valid] = self.palette[label[valid]]
        return out


class RGBDListDataset(SegmentationDataset):
    """Datasets listed by `rgb<TAB>label<TAB>depth` lines relative to `root`.

    Cheap checks (root, list file, line format, file existence) run here, so a bad dataset
    fails before training starts; decoding checks (sizes, label values) run per sample.
    """

    layout_hint = ""

    def __init__(self, root, list_file, num_classes, class_names, ignore_index=255,
                 modalities=("rgb", "depth"), transforms=None, aug_seed=None, depth_scale=None):
        super().__init__(num_classes, class_names, ignore_index, modalities, transforms, aug_seed)
        name = type(self).__name__
        if depth_scale is not None and (not isinstance(depth_scale, numbers.Real) or isinstance(depth_scale, bool)
                                        or not depth_scale > 0):
            raise ConfigError(f"{name}: depth_scale must be positive or None, got {depth_scale!r}")
        if not isinstance(root, (str, os.PathLike)):
            raise ConfigError(f"{name}: root must be a directory path, got {root!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{name}: dataset root {root!r} is not a directory. {self.layout_hint}")
        list_path = os.path.join(root, list_file)
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"{name}: list file {list_path} not found. {self.layout_hint}")
        self.root = root
        self.list_path = list_path
        self.depth_scale = depth_scale
        self.samples = self._read_list(list_path)
        if not self.samples:
            raise DataError(f"{name}: list file {list_path} has no samples")

    def _read_list(self, list_path):
        samples = []
        with open(list_path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != 3:
                    hint = (" (fields must be separated by TABs, not spaces)"
                            if len(line.split()) == 3 else "")
                    raise DataError(f"{list_path}:{lineno}: expected 3 TAB-separated fields "
                                    f"rgb<TAB>label<TAB>depth, got {len(fields)}{hint}: {line!r}")
                rgb, label, depth = (os.path.join(self.root, p.strip()) for p in fields)
                for kind, path in (("rgb", rgb), ("label", label), ("depth", depth)):
                    # Only the files this dataset will read must exist.
                    if (kind == "label" or kind in self.modalities) and not os.path.isfile(path):
                        raise FileNotFoundError(f"{list_path}:{lineno}: {kind} file {path} not found")
                samples.append({"rgb": rgb, "label": label, "depth": depth, "line": lineno})
        return samples

    def __len__(self):
        return len(self.samples)

    def sample_source(self, index):
        """Where sample `index` comes from, for error messages: the list line and its files."""
        rec = self.samples[index]
        files = ", ".join(rec[k] for k in ("rgb", "depth", "label") if k == "label" or k in self.modalities)
        return f"{self.list_path}:{rec['line']} ({files})"

    def load(self, index):
        rec = self.samples[index]
        source = f"{rec['label']} ({self.list_path}:{rec['line']})"
        arrays = {}
        if "rgb" in self.modalities:
            arrays["rgb"] = read_image(rec["rgb"], "rgb")
        if "depth" in self.modalities:
            arrays["depth"] = read_depth(rec["depth"], self.depth_scale)
        label = read_image(rec["label"], "unchanged")
        if label.ndim != 2:
            raise DataError(f"label image {rec['label']} has shape {label.shape}; expected a single-channel "
                            f"class-index PNG (no colour map)")
        shapes = {rec[m]: arrays[m].shape[:2] for m in self.modalities}
        shapes[rec["label"]] = label.shape
        if len(set(shapes.values())) > 1:
            sizes = ", ".join(f"{p}: {h}x{w}" for p, (h, w) in shapes.items())
            raise DataError(f"spatial sizes differ within one sample ({self.list_path}:{rec['line']}): {sizes}")
        return arrays, self.decode_label(label, source), source

    def decode_label(self, stored, source):
        """Stored label PNG -> 0-based classes with `ignore_index`; stored 255 is unlabelled."""
        return self.check_label(stored, source)


@DATASETS.register
class NYUDv2(RGBDListDataset):
    """NYU Depth v2, 40 classes, TokenFusion layout: `root/{train,val}.txt` with lines
    `rgb/000003.png<TAB>masks/000003.png<TAB>depth/000003.png`; 795 train / 654 val.

    Masks hold classes 0..39 and 255 for unlabelled (TokenFusion evaluates only pixels with
    mask < num_classes and colours mask value v with cmap[v + 1], i.e. 0-based classes).
    split="test" is the 654-image val list, as in TokenFusion/GeminiFusion.
    """

    layout_hint = ("Expected the TokenFusion NYUDv2 layout: root/train.txt, root/val.txt and "
                   "folders rgb/, masks/, depth/.")
    split_files = {"train": "train.txt", "val": "val.txt", "test": "val.txt"}

    def __init__(self, root, split="train", num_classes=40, ignore_index=255,
                 modalities: Union[str, Tuple[str, ...]] = ("rgb", "depth"), transforms=None, aug_seed=None,
                 depth_scale=None):
        if split not in self.split_files:
            raise ConfigError(f"NYUDv2: split must be one of {list(self.split_files)}, got {split!r}")
        self.split = split
        super().__init__(root, self.split_files[split], num_classes, NYUDV2_CLASSES, ignore_index,
                         modalities, transforms, aug_seed, depth_scale)


@DATASETS.register
class SUNRGBD(RGBDListDataset):
    """SUN RGB-D, 37 classes, DFormer/GeminiFusion layout: `root/{train,test}.txt` with lines
    `RGB/train_0.jpg<TAB>labels/train_0.png<TAB>Depth/train_0.png`; 5285 train / 5050 test.

    Labels are stored 1-based with 0 = unlabelled; they are shifted by -1 and 0 becomes the
    ignore index, as GeminiFusion's loader does (`mask -= 1` on uint8).
    """

    layout_hint = ("Expected the DFormer/GeminiFusion SUN RGB-D layout: root/train.txt, root/test.txt "
                   "and folders RGB/, Depth/, labels/.")
    split_files = {"train": "train.txt", "test": "test.txt", "val": "test.txt"}

    def __init__(self, root, split="train", num_classes=37, ignore_index=255,
                 modalities: Union[str, Tuple[str, ...]] = ("rgb", "depth"), transforms=None, aug_seed=None,
                 depth_scale=None):
        if split not in self.split_files:
            raise ConfigError(f"SUNRGBD: split must be one of {list(self.split_files)}, got {split!r}")
        self.split = split
        super().__init__(root, self.split_files[split], num_classes, SUNRGBD_CLASSES, ignore_index,
                         modalities, transforms, aug_seed, depth_scale)

    def decode_label(self, stored, source):
        bad = stored > self.num_classes
        if bad.any():
            values = np.unique(stored[bad])
            raise DataError(f"label values {values[:10].tolist()} in {source} are outside 0..{self.num_classes} "
                            f"(SUN RGB-D labels are 1-based with 0 = unlabelled)")
        label = stored.astype(np.int64) - 1
        label[stored == 0] = STORED_IGNORE
        return self.check_label(label.astype(stored.dtype), source)
