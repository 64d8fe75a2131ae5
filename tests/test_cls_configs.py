"""ImageNet classification configs: every one loads, validates and builds; the published recipe values
come out right after batch scaling; lr scaling and the distillation teacher work in the trainer."""
import glob
import os
import re

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
import yaml

from plfusion.config import get_config
from plfusion.data.cls_transforms import build_cls_transforms
from plfusion.data.mixup import Mixup
from plfusion.engine import Trainer
from plfusion.engine.lr_scheduler import build_lr_scheduler
from plfusion.engine.optimizer import build_optimizer
from plfusion.engine.trainer import scale_lr_by_batch, validate_engine_config
from plfusion.losses import build_loss
from plfusion.models import build_model
from plfusion.registry import ConfigError, check_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS_DIRS = ("deit", "vit", "swin", "mvit", "t2t_vit")
QUICKSTARTS = ["configs/quickstart/vit_tiny_synthetic.yaml", "configs/quickstart/swin_tiny_synthetic.yaml"]
CONFIGS = sorted([os.path.relpath(p, ROOT) for d in CLS_DIRS
                  for p in glob.glob(os.path.join(ROOT, "configs", d, "*.yaml"))] + QUICKSTARTS)
GPUS_WHEN_UNNAMED = 8   # swin / t2t_vit file names keep the model name; their recipes state 8 GPUs


def load(rel, overrides=()):
    return get_config(os.path.join(ROOT, rel), list(overrides))


def global_batch(rel, cfg):
    """Processes x per-process batch x accumulation, processes taken from an 'NxbM' file name."""
    m = re.search(r"_(\d+)xb(\d+)_", os.path.basename(rel))
    accum = (cfg.get("train") or {}).get("accum_steps", 1)
    per = cfg.dataloader.train.sampler.batch_size
    if m:
        assert int(m.group(2)) == per, f"{rel}: the name says {m.group(2)} images per process, the config {per}"
        return int(m.group(1)) * per * accum
    return GPUS_WHEN_UNNAMED * per * accum


def scaled_schedule(rel, cfg):
    sched, _ = scale_lr_by_batch(cfg.lr_scheduler, global_batch(rel, cfg))
    return sched


def test_the_classification_configs_are_all_found():
    names = {os.path.basename(p) for p in CONFIGS}
    assert len([p for p in CONFIGS if p.startswith("configs/deit/")]) == 6
    assert {"vit_base_patch16_224_in1k_eval.yaml", "deit_small_patch16_224_4xb256_in1k.yaml",
            "deit_base_distilled_patch16_224_16xb64_in1k.yaml", "mvitv2-tiny_8xb256_in1k.yaml",
            "swin_tiny_patch4_window7_224.yaml", "t2t_vit_t_24.yaml", "vit_tiny_synthetic.yaml"} <= names


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_loads_validates_and_builds(rel):
    cfg = load(rel)
    with paddle.LazyGuard():
        model = build_model(cfg.model)
    for mode, section in cfg.dataloader.items():
        assert mode in ("train", "val")
        build_cls_transforms(section.dataset.get("transforms"), where=f"dataloader.{mode}.dataset.transforms")
    assert cfg.dataloader.val.sampler.shuffle is False and cfg.dataloader.val.sampler.drop_last is False
    if rel.endswith("_eval.yaml"):
        assert "train" not in cfg.dataloader and "epochs" not in cfg
        return
    validate_engine_config(cfg)
    sched = build_lr_scheduler(scaled_schedule(rel, cfg), 10, 10 * cfg.epochs)
    with paddle.LazyGuard():
        build_optimizer(cfg.optimizer, model, sched)
    if cfg.get("mixup") is not None:
        check_kwargs(Mixup, dict(cfg.mixup), "mixup")
        assert cfg.loss.name != "CrossEntropyLoss"
    teacher = None
    if cfg.get("teacher") is not None:
        spec = dict(cfg.teacher)
        assert spec.pop("pretrained"), f"{rel}: the teacher needs its weights"
        with paddle.LazyGuard():
            teacher = build_model(spec)
    loss = build_loss(cfg.loss, teacher=teacher) if teacher is not None else build_loss(cfg.loss)
    assert isinstance(loss, paddle.nn.Layer)


