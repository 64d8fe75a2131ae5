"""Prediction pictures of a segmentation run: one PNG per val sample, RGB | depth | ground truth |
prediction, with a class legend underneath.

The trainer writes them after its final evaluation (and `Trainer.evaluate` after evaluating)
when the config asks for some, on rank 0 only:

    eval:
      save_predictions: 4      # the first 4 val samples -> <output_dir>/predictions/val_0000.png ...

Inputs reach the model normalised; for the pictures they are mapped back with the statistics of
the dataset's own `Normalize` step. The prediction is the model's last output (the ensemble of a
fused model), resized to the label, blended over the RGB image (over a grey rendering of the depth
picture when there is no RGB input). Ignored ground-truth pixels are black.
"""
import logging
import os

import cv2
import numpy as np
import paddle

from ..data.seg_transforms import Normalize
from ..models.layers import resize_bilinear
from ..utils.visualize import colorize, depth_to_rgb, overlay, panel, save_image

__all__ = ["save_predictions", "display_inputs", "legend", "PREDICTIONS_DIR"]

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"


def _normalize_stats(dataset):
    """{modality: (mean, std)} of the dataset's Normalize step; {} when it has none."""
    steps = getattr(getattr(dataset, "transforms", None), "transforms", None) or []
    for step in steps:
        if isinstance(step, Normalize):
            return {mod: (np.asarray(st["mean"], np.float32), np.asarray(st["std"], np.float32))
                    for mod, st in step.stats.items()}
    return {}


def display_inputs(dataset, inputs):
    """Model inputs of one sample (C x H x W float arrays, in the dataset's modality order) as
    {modality: H x W x 3 uint8 picture}: RGB un-normalised, depth as a colour map."""
    stats = _normalize_stats(dataset)
    modalities = list(getattr(dataset, "modalities", None) or [f"input{i}" for i in range(len(inputs))])
    if len(modalities) != len(inputs):
        raise ValueError(f"display_inputs: {len(inputs)} inputs but the dataset lists modalities {modalities}")
    out = {}
    for mod, x in zip(modalities, inputs):
        x = np.asarray(x, np.float32).transpose(1, 2, 0)
        if mod in stats:
            mean, std = stats[mod]
            x = x * std + mean    # mean/std have 1 or C entries; both broadcast over the channels
        if mod == "rgb" and x.shape[2] == 3:
            out[mod] = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:   # depth and other one-channel modalities (tiled to 3 channels for the model)
            out[mod] = depth_to_rgb(x[..., 0])
    return out


def legend(class_names, palette, width, swatch=12, row_height=20, background=255):
    """A strip of colour swatches with class names, wrapped to `width` pixels."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    items = []
    for k, name in enumerate(class_names):
        text_w = cv2.getTextSize(str(name), font, scale, 1)[0][0]
        items.append((k, str(name), swatch + 4 + text_w + 12))
    rows, row, used = [], [], 0
    for item in items:
        if row and used + item[2] > width:
            rows.append(row)
            row, used = [], 0
        row.append(item)
        used += item[2]
    rows.append(row)
    strip = np.full((row_height * len(rows) + 4, width, 3), background, np.uint8)
    for r, row in enumerate(rows):
        x, y = 4, 4 + r * row_height
        for k, name, w in row:
            colour = tuple(int(c) for c in palette[k])
            cv2.rectangle(strip, (x, y), (x + swatch, y + swatch), colour, -1)
            cv2.rectangle(strip, (x, y), (x + swatch, y + swatch), (0, 0, 0), 1)
            cv2.putText(strip, name, (x + swatch + 4, y + swatch - 2), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
            x += w
    return strip


def _forward(model, inputs, amp):
    if amp is None:
        return model(inputs)
    level, dtype = amp
    with paddle.amp.auto_cast(enable=True, level=level, dtype=dtype):
        return model(inputs)


def _enlarge(image, min_width):
    """Whole-number nearest-neighbour upscaling so that small samples stay readable (pixels stay square)."""
    factor = -(-min_width // image.shape[1])
    if factor <= 1:
        return image
    return cv2.resize(image, (image.shape[1] * factor, image.shape[0] * factor), interpolation=cv2.INTER_NEAREST)


@paddle.no_grad()
def save_predictions(model, loader, count, out_dir, amp=None, alpha=0.6, min_width=180):
    """Write pictures of the first `count` samples of `loader` to `out_dir`; returns their paths.

    `loader` yields (inputs, labels) like the trainer's val loader, and its dataset provides
    `palette`, `class_names`, `ignore_index` and `modalities` (every segmentation dataset here does).
    Samples narrower than `min_width` pixels are enlarged by a whole factor for the picture."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"save_predictions: count must be an integer >= 0, got {count!r}")
    dataset = loader.dataset
    for attr in ("palette", "class_names"):
        if not hasattr(dataset, attr):
            raise ValueError(f"save_predictions: {type(dataset).__name__} has no '{attr}'; prediction pictures "
                             f"are for segmentation datasets")
    if count == 0:
        return []
    palette = np.asarray(dataset.palette)
    ignore = getattr(dataset, "ignore_index", 255)
    was_training = model.training
    model.eval()
    paths = []
    try:
        for inputs, labels in loader:
            if len(paths) >= count:
                break
            outputs = _forward(model, inputs, amp)
            logits = (outputs[-1] if isinstance(outputs, (list, tuple)) else outputs).astype("float32")
            if logits.ndim != 4:
                raise ValueError(f"save_predictions: expected segmentation logits [B, K, h, w], got "
                                 f"{list(logits.shape)}")
            size = list(labels.shape[-2:])
            if list(logits.shape[-2:]) != size:
                logits = resize_bilinear(logits, size)
            preds = paddle.argmax(logits, axis=1).numpy()
            labels = labels.numpy()
            streams = [x.numpy() for x in inputs] if isinstance(inputs, (list, tuple)) else [inputs.numpy()]
            for b in range(labels.shape[0]):
                if len(paths) >= count:
                    break
                shown = display_inputs(dataset, [s[b] for s in streams])
                pred, label = preds[b], labels[b]
                if "rgb" in shown:
                    base = shown["rgb"]
                else:   # class colours blended into a colour-mapped depth are unreadable: blend into grey
                    grey = cv2.cvtColor(next(iter(shown.values())), cv2.COLOR_RGB2GRAY)
                    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
                valid = label != ignore
                acc = 100.0 * float((pred[valid] == label[valid]).mean()) if valid.any() else float("nan")
                images = list(shown.values()) + [colorize(label, palette, ignore), overlay(base, pred, palette, alpha)]
                captions = list(shown) + ["ground truth", f"prediction: {acc:.1f}% px"]
                sheet = panel([_enlarge(img, min_width) for img in images], captions)
                sheet = np.concatenate([sheet, legend(dataset.class_names, palette, sheet.shape[1])], axis=0)
                paths.append(save_image(os.path.join(out_dir, f"val_{len(paths):04d}.png"), sheet))
    finally:
        if was_training:
            model.train()
    logger.info("wrote %d prediction picture(s) to %s", len(paths), out_dir)
    return paths
