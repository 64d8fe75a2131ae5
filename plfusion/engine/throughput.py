"""Training throughput: can the data loader feed the model faster than it trains?

Measures, for one training config, (1) how many samples/s the configured train loader delivers
(its own workers and transforms, no model) and (2) how many samples/s full training updates run
(forward, loss, backward, optimizer step) on batches already in memory. A loader/train ratio
above 1 means training is compute-bound, as it should be.
"""
import time

import numpy as np

from .trainer import Trainer

__all__ = ["training_throughput"]


def _loader_rate(loader, batches):
    """Samples/s of `batches` batches from the loader (after its workers have started)."""
    loader.set_epoch(0)
    it = iter(loader)
    first = next(it)                       # worker start-up is not throughput
    n = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            inputs, _ = next(it)
        except StopIteration:
            break
        x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        n += int(x.shape[0])
    seconds = time.perf_counter() - start
    return n / seconds if seconds > 0 else float("inf"), n, first


def training_throughput(cfg, steps=10, warmup=2, loader_batches=None):
    """{'loader_ips', 'train_ips', 'ratio', 'batch_size', 'steps'} for the config's train section."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"training_throughput: steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    trainer = Trainer(cfg, mode="train")
    loader = trainer.train_loader
    loader_ips, loaded, first = _loader_rate(loader, loader_batches or max(steps, 5))
    batches = [first] * trainer.accum
    for _ in range(warmup):
        trainer._train_step(batches)
    times = []
    samples = 0
    for _ in range(steps):
        start = time.perf_counter()
        _, _, n, _ = trainer._train_step(batches)
        times.append(time.perf_counter() - start)
        samples = n
    train_ips = samples / float(np.median(times))
    return {"loader_ips": loader_ips, "train_ips": train_ips, "ratio": loader_ips / train_ips,
            "batch_size": loader.batch_size, "steps": steps, "loader_samples": loaded}