@pytest.mark.parametrize("rel", [p for p in CONFIGS if "in1k" in p or p.startswith(("configs/swin", "configs/t2t"))])
def test_imagenet_configs_read_the_list_layout_with_a_placeholder_root(rel):
    cfg = load(rel)
    for section in cfg.dataloader.values():
        assert section.dataset.name == "ImageNet" and section.dataset.root == "data/ILSVRC2012"
        assert section.dataset.num_classes == 1000
    head = cfg.model.head or {"num_classes": cfg.model.architecture.get("num_classes", 1000)}
    assert head["num_classes"] == 1000


def test_deit_small_recipe_at_batch_1024():
    rel = "configs/deit/deit_small_patch16_224_4xb256_in1k.yaml"
    cfg = load(rel)
    assert global_batch(rel, cfg) == 1024
    sched = scaled_schedule(rel, cfg)
    assert sched["learning_rate"] == pytest.approx(1e-3)
    assert sched["warmup_start_lr"] == pytest.approx(1e-6) and sched["eta_min"] == pytest.approx(1e-5)
    assert sched["warmup_epochs"] == 5 and cfg.epochs == 300 and sched["name"] == "CosineWarmup"
    assert cfg.optimizer.name == "AdamW" and cfg.optimizer.weight_decay == 0.05 and cfg.optimizer.grad_clip is None
    assert cfg.model.architecture.drop_path_rate == 0.1
    assert dict(cfg.mixup) == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
                               "label_smoothing": 0.1}
    assert dict(cfg.loss) == {"name": "SoftTargetCrossEntropy"}
    train_t = {t["name"]: t for t in cfg.dataloader.train.dataset.transforms}
    assert train_t["RandAugment"]["config_str"] == "rand-m9-mstd0.5-inc1"
    assert train_t["RandomErasing"]["prob"] == 0.25 and train_t["RandomResizedCrop"]["size"] == 224
    val_t = {t["name"]: t for t in cfg.dataloader.val.dataset.transforms}
    assert val_t["ResizeCenterCrop"]["crop_ratio"] == 0.875 and "mean" not in val_t["Normalize"]
    # the same global batch on another layout gives the same rates
    other = load(rel, ["dataloader.train.sampler.batch_size=128"])
    assert scale_lr_by_batch(other.lr_scheduler, 8 * 128)[0]["learning_rate"] == pytest.approx(1e-3)
    assert scale_lr_by_batch(cfg.lr_scheduler, 256)[0]["learning_rate"] == pytest.approx(2.5e-4)


@pytest.mark.parametrize("rel,lr,warmup,eta_min,clip", [
    ("configs/deit/deit_base_patch16_224_16xb64_in1k.yaml", 1e-3, 5, 1e-5, None),
    ("configs/swin/swin_tiny_patch4_window7_224.yaml", 1e-3, 20, 1e-5, 5.0),
    ("configs/swin/swin_base_patch4_window7_224.yaml", 1e-3, 20, 1e-5, 5.0),
    ("configs/swin/swin_large_patch4_window12_384.yaml", 4e-5, 5, 4e-7, 5.0),
    ("configs/mvit/mvitv2-tiny_8xb256_in1k.yaml", 2e-3, 70, 8e-6, 1.0),
    ("configs/t2t_vit/t2t_vit_14.yaml", 5e-4, 10, 1e-5, None),
])
def test_published_rates_after_batch_scaling(rel, lr, warmup, eta_min, clip):
    cfg = load(rel)
    sched = scaled_schedule(rel, cfg)
    assert sched["learning_rate"] == pytest.approx(lr) and sched["eta_min"] == pytest.approx(eta_min)
    assert sched["warmup_epochs"] == warmup
    assert (cfg.optimizer.grad_clip or {}).get("max_norm") == clip


