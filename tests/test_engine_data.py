"""Samplers, loader seeding, loader config errors and the evaluator's numbers."""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from plfusion.config import AttrDict
from plfusion.data.loader import ShardBatchSampler, TrainBatchSampler, build_dataloader
from plfusion.engine.evaluator import Evaluator
from plfusion.metrics import ConfusionMatrix
from plfusion.registry import DATASETS, ConfigError


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_ranks_split_each_global_batch_like_one_process():
    data = _Sized(40)
    single = TrainBatchSampler(data, 8, num_replicas=1, rank=0, shuffle=True, drop_last=True, seed=3)
    ranks = [TrainBatchSampler(data, 4, num_replicas=2, rank=r, shuffle=True, drop_last=True, seed=3) for r in (0, 1)]
    for epoch in (0, 1):
        for s in [single] + ranks:
            s.set_epoch(epoch)
        one = list(single)
        two = [list(b) for b in zip(*[list(r) for r in ranks])]
        assert len(one) == 5 and len(two) == 5
        for b1, (b_r0, b_r1) in zip(one, two):
            assert b1 == b_r0 + b_r1
        assert sorted(i for b in one for i in b) == list(range(40))
    single.set_epoch(0)
    e0 = list(single)
    single.set_epoch(1)
    assert list(single) != e0                          # reshuffled every epoch
    other = TrainBatchSampler(data, 8, shuffle=True, seed=4)
    other.set_epoch(0)
    assert list(other) != e0                           # and the run seed matters


def test_start_batch_resumes_mid_epoch_and_padding_repeats():
    s = TrainBatchSampler(_Sized(10), 2, num_replicas=1, rank=0, shuffle=True, drop_last=False, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2)
    s.set_start_batch(3)
    assert list(s) == full[3:]
    assert list(s) == full                             # the skip applies to one pass only
    # 7 samples on 2 ranks: 8 slots, one sample repeated, every sample present
    r = [TrainBatchSampler(_Sized(7), 2, num_replicas=2, rank=k, shuffle=False, drop_last=False) for k in (0, 1)]
    got = [i for k in (0, 1) for b in r[k] for i in b]
    assert len(got) == 8 and set(got) == set(range(7))


def test_shard_sampler_counts_every_sample_once():
    for n, world in [(10, 3), (7, 2), (5, 4), (3, 4)]:
        seen = []
        for rank in range(world):
            s = ShardBatchSampler(n, 2, num_replicas=world, rank=rank)
            batches = list(s)
            assert len(batches) == len(s)
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(n))


@DATASETS.register
class EngineTestNoise(paddle.io.Dataset):
    """Draws from numpy's global generator, as careless user transforms do."""

    def __init__(self, n=8):
        self.n = n
        self.seed = None
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.array([np.random.rand(), self.epoch], np.float32), np.int64(i)


def _noise_loader(workers):
    cfg = AttrDict(dataset=AttrDict(name="EngineTestNoise"), sampler=AttrDict(batch_size=4, shuffle=False,
                                                                              drop_last=False),
                   loader=AttrDict(num_workers=workers))
    return build_dataloader(cfg, "train", seed=5)


def test_worker_seeding_depends_on_seed_epoch_and_not_on_the_main_generator():
    loader = _noise_loader(2)
    assert loader.dataset.seed == 5                     # a dataset without a seed gets the run's

    def run(epoch):
        loader.set_epoch(epoch)
        return np.concatenate([x.numpy() for x, _ in loader])

    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    a = run(0)
    assert np.array_equal(np.random.get_state()[1], state)   # building the iterator left it alone
    np.random.seed(123)
    b = run(0)
    assert np.array_equal(a, b)
    c = run(1)
    assert not np.allclose(a[:, 0], c[:, 0]) and np.all(c[:, 1] == 1)


