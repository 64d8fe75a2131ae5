"""Samples that fail to load: one clear error in the training process, or skipped and counted.

Paddle's DataLoader re-raises a dataset error in a background thread, and the training process
then dies in "Blocking queue is killed" with the real message far above it. Here a sample never
raises inside the loader: `GuardedDataset` returns the failure, `GuardedCollate` sends it beside
the batch, and `BatchGuard.check` (in the training process) raises it as one `DataError` naming
the loader section, the dataset, the sample (list line and files) and the cause.

With `loader.skip_corrupt: N` a sample that fails is replaced by the next one that loads (the
batch keeps its size and the run stays reproducible); each skip is logged with the running total,
and the (N+1)-th skip is an error.
"""
import json
import logging

import numpy as np
from paddle.io.dataloader.collate import default_collate_fn

from .image_io import DataError

__all__ = ["GuardedDataset", "GuardedCollate", "BatchGuard"]

logger = logging.getLogger(__name__)

# Substitutes tried per failing sample before giving up (a dataset that is mostly broken).
MAX_SUBSTITUTES = 16


def describe_failure(dataset, index, error, where):
    source = dataset.sample_source(index) if hasattr(dataset, "sample_source") else None
    at = f" ({source})" if source else ""
    return f"{where}: sample {index} of {type(dataset).__name__}{at} cannot be loaded: {type(error).__name__}: {error}"


class _Item:
    __slots__ = ("sample", "failures")

    def __init__(self, sample, failures):
        self.sample, self.failures = sample, failures


class GuardedDataset:
    """Wraps a dataset: `[i]` gives an `_Item` holding the sample (or None) and the failures met."""

    def __init__(self, dataset, where, skip):
        self.dataset, self.where, self.skip = dataset, where, bool(skip)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        failures = []
        n = len(self.dataset)
        tries = 1 + (MAX_SUBSTITUTES if self.skip else 0)
        for k in range(min(tries, n)):
            i = (index + k) % n
            try:
                return _Item(self.dataset[i], failures)
            except Exception as e:  # noqa: BLE001 - any failure is reported in the training process
                failures.append(describe_failure(self.dataset, i, e, self.where))
        return _Item(None, failures)


class GuardedCollate:
    """Collates the loaded samples and appends a uint8 JSON report of the failures."""

    def __call__(self, items):
        failures = [f for it in items for f in it.failures]
        fatal = any(it.sample is None for it in items)
        report = np.frombuffer(json.dumps({"fatal": fatal, "failures": failures}).encode(), dtype=np.uint8).copy()
        if fatal:
            return [np.zeros([1], np.float32), report]
        return list(default_collate_fn([it.sample for it in items])) + [report]


class BatchGuard:
    """Reads the report off each batch in the training process: raise, or log the skips."""

    def __init__(self, where, skip_corrupt):
        self.where, self.max_skips, self.skipped = where, int(skip_corrupt), 0

    def check(self, batch):
        *batch, report = batch
        raw = report.numpy() if hasattr(report, "numpy") else np.asarray(report)
        info = json.loads(raw.astype(np.uint8).tobytes().decode())
        if info["fatal"] and not self.max_skips:
            raise DataError(info["failures"][-1])
        for failure in info["failures"]:
            self.skipped += 1
            if self.skipped > self.max_skips:
                raise DataError(f"{self.where}.loader.skip_corrupt: {self.skipped} samples could not be loaded, more "
                                f"than the {self.max_skips} allowed; the last: {failure}")
            logger.warning("skipped a sample that cannot be loaded (%d skipped so far, %s.loader.skip_corrupt allows "
                           "%d): %s", self.skipped, self.where, self.max_skips, failure)
        if info["fatal"]:
            raise DataError(f"{self.where}: no loadable sample among {MAX_SUBSTITUTES + 1} consecutive ones; the "
                            f"last failure: {info['failures'][-1]}")
        return batch