def test_family_specific_recipe_values():
    t2t = load("configs/t2t_vit/t2t_vit_19.yaml")
    assert t2t.optimizer.weight_decay == 0.065 and t2t.model.architecture.drop_path_rate == 0.1
    assert t2t.ema.enable and t2t.ema.decay == 0.99996 and t2t.train.best_metric == "ema_top1"
    assert {t["name"]: t for t in t2t.dataloader.val.dataset.transforms}["ResizeCenterCrop"]["crop_ratio"] == 0.9
    assert load("configs/t2t_vit/t2t_vit_t_14.yaml").optimizer.weight_decay == 0.05
    swin = load("configs/swin/swin_base_patch4_window12_384.yaml")
    assert swin.epochs == 30 and swin.optimizer.weight_decay == 1e-8 and swin.train.accum_steps == 2
    assert swin.dataloader.train.dataset.transforms[0]["size"] == 384
    assert swin.dataloader.val.dataset.transforms[0] == {"name": "ResizeCenterCrop", "size": 384, "crop_ratio": 1.0,
                                                          "interpolation": "bicubic"}
    mvit = load("configs/mvit/mvitv2-base_8xb256_in1k.yaml")
    assert mvit.model.architecture.drop_path_rate == 0.3
    assert mvit.dataloader.train.dataset.transforms[2]["config_str"] == "rand-m9-n6-mstd0.5-inc1"


@pytest.mark.parametrize("name,size,crop", [("vit_base_patch16_224", 224, 0.9), ("vit_base_patch16_384", 384, 1.0)])
def test_augreg_eval_configs_use_timm_preprocessing(name, size, crop):
    cfg = load(f"configs/vit/{name}_in1k_eval.yaml")
    resize, norm, _ = cfg.dataloader.val.dataset.transforms
    assert resize == {"name": "ResizeCenterCrop", "size": size, "crop_ratio": crop, "interpolation": "bicubic"}
    assert norm["mean"] == [0.5] * 3 and norm["std"] == [0.5] * 3
    assert cfg.model.architecture.name == name and cfg.model.head is None


def test_distilled_deit_config_distils_hard_from_a_built_teacher():
    cfg = load("configs/deit/deit_small_distilled_patch16_224_4xb256_in1k.yaml")
    assert cfg.loss.name == "DistillationLoss" and cfg.loss.distillation_type == "hard"
    assert cfg.loss.alpha == 0.5 and cfg.loss.base_loss == {"name": "SoftTargetCrossEntropy"}
    assert cfg.model.architecture.name == "deit_small_distilled_patch16_224"
    assert cfg.teacher.architecture.name == "mvitv2_base" and cfg.teacher.pretrained


# ------------------------------------------------------------------ the trainer side, on tiny models

TINY_VIT = {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1,
            "num_heads": 2, "num_classes": 4}
SYNTH = {"name": "SyntheticImageNet", "image_size": 16, "num_classes": 4}


def tiny_data(train_samples=16):
    return {"train": {"dataset": dict(SYNTH, num_samples=train_samples, split="train"),
                      "sampler": {"batch_size": 8, "shuffle": True, "drop_last": True}, "loader": {"num_workers": 0}},
            "val": {"dataset": dict(SYNTH, num_samples=8, split="val"), "sampler": {"batch_size": 8},
                    "loader": {"num_workers": 0}}}


def tiny_distilled_cfg(tmp_path, **teacher):
    """The DeiT-Ti distilled config, shrunk: tiny models, synthetic data, two updates."""
    cfg = load("configs/deit/deit_tiny_distilled_patch16_224_4xb256_in1k.yaml",
               [f"output_dir={tmp_path / 'run'}", "train.log_interval=1"])
    del cfg["epochs"]
    cfg.iters = 2
    cfg.model.architecture = dict(TINY_VIT, name="deit_tiny_distilled_patch16_224", drop_path_rate=0.0)
    cfg.teacher = dict({"name": "Classifier", "architecture": dict(TINY_VIT, depth=2), "head": None}, **teacher)
    cfg.dataloader = tiny_data()
    cfg.lr_scheduler.warmup_epochs = 0
    return cfg


def teacher_weights(tmp_path):
    paddle.seed(7)
    teacher = build_model({"name": "Classifier", "architecture": dict(TINY_VIT, depth=2), "head": None})
    path = str(tmp_path / "teacher.pdparams")
    paddle.save(teacher.state_dict(), path)
    return path, {k: v.numpy().copy() for k, v in teacher.state_dict().items()}


