"""Evaluation metrics: top-k classification accuracy and confusion-matrix segmentation scores.

Segmentation scores follow the convention shared by mmseg and TokenFusion's `getScores`:
the confusion matrix has ground truth in rows and predictions in columns;
IoU_c = TP / (TP + FP + FN) and Acc_c = TP / (TP + FN). A class with an empty
denominator (for IoU: absent from both label and prediction; for Acc: absent from the
label) gets NaN and is left out of the mean (nanmean). A class that is predicted but
never present in the label therefore counts with IoU 0. All scores are percentages.
"""
import numpy as np
import paddle

__all__ = ["ConfusionMatrix", "topk_accuracy"]


def _to_numpy(x, name):
    if isinstance(x, paddle.Tensor):
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple, int, float, np.generic)):
        return np.asarray(x)
    raise TypeError(f"{name} must be a numpy array or paddle.Tensor, got {type(x).__name__}")


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes matrix (rows: label, columns: prediction).

    `update(pred, label)`: label is (N,)H,W class indices with `ignore_index` for pixels to
    skip; pred is either indices of the same shape or logits with one more axis, the class
    axis right before H,W (NCHW for batches, CHW for one image), which is argmax-ed.
    For multi-GPU evaluation all-reduce `matrix` across ranks, then `merge` or assign it
    and call `compute()`.
    """

    def __init__(self, num_classes, ignore_index=255):
        if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes <= 0:
            raise ValueError(f"ConfusionMatrix: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self):
        self.matrix[...] = 0

    def update(self, pred, label):
        n = self.num_classes
        label = _to_numpy(label, "label")
        if not isinstance(pred, paddle.Tensor):
            pred = _to_numpy(pred, "pred")
        label_shape = label.shape
        if len(pred.shape) == len(label_shape) + 1:
            if len(pred.shape) < 3:
                raise ValueError(f"ConfusionMatrix.update: logits of shape {tuple(pred.shape)} need a class "
                                 f"axis before H, W (label shape {label_shape})")
            if pred.shape[-3] != n:
                raise ValueError(f"ConfusionMatrix.update: logits have {pred.shape[-3]} classes on axis -3, "
                                 f"expected num_classes={n}")
            # argmax where the logits live (on the GPU for paddle) before copying to host
            pred = paddle.argmax(pred, axis=-3) if isinstance(pred, paddle.Tensor) else pred.argmax(axis=-3)
        pred = _to_numpy(pred, "pred")
        if pred.shape != label.shape:
            raise ValueError(f"ConfusionMatrix.update: prediction shape {pred.shape} does not match label "
                             f"shape {label.shape}; resize logits to the label size first")
        if not np.issubdtype(label.dtype, np.integer):
            raise TypeError(f"ConfusionMatrix.update: label must hold integers, got {label.dtype}")
        if not np.issubdtype(pred.dtype, np.integer):
            raise TypeError(f"ConfusionMatrix.update: class-index predictions must be integers, got "
                            f"{pred.dtype} (pass logits with a class axis to have them argmax-ed)")
        label = label.reshape(-1).astype(np.int64, copy=False)
        pred = pred.reshape(-1).astype(np.int64, copy=False)
        keep = label != self.ignore_index
        label, pred = label[keep], pred[keep]
        bad = (label < 0) | (label >= n)
        if bad.any():
            raise ValueError(f"ConfusionMatrix.update: label value {int(label[bad][0])} is outside "
                             f"[0, {n}) and is not ignore_index={self.ignore_index}")
        bad = (pred < 0) | (pred >= n)
        if bad.any():
            raise ValueError(f"ConfusionMatrix.update: predicted class {int(pred[bad][0])} is outside [0, {n})")
        self.matrix += np.bincount(label * n + pred, minlength=n * n).reshape(n, n)
        return self

    def merge(self, other):
        """Add another matrix (numpy, paddle.Tensor or ConfusionMatrix), e.g. from another rank."""
        m = other.matrix if isinstance(other, ConfusionMatrix) else _to_numpy(other, "other")
        if m.shape != self.matrix.shape:
            raise ValueError(f"ConfusionMatrix.merge: shape {m.shape} does not match {self.matrix.shape}")
        self.matrix += m.astype(np.int64)
        return self

    def compute(self):
        """Dict of percentages: miou, pixel_acc, mean_acc, per_class_iou, per_class_acc (NaN = absent)."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        in_label = m.sum(axis=1)
        in_pred = m.sum(axis=0)
        total = m.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = tp / (in_label + in_pred - tp)
            acc = tp / in_label
        iou = np.where(in_label + in_pred > 0, iou, np.nan) * 100.0
        acc = np.where(in_label > 0, acc, np.nan) * 100.0
        nan = float("nan")
        return {
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else nan,
            "pixel_acc": float(tp.sum() / total * 100.0) if total > 0 else nan,
            "mean_acc": float(np.nanmean(acc)) if np.isfinite(acc).any() else nan,
            "per_class_iou": iou.tolist(),
            "per_class_acc": acc.tolist(),
        }


def topk_accuracy(logits, labels, ks=(1, 5)):
    """Top-k accuracy in percent for (N, C) logits, returned as {"top1": .., "top5": ..}.

    labels are (N,) class indices or (N, C) soft targets (mixup/cutmix), reduced by argmax.
    A sample counts for top-k when fewer than k other classes score at least as high as the
    true class: ties are counted against the prediction, so a constant output scores 0
    rather than 100.
    """
    logits = _to_numpy(logits, "logits")
    labels = _to_numpy(labels, "labels")
    if logits.ndim != 2:
        raise ValueError(f"topk_accuracy: logits must be (N, C), got shape {logits.shape}")
    n, c = logits.shape
    if labels.ndim == 2 and labels.shape == logits.shape:
        labels = labels.argmax(axis=1)
    elif labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (n,):
        raise ValueError(f"topk_accuracy: labels must be ({n},) indices or ({n}, {c}) soft targets, "
                         f"got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"topk_accuracy: hard labels must be integers, got {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= c):
        bad = labels[(labels < 0) | (labels >= c)][0]
        raise ValueError(f"topk_accuracy: label {int(bad)} is outside [0, {c})")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= c:
            raise ValueError(f"topk_accuracy: k={k!r} must be an int in [1, {c}] (number of classes)")
    if n == 0:
        raise ValueError("topk_accuracy: got an empty batch")
    true_score = logits[np.arange(n), labels][:, None]
    # Rank of the true class = number of other classes scoring >= it.
    rank = (logits >= true_score).sum(axis=1) - 1
    rank[np.isnan(true_score[:, 0])] = c  # a NaN score for the true class is never a hit
    return {f"top{k}": float((rank < k).mean() * 100.0) for k in ks}
