import json
import os

import pytest

from conftest import ROOT
from plfusion.benchmark_cli import main as bench_main
from plfusion.config import get_config
from plfusion.engine.throughput import training_throughput

CFG = os.path.join(ROOT, "configs", "quickstart", "vit_tiny_synthetic.yaml")
TINY = ["model.architecture.depth=1", "dataloader.train.dataset.num_samples=64",
        "dataloader.train.sampler.batch_size=8", "dataloader.train.loader.num_workers=0"]


def test_training_throughput_counts_samples(tmp_path):
    cfg = get_config(CFG, TINY + [f"output_dir={tmp_path / 'run'}"])
    res = training_throughput(cfg, steps=2, warmup=1, loader_batches=3)
    assert res["batch_size"] == 8 and res["loader_samples"] == 24     # 3 batches after the first
    assert res["loader_ips"] > 0 and res["train_ips"] > 0
    assert res["ratio"] == pytest.approx(res["loader_ips"] / res["train_ips"])


def test_benchmark_train_mode_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    args = ["-c", CFG, "--train", "--iters", "2", "--warmup", "0", "--threads", "1", "--json", str(out)]
    for o in TINY:
        args += ["-o", o]
    assert bench_main(args) == 0
    text = capsys.readouterr().out
    assert "data loader" in text and "training" in text and "loader/train" in text
    res = json.loads(out.read_text())
    assert res["threads"] == 1 and res["batch_size"] == 8


def test_train_mode_needs_a_config():
    with pytest.raises(SystemExit):
        bench_main(["--model", "vit_tiny_patch16_224", "--train"])
