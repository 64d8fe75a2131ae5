"""Two CPU processes through paddle.distributed.launch (gloo) against one process with the same
global batch: identical weights on both ranks, equal to the single-process weights and losses,
and the same full-dataset evaluation on an uneven split of the val set."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from plfusion.engine.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = {
    "model": {"name": "Classifier",
              # no qkv bias: the key bias has an exactly-zero gradient, which AdamW would turn into
              # noise-driven updates that differ between summation orders
              "architecture": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 16,
                               "depth": 1, "num_heads": 2, "num_classes": 0, "qkv_bias": False},
              "head": {"name": "LinearClsHead", "in_channels": 16, "num_classes": 4}},
    "dataloader": {
        "train": {"dataset": {"name": "SyntheticImageNet", "num_samples": 32, "image_size": 16, "num_classes": 4,
                              "split": "train", "transforms": [{"name": "RandomHorizontalFlip"}, {"name": "Normalize"},
                                                               {"name": "ToCHW"}]},
                  "sampler": {"batch_size": 4, "shuffle": True, "drop_last": True}, "loader": {"num_workers": 1}},
        # 11 samples: the shards are 6 and 5, so padding would count a sample twice
        "val": {"dataset": {"name": "SyntheticImageNet", "num_samples": 11, "image_size": 16, "num_classes": 4,
                            "split": "val"},
                "sampler": {"batch_size": 2}, "loader": {"num_workers": 0}}},
    "loss": {"name": "CrossEntropyLoss", "label_smoothing": 0.1},
    "optimizer": {"name": "AdamW", "weight_decay": 0.01, "grad_clip": {"max_norm": 1.0},
                  "param_groups": [{"pattern": "head.*", "lr_mult": 5.0}]},
    "lr_scheduler": {"name": "CosineWarmup", "learning_rate": 0.01, "warmup_iters": 2},
    "iters": 8,
    "seed": 3,
    "output_dir": "output/overridden_by_the_test",
    "train": {"log_interval": 1, "eval_interval": 0, "save_interval": 0},
}


def run(cmd, cwd, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PADDLE_TRAINERS_NUM", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(output_dir):
    with open(os.path.join(output_dir, "scalars.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_cpu_processes_match_one_process_with_the_global_batch(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    launch = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
              str(tmp_path / "log"), os.path.join(ROOT, "tools", "train.py"), "-c", str(cfg_path),
              "-o", f"output_dir={two}", "--max-steps", "5"]
    res = run(launch, tmp_path)
    logs = {r: (tmp_path / "log" / f"workerlog.{r}").read_text() for r in (0, 1)}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + logs[0][-3000:] + logs[1][-3000:]
    assert "data parallel: rank 0 of 2 (backend gloo, device cpu)" in logs[0]
    single = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", str(cfg_path), "-o", f"output_dir={one}",
              "-o", "dataloader.train.sampler.batch_size=8", "--max-steps", "5"]
    res1 = run(single, tmp_path)
    assert res1.returncode == 0, res1.stdout[-3000:] + res1.stderr[-3000:]

    a = load_checkpoint(os.path.join(two, "checkpoints", "iter_0000005"))
    b = load_checkpoint(os.path.join(one, "checkpoints", "iter_0000005"))
    digests = a["state"]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]          # both ranks hold identical weights
    assert a["state"]["world_size"] == 2 and b["state"]["world_size"] == 1
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        np.testing.assert_allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, err_msg=k)
    la, lb = losses(two), losses(one)
    assert sorted(la) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([la[s] for s in sorted(la)], [lb[s] for s in sorted(la)], rtol=1e-5)
    # evaluation at the stop: every rank reduces to the full 11-sample figure
    assert a["state"]["metrics"]["samples"] == 11 and b["state"]["metrics"]["samples"] == 11
    assert a["state"]["metrics"]["top1"] == pytest.approx(b["state"]["metrics"]["top1"])
    # rank 0 alone writes: one VisualDL file, no checkpoint message from rank 1
    assert len(os.listdir(os.path.join(two, "vdl"))) == 1
    assert "saved checkpoint" in logs[0] and "saved checkpoint" not in logs[1]
