"""RGB-D fusion configs (configs/geminifusion, configs/tokenfusion, configs/quickstart): every one loads,
passes the engine's checks and builds its model; the models have the published sizes; the NYUDv2 /
SUN RGB-D files carry the official training recipe; the quickstart variants differ only where they should."""
import glob
import os

import numpy as np
import paddle
import pytest

from conftest import param_count
from plfusion.config import get_config
from plfusion.data.loader import build_dataset, validate_section
from plfusion.data.seg_transforms import SEG_TRANSFORMS, Compose
from plfusion.engine.lr_scheduler import build_lr_scheduler
from plfusion.engine.optimizer import build_optimizer
from plfusion.engine.trainer import validate_engine_config
from plfusion.losses import build_loss
from plfusion.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for d in ("geminifusion", "tokenfusion", "quickstart")
                 for p in glob.glob(os.path.join(ROOT, "configs", d, "*.yaml")))
RGBD = [p for p in CONFIGS if not p.endswith("vit_tiny_synthetic.yaml")]
QUICKSTART = {k: f"configs/quickstart/{k}_mit_b0_synthetic.yaml"
              for k in ("geminifusion", "tokenfusion", "rgb_only", "depth_only")}


def load(rel, overrides=()):
    return get_config(os.path.join(ROOT, rel), list(overrides))


def built(rel):
    cfg = load(rel)
    with paddle.LazyGuard():
        model = build_model(cfg.model)
    return cfg, model


def test_every_fusion_config_is_found():
    names = set(CONFIGS)
    assert len([p for p in CONFIGS if p.startswith("configs/geminifusion/")]) == 10
    assert "configs/tokenfusion/nyudv2_mit_b3.yaml" in names
    assert set(QUICKSTART.values()) <= names


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_loads_validates_and_builds(rel):
    cfg, model = built(rel)
    validate_engine_config(cfg)
    for mode, section in cfg.dataloader.items():
        dataset_cfg, sampler, _ = validate_section(section, mode, f"dataloader.{mode}")
        if mode != "train":
            assert not sampler["shuffle"] and not sampler["drop_last"]
        transforms = dataset_cfg.get("transforms")
        if dataset_cfg["name"] == "SyntheticRGBD":   # generated, so it can be built and read here
            inputs, label = build_dataset(dict(dataset_cfg, num_samples=1), seed=0)[0]
            assert len(inputs) == len(dataset_cfg["modalities"]) and all(x.shape[0] == 3 for x in inputs)
            assert label.shape == inputs[0].shape[1:]
        elif dataset_cfg["name"] in ("NYUDv2", "SUNRGBD"):
            Compose([SEG_TRANSFORMS.build(t, where="transforms") for t in transforms])
    iters_per_epoch = 10
    total = cfg.get("iters") or cfg.epochs * iters_per_epoch
    sched = build_lr_scheduler(cfg.lr_scheduler, iters_per_epoch, total)
    with paddle.LazyGuard():
        build_optimizer(cfg.optimizer, model, sched)
    assert isinstance(build_loss(cfg.loss), paddle.nn.Layer)


# the published sizes (REFERENCE.md, GeminiFusion): every parameter, 40-class head, to the digits given
@pytest.mark.parametrize("rel,million,digits", [
    ("configs/geminifusion/nyudv2_mit_b3.yaml", 74.55, 2),
    ("configs/geminifusion/nyudv2_mit_b5.yaml", 137.21, 2),
    ("configs/geminifusion/nyudv2_swin_tiny.yaml", 52.0, 1),
    ("configs/geminifusion/nyudv2_swin_small.yaml", 92.8, 1),
    ("configs/geminifusion/nyudv2_swin_large.yaml", 369.0, 1),
    ("configs/tokenfusion/nyudv2_mit_b3.yaml", 45.92, 2),
])
def test_fusion_models_have_the_published_size(rel, million, digits):
    _, model = built(rel)
    assert round(param_count(model) / 1e6, digits) == pytest.approx(million)


# drop path per the official README commands (--dpr, default 0.4; TokenFusion's MiT uses 0.1)
DROP_PATH = {"nyudv2_mit_b3": 0.4, "nyudv2_mit_b5": 0.35, "nyudv2_swin_tiny": 0.2, "nyudv2_swin_small": 0.4,
             "nyudv2_swin_large": 0.4, "nyudv2_swin_large_window12": 0.2, "sunrgbd_mit_b3": 0.4,
             "sunrgbd_mit_b5": 0.4, "sunrgbd_swin_tiny": 0.4, "sunrgbd_swin_large_window12": 0.4}


