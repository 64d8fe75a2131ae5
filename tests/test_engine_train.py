"""The trainer in one process: exact resume, gradient accumulation, NaN stop, run-directory safety,
extra loss terms, AMP on CPU, EMA, VisualDL output and the command line."""
import copy
import glob
import hashlib
import json
import logging
import os

import numpy as np
import paddle
import pytest
import yaml

from plfusion.config import get_config
from plfusion.data.synthetic_imagenet import SyntheticImageNet
from plfusion.engine import OutputDirInUse, Trainer, TrainingDiverged, extra_losses
from plfusion.engine.checkpoint import load_checkpoint
from plfusion.engine.cli import eval_main, train_main
from plfusion.engine.ema import ModelEMA
from plfusion.models.classifier import Classifier
from plfusion.registry import DATASETS, MODELS, ConfigError

BASE = {
    "model": {"name": "Classifier",
              "architecture": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 16,
                               "depth": 1, "num_heads": 2, "num_classes": 0},
              "head": {"name": "LinearClsHead", "in_channels": 16, "num_classes": 4}},
    "dataloader": {
        "train": {"dataset": {"name": "SyntheticImageNet", "num_samples": 32, "image_size": 16, "num_classes": 4,
                              "split": "train", "transforms": [{"name": "RandomHorizontalFlip"}, {"name": "Normalize"},
                                                               {"name": "ToCHW"}]},
                  "sampler": {"batch_size": 8, "shuffle": True, "drop_last": True}, "loader": {"num_workers": 0}},
        "val": {"dataset": {"name": "SyntheticImageNet", "num_samples": 12, "image_size": 16, "num_classes": 4,
                            "split": "val"},
                "sampler": {"batch_size": 5}, "loader": {"num_workers": 0}}},
    "loss": {"name": "CrossEntropyLoss"},
    "optimizer": {"name": "AdamW", "weight_decay": 0.01, "grad_clip": {"max_norm": 1.0}},
    "lr_scheduler": {"name": "CosineWarmup", "learning_rate": 0.01, "warmup_iters": 2},
    "iters": 6,
    "seed": 3,
    "train": {"log_interval": 1, "eval_interval": 4, "save_interval": 4, "keep_last": 2},
}


def merge(base, new):
    out = copy.deepcopy(base)
    for k, v in new.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_cfg(tmp_path, name, replace=None, **changes):
    data = merge(BASE, changes)
    data.update(replace or {})
    data.setdefault("output_dir", str(tmp_path / name))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return get_config(str(path)), str(path)


def weights(trainer):
    return {k: v.numpy().copy() for k, v in trainer.net.state_dict().items()}


def assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def jsonl(output_dir, tag):
    out = {}
    with open(os.path.join(output_dir, "scalars.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if tag in row:
                out[row["step"]] = row[tag]
    return out


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    # dropout, drop path, mixup, flips and EMA all draw randomness; 4 updates per epoch, so the
    # interruption after 3 lands mid-epoch and the resumed run crosses an epoch boundary.
    stochastic = dict(model={"architecture": {"drop_rate": 0.1, "drop_path_rate": 0.1}},
                      mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1},
                      replace={"loss": {"name": "SoftTargetCrossEntropy"}}, ema={"enable": True, "decay": 0.9})
    cfg_a, _ = make_cfg(tmp_path, "full", **stochastic)
    full = Trainer(cfg_a)
    out_a = full.train()
    assert out_a["global_step"] == 6

    cfg_b, _ = make_cfg(tmp_path, "parts", **stochastic)
    first = Trainer(cfg_b).train(max_steps=3)
    assert [l for _, l in first["history"]] == pytest.approx([l for _, l in out_a["history"][:3]], rel=1e-6)
    resumed_trainer = Trainer(cfg_b)
    second = resumed_trainer.train(resume="auto")
    assert [s for s, _ in second["history"]] == [4, 5, 6]
    np.testing.assert_allclose([l for _, l in second["history"]], [l for _, l in out_a["history"][3:]], rtol=1e-5)
    assert_same_weights(weights(full), weights(resumed_trainer))
    ema_a = {k: v.numpy() for k, v in full.ema.state_dict().items()}
    ema_c = {k: v.numpy() for k, v in resumed_trainer.ema.state_dict().items()}
    assert_same_weights(ema_a, ema_c)
    assert "ema_top1" in second["metrics"]
    assert second["metrics"]["top1"] == pytest.approx(out_a["metrics"]["top1"])
    # the same losses were logged, once per step, across both invocations
    assert jsonl(cfg_b.output_dir, "train/loss") == pytest.approx(jsonl(cfg_a.output_dir, "train/loss"), rel=1e-5)
    # keep_last 2 of the periodic checkpoints (3 = the max-steps stop, 4, 6), plus best
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cfg_b.output_dir, "checkpoints", "*.json")))
    assert names == ["best.json", "iter_0000004.json", "iter_0000006.json", "latest.json"]
    assert os.path.isfile(os.path.join(cfg_b.output_dir, "checkpoints", "iter_0000006.ema.pdparams"))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # Momentum rather than AdamW: Adam rescales the float noise of gradients that are zero in exact
    # arithmetic (the key bias) into full-size updates, which would hide what is compared here.
    sgd = {"name": "Momentum", "momentum": 0.9, "weight_decay": 1e-4, "grad_clip": {"max_norm": 1.0}}
    one, _ = make_cfg(tmp_path, "b8", iters=4, replace={"optimizer": sgd},
                      train={"eval_interval": 0, "save_interval": 0})
    two, _ = make_cfg(tmp_path, "b4x2", iters=4, dataloader={"train": {"sampler": {"batch_size": 4}}},
                      replace={"optimizer": sgd}, train={"accum_steps": 2, "eval_interval": 0, "save_interval": 0})
    t1, t2 = Trainer(one), Trainer(two)
    h1, h2 = t1.train()["history"], t2.train()["history"]
    assert t2.iters_per_epoch == t1.iters_per_epoch == 4
    np.testing.assert_allclose([l for _, l in h2], [l for _, l in h1], rtol=1e-5)
    assert_same_weights(weights(t1), weights(t2))


@DATASETS.register
class EngineTestPoisoned(SyntheticImageNet):
    """Images turn to Inf from epoch `bad_epoch` on."""

    def __init__(self, bad_epoch=1, **kwargs):
        super().__init__(**kwargs)
        self.bad_epoch = bad_epoch

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return (image * np.float32(np.inf) if self.epoch >= self.bad_epoch else image), label


def _digest(paths):
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg, _ = make_cfg(tmp_path, "nan", iters=None, epochs=3,
                      dataloader={"train": {"dataset": {"name": "EngineTestPoisoned", "bad_epoch": 1}}},
                      train={"eval_interval": 0, "save_interval": 1})
    del cfg["iters"]
    trainer = Trainer(cfg)
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step 5 \(epoch 2, update 1 of 4\); stopping "
                                               r"without saving.*epoch_1"):
        trainer.train()
    ckpt = os.path.join(cfg.output_dir, "checkpoints")
    assert json.load(open(os.path.join(ckpt, "latest.json")))["name"] == "epoch_1"
    files = sorted(glob.glob(os.path.join(ckpt, "*")))
    assert [os.path.basename(f) for f in files] == ["epoch_1.json", "epoch_1.pdopt", "epoch_1.pdparams", "latest.json"]
    state = load_checkpoint(os.path.join(ckpt, "epoch_1"))
    assert all(np.isfinite(v).all() for v in state["model"].values())
    assert state["state"]["global_step"] == 4


def test_output_dir_of_another_run_is_not_overwritten(tmp_path):
    cfg, _ = make_cfg(tmp_path, "taken", iters=2, train={"eval_interval": 0})
    Trainer(cfg).train()
    before = _digest(glob.glob(os.path.join(cfg.output_dir, "checkpoints", "*")))
    with pytest.raises(OutputDirInUse, match=r"already holds checkpoints of a run \(newest complete: iter_0000002\)"
                                             r"\. Pass --resume auto"):
        Trainer(cfg).train()
    assert _digest(glob.glob(os.path.join(cfg.output_dir, "checkpoints", "*"))) == before
    # resuming a finished run is a no-op that keeps the checkpoints
    assert Trainer(cfg).train(resume="auto")["global_step"] == 2


