"""ImageNet-style classification datasets: PaddleClas list files and class-per-folder trees.

`dataset[i]` is `(image, label)`: the transformed image (float32 CHW) and a numpy int64 label.
Random transforms get one generator per sample, derived from (seed, epoch, index) when a
seed is given, so a seeded dataset returns the same arrays in every worker and run;
call `set_epoch(epoch)` each epoch to vary the augmentation.
"""
import logging
import os
from typing import Tuple, Union

import numpy as np
import paddle

from ..registry import DATASETS, ConfigError
from .cls_transforms import Normalize, ToCHW, build_cls_transforms
from .image_io import DataError, read_image

__all__ = ["ClassificationDataset", "ImageNet", "ImageFolder", "IMG_EXTENSIONS", "read_class_names"]

logger = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, matched case-insensitively
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ClassificationDataset(paddle.io.Dataset):
    """Shared base: `samples` as (path, label), `num_classes`, `class_names`, transforms, seeding.

    With `transforms=None` the image is only normalised with the ImageNet mean/std and made CHW."""

    def __init__(self, samples, num_classes, class_names, transforms=None, seed=None):
        super().__init__()
        self.samples = samples
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        if transforms is None:
            transforms = [Normalize(), ToCHW()]
        self.transforms = build_cls_transforms(transforms, where=f"{type(self).__name__}.transforms")
        if seed is not None and not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise ConfigError(f"{type(self).__name__}.seed: expected an int >= 0 or null, got {seed!r}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def sample_rng(self, index):
        """Generator for sample `index`: fixed by (seed, epoch, index), or fresh entropy without a seed."""
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([int(self.seed), self.epoch, int(index)])

    def load(self, index):
        """The raw HxWx3 uint8 RGB image of sample `index`."""
        return read_image(self.samples[index][0], "rgb")

    def __len__(self):
        return len(self.samples)

    def sample_source(self, index):
        """Where sample `index` comes from, for error messages."""
        return self.samples[index][0]

    def __getitem__(self, index):
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {n} samples")
        index = index % n
        image = self.transforms(self.load(index), rng=self.sample_rng(index))
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype == np.float32):
            got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) \
                else type(image).__name__
            raise DataError(f"{type(self).__name__}: the transforms must produce a float32 CHW array (end the list "
                            f"with Normalize and ToCHW), got {got} for {self.samples[index][0]}")
        return image, np.int64(self.samples[index][1])

    def __repr__(self):
        return f"{type(self).__name__}(samples={len(self)}, num_classes={self.num_classes})"


def read_class_names(path):
    """One class name per line, in index order; a leading '<index> ' (PaddleClas class_id_map) is dropped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class name file not found: {path}")
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            head, _, rest = line.partition(" ")
            names.append(rest.strip() if head == str(len(names)) and rest.strip() else line)
    return names


def _class_names(class_names, num_classes, where):
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if isinstance(class_names, str):
        names = read_class_names(class_names)
        source = class_names
    elif isinstance(class_names, (list, tuple)):
        names, source = [str(n) for n in class_names], where
    else:
        raise ConfigError(f"{where}: expected a list of names or a file path, got {class_names!r}")
    if len(names) != num_classes:
        raise ConfigError(f"{where}: {source} gives {len(names)} class names but there are {num_classes} classes")
    return names


def _parse_list_file(path, root):
    """[(absolute path, label, line number)] from 'relative/path label' lines."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                raise DataError(f"{path}:{lineno}: expected 'relative/path label' (two whitespace-separated fields; "
                                f"image paths may not contain spaces), got {line!r}")
            rel, label = fields
            try:
                label = int(label)
            except ValueError:
                raise DataError(f"{path}:{lineno}: label {label!r} is not an integer") from None
            samples.append((os.path.join(root, rel), label, lineno))
    return samples


