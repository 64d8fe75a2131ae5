"""Data loaders from a `dataloader.train` / `dataloader.val` section, reproducible and resumable.

    dataloader:
      train:
        dataset: {name: SyntheticImageNet, num_samples: 2000, ...}
        sampler: {batch_size: 8, shuffle: true, drop_last: true}     # batch size per process
        loader: {num_workers: 2, use_shared_memory: false, skip_corrupt: 0}

A sample that cannot be loaded (a corrupt or missing file, a label map of the wrong size) stops
the run with one `DataError` naming the section, the dataset, the list line and the files,
with or without workers; `skip_corrupt: N` instead replaces up to N such samples by the next
loadable one, logging each (plfusion.data.guard).

Training batches come from `TrainBatchSampler`, a `paddle.io.DistributedBatchSampler` whose
shuffle is seeded by (seed, epoch) rather than the epoch alone, and which can start an epoch
part-way through (to resume a run mid-epoch). Each global batch is the concatenation of the
ranks' local batches, so N processes with batch b see exactly the samples one process sees
with batch N*b.

Evaluation uses `ShardBatchSampler`: every rank gets a contiguous, disjoint shard and the
shards cover the dataset once. There is no padding, so no sample is counted twice when the
ranks' metrics are summed (DistributedBatchSampler would repeat samples to even the shards).

Randomness: datasets draw per-sample augmentation from (seed, epoch, index) through their
`seed` attribute and `set_epoch`; a dataset configured without a seed (`seed` attribute None)
gets the run's seed, so augmentation is reproducible unless asked otherwise. Loader workers
seed numpy, `random` and Paddle from (seed, epoch, rank, worker id). Creating a multi-worker
iterator draws from numpy's global generator in Paddle; `EpochLoader` restores that
generator afterwards, so the main process's random streams do not depend on loader setup.
"""
import logging
import math
import numbers
import random

import numpy as np
import paddle
from paddle.io import DataLoader, DistributedBatchSampler

from ..registry import DATASETS, ConfigError, did_you_mean  # importing plfusion.data registered the datasets
from .guard import BatchGuard, GuardedCollate, GuardedDataset

__all__ = ["build_dataloader", "build_dataset", "EpochLoader", "TrainBatchSampler", "ShardBatchSampler",
           "SECTION_KEYS", "SAMPLER_KEYS", "LOADER_KEYS"]

logger = logging.getLogger(__name__)

SECTION_KEYS = ("dataset", "sampler", "loader")
SAMPLER_KEYS = ("batch_size", "shuffle", "drop_last")
LOADER_KEYS = ("num_workers", "use_shared_memory", "prefetch_factor", "skip_corrupt")


class TrainBatchSampler(DistributedBatchSampler):
    """DistributedBatchSampler with a (seed, epoch) shuffle and a start position within the epoch."""

    def __init__(self, dataset, batch_size, num_replicas=1, rank=0, shuffle=True, drop_last=True, seed=0):
        super().__init__(dataset, batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         drop_last=drop_last)
        self.seed = int(seed)
        self.start_batch = 0

    def set_start_batch(self, start_batch):
        """Skip the first `start_batch` local batches of the next pass (resuming mid-epoch)."""
        self.start_batch = int(start_batch)

    def local_indices(self):
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = np.resize(order, self.total_size)  # pads by repeating from the start
        per_global = self.batch_size * self.nranks
        full = (self.total_size // per_global) * per_global
        head = order[:full].reshape(-1, self.nranks, self.batch_size)[:, self.local_rank].reshape(-1)
        tail = order[full:]
        share = len(tail) // self.nranks
        return np.concatenate([head, tail[self.local_rank * share:(self.local_rank + 1) * share]])

    def __iter__(self):
        indices = self.local_indices().tolist()
        start, self.start_batch = self.start_batch, 0
        for b in range(start, len(self)):
            batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
            if batch:
                yield batch


class ShardBatchSampler:
    """Rank `rank` of `num_replicas` gets samples [start, end) of a contiguous split, in batches."""

    def __init__(self, num_samples, batch_size, num_replicas=1, rank=0):
        self.batch_size = int(batch_size)
        per, extra = divmod(int(num_samples), num_replicas)
        self.start = rank * per + min(rank, extra)
        self.end = self.start + per + (1 if rank < extra else 0)

    def set_epoch(self, epoch):
        """Evaluation order does not depend on the epoch."""

    def __iter__(self):
        for b in range(self.start, self.end, self.batch_size):
            yield list(range(b, min(b + self.batch_size, self.end)))

    def __len__(self):
        return math.ceil((self.end - self.start) / self.batch_size)


class WorkerInit:
    """Seeds a loader worker from (seed, epoch, rank, worker id); `epoch` is set before each pass."""

    def __init__(self, seed, rank):
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def __call__(self, worker_id):
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank, int(worker_id)]).generate_state(3)
        np.random.seed(int(state[0]))
        random.seed(int(state[1]))
        paddle.seed(int(state[2]))