@MODELS.register
class EngineTestAux(Classifier):
    """A classifier with an extra loss term: 0.5 * sum(head weight ** 2)."""

    def extra_losses(self):
        return {"aux_l2": 0.5 * (self.head.fc.weight ** 2).sum()}


class _Wrapper(paddle.nn.Layer):
    def __init__(self, inner):
        super().__init__()
        self._layers = inner


def test_extra_losses_are_added_found_through_wrappers_and_logged(tmp_path):
    cfg, _ = make_cfg(tmp_path, "aux", iters=2, model={"name": "EngineTestAux"}, train={"eval_interval": 0},
                      optimizer={"grad_clip": None})
    trainer = Trainer(cfg)
    w0 = trainer.net.head.fc.weight.numpy().copy()
    terms = extra_losses(_Wrapper(_Wrapper(trainer.net)))
    assert float(terms["aux_l2"]) == pytest.approx(0.5 * (w0 ** 2).sum(), rel=1e-5)
    trainer.train()
    loss, task, aux = (jsonl(cfg.output_dir, t) for t in ("train/loss", "train/task_loss", "train/aux_l2"))
    assert aux[1] == pytest.approx(0.5 * (w0 ** 2).sum(), rel=1e-5)
    for step in (1, 2):
        assert loss[step] == pytest.approx(task[step] + aux[step], rel=1e-6)
    with pytest.raises(TypeError, match=r"extra_losses\(\) must return a dict"):
        trainer.net.extra_losses = lambda: [1.0]
        extra_losses(trainer.net)


def test_amp_on_cpu_is_switched_off_with_one_warning(tmp_path, caplog):
    cfg, _ = make_cfg(tmp_path, "amp", iters=2, amp={"enable": True, "level": "O2", "dtype": "bfloat16"},
                      train={"eval_interval": 0})
    with caplog.at_level(logging.WARNING, logger="plfusion"):
        logging.getLogger("plfusion").addHandler(caplog.handler)
        trainer = Trainer(cfg)
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "AMP" in r.getMessage()]
    assert len(warnings) == 1 and "disabled, training in float32" in warnings[0]
    assert trainer.scaler is None and not trainer.amp_enabled
    assert all(p.dtype == paddle.float32 for p in trainer.net.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("level, dtype", [("O1", "float16"), ("O2", "bfloat16")])
def test_amp_on_gpu_trains_and_resumes(tmp_path, level, dtype):
    cfg, _ = make_cfg(tmp_path, f"amp_{level}", iters=4, amp={"enable": True, "level": level, "dtype": dtype})
    trainer = Trainer(cfg)
    out = trainer.train(max_steps=2)
    assert trainer.amp_enabled and np.isfinite([l for _, l in out["history"]]).all()
    assert Trainer(cfg).train(resume="auto")["global_step"] == 4


def test_ema_average_follows_the_formula():
    paddle.seed(0)
    model = paddle.nn.Linear(3, 2)
    w0 = model.weight.numpy().copy()
    ema = ModelEMA(model, decay=0.75)
    with paddle.no_grad():
        model.weight.set_value(model.weight + 1.0)
    ema.update(model)
    np.testing.assert_allclose(ema.state_dict()["weight"].numpy(), 0.75 * w0 + 0.25 * (w0 + 1.0), rtol=1e-6)
    with ema.swapped(model):
        np.testing.assert_allclose(model.weight.numpy(), 0.75 * w0 + 0.25 * (w0 + 1.0), rtol=1e-6)
    np.testing.assert_allclose(model.weight.numpy(), w0 + 1.0, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"ema.decay: expected a number in \[0, 1\), got 1.5"):
        ModelEMA(model, decay=1.5)


def test_visualdl_scalars_are_readable(tmp_path):
    from visualdl import LogReader
    cfg, _ = make_cfg(tmp_path, "vdl", iters=4)
    Trainer(cfg).train()
    files = glob.glob(os.path.join(cfg.output_dir, "vdl", "*"))
    assert len(files) == 1
    reader = LogReader(file_path=files[0])
    tags = reader.get_tags()["scalar"]
    assert {"train/loss", "train/lr", "train/ips", "eval/top1"} <= set(tags)
    losses = {r.id: r.value for r in reader.get_data("scalar", "train/loss")}
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses == pytest.approx(jsonl(cfg.output_dir, "train/loss"), rel=1e-6)
    lrs = {r.id: r.value for r in reader.get_data("scalar", "train/lr")}
    assert lrs[1] == pytest.approx(0.0) and lrs[2] == pytest.approx(0.005)   # warmup 2 updates from 0 to 0.01


@pytest.mark.parametrize("changes, message", [
    ({"train": {"acum_steps": 2}}, "train.acum_steps: unknown key. Did you mean: accum_steps"),
    ({"train": {"log_interval": "10"}}, "train.log_interval: expected an integer >= 1, got '10'"),
    ({"amp": {"level": "O3"}}, "amp.level: expected O1 or O2, got 'O3'"),
    ({"ema": {"enabled": True}}, "ema.enabled: unknown key. Did you mean: enable"),
    ({"epochs": 2}, "exactly one of 'epochs' or 'iters'"),
    ({"optimizer": {"betas": [0.9]}}, r"optimizer.betas: expected two numbers in \[0, 1\)"),
    ({"dataloader": {"train": {"sampler": {"batch_size": 0}}}},
     "dataloader.train.sampler.batch_size: expected an integer >= 1, got 0"),
    ({"train": {"best_metric": "top_1"}}, "train.best_metric: expected an evaluation metric"),
    ({"mixup": {"mixup_alpa": 0.8}}, "mixup: unknown key 'mixup_alpa'"),
])
def test_config_errors_name_the_key_path(tmp_path, changes, message):
    cfg, _ = make_cfg(tmp_path, "bad", **changes)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg)


