"""Evaluation over a (sharded) loader, reduced over all ranks so every rank reports the same figures.

The task follows from the model's output:
- [B, K] logits: classification, top-1 / top-k accuracy from summed hit counts;
- [B, K, h, w] logits (or a list of them, as a fused multimodal Segmentor returns: one per
  modality, then the ensemble): segmentation. Logits are resized bilinearly to the label
  size, then argmax-ed into one confusion matrix per output. The headline `miou`,
  `pixel_acc` and `mean_acc` are those of the last output (the ensemble); per-output mIoU
  is reported as `miou_<name>`.

The eval loader gives each rank a disjoint shard (see plfusion.data.loader.ShardBatchSampler),
so summing counts and confusion matrices over ranks counts every sample exactly once.
"""
import logging
import time

import numpy as np
import paddle
from tqdm import tqdm

from ..metrics import ConfusionMatrix, topk_accuracy
from ..models.layers import resize_bilinear
from .distributed import all_reduce_sum, is_main_process

__all__ = ["Evaluator"]

logger = logging.getLogger(__name__)


def _labels_of(dataset_or_none, count):
    names = list(getattr(dataset_or_none, "modalities", None) or [])
    if count == 1:
        return [""]
    if len(names) == count - 1:
        return names + ["ensemble"]
    return [f"out{i}" for i in range(count - 1)] + ["ensemble"]


class _Tally:
    """The running counts of one model setting: top-k hits (classification) or one confusion matrix per
    output (segmentation); the task is read from the first outputs."""

    def __init__(self, evaluator, loader):
        self.ev, self.loader = evaluator, loader
        self.task, self.counts, self.matrices, self.names = None, None, None, None
        self.samples, self.classes = 0, 0

    def update(self, outputs, labels):
        outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if self.task is None:
            self.task = "segmentation" if outs[0].ndim == 4 else "classification"
            self.classes = outs[0].shape[1]
            if self.task == "classification":
                self.counts = np.zeros(len(self.ev.topk) + 1, dtype=np.int64)
            else:
                k = self.ev.num_classes or outs[-1].shape[1]
                self.matrices = [ConfusionMatrix(k, self.ev.ignore_index) for _ in outs]
                self.names = _labels_of(getattr(self.loader, "dataset", None), len(outs))
        if self.task == "classification":
            logits = outs[0].astype("float32").numpy()
            y = labels.numpy().reshape(-1)
            ks = [min(k, logits.shape[1]) for k in self.ev.topk]
            acc = topk_accuracy(logits, y, ks)
            n = logits.shape[0]
            for j, k in enumerate(ks):
                self.counts[j] += int(round(acc[f"top{k}"] * n / 100.0))
            self.counts[-1] += n
        else:
            size = list(labels.shape[-2:])
            for cm, out in zip(self.matrices, outs):
                out = out.astype("float32")
                if list(out.shape[-2:]) != size:
                    out = resize_bilinear(out, size)
                cm.update(paddle.argmax(out, axis=1), labels)
            n = labels.shape[0]
        self.samples += n
        return n

    def result(self):
        return self.ev._reduce(self.task, self.counts, self.matrices, self.names, self.samples, self.classes)