def test_distillation_trainer_builds_the_teacher_from_config_and_never_trains_it(tmp_path):
    path, saved = teacher_weights(tmp_path)
    trainer = Trainer(tiny_distilled_cfg(tmp_path, pretrained=path))
    teacher = trainer.loss_fn.teacher
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), saved[k], err_msg=k)
    assert not teacher.training and all(p.stop_gradient for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in trainer.params}

    # the loss is DeiT's hard distillation against this teacher, on the images the student sees
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype("float32"))
    target = F.one_hot(paddle.to_tensor([0, 1, 2, 3, 0, 1]), 4) * 0.9 + 0.1 / 4
    trainer.model.train()
    cls, dist = trainer.model(x)
    got = float(trainer.loss_fn((cls, dist), target, x))
    t_pred = teacher(x).numpy().argmax(1)
    soft = float((-target * F.log_softmax(cls, axis=-1)).sum(-1).mean())
    hard = float(F.cross_entropy(dist, paddle.to_tensor(t_pred)))
    assert got == pytest.approx(0.5 * soft + 0.5 * hard, rel=1e-5)

    student_before = {k: v.numpy().copy() for k, v in trainer.net.state_dict().items()}
    out = trainer.train()
    assert out["global_step"] == 2 and np.isfinite([loss for _, loss in out["history"]]).all()
    for k, v in teacher.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), saved[k], err_msg=k)
    assert any(not np.array_equal(v.numpy(), student_before[k]) for k, v in trainer.net.state_dict().items())


def test_distillation_config_errors_name_the_teacher(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.pretrained: missing"):
        Trainer(tiny_distilled_cfg(tmp_path))
    cfg = tiny_distilled_cfg(tmp_path, pretrained=str(tmp_path / "absent.pdparams"))
    with pytest.raises((ConfigError, FileNotFoundError), match="teacher"):
        Trainer(cfg)
    cfg = tiny_distilled_cfg(tmp_path)
    del cfg["teacher"]
    with pytest.raises(ConfigError, match="teacher: missing"):
        Trainer(cfg)
    path, _ = teacher_weights(tmp_path)
    cfg = tiny_distilled_cfg(tmp_path, pretrained=path)
    cfg.loss = {"name": "SoftTargetCrossEntropy"}
    with pytest.raises(ConfigError, match="only DistillationLoss"):
        Trainer(cfg)


def tiny_plain_cfg(tmp_path, sched, accum=1):
    data = {"model": {"name": "Classifier", "architecture": TINY_VIT, "head": None},
            "dataloader": tiny_data(train_samples=32), "loss": {"name": "CrossEntropyLoss", "ignore_index": None},
            "optimizer": {"name": "AdamW", "weight_decay": 0.05}, "lr_scheduler": sched, "iters": 4, "seed": 1,
            "train": {"accum_steps": accum}, "output_dir": str(tmp_path / "plain")}
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    return get_config(str(path))


def test_trainer_scales_the_rates_by_the_global_batch(tmp_path):
    sched = {"name": "CosineWarmup", "learning_rate": 0.01, "warmup_iters": 2, "warmup_start_lr": 0.001,
             "eta_min": 0.0002, "scale_by_batch": 64}
    trainer = Trainer(tiny_plain_cfg(tmp_path, sched, accum=2))   # 8 images x 1 process x 2 = 16
    s = trainer.scheduler
    assert s.base_lr == pytest.approx(0.0025)
    assert s.warmup_start_lr == pytest.approx(0.00025) and s.eta_min == pytest.approx(0.00005)
    assert trainer.optimizer.get_lr() == pytest.approx(0.00025)   # update 0 starts the warm-up
    unscaled = dict(sched)
    del unscaled["scale_by_batch"]
    assert Trainer(tiny_plain_cfg(tmp_path, unscaled)).scheduler.base_lr == pytest.approx(0.01)
    for bad in (0, "512", 2.5):
        with pytest.raises(ConfigError, match=r"lr_scheduler\.scale_by_batch: expected an integer >= 1"):
            Trainer(tiny_plain_cfg(tmp_path, dict(sched, scale_by_batch=bad)))