class EpochLoader:
    """A paddle DataLoader plus its sampler: `set_epoch(epoch, start_batch)` before each pass."""

    def __init__(self, loader, batch_sampler, worker_init, mode, dataset, guard):
        self.loader = loader
        self.batch_sampler = batch_sampler
        self.worker_init = worker_init
        self.dataset = dataset
        self.mode = mode
        self.guard = guard

    @property
    def batch_size(self):
        return self.batch_sampler.batch_size

    def set_epoch(self, epoch, start_batch=0):
        self.batch_sampler.set_epoch(epoch)
        if start_batch:
            if not hasattr(self.batch_sampler, "set_start_batch"):
                raise ValueError(f"the {self.mode} loader cannot start part-way through an epoch")
            self.batch_sampler.set_start_batch(start_batch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.worker_init.epoch = int(epoch)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        state = np.random.get_state()
        it = iter(self.loader)
        np.random.set_state(state)
        return (self.guard.check(batch) for batch in it)


def _check(value, where, kind, minimum=None):
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        raise ConfigError(f"{where}: expected an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_keys(section, allowed, where):
    if section is None:
        return {}
    if not hasattr(section, "items"):
        raise ConfigError(f"{where}: expected a mapping, got {section!r}")
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key.{did_you_mean(key, allowed)} "
                              f"Accepted keys: {', '.join(allowed)}")
    return dict(section)


def validate_section(section_cfg, mode, where):
    """Checked (dataset_cfg, sampler dict, loader dict) with defaults filled in."""
    if not hasattr(section_cfg, "items"):
        raise ConfigError(f"{where}: expected a mapping with 'dataset', 'sampler' and 'loader', got {section_cfg!r}")
    section = _check_keys(section_cfg, SECTION_KEYS, where)
    if "dataset" not in section:
        raise ConfigError(f"{where}.dataset: missing (e.g. {{name: SyntheticImageNet}})")
    train = mode == "train"
    sampler = _check_keys(section.get("sampler"), SAMPLER_KEYS, f"{where}.sampler")
    if "batch_size" not in sampler:
        raise ConfigError(f"{where}.sampler.batch_size: missing (the batch size per process)")
    sampler["batch_size"] = _check(sampler["batch_size"], f"{where}.sampler.batch_size", "int", 1)
    sampler["shuffle"] = _check(sampler.get("shuffle", train), f"{where}.sampler.shuffle", "bool")
    sampler["drop_last"] = _check(sampler.get("drop_last", train), f"{where}.sampler.drop_last", "bool")
    if not train and (sampler["shuffle"] or sampler["drop_last"]):
        raise ConfigError(f"{where}.sampler: evaluation reads every sample exactly once, in order; set shuffle and "
                          f"drop_last to false (got shuffle={sampler['shuffle']}, drop_last={sampler['drop_last']})")
    loader = _check_keys(section.get("loader"), LOADER_KEYS, f"{where}.loader")
    loader["num_workers"] = _check(loader.get("num_workers", 0), f"{where}.loader.num_workers", "int", 0)
    loader["use_shared_memory"] = _check(loader.get("use_shared_memory", False),
                                         f"{where}.loader.use_shared_memory", "bool")
    loader["prefetch_factor"] = _check(loader.get("prefetch_factor", 2), f"{where}.loader.prefetch_factor", "int", 1)
    loader["skip_corrupt"] = _check(loader.get("skip_corrupt", 0), f"{where}.loader.skip_corrupt", "int", 0)
    return section["dataset"], sampler, loader


def build_dataset(dataset_cfg, seed=None, where="dataloader.train.dataset", verbose=True):
    """Dataset from `{name: ..., **kwargs}`; a dataset without its own seed gets `seed`."""
    dataset = DATASETS.build(dataset_cfg, where=where)
    if seed is not None and hasattr(dataset, "seed") and dataset.seed is None:
        dataset.seed = int(seed)
        logger.log(logging.INFO if verbose else logging.DEBUG,
                   "%s: no augmentation seed configured; using the run seed %d", where, int(seed))
    return dataset


def build_dataloader(section_cfg, mode, seed, rank=0, world_size=1, where=None):
    """EpochLoader for `mode` 'train' (shuffled, resumable) or 'val'/'test' (sharded, each sample once).

    `section_cfg` is `dataloader.<mode>`; batch_size there is per process."""
    if mode not in ("train", "val", "test"):
        raise ValueError(f"build_dataloader: mode must be 'train', 'val' or 'test', got {mode!r}")
    where = where or f"dataloader.{mode}"
    dataset_cfg, sampler_cfg, loader_cfg = validate_section(section_cfg, mode, where)
    dataset = build_dataset(dataset_cfg, seed, where=f"{where}.dataset", verbose=mode == "train")
    if len(dataset) == 0:
        raise ConfigError(f"{where}.dataset: the dataset is empty")
    bs = sampler_cfg["batch_size"]
    if mode == "train":
        sampler = TrainBatchSampler(dataset, bs, num_replicas=world_size, rank=rank, shuffle=sampler_cfg["shuffle"],
                                    drop_last=sampler_cfg["drop_last"], seed=seed)
        if len(sampler) == 0:
            raise ConfigError(f"{where}: {len(dataset)} samples over {world_size} process(es) make no full batch of "
                              f"{bs} with drop_last: true; lower sampler.batch_size or add data")
    else:
        sampler = ShardBatchSampler(len(dataset), bs, num_replicas=world_size, rank=rank)
    worker_init = WorkerInit(seed, rank)
    skip = loader_cfg["skip_corrupt"]
    loader = DataLoader(GuardedDataset(dataset, f"{where}.dataset", skip), batch_sampler=sampler,
                        num_workers=loader_cfg["num_workers"], use_shared_memory=loader_cfg["use_shared_memory"],
                        prefetch_factor=loader_cfg["prefetch_factor"], worker_init_fn=worker_init,
                        collate_fn=GuardedCollate(), return_list=True)
    return EpochLoader(loader, sampler, worker_init, mode, dataset, BatchGuard(where, skip))