class Evaluator:
    """`Evaluator(num_classes, ignore_index, topk).run(model, loader, ...)` -> {metric: value}."""

    def __init__(self, num_classes=None, ignore_index=255, topk=(1, 5), amp=None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.topk = tuple(topk)
        self.amp = amp  # (level, dtype) for auto_cast on GPU, or None

    def _forward(self, model, inputs):
        if self.amp is None:
            return model(inputs)
        level, dtype = self.amp
        with paddle.amp.auto_cast(enable=True, level=level, dtype=dtype):
            return model(inputs)

    @paddle.no_grad()
    def run(self, model, loader, desc="eval", max_batches=None):
        was_training = model.training
        model.eval()
        tally = _Tally(self, loader)
        total = len(loader) if max_batches is None else min(len(loader), max_batches)
        bar = tqdm(total=total, desc=desc, disable=not is_main_process(), leave=False, dynamic_ncols=True)
        try:
            for i, (inputs, labels) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                tally.update(self._forward(model, inputs), labels)
                bar.update(1)
        finally:
            bar.close()
            if was_training:
                model.train()
        return tally.result()

    @paddle.no_grad()
    def compare(self, model, loader, settings, desc="compare"):
        """The metrics and forward throughput of several model settings in one data pass.

        `settings` is {label: fn(model)}, each fn putting the model into one setting (a ToMe r or
        merge ratio). Every batch runs under every setting, in an order that rotates from batch to
        batch, so a machine whose load changes slows all settings alike. Only the forward passes
        are timed, and the first batch is a warm-up (not timed) when there is more than one.
        Returns {label: run()'s metrics + {"ips", "timed_samples", "seconds"}}, with counts summed
        and images/s added up over ranks."""
        labels = list(settings)
        if not labels:
            raise ValueError("Evaluator.compare: no settings given")
        was_training = model.training
        model.eval()
        tallies = {label: _Tally(self, loader) for label in labels}
        timing = {label: np.zeros(2, dtype=np.float64) for label in labels}   # seconds, images
        total = len(loader)
        sync = not paddle.device.get_device().startswith("cpu")
        bar = tqdm(total=total, desc=desc, disable=not is_main_process(), leave=False, dynamic_ncols=True)
        try:
            for i, (inputs, targets) in enumerate(loader):
                shift = i % len(labels)
                for label in labels[shift:] + labels[:shift]:
                    settings[label](model)
                    start = time.perf_counter()
                    outputs = self._forward(model, inputs)
                    if sync:
                        paddle.device.synchronize()
                    elapsed = time.perf_counter() - start
                    n = tallies[label].update(outputs, targets)
                    if i > 0 or total == 1:
                        timing[label] += (elapsed, n)
                bar.update(1)
        finally:
            bar.close()
            if was_training:
                model.train()
        out = {}
        for label in labels:
            res = tallies[label].result()
            seconds, images = timing[label]
            ips = float(all_reduce_sum(np.array([images / seconds if seconds > 0 else 0.0]))[0])
            res.update(ips=ips, timed_samples=int(all_reduce_sum(np.array([images], np.int64))[0]),
                       seconds=float(seconds))
            out[label] = res
        return out

    def _reduce(self, task, counts, matrices, names, samples, classes):
        # Ranks whose shard was empty still join the reduction with zeros of the agreed shape.
        flags = all_reduce_sum(np.array([task == "classification", task == "segmentation", classes], dtype=np.int64))
        if flags[0] and flags[1]:
            raise RuntimeError("evaluation: ranks disagree on the task (classification vs segmentation)")
        if flags[0]:
            counts = all_reduce_sum(counts if counts is not None else np.zeros(len(self.topk) + 1, np.int64))
            n = int(counts[-1])
            classes = int(flags[2]) // int(flags[0])
            # top-k with k >= the number of classes is always 100%: not reported
            result = {f"top{k}": float(counts[j]) / n * 100.0 for j, k in enumerate(self.topk) if k < classes or j == 0}
            result["samples"] = n
            return result
        if flags[1]:
            if matrices is None:
                raise RuntimeError("evaluation: this rank's shard is empty; use fewer processes than val samples")
            for cm in matrices:
                cm.matrix = all_reduce_sum(cm.matrix)
            scores = [cm.compute() for cm in matrices]
            result = {k: scores[-1][k] for k in ("miou", "pixel_acc", "mean_acc")}
            result["per_class_iou"] = scores[-1]["per_class_iou"]
            if len(matrices) > 1:
                for name, s in zip(names, scores):
                    result[f"miou_{name}"] = s["miou"]
            result["samples"] = int(all_reduce_sum(np.array([samples], np.int64))[0])
            return result
        raise RuntimeError("evaluation: the loader produced no batches")
