"""LR schedules against hand-computed values; parameter groups, weight decay and clipping."""
import math

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from plfusion.config import AttrDict
from plfusion.engine.lr_scheduler import CosineWarmup, PolyWarmup, Step, build_lr_scheduler
from plfusion.engine.optimizer import build_optimizer, build_param_groups, clip_grad_norm
from plfusion.models import build_model
from plfusion.registry import ConfigError


def values(sched, steps):
    out = {}
    for t in range(max(steps) + 1):
        if t in steps:
            out[t] = sched.get_lr()
        sched.step()
    return out


def test_poly_warmup_matches_tokenfusion_formula():
    # TokenFusion / GeminiFusion NYUDv2: lr 6e-5, warmup 1500 from ratio 1e-6, poly power 1 over 40000.
    s = PolyWarmup(6e-5, max_iters=40000, warmup_iters=1500, warmup_ratio=1e-6, power=1.0)
    got = values(s, [0, 750, 1499, 1500, 20000, 39999, 45000])
    assert got[0] == pytest.approx(6e-11, rel=1e-9)                      # 6e-5 * 1e-6
    assert got[750] == pytest.approx(3.0000030e-5, rel=1e-9)             # 6e-5 * (1 - 0.5 * (1 - 1e-6))
    assert got[1499] == pytest.approx(5.99600004e-5, rel=1e-8)           # 6e-5 * (1 - 1/1500 * (1 - 1e-6))
    assert got[1500] == pytest.approx(5.775e-5, rel=1e-12)               # 6e-5 * (1 - 1500/40000): t / T, not (t-W)/(T-W)
    assert got[20000] == pytest.approx(3.0e-5, rel=1e-12)
    assert got[39999] == pytest.approx(1.5e-9, rel=1e-9)                 # 6e-5 / 40000
    assert got[45000] == got[39999]                                      # held after max_iters, as the reference does
    p9 = PolyWarmup(6e-5, max_iters=40000, warmup_iters=0, warmup_ratio=1e-6, power=0.9)
    assert values(p9, [20000])[20000] == pytest.approx(6e-5 * 0.5 ** 0.9, rel=1e-12)  # 3.2153e-5


def test_cosine_warmup_values():
    s = CosineWarmup(1e-3, max_iters=100, warmup_iters=10, warmup_start_lr=1e-6, eta_min=1e-5)
    got = values(s, [0, 5, 10, 40, 55, 100, 150])
    assert got[0] == pytest.approx(1e-6)
    assert got[5] == pytest.approx(5.005e-4)         # halfway from 1e-6 to 1e-3
    assert got[10] == pytest.approx(1e-3)
    assert got[40] == pytest.approx(7.525e-4)        # cos(pi/3) = 0.5 -> 1e-5 + 0.99e-3 * 0.75
    assert got[55] == pytest.approx(5.05e-4)         # halfway down
    assert got[100] == pytest.approx(1e-5) and got[150] == pytest.approx(1e-5)


def test_step_values_and_epoch_units():
    s = Step(0.1, milestones=[30, 60], gamma=0.1, warmup_iters=5, warmup_start_lr=0.0)
    got = values(s, [0, 2, 5, 29, 30, 59, 60, 100])
    assert [got[t] for t in (0, 2, 5, 29)] == pytest.approx([0.0, 0.04, 0.1, 0.1])
    assert [got[t] for t in (30, 59, 60, 100)] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    # epochs convert with the number of updates per epoch (10 here)
    cfg = AttrDict(name="Step", learning_rate=0.1, milestone_epochs=[3], warmup_epochs=2)
    built = build_lr_scheduler(cfg, iters_per_epoch=10, total_iters=100)
    assert built.warmup_iters == 20 and built.milestones == [30]
    cos = build_lr_scheduler(AttrDict(name="CosineWarmup", learning_rate=1.0, warmup_iters=0), 10, 40)
    assert values(cos, [20])[20] == pytest.approx(0.5)   # max_iters defaults to the run length


@pytest.mark.parametrize("cfg, message", [
    ({"name": "Poly", "learning_rate": 0.1}, "lr_scheduler.name: unknown schedule 'Poly'. Did you mean: PolyWarmup"),
    ({"name": "PolyWarmup", "learning_rate": 0.1, "warmup_iter": 5}, "lr_scheduler.warmup_iter: unknown key"),
    ({"name": "PolyWarmup", "learning_rate": "0.1"}, "lr_scheduler.learning_rate: expected a number"),
    ({"name": "CosineWarmup", "learning_rate": 0.1, "warmup_iters": -1}, "lr_scheduler.warmup_iters"),
    ({"name": "CosineWarmup", "learning_rate": 0.1, "warmup_iters": 500}, "warmup (500 updates) is longer"),
    ({"name": "Step", "learning_rate": 0.1}, "exactly one of 'milestones'"),
])
def test_schedule_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_lr_scheduler(AttrDict(cfg), iters_per_epoch=10, total_iters=100)


def tiny_classifier():
    return build_model(AttrDict(
        name="Classifier",
        architecture=AttrDict(name="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1,
                              num_heads=2, num_classes=0),
        head=AttrDict(name="LinearClsHead", in_channels=16, num_classes=3)))


