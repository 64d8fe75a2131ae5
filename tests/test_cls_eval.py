"""Evaluating pretrained weights: a timm-layout .safetensors on an ImageNet-layout val list, with ToMe
from a config override, and the ToMe accuracy / speed table (--tome-r) in one pass; Evaluator.compare."""
import json
import os

import cv2
import numpy as np
import paddle
import pytest
import yaml
from safetensors.numpy import save_file

from plfusion.data.cls_transforms import build_cls_transforms
from plfusion.data.image_io import read_image
from plfusion.engine import Evaluator
from plfusion.engine.cli import eval_main, train_main
from plfusion.models import create_model
from plfusion.models.pretrained import linear_weight_keys
from plfusion.patches import tome
from plfusion.utils.flops import count_flops

ARCH = {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2,
        "num_heads": 2, "num_classes": 10}
VAL_TRANSFORMS = [{"name": "ResizeCenterCrop", "size": 16, "crop_ratio": 0.9, "interpolation": "bicubic"},
                  {"name": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, {"name": "ToCHW"}]
# label = the class at this rank of the model's scores: 6 right, 3 in the top 5 only, 3 outside it
RANKS = [0, 0, 0, 0, 0, 0, 2, 3, 4, 7, 8, 9]
TOP1, TOP5 = 50.0, 75.0


def direct_logits(model, images, r=None):
    """The model's logits on the val images, computed here, outside the engine."""
    if r is not None:
        tome.apply_patch(model)
        model.r = r
    model.eval()
    with paddle.no_grad():
        out = model(paddle.to_tensor(images)).numpy()
    if r is not None:
        tome.remove_patch(model)
    return out


def topk(logits, labels, k):
    order = np.argsort(-logits, axis=1)[:, :k]
    return 100.0 * np.mean([labels[i] in order[i] for i in range(len(labels))])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """timm-layout weights as .safetensors, an ImageNet-layout val set of 12 generated images, a config."""
    tmp = tmp_path_factory.mktemp("cls_eval")
    paddle.seed(11)
    model = create_model(**ARCH)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for k in linear_weight_keys(model):       # timm / torch stores Linear weights as [out, in]
        state[k] = np.ascontiguousarray(state[k].T)
    weights = str(tmp / "vit_tiny_timm.safetensors")
    save_file(state, weights)

    rng = np.random.default_rng(3)
    root = tmp / "imagenet"
    (root / "val").mkdir(parents=True)
    paths = []
    for i in range(len(RANKS)):
        img = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        rel = f"val/ILSVRC2012_val_{i:08d}.png"
        cv2.imwrite(str(root / rel), img[:, :, ::-1])
        paths.append(rel)
    pipeline = build_cls_transforms(VAL_TRANSFORMS)
    images = np.stack([pipeline(read_image(str(root / p), "rgb")) for p in paths])
    logits = direct_logits(model, images)
    labels = np.array([np.argsort(-row)[rank] for row, rank in zip(logits, RANKS)])
    (root / "val_list.txt").write_text("".join(f"{p} {y}\n" for p, y in zip(paths, labels)))

    cfg = {"seed": 0, "output_dir": str(tmp / "out"),
           "model": {"name": "Classifier", "architecture": ARCH, "head": None},
           "dataloader": {"val": {"dataset": {"name": "ImageNet", "root": str(root), "split": "val", "num_classes": 10,
                                              "transforms": VAL_TRANSFORMS},
                                  "sampler": {"batch_size": 5}, "loader": {"num_workers": 0}}}}
    config = str(tmp / "eval.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    return {"model": model, "weights": weights, "images": images, "labels": labels, "config": config,
            "out": str(tmp / "out")}


def test_the_val_set_was_built_with_the_intended_accuracy(setup):
    logits = direct_logits(setup["model"], setup["images"])
    assert topk(logits, setup["labels"], 1) == TOP1 and topk(logits, setup["labels"], 5) == TOP5


def test_eval_pretrained_timm_safetensors_prints_topk_matching_a_direct_computation(setup, capsys):
    assert eval_main(["-c", setup["config"], "--pretrained", setup["weights"], "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "top1 50.0000, top5 75.0000, samples 12" in printed
    results = json.load(open(os.path.join(setup["out"], "eval_results.json")))
    assert results["weights"] == setup["weights"]
    assert results["metrics"] == {"top1": TOP1, "top5": TOP5, "samples": 12}


def test_eval_refuses_weights_that_do_not_fill_the_model(setup, capsys):
    # a separate 7-class head: the checkpoint's 10-class head is dropped, so the head would stay random
    assert eval_main(["-c", setup["config"], "--pretrained", setup["weights"], "--threads", "1",
                      "-o", "model.architecture.num_classes=0",
                      "-o", "model.head={name: LinearClsHead, in_channels: 16, num_classes: 7}"]) == 2
    err = capsys.readouterr().err
    assert "leaves 2 model tensor(s) at their random initialisation (head.fc.bias, head.fc.weight)" in err
    # the backbone's own head with another class count: a plain shape mismatch, reported without a traceback
    assert eval_main(["-c", setup["config"], "--pretrained", setup["weights"], "--threads", "1",
                      "-o", "model.architecture.num_classes=7"]) == 2
    assert "backbone.head.weight: checkpoint [16, 10] vs model [16, 7]" in capsys.readouterr().err


def test_eval_with_tome_from_a_config_override(setup, capsys):
    assert eval_main(["-c", setup["config"], "--pretrained", setup["weights"], "--threads", "1",
                      "-o", "model.patches=[{name: tome, r: 3}]"]) == 0
    capsys.readouterr()
    base = direct_logits(setup["model"], setup["images"])
    merged = direct_logits(setup["model"], setup["images"], r=3)
    assert np.abs(merged - base).max() > 1e-3      # ToMe changed the outputs, so the check below can fail
    metrics = json.load(open(os.path.join(setup["out"], "eval_results.json")))["metrics"]
    assert metrics["top1"] == pytest.approx(topk(merged, setup["labels"], 1))
    assert metrics["top5"] == pytest.approx(topk(merged, setup["labels"], 5))


def test_tome_table_evaluates_every_r_in_one_pass(setup, capsys):
    assert eval_main(["-c", setup["config"], "--pretrained", setup["weights"], "--threads", "1",
                      "--tome-r", "0", "3", "3,-1"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "images/s" in line and "GFLOPs" in line)
    assert header.split()[:3] == ["r", "top-1", "top-5"]
    rows = json.load(open(os.path.join(setup["out"], "eval_results.json")))["tome"]
    assert [row["r"] for row in rows] == ["0", "3", "3,-1"]
    model, images, labels = setup["model"], setup["images"], setup["labels"]
    for row, r in zip(rows, (0, 3, (3, -1.0))):
        logits = direct_logits(model, images, r=r)
        assert row["top1"] == pytest.approx(topk(logits, labels, 1)) and row["samples"] == 12
        assert row["top5"] == pytest.approx(topk(logits, labels, 5))
        assert row["ips"] > 0 and row["timed_samples"] == 7       # the first batch of 5 is a warm-up
        tome.apply_patch(model)
        model.r = r
        assert row["gflops"] == pytest.approx(count_flops(model, (1, 3, 16, 16)))
        tome.remove_patch(model)
        assert f"{row['top1']:.2f}" in printed and f"{row['gflops']:.3f}" in printed
    assert rows[0]["top1"] == TOP1 and rows[0]["speedup"] == 1.0
    assert rows[1]["gflops"] < rows[0]["gflops"] and rows[2]["gflops"] < rows[0]["gflops"]


def test_tome_r_argument_errors(setup, capsys):
    assert eval_main(["-c", setup["config"], "--pretrained", setup["weights"], "--tome-r", "sixteen"]) == 2
    assert "--tome-r: cannot read r from 'sixteen'" in capsys.readouterr().err
    assert eval_main(["-c", setup["config"], "--pretrained", setup["weights"], "--tome-r", "0", "2", "2"]) == 2
    assert "--tome-r: each r once, got 0 2 2" in capsys.readouterr().err
    assert train_main(["-c", setup["config"], "--tome-r", "0", "8"]) == 2
    assert "--tome-r is an evaluation option" in capsys.readouterr().err


class _Switch(paddle.nn.Layer):
    """Logits that depend on a setting: 'good' scores the true class first, 'bad' last."""

    def __init__(self):
        super().__init__()
        self.mode, self.calls = "good", []

    def forward(self, x):
        self.calls.append(self.mode)
        y = x[:, 0, 0, 0].astype("int64")
        onehot = paddle.nn.functional.one_hot(y, 6)
        return onehot if self.mode == "good" else -onehot


def test_compare_counts_each_setting_on_every_batch_in_rotating_order():
    xs = np.zeros((7, 1, 1, 1), np.float32)
    xs[:, 0, 0, 0] = [0, 1, 2, 3, 4, 5, 0]
    loader = [(paddle.to_tensor(xs[i:i + 3]), paddle.to_tensor(xs[i:i + 3, 0, 0, 0].astype("int64")))
              for i in range(0, 7, 3)]
    model = _Switch()

    def setting(mode):
        return lambda m: setattr(m, "mode", mode)
    out = Evaluator(topk=(1, 5)).compare(model, loader, {"good": setting("good"), "bad": setting("bad")})
    assert out["good"]["top1"] == 100.0 and out["good"]["top5"] == 100.0
    assert out["bad"]["top1"] == 0.0 and out["bad"]["top5"] == 0.0     # the true class ranks last of 6
    assert out["good"]["samples"] == out["bad"]["samples"] == 7
    assert out["good"]["timed_samples"] == 4 and out["good"]["ips"] > 0
    assert model.calls == ["good", "bad", "bad", "good", "good", "bad"]
