"""Training losses, registered in LOSSES: cross entropy for classification and segmentation,
soft-target cross entropy for mixup/cutmix, and DeiT's distillation loss."""
import math
import numbers
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .models.layers import resize_bilinear
from .registry import LOSSES, ConfigError

__all__ = ["CrossEntropyLoss", "SoftTargetCrossEntropy", "DistillationLoss", "build_loss"]


def build_loss(cfg, **extra):
    """Build the `loss` config section, e.g. {name: CrossEntropyLoss, label_smoothing: 0.1}.
    `extra` keywords (such as a built `teacher`) are passed to the constructor."""
    return LOSSES.build(cfg, where="loss", **extra)


@LOSSES.register
class CrossEntropyLoss(nn.Layer):
    """Cross entropy on logits, for classification ([B, K] with labels [B]) and segmentation
    ([B, K, h, w] with labels [B, H, W]; logits are bilinearly resized to H x W first,
    align_corners=False, as in the TokenFusion/GeminiFusion training code).

    The mean runs over labels that are not `ignore_index` (weighted by `weight[label]` when
    `weight` is given, as torch does); a batch with nothing left to count gives 0, not NaN.
    Label smoothing follows torch: (1 - eps) * nll + eps * mean over classes of -log p.
    Given a list/tuple of logits (a multimodal segmentor's per-modality outputs and their
    ensemble), it returns the sum of their losses, as the official TokenFusion and
    GeminiFusion `train()` do (the ensemble output is included there too).

    `ignore_index=None` ignores nothing. An ignore_index that is also a class index (255 with
    1000 ImageNet classes) is rejected rather than silently dropping that class."""

    def __init__(self, ignore_index: Optional[int] = 255, label_smoothing=0.0, weight=None):
        super().__init__()
        if ignore_index is not None and not (isinstance(ignore_index, numbers.Integral)
                                             and not isinstance(ignore_index, bool)):
            raise ConfigError(f"CrossEntropyLoss.ignore_index: expected an int or null, got {ignore_index!r}")
        if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= label_smoothing < 1.0):
            raise ConfigError(f"CrossEntropyLoss.label_smoothing: expected a number in [0, 1), "
                              f"got {label_smoothing!r}")
        if weight is not None:
            if not (isinstance(weight, (list, tuple)) and len(weight) > 0
                    and all(isinstance(w, numbers.Real) and w >= 0 for w in weight)):
                raise ConfigError(f"CrossEntropyLoss.weight: expected a list of per-class weights >= 0, "
                                  f"got {weight!r}")
            self.register_buffer("weight", paddle.to_tensor(list(weight), dtype="float32"), persistable=False)
        else:
            self.weight = None
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits, labels):
        if isinstance(logits, (list, tuple)):
            if len(logits) == 0:
                raise ValueError("CrossEntropyLoss: got an empty list of outputs")
            total = self._single(logits[0], labels)
            for out in logits[1:]:
                total = total + self._single(out, labels)
            return total
        return self._single(logits, labels)

    def _single(self, logits, labels):
        num_classes = logits.shape[1]
        if logits.ndim == 2:
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels.squeeze(1)
            if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
                raise ValueError(f"CrossEntropyLoss: logits {list(logits.shape)} need labels of shape "
                                 f"[{logits.shape[0]}], got {list(labels.shape)}")
            flat = logits
        elif logits.ndim == 4:
            if labels.ndim == 4 and labels.shape[1] == 1:
                labels = labels.squeeze(1)
            if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
                raise ValueError(f"CrossEntropyLoss: logits {list(logits.shape)} need labels of shape "
                                 f"[{logits.shape[0]}, H, W], got {list(labels.shape)}")
            if list(logits.shape[2:]) != list(labels.shape[1:]):
                logits = resize_bilinear(logits, labels.shape[1:])
            flat = logits.transpose([0, 2, 3, 1]).reshape([-1, num_classes])
        else:
            raise ValueError(f"CrossEntropyLoss: expected logits [B, K] or [B, K, h, w], got {list(logits.shape)}")
        if paddle.is_floating_point(labels):
            raise ValueError(f"CrossEntropyLoss: labels must be class indices (int), got {labels.dtype}; "
                             f"use SoftTargetCrossEntropy for mixup/cutmix targets")
        if self.ignore_index is not None and 0 <= self.ignore_index < num_classes:
            raise ValueError(f"CrossEntropyLoss: ignore_index={self.ignore_index} is a valid class index for "
                             f"{num_classes}-class logits, so that class would never be trained; set "
                             f"loss.ignore_index to null (or -100) for this task")
        if self.weight is not None and self.weight.shape[0] != num_classes:
            raise ValueError(f"CrossEntropyLoss: weight has {self.weight.shape[0]} entries but the logits have "
                             f"{num_classes} classes")

        labels = labels.reshape([-1]).astype("int64")
        if self.ignore_index is not None:
            valid = labels != self.ignore_index
        else:
            valid = paddle.ones_like(labels, dtype="bool")
        safe = paddle.where(valid, labels, paddle.zeros_like(labels))
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            value = int(paddle.masked_select(labels, bad)[0])
            raise ValueError(f"CrossEntropyLoss: label {value} is outside [0, {num_classes}) and is not "
                             f"ignore_index={self.ignore_index}")

        logp = F.log_softmax(flat.astype("float32"), axis=1)
        nll = -paddle.take_along_axis(logp, safe.unsqueeze(1), axis=1).squeeze(1)
        validf = valid.astype("float32")
        if self.weight is not None:
            w_label = paddle.gather(self.weight, safe) * validf
            smooth = -(logp * self.weight).sum(1)
        else:
            w_label = validf
            smooth = -logp.sum(1)
        eps = self.label_smoothing
        per = (1.0 - eps) * w_label * nll
        if eps > 0:
            per = per + (eps / num_classes) * smooth * validf
        denom = w_label.sum()
        denom = paddle.where(denom > 0, denom, paddle.ones_like(denom))
        return per.sum() / denom


