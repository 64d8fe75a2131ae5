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


def training_throughput(cfg, steps=10, warmup=2, loader_batches=None, tome_ratios=None):
    """{'loader_ips', 'train_ips', 'ratio', 'batch_size', 'steps'} for the config's train section.

    With `tome_ratios` (MiT, Swin and MViTv2 models) the model is ToMe-patched and every ratio's update is
    timed in rotating order; 'tome' then lists {'ratio', 'train_ips', 'speedup'} (speed-up over
    the first ratio, median of per-round time ratios) and 'train_ips' is the first ratio's."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"training_throughput: steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    trainer = Trainer(cfg, mode="train")
    loader = trainer.train_loader
    loader_ips, loaded, first = _loader_rate(loader, loader_batches or max(steps, 5))
    batches = [first] * trainer.accum
    settings = [None]
    if tome_ratios:
        from ..patches import tome
        if not tome.is_patched(trainer.net):
            tome.apply_patch(trainer.net, ratio=0.0)
        for ratio in tome_ratios:
            trainer.net.ratio = ratio      # validated before the long runs
        settings = list(tome_ratios)
    for _ in range(warmup):
        for ratio in settings:
            if ratio is not None:
                trainer.net.ratio = ratio
            trainer._train_step(batches)
    times = {i: [] for i in range(len(settings))}
    samples = 0
    for step in range(steps):
        order = list(range(len(settings)))
        order = order[step % len(order):] + order[:step % len(order)]
        for i in order:
            if settings[i] is not None:
                trainer.net.ratio = settings[i]
            start = time.perf_counter()
            _, _, n, _ = trainer._train_step(batches)
            times[i].append(time.perf_counter() - start)
            samples = n
    train_ips = samples / float(np.median(times[0]))
    out = {"loader_ips": loader_ips, "train_ips": train_ips, "ratio": loader_ips / train_ips,
           "batch_size": loader.batch_size, "steps": steps, "loader_samples": loaded}
    if tome_ratios:
        out["tome"] = [{"ratio": str(r), "train_ips": samples / float(np.median(times[i])),
                        "speedup": float(np.median(np.array(times[0]) / np.array(times[i])))}
                       for i, r in enumerate(settings)]
    return out
