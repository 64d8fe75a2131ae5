"""Pictures of segmentation results: colourised label maps, overlays on the RGB image, captioned panels.

All images are uint8 HxWx3 RGB arrays; `save_image` writes one to disk (PNG/JPEG by extension).
"""
import os

import cv2
import numpy as np

__all__ = ["colorize", "overlay", "depth_to_rgb", "panel", "save_image"]


def _palette(palette):
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 1:
        raise ValueError(f"palette must be a non-empty list of [r, g, b] colours, got shape {list(pal.shape)}")
    return pal.astype(np.uint8)


def _valid(label, num_classes, ignore_index):
    valid = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        valid &= label != ignore_index
    return valid


def colorize(label, palette, ignore_index=255):
    """HxW class map -> HxWx3 uint8: class k gets palette[k]; ignored or out-of-range pixels are black."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"colorize: expected an HxW class map, got shape {list(label.shape)}")
    pal = _palette(palette)
    out = np.zeros(label.shape + (3,), np.uint8)
    valid = _valid(label, len(pal), ignore_index)
    out[valid] = pal[label[valid]]
    return out


def overlay(image, label, palette, alpha=0.5, ignore_index=255):
    """Blend the colourised `label` over `image` (HxWx3 uint8, same HxW): alpha * colour +
    (1 - alpha) * image on labelled pixels; ignored pixels show the image unchanged."""
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay: image must be HxWx3 uint8, got {image.dtype} of shape {list(image.shape)}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"overlay: label is {label.shape[0]}x{label.shape[1]} but the image is "
                         f"{image.shape[0]}x{image.shape[1]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    colour = colorize(label, palette, ignore_index).astype(np.float32)
    valid = _valid(label, len(_palette(palette)), ignore_index)[..., None]
    blended = image.astype(np.float32) * (1.0 - alpha) + colour * alpha
    return np.where(valid, np.rint(blended), image).astype(np.uint8)


def depth_to_rgb(depth):
    """A depth map (HxW or HxWx1/3, any numeric range) as a colour image for viewing: near is warm.

    Scaled by its own min/max over non-zero pixels (zeros are sensor holes, shown black)."""
    d = np.asarray(depth, np.float32)
    if d.ndim == 3:
        d = d[..., 0]
    if d.ndim != 2:
        raise ValueError(f"depth_to_rgb: expected an HxW depth map, got shape {list(np.asarray(depth).shape)}")
    valid = d > 0
    lo, hi = (float(d[valid].min()), float(d[valid].max())) if valid.any() else (0.0, 1.0)
    scaled = np.clip((d - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    grey = np.rint((1.0 - scaled) * 255).astype(np.uint8)
    out = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out[~valid] = 0
    return out


def panel(images, captions=None, gap=4, caption_height=24, background=255):
    """Images side by side (each padded to the tallest), with a caption strip above each.

    images: HxWx3 uint8 arrays (HxW greyscale is expanded); captions: one string per image, or None."""
    if not images:
        raise ValueError("panel: no images given")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"panel: {len(images)} images but {len(captions)} captions")
    tiles = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"panel: image {i} must be HxWx3 uint8, got {img.dtype} of shape {list(img.shape)}")
        tiles.append(img)
    strip = caption_height if captions is not None else 0
    height = max(t.shape[0] for t in tiles) + strip
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    sheet = np.full((height, width, 3), background, np.uint8)
    x = 0
    for i, tile in enumerate(tiles):
        h, w = tile.shape[:2]
        sheet[strip:strip + h, x:x + w] = tile
        if captions is not None:   # drawn in the tile's own strip, so a long caption is cut at its edge
            cap = np.full((strip, w, 3), background, np.uint8)
            cv2.putText(cap, str(captions[i]), (4, strip - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                        cv2.LINE_AA)
            sheet[:strip, x:x + w] = cap
        x += w + gap
    return sheet


def save_image(path, image):
    """Write an HxWx3 uint8 RGB image (PNG, JPEG, ... by extension); raises OSError if it cannot."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"save_image: expected HxWx3 uint8 RGB, got {image.dtype} of shape {list(image.shape)}")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"save_image: could not write {path} (unknown extension or unwritable path)")
    return path