@pytest.mark.parametrize("rel", [p for p in RGBD if not p.startswith("configs/quickstart/")])
def test_official_recipe(rel):
    cfg, model = built(rel)
    stem = os.path.splitext(os.path.basename(rel))[0]
    family = rel.split("/")[1]
    nyu = stem.startswith("nyudv2")
    assert cfg.model.architecture.drop_path_rate == (0.1 if family == "tokenfusion" else DROP_PATH[stem])
    assert cfg.model.patches[0]["name"] == family
    assert cfg.model.head.num_classes == (40 if nyu else 37) and cfg.model.head.embed_dim == 256
    assert cfg.output_dir == f"output/{family}_{stem}"

    opt = cfg.optimizer
    assert opt.name == "AdamW" and list(opt.betas) == [0.9, 0.999] and opt.epsilon == 1e-8
    assert opt.weight_decay == (0.05 if stem == "sunrgbd_mit_b5" else 0.01)   # the README's B5 SUN command
    # the official GPUs x 2 images per update: one run spans (nearly all of) one 40000-update poly schedule
    per_epoch = 795 // (3 * 2) if nyu else 5285 // (4 * 2)
    assert cfg.epochs == (300 if nyu else 60) and 38000 <= cfg.epochs * per_epoch <= 40000
    sched = build_lr_scheduler(cfg.lr_scheduler, per_epoch, per_epoch * cfg.epochs)
    assert sched.base_lr == 6e-5 and sched.warmup_iters == 1500 and sched.max_iters == 40000
    assert sched.value(0) == pytest.approx(6e-5 * 1e-6) and sched.value(1500) == pytest.approx(6e-5 * (1 - 1500 / 40000))
    with paddle.LazyGuard():
        optimizer, max_norm = build_optimizer(opt, model, sched)
    assert max_norm is None
    groups = optimizer.param_summary
    head = [g for n, g in groups.items() if n.startswith("head.")]
    norms = [g for n, g in groups.items() if n.startswith("backbone.") and "norm" in n]
    rest = [g for n, g in groups.items() if n.startswith("backbone.") and "norm" not in n]
    assert head and set(head) == {(10.0, opt.weight_decay)}     # decoder: 10x lr, decayed (WeTr)
    assert norms and set(norms) == {(1.0, 0.0)}                 # encoder norms: no decay
    assert rest and set(rest) == {(1.0, opt.weight_decay)}

    train, val = cfg.dataloader.train, cfg.dataloader.val
    crop = [480, 640] if nyu else [480, 480]
    assert train.dataset.name == ("NYUDv2" if nyu else "SUNRGBD") and list(train.dataset.modalities) == ["rgb", "depth"]
    assert train.sampler.batch_size == 2 and val.sampler.batch_size == 1
    steps = {t["name"]: t for t in train.dataset.transforms}
    assert list(steps["RandomResizedCrop"]["crop_size"]) == crop and list(steps["RandomResizedCrop"]["scale"]) == [0.5, 2.0]
    assert steps["RandomResizedCrop"]["relative_to"] == ("image" if nyu else "crop")
    assert steps["ColorJitter"]["prob"] == 0.2 and steps["RandomHorizontalFlip"]["prob"] == 0.5
    assert {t["name"]: t for t in val.dataset.transforms}["Resize"]["size"] == crop


def test_rgbd_normalisation_is_the_official_one():
    """RGB /255 then ImageNet mean/std; an 8-bit depth PNG /255 (read_depth), tiled to 3 channels."""
    cfg = load("configs/geminifusion/nyudv2_mit_b3.yaml")
    steps = [t for t in cfg.dataloader.val.dataset.transforms if t["name"] in ("Normalize", "ToCHW")]
    pipeline = Compose([SEG_TRANSFORMS.build(t, where="transforms") for t in steps])
    rgb = np.array([[[0, 128, 255]]], dtype=np.uint8)
    depth = np.array([[[51]]], dtype=np.float32) / 255.0          # what read_depth returns for the value 51
    out = pipeline({"inputs": [rgb, depth], "modalities": ["rgb", "depth"], "label": np.zeros((1, 1), np.uint8)})
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out["inputs"][0][:, 0, 0], (np.array([0, 128, 255]) / 255.0 - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(out["inputs"][1][:, 0, 0], [0.2, 0.2, 0.2], rtol=1e-6)


def test_quickstart_variants_share_data_and_schedule():
    cfgs = {k: load(v) for k, v in QUICKSTART.items()}
    base = cfgs["geminifusion"]
    assert base.model.architecture.name == "mit_b0" and "pretrained" not in base.model.architecture
    assert [p["name"] for p in base.model.patches] == ["geminifusion"]
    assert [p["name"] for p in cfgs["tokenfusion"].model.patches] == ["tokenfusion"]
    modalities = {"geminifusion": ["rgb", "depth"], "tokenfusion": ["rgb", "depth"], "rgb_only": ["rgb"],
                  "depth_only": ["depth"]}
    outputs = set()
    for name, cfg in cfgs.items():
        outputs.add(cfg.output_dir)
        for mode in ("train", "val"):
            ds = dict(cfg.dataloader[mode].dataset)
            assert ds.pop("modalities") == modalities[name], (name, mode)
            expected = dict(base.dataloader[mode].dataset)
            expected.pop("modalities")
            assert ds == expected, (name, mode)
        assert cfg.dataloader.train.sampler == base.dataloader.train.sampler
        for key in ("iters", "seed", "optimizer", "lr_scheduler", "loss", "train", "eval"):
            assert cfg.get(key) == base.get(key), (name, key)
        if name.endswith("_only"):
            assert "patches" not in cfg.model
        head = dict(cfg.model.head)
        assert head == dict(base.model.head) and head["num_classes"] == 6
    assert len(outputs) == 4      # one run directory each
    assert base.dataloader.train.dataset.split == "train" and base.dataloader.val.dataset.split == "val"