@pytest.mark.parametrize("section, message", [
    ({"dataset": {"name": "EngineTestNoise"}, "sampler": {"batch_size": -2}},
     "dataloader.train.sampler.batch_size: expected an integer >= 1, got -2"),
    ({"dataset": {"name": "EngineTestNoise"}, "sampler": {"batch_size": "8"}},
     "dataloader.train.sampler.batch_size: expected an integer, got '8'"),
    ({"dataset": {"name": "EngineTestNoise"}, "sampler": {"batch_size": 2, "shufle": True}},
     "dataloader.train.sampler.shufle: unknown key. Did you mean: shuffle"),
    ({"dataset": {"name": "EngineTestNoise"}, "sampler": {"batch_size": 2}, "loader": {"num_worker": 2}},
     "dataloader.train.loader.num_worker: unknown key. Did you mean: num_workers"),
    ({"dataset": {"name": "EngineTestNoise"}, "batch_size": 2},
     "dataloader.train.batch_size: unknown key"),
    ({"dataset": {"name": "EngineTestNoiz"}, "sampler": {"batch_size": 2}},
     "dataloader.train.dataset.name: unknown dataset 'EngineTestNoiz'. Did you mean: EngineTestNoise"),
])
def test_loader_config_errors_name_the_key_path(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_dataloader(AttrDict(section), "train", seed=0)


def test_eval_loader_refuses_shuffle():
    cfg = AttrDict(dataset=AttrDict(name="EngineTestNoise"), sampler=AttrDict(batch_size=2, shuffle=True))
    with pytest.raises(ConfigError, match=r"dataloader\.val\.sampler: evaluation reads every sample exactly once"):
        build_dataloader(cfg, "val", seed=0)


class _Batches(list):
    """A loader stand-in: a list of (inputs, labels) batches with a dataset attribute."""
    dataset = None


class _Lookup(nn.Layer):
    """Returns precomputed outputs batch by batch."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.i = 0

    def forward(self, x):
        out = self.outputs[self.i]
        self.i += 1
        return out


def test_classification_accuracy_counts_samples_not_batches():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(5, 6)).astype("float32"), rng.normal(size=(2, 6)).astype("float32")]
    # batch 1: only sample 0 right; batch 2: both right -> 3/7 overall, (1/5 + 2/2) / 2 batch-averaged
    labels = [(logits[0].argmax(1) + np.array([0, 1, 1, 1, 1])) % 6, logits[1].argmax(1)]
    loader = _Batches([(paddle.zeros([len(y), 1]), paddle.to_tensor(y)) for y in labels])
    model = _Lookup([paddle.to_tensor(x) for x in logits])
    got = Evaluator(topk=(1, 5)).run(model, loader)
    all_logits, all_labels = np.concatenate(logits), np.concatenate(labels)
    top1 = (all_logits.argmax(1) == all_labels).mean() * 100
    ranks = (all_logits >= all_logits[np.arange(7), all_labels][:, None]).sum(1)
    top5 = (ranks <= 5).mean() * 100
    assert got["samples"] == 7
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
    assert got["top1"] == pytest.approx(300 / 7)


def test_segmentation_metrics_per_output_and_ensemble():
    rng = np.random.default_rng(1)
    k, n = 4, 3
    label = rng.integers(0, k, (n, 8, 8)).astype("int64")
    label[:, 0, :] = 255
    outs = [paddle.to_tensor(rng.normal(size=(n, k, 4, 4)).astype("float32")) for _ in range(3)]
    loader = _Batches([((paddle.zeros([n, 3, 8, 8]), paddle.zeros([n, 1, 8, 8])), paddle.to_tensor(label))])
    loader.dataset = type("D", (), {"modalities": ("rgb", "depth")})()
    got = Evaluator(num_classes=k, ignore_index=255).run(_Lookup([outs]), loader)
    expected = []
    for out in outs:
        cm = ConfusionMatrix(k, 255)
        cm.update(F.interpolate(out, size=[8, 8], mode="bilinear", align_corners=False).argmax(1), label)
        expected.append(cm.compute())
    assert got["miou"] == pytest.approx(expected[2]["miou"])
    assert got["pixel_acc"] == pytest.approx(expected[2]["pixel_acc"])
    assert got["miou_rgb"] == pytest.approx(expected[0]["miou"])
    assert got["miou_depth"] == pytest.approx(expected[1]["miou"])
    assert got["samples"] == n