@LOSSES.register
class SoftTargetCrossEntropy(nn.Layer):
    """mean over the batch of sum_k -target_k * log_softmax(logits)_k (mixup/cutmix targets)."""

    def forward(self, logits, target):
        if isinstance(logits, (list, tuple)):
            raise ValueError("SoftTargetCrossEntropy: got a tuple of outputs; a distilled model's "
                             "(cls, dist) pair goes through DistillationLoss")
        if list(logits.shape) != list(target.shape):
            raise ValueError(f"SoftTargetCrossEntropy: target shape {list(target.shape)} must equal logits shape "
                             f"{list(logits.shape)} (soft targets come from Mixup)")
        logp = F.log_softmax(logits.astype("float32"), axis=-1)
        return (-target.astype("float32") * logp).sum(-1).mean()


_DISTILL_TYPES = ("none", "soft", "hard")


@LOSSES.register
class DistillationLoss(nn.Layer):
    """DeiT distillation: (1 - alpha) * base(cls_logits, labels) + alpha * distill(dist_logits, teacher).

    Called as `loss(outputs, labels, inputs)` where `outputs` is the student's training output
    `(cls_logits, dist_logits)` and `inputs` the images the teacher sees. 'hard' uses cross
    entropy against the teacher's argmax; 'soft' uses KL(teacher || student) at temperature
    `tau`, times tau^2, divided by the number of logits (DeiT's choice); 'none' returns the
    base loss on the class logits only.

    `base_loss` is a loss config ({name: ...}) or a built loss. `teacher` is a paddle Layer
    given by the caller; it runs in eval mode under no_grad and is not a sublayer of this loss,
    so its weights are neither saved with nor optimised through it."""

    needs_inputs = True  # tells the engine to pass the images as a third argument

    def __init__(self, base_loss, teacher=None, distillation_type="hard", alpha=0.5, tau=1.0):
        super().__init__()
        if distillation_type not in _DISTILL_TYPES:
            raise ConfigError(f"DistillationLoss.distillation_type: expected one of {list(_DISTILL_TYPES)}, "
                              f"got {distillation_type!r}")
        if not (isinstance(alpha, numbers.Real) and 0.0 <= alpha <= 1.0):
            raise ConfigError(f"DistillationLoss.alpha: expected a number in [0, 1], got {alpha!r}")
        if not (isinstance(tau, numbers.Real) and tau > 0):
            raise ConfigError(f"DistillationLoss.tau: expected a positive number, got {tau!r}")
        if distillation_type != "none" and not callable(teacher):
            raise ConfigError(f"DistillationLoss.teacher: distillation_type '{distillation_type}' needs a teacher "
                              f"model (a paddle Layer built by the caller), got {teacher!r}")
        if hasattr(base_loss, "get"):
            base_loss = LOSSES.build(base_loss, where="loss.base_loss")
        elif not callable(base_loss):
            raise ConfigError(f"DistillationLoss.base_loss: expected a loss config {{name: ...}} or a loss, "
                              f"got {base_loss!r}")
        self.base_loss = base_loss
        object.__setattr__(self, "teacher", teacher)  # deliberately not registered as a sublayer
        if teacher is not None and hasattr(teacher, "eval"):
            teacher.eval()
        self.distillation_type = distillation_type
        self.alpha = float(alpha)
        self.tau = float(tau)

    def teacher_logits(self, inputs):
        if hasattr(self.teacher, "eval"):
            self.teacher.eval()
        with paddle.no_grad():
            out = self.teacher(inputs)
        if isinstance(out, (list, tuple)):
            raise ValueError(f"DistillationLoss: the teacher returned a {type(out).__name__} of {len(out)} "
                             f"outputs in eval mode; it must return one logits tensor [B, K]")
        return out.detach()

    def forward(self, outputs, labels, inputs=None):
        dist_logits = None
        if isinstance(outputs, (list, tuple)):
            if len(outputs) != 2:
                raise ValueError(f"DistillationLoss: expected the student's (cls_logits, dist_logits), "
                                 f"got {len(outputs)} outputs")
            outputs, dist_logits = outputs
        base = self.base_loss(outputs, labels)
        if self.distillation_type == "none":
            return base
        if dist_logits is None:
            raise ValueError("DistillationLoss: distillation needs the student to return (cls_logits, "
                             "dist_logits) in train mode; got a single tensor (is the model a distilled one?)")
        if inputs is None:
            raise ValueError("DistillationLoss: call as loss(outputs, labels, inputs); the teacher needs the images")
        teacher = self.teacher_logits(inputs)
        if list(teacher.shape) != list(dist_logits.shape):
            raise ValueError(f"DistillationLoss: teacher logits {list(teacher.shape)} do not match the student's "
                             f"distillation logits {list(dist_logits.shape)}")
        if self.distillation_type == "soft":
            t = self.tau
            logp_s = F.log_softmax(dist_logits.astype("float32") / t, axis=1)
            logp_t = F.log_softmax(teacher.astype("float32") / t, axis=1)
            distill = (logp_t.exp() * (logp_t - logp_s)).sum() * (t * t) / float(math.prod(dist_logits.shape))
        else:
            distill = F.cross_entropy(dist_logits.astype("float32"), teacher.argmax(axis=1), reduction="mean")
        return base * (1.0 - self.alpha) + distill * self.alpha
