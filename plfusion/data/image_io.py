"""Reading images from disk with opencv, with errors that name the file."""
import os

import cv2
import numpy as np

__all__ = ["read_image", "DataError"]


class DataError(ValueError):
    """Bad dataset content: the message names the file (and line) it came from."""


_FLAGS = {
    "rgb": cv2.IMREAD_COLOR,          # HxWx3 uint8, converted BGR -> RGB
    "gray": cv2.IMREAD_GRAYSCALE,     # HxW uint8
    "unchanged": cv2.IMREAD_UNCHANGED,  # as stored (16-bit depth stays uint16)
}


def read_image(path, mode="rgb"):
    """Read `path` as 'rgb' (HxWx3 uint8 RGB), 'gray' (HxW) or 'unchanged'."""
    if mode not in _FLAGS:
        raise ValueError(f"read_image mode must be one of {sorted(_FLAGS)}, got {mode!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    buf = np.fromfile(path, dtype=np.uint8)  # fromfile+imdecode also handles non-ASCII paths
    img = cv2.imdecode(buf, _FLAGS[mode]) if buf.size else None
    if img is None:
        raise DataError(f"cannot decode image file (corrupt or not an image): {path}")
    if mode == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img