def test_param_groups_lr_mult_and_no_weight_decay():
    model = tiny_classifier()
    groups, summary = build_param_groups(model, 0.05, [{"pattern": "head.*", "lr_mult": 10.0}],
                                         ["norm", "bias", "pos_embed", "cls_token"])
    assert summary["head.fc.weight"] == (10.0, 0.05)
    assert summary["head.fc.bias"] == (10.0, 0.0)
    assert summary["backbone.blocks.0.attn.qkv.weight"] == (1.0, 0.05)
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight",
                 "backbone.blocks.0.attn.qkv.bias", "backbone.norm.bias"):
        assert summary[name] == (1.0, 0.0), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {(g["learning_rate"], g["weight_decay"]) for g in groups} == {(10.0, 0.05), (10.0, 0.0), (1.0, 0.05),
                                                                          (1.0, 0.0)}

    # Fusion style: only "norm" listed. The backbone's own no_weight_decay() still exempts pos_embed and
    # cls_token; biases are decayed; a LayerNorm whose name has no "norm" in it is found by its type.
    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_classifier().backbone
            self.ln = nn.LayerNorm(16)
    _, s2 = build_param_groups(Net(), 0.01, None, ["norm"])
    assert s2["backbone.pos_embed"] == (1.0, 0.0) and s2["backbone.cls_token"] == (1.0, 0.0)
    assert s2["backbone.blocks.0.attn.qkv.bias"] == (1.0, 0.01)
    assert s2["ln.weight"] == (1.0, 0.0) and s2["ln.bias"] == (1.0, 0.0)


def test_param_group_errors_name_the_key():
    model = tiny_classifier()
    with pytest.raises(ConfigError, match=r"optimizer.param_groups\[0\].pattern: \['decoder.\*'\] matches no"):
        build_param_groups(model, 0.01, [{"pattern": "decoder.*", "lr_mult": 10.0}])
    with pytest.raises(ConfigError, match=r"optimizer.param_groups\[0\].lr_mul: unknown key. Did you mean: lr_mult"):
        build_param_groups(model, 0.01, [{"pattern": "head.*", "lr_mul": 10.0}])
    with pytest.raises(ConfigError, match=r"optimizer.param_groups\[0\].lr_mult: expected a number >= 0, got '10'"):
        build_param_groups(model, 0.01, [{"pattern": "head.*", "lr_mult": "10"}])
    with pytest.raises(ConfigError, match="optimizer.momentun: unknown key for Momentum. Did you mean: momentum"):
        build_optimizer(AttrDict(name="Momentum", momentun=0.9), model, 0.1)
    with pytest.raises(ConfigError, match="optimizer.name: unknown optimizer 'Adamw'. Did you mean: AdamW"):
        build_optimizer(AttrDict(name="Adamw"), model, 0.1)


class Two(nn.Layer):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _one_step(cfg, lr=0.1):
    paddle.seed(1)
    model = Two()
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    opt, _ = build_optimizer(AttrDict(cfg), model, lr)
    x = paddle.to_tensor(np.array([[1.0, -2.0, 0.5]], np.float32))
    model(x).sum().backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    opt.step()
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    return before, grads, after


def test_adamw_decoupled_decay_and_lr_mult_per_group():
    cfg = {"name": "AdamW", "weight_decay": 0.5, "param_groups": [{"pattern": "head.*", "lr_mult": 10.0}],
           "no_weight_decay": ["bias"]}
    before, grads, after = _one_step(cfg)
    for name in before:
        lr = 0.1 * (10.0 if name.startswith("head.") else 1.0)
        wd = 0.0 if name.endswith("bias") else 0.5
        g = grads[name]
        # first Adam step: m_hat = g, v_hat = g^2; decay is decoupled: p * (1 - lr * wd)
        expected = before[name] * (1 - lr * wd) - lr * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_momentum_and_sgd_weight_decay_is_l2_per_group():
    for name in ("SGD", "Momentum"):
        cfg = {"name": name, "weight_decay": 0.5, "param_groups": [{"pattern": "head.*", "lr_mult": 2.0}],
               "no_weight_decay": ["bias"]}
        before, grads, after = _one_step(cfg)
        for key in before:
            lr = 0.1 * (2.0 if key.startswith("head.") else 1.0)
            wd = 0.0 if key.endswith("bias") else 0.5
            expected = before[key] - lr * (grads[key] + wd * before[key])   # first step: velocity = gradient
            np.testing.assert_allclose(after[key], expected, rtol=1e-5, atol=1e-7, err_msg=f"{name} {key}")


def test_clip_grad_norm_is_global_over_groups():
    paddle.seed(2)
    model = Two()
    opt, max_norm = build_optimizer(AttrDict(name="SGD", grad_clip={"max_norm": 0.5},
                                             param_groups=[{"pattern": "head.*", "lr_mult": 3.0}]), model, 0.1)
    assert max_norm == 0.5
    x = paddle.to_tensor(np.array([[3.0, -2.0, 4.0]], np.float32))
    (model(x) * 10).sum().backward()
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    assert norm > 0.5
    returned = clip_grad_norm(list(model.parameters()), max_norm)
    assert returned == pytest.approx(norm, rel=1e-5)
    clipped = [p.grad.numpy() for p in model.parameters()]
    assert math.sqrt(sum(float((g ** 2).sum()) for g in clipped)) == pytest.approx(0.5, rel=1e-5)
    for g0, g1 in zip(grads, clipped):     # one scale for all groups: directions kept
        np.testing.assert_allclose(g1, g0 * (0.5 / norm), rtol=1e-5)
    # below the limit nothing changes
    assert clip_grad_norm(list(model.parameters()), 10.0) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(model.parameters()[0].grad.numpy(), clipped[0])