@DATASETS.register
class ImageNet(ClassificationDataset):
    """PaddleClas layout: `root/{split}_list.txt` with lines `relative/path.JPEG label`,
    paths relative to `root` and free of spaces.

    `list_file` overrides the list (a relative path is taken from `root`). `num_classes`
    defaults to max label + 1; labels must lie in [0, num_classes). `class_names` is a list
    or a file with one name per line. The list and the first image are checked on
    construction; `verify_files=True` checks that every listed image exists."""

    def __init__(self, root, split="train", list_file=None, transforms=None, num_classes=None,
                 class_names=None, verify_files=False, seed=None):
        if not isinstance(root, str) or not os.path.isdir(root):
            raise FileNotFoundError(f"ImageNet.root: dataset directory not found: {root!r}")
        if list_file is None:
            if not isinstance(split, str) or not split:
                raise ConfigError(f"ImageNet.split: expected a split name such as 'train' or 'val', got {split!r}")
            list_file = os.path.join(root, f"{split}_list.txt")
            if not os.path.isfile(list_file):
                found = sorted(f for f in os.listdir(root) if f.endswith("_list.txt"))
                raise FileNotFoundError(f"ImageNet: list file for split {split!r} not found: {list_file} "
                                        f"(list files in root: {found or 'none'}; or set list_file)")
        else:
            list_file = list_file if os.path.isabs(list_file) else os.path.join(root, list_file)
            if not os.path.isfile(list_file):
                raise FileNotFoundError(f"ImageNet.list_file: file not found: {list_file}")
        parsed = _parse_list_file(list_file, root)
        if not parsed:
            raise DataError(f"{list_file}: the list file has no samples")
        if num_classes is None:
            num_classes = max(label for _, label, _ in parsed) + 1
        elif not (isinstance(num_classes, int) and num_classes >= 1):
            raise ConfigError(f"ImageNet.num_classes: expected a positive int, got {num_classes!r}")
        for path, label, lineno in parsed:
            if not 0 <= label < num_classes:
                raise DataError(f"{list_file}:{lineno}: label {label} is outside [0, {num_classes})")
        to_check = parsed if verify_files else parsed[:1]
        for path, _, lineno in to_check:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{list_file}:{lineno}: image file not found: {path}")
        super().__init__([(p, label) for p, label, _ in parsed], num_classes,
                         _class_names(class_names, num_classes, "ImageNet.class_names"), transforms, seed)
        self.root, self.split, self.list_file = root, split, list_file
        self.list_lines = [lineno for _, _, lineno in parsed]

    def sample_source(self, index):
        return f"{self.list_file}:{self.list_lines[index]} ({self.samples[index][0]})"
        logger.info("ImageNet %s: %d images, %d classes from %s", split, len(self.samples), num_classes, list_file)


@DATASETS.register
class ImageFolder(ClassificationDataset):
    """Class-per-folder tree (`root[/split]/<class>/**/<image>`) as torchvision's ImageFolder:
    classes are the sorted sub-folder names, files are found recursively (following links) in
    sorted order and kept when their lower-cased name ends with one of `extensions`."""

    def __init__(self, root, split=None, transforms=None, extensions: Union[str, Tuple[str, ...]] = IMG_EXTENSIONS,
                 seed=None):
        if not isinstance(root, str):
            raise ConfigError(f"ImageFolder.root: expected a directory path, got {root!r}")
        folder = os.path.join(root, split) if split else root
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"ImageFolder.root: image folder not found: {folder!r}")
        if isinstance(extensions, str):
            extensions = (extensions,)
        if not (isinstance(extensions, (list, tuple)) and extensions and all(isinstance(e, str) for e in extensions)):
            raise ConfigError(f"ImageFolder.extensions: expected a file extension or a list of them, "
                              f"got {extensions!r}")
        extensions = tuple(e.lower() for e in extensions)
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if not classes:
            raise DataError(f"ImageFolder: no class sub-folders in {folder}")
        samples, empty = [], []
        for label, name in enumerate(classes):
            before = len(samples)
            for dirpath, _, filenames in sorted(os.walk(os.path.join(folder, name), followlinks=True)):
                for fname in sorted(filenames):
                    if fname.lower().endswith(extensions):
                        samples.append((os.path.join(dirpath, fname), label))
            if len(samples) == before:
                empty.append(name)
        if empty:
            raise DataError(f"ImageFolder: no images with extensions {list(extensions)} in class folder(s) "
                            f"{empty[:10]}{' ...' if len(empty) > 10 else ''} under {folder}")
        super().__init__(samples, len(classes), classes, transforms, seed)
        self.root, self.split = root, split
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        logger.info("ImageFolder %s: %d images, %d classes", folder, len(samples), len(classes))