def test_command_line_train_then_eval(tmp_path, capsys):
    _, path = make_cfg(tmp_path, "cli", iters=2, train={"eval_interval": 0})
    out_dir = str(tmp_path / "cli")
    assert train_main(["-c", path, "--threads", "1"]) == 0
    assert os.path.isfile(os.path.join(out_dir, "config.yaml"))
    assert train_main(["-c", path, "-o", "optimizer.weight_decya=0.1"]) == 2
    assert "optimizer.weight_decya" in capsys.readouterr().err
    assert train_main(["-c", path, "--eval"]) == 2
    assert "exactly one of --resume CKPT or --pretrained WEIGHTS" in capsys.readouterr().err
    assert eval_main(["-c", path, "--resume", out_dir]) == 0
    results = json.load(open(os.path.join(out_dir, "eval_results.json")))
    assert results["weights"].endswith("iter_0000002") and results["metrics"]["samples"] == 12
    weights = os.path.join(out_dir, "checkpoints", "iter_0000002.pdparams")
    assert eval_main(["-c", path, "--pretrained", weights]) == 0
    by_weights = json.load(open(os.path.join(out_dir, "eval_results.json")))
    assert by_weights["weights"] == weights and by_weights["metrics"] == results["metrics"]
    assert eval_main(["-c", path, "--resume", os.path.join(out_dir, "checkpoints", "nothing.pdparams")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_quickstart_config_runs(tmp_path, root_dir):
    cfg = get_config(os.path.join(root_dir, "configs", "quickstart", "vit_tiny_synthetic.yaml"),
                     [f"output_dir={tmp_path / 'qs'}", "dataloader.val.dataset.num_samples=40",
                      "dataloader.train.loader.num_workers=0"])
    trainer = Trainer(cfg)
    assert trainer.iters_per_epoch == 125 and trainer.total_steps == 375
    out = trainer.train(max_steps=2)
    assert out["global_step"] == 2 and out["metrics"]["samples"] == 40 and "top1" in out["metrics"]
    assert os.path.isfile(os.path.join(cfg.output_dir, "checkpoints", "iter_0000002.pdparams"))
