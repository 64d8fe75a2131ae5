"""Segmentation through the engine: a TokenFusion RGB-D MiT on SyntheticRGBD with the fusion recipe's
optimizer base config; the sparsity term reaches the loss, evaluation reports per-modality mIoU."""
import json
import os

import numpy as np
import pytest
import yaml

from plfusion.config import get_config
from plfusion.engine import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tokenfusion_segmentor_trains_with_its_sparsity_term(tmp_path):
    data = {
        "_base_": [os.path.join(ROOT, "configs", "_base_", "runtime.yaml"),
                   os.path.join(ROOT, "configs", "_base_", "adamw_poly_fusion.yaml")],
        "model": {"name": "Segmentor", "architecture": {"name": "mit_b0"},
                  "head": {"name": "SegFormerHead", "num_classes": 6, "embed_dim": 16},
                  "patches": [{"name": "tokenfusion", "sparsity_weight": 1.0e-3}]},
        "dataloader": {
            "train": {"dataset": {"name": "SyntheticRGBD", "num_samples": 4, "image_size": [32, 32], "split": "train"},
                      "sampler": {"batch_size": 2}, "loader": {"num_workers": 0}},
            "val": {"dataset": {"name": "SyntheticRGBD", "num_samples": 3, "image_size": [32, 32], "split": "val"},
                    "sampler": {"batch_size": 2}, "loader": {"num_workers": 0}}},
        "loss": {"name": "CrossEntropyLoss", "ignore_index": 255},
        "lr_scheduler": {"warmup_iters": 1, "max_iters": 10},
        "iters": 2,
        "output_dir": str(tmp_path / "seg"),
        "train": {"log_interval": 1, "eval_interval": 2, "save_interval": 2},
    }
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = get_config(str(path))
    trainer = Trainer(cfg)
    groups = trainer.optimizer._inner_opt.param_summary if hasattr(trainer.optimizer, "_inner_opt") \
        else trainer.optimizer.param_summary
    assert groups["head.linear_pred.weight"] == (10.0, 0.01)             # decoder at 10x lr
    assert groups["head.linear_fuse.bn.weight"] == (10.0, 0.01)          # as WeTr: the whole decoder decays
    norms = [n for n in groups if n.startswith("backbone.") and "norm" in n]
    assert norms and all(groups[n] == (1.0, 0.0) for n in norms)
    result = trainer.train()

    rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "scalars.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert r["train/tokenfusion_sparsity"] > 0
        assert r["train/loss"] == pytest.approx(r["train/task_loss"] + r["train/tokenfusion_sparsity"], rel=1e-6)
    # lr of update 0 is 6e-5 * 1e-6 (warm-up from the ratio), update 1 the poly value 6e-5 * (1 - 1/10)
    assert [r["train/lr"] for r in train_rows] == pytest.approx([6e-11, 5.4e-5], rel=1e-6)
    metrics = result["metrics"]
    assert {"miou", "pixel_acc", "mean_acc", "miou_rgb", "miou_depth"} <= set(metrics)
    assert metrics["samples"] == 3 and 0.0 <= metrics["miou"] <= 100.0
    assert len(metrics["per_class_iou"]) == 6
    assert result["best"]["metric"] == "miou"
    assert np.isfinite([r["train/loss"] for r in train_rows]).all()
