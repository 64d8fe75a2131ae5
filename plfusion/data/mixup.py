"""Mixup / CutMix on a batch of paddle tensors, with timm's 'batch' mode semantics.

One lambda per batch; each image is mixed with its mirror in the batch (x.flip(0)). CutMix
pastes one box, and lambda is then recomputed from the box area actually inside the image.
Targets become smoothed one-hot rows mixed with the same lambda, for SoftTargetCrossEntropy.
"""
import numbers

import numpy as np
import paddle

from ..registry import ConfigError

__all__ = ["Mixup", "mixup_target", "cutmix_bbox"]


def mixup_target(labels, num_classes, lam=1.0, smoothing=0.0):
    """Smoothed one-hot of `labels` mixed with the batch-flipped one: lam * y + (1 - lam) * y.flip(0)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y = paddle.nn.functional.one_hot(labels.astype("int64"), num_classes) * (on - off) + off
    return y * lam + y.flip([0]) * (1.0 - lam)


def cutmix_bbox(height, width, lam, rng, minmax=None):
    """(top, bottom, left, right) of the box to paste and the lambda implied by its clipped area.

    With `minmax`, each side is a uniform fraction of the image side in [min, max) (lam unused)."""
    if minmax is not None:
        cut_h = int(rng.integers(int(height * minmax[0]), int(height * minmax[1])))
        cut_w = int(rng.integers(int(width * minmax[0]), int(width * minmax[1])))
        top = int(rng.integers(0, height - cut_h))
        left = int(rng.integers(0, width - cut_w))
        bottom, right = top + cut_h, left + cut_w
    else:
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy = int(rng.integers(0, height))
        cx = int(rng.integers(0, width))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    area = (bottom - top) * (right - left)
    return (int(top), int(bottom), int(left), int(right)), 1.0 - area / float(height * width)


class Mixup:
    """Mixup (prob 1 - switch_prob) or CutMix (switch_prob) on the whole batch, with probability `prob`.

    `x, target = Mixup(...)(x, labels)`: x is [B, C, H, W] float, labels are int [B] (or [B, 1]);
    target is [B, num_classes] float32 whose rows sum to 1. The lambda and kind of the last
    call are kept in `last_lam` / `last_mode` ('mixup', 'cutmix' or None when not applied)."""

    def __init__(self, mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 correct_lam=True, label_smoothing=0.1, num_classes=1000, seed=None):
        for key, val in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not (isinstance(val, numbers.Real) and val >= 0):
                raise ConfigError(f"Mixup.{key}: expected a number >= 0 (0 disables it), got {val!r}")
        for key, val in (("prob", prob), ("switch_prob", switch_prob)):
            if not (isinstance(val, numbers.Real) and 0 <= val <= 1):
                raise ConfigError(f"Mixup.{key}: expected a probability in [0, 1], got {val!r}")
        if not (isinstance(label_smoothing, numbers.Real) and 0 <= label_smoothing < 1):
            raise ConfigError(f"Mixup.label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
        if not (isinstance(num_classes, numbers.Integral) and num_classes >= 1):
            raise ConfigError(f"Mixup.num_classes: expected a positive int, got {num_classes!r}")
        if cutmix_minmax is not None:
            if not (isinstance(cutmix_minmax, (list, tuple)) and len(cutmix_minmax) == 2
                    and 0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1):
                raise ConfigError(f"Mixup.cutmix_minmax: expected [min, max] with 0 < min < max <= 1, "
                                  f"got {cutmix_minmax!r}")
            cutmix_alpha = 1.0  # as timm: minmax boxes are always on, alpha only picks the branch
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ConfigError("Mixup: both mixup_alpha and cutmix_alpha are 0, so nothing would be mixed; "
                              "set one > 0 or do not configure mixup")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.cutmix_minmax = tuple(cutmix_minmax) if cutmix_minmax is not None else None
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.rng = np.random.default_rng(seed)
        self.enabled = True  # a train loop may switch mixing off for the last epochs
        self.last_lam, self.last_mode, self.last_box = 1.0, None, None

    def sample_params(self):
        """(lam, use_cutmix) for one batch."""
        if not self.enabled or self.rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, x, labels):
        if not isinstance(x, paddle.Tensor) or x.ndim != 4:
            raise ValueError(f"Mixup: expected images as a [B, C, H, W] paddle.Tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels.squeeze(1)
        if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
            raise ValueError(f"Mixup: expected integer labels of shape [{x.shape[0]}], got {list(labels.shape)}")
        if paddle.is_floating_point(labels):
            raise ValueError(f"Mixup: labels must be class indices (int), got dtype {labels.dtype}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"Mixup: label {lo if lo < 0 else hi} is outside [0, num_classes={self.num_classes})")
        lam, use_cutmix = self.sample_params()
        self.last_box = None
        if lam == 1.0:
            self.last_lam, self.last_mode = 1.0, None
        elif use_cutmix:
            box, area_lam = cutmix_bbox(x.shape[2], x.shape[3], lam, self.rng, self.cutmix_minmax)
            if self.correct_lam or self.cutmix_minmax is not None:
                lam = area_lam
            top, bottom, left, right = box
            x = x.clone()
            if bottom > top and right > left:
                x[:, :, top:bottom, left:right] = x.flip([0])[:, :, top:bottom, left:right]
            self.last_lam, self.last_mode, self.last_box = lam, "cutmix", box
        else:
            x = x * lam + x.flip([0]) * (1.0 - lam)
            self.last_lam, self.last_mode = lam, "mixup"
        return x, mixup_target(labels, self.num_classes, self.last_lam, self.label_smoothing)

    def __repr__(self):
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"cutmix_minmax={self.cutmix_minmax}, prob={self.prob}, switch_prob={self.switch_prob}, "
                f"label_smoothing={self.label_smoothing}, num_classes={self.num_classes})")
