"""Losses against hand-computed numpy values."""
import cv2
import numpy as np
import paddle
import pytest

from plfusion.losses import CrossEntropyLoss, DistillationLoss, SoftTargetCrossEntropy, build_loss
from plfusion.registry import LOSSES, ConfigError


def _logsoftmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _t(a, dtype="float32"):
    return paddle.to_tensor(np.asarray(a), dtype=dtype)


def test_registered_names():
    for name in ("CrossEntropyLoss", "SoftTargetCrossEntropy", "DistillationLoss"):
        assert name in LOSSES


def test_ce_classification_hand_computed():
    logits = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]], dtype=np.float32)
    labels = np.array([2, 0])
    # -log softmax: row 0 -> log(e^1+e^2+e^3) - 3, row 1 -> log(e^1+e^0+e^-1) - 1
    expected = np.mean([np.log(np.e + np.e ** 2 + np.e ** 3) - 3, np.log(np.e + 1 + np.e ** -1) - 1])
    loss = CrossEntropyLoss(ignore_index=None)(_t(logits), _t(labels, "int64"))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # the same with the default ignore_index (255 is not a class of 3) and with [B, 1] labels
    loss2 = CrossEntropyLoss()(_t(logits), _t(labels[:, None], "int64"))
    assert float(loss2) == pytest.approx(expected, rel=1e-6)
    ref = paddle.nn.functional.cross_entropy(_t(logits), _t(labels, "int64"))
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_ce_label_smoothing_hand_computed():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2])
    eps = 0.1
    logp = _logsoftmax(logits.astype(np.float64), 1)
    nll = -logp[np.arange(4), labels]
    expected = np.mean((1 - eps) * nll + eps * (-logp.mean(1)))
    loss = CrossEntropyLoss(label_smoothing=eps)(_t(logits), _t(labels, "int64"))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # equivalently: cross entropy against the smoothed target distribution
    target = np.full((4, 5), eps / 5)
    target[np.arange(4), labels] += 1 - eps
    assert float(loss) == pytest.approx(np.mean((-target * logp).sum(1)), rel=1e-5)


def test_ce_class_weights_follow_torch_semantics():
    logits = np.array([[0.5, -1.0, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]], dtype=np.float32)
    labels = np.array([2, 1, 0])
    w = np.array([1.0, 2.0, 0.5])
    logp = _logsoftmax(logits.astype(np.float64), 1)
    nll = -logp[np.arange(3), labels]
    plain = (w[labels] * nll).sum() / w[labels].sum()
    loss = CrossEntropyLoss(weight=list(w))(_t(logits), _t(labels, "int64"))
    assert float(loss) == pytest.approx(plain, rel=1e-5)
    eps = 0.2
    smooth = -(logp * w).sum(1)
    expected = ((1 - eps) * (w[labels] * nll).sum() + eps / 3 * smooth.sum()) / w[labels].sum()
    loss = CrossEntropyLoss(weight=list(w), label_smoothing=eps)(_t(logits), _t(labels, "int64"))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_ce_segmentation_ignore_index_means_over_valid_pixels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 3, 3))
    labels[0, 0, :] = 255
    labels[1, 2, 1] = 255
    logp = _logsoftmax(logits.astype(np.float64), 1)
    b, y, x = np.nonzero(labels != 255)
    expected = -logp[b, labels[b, y, x], y, x].mean()
    loss = CrossEntropyLoss()(_t(logits), _t(labels, "int64"))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_ce_segmentation_upsamples_logits_bilinear_half_pixel():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 3, 2, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(1, 4, 6))
    # opencv's INTER_LINEAR uses half-pixel centres, i.e. align_corners=False
    up = np.stack([cv2.resize(logits[0, k], (6, 4), interpolation=cv2.INTER_LINEAR) for k in range(3)])
    logp = _logsoftmax(up.astype(np.float64), 0)
    yy, xx = np.mgrid[0:4, 0:6]
    expected = -logp[labels[0], yy, xx].mean()
    loss = CrossEntropyLoss()(_t(logits), _t(labels, "int64"))
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    # labels given as [B, 1, H, W] are accepted too
    loss2 = CrossEntropyLoss()(_t(logits), _t(labels[:, None], "int64"))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_ce_all_ignored_is_zero_with_finite_gradient():
    logits = paddle.randn([2, 3, 4, 4])
    logits.stop_gradient = False
    labels = paddle.full([2, 8, 8], 255, dtype="int64")
    loss = CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    assert float(loss) == 0.0
    loss.backward()
    grad = logits.grad.numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() == 0.0


def test_ce_list_of_outputs_is_summed():
    rng = np.random.default_rng(3)
    outs = [_t(rng.normal(size=(2, 5, 4, 4))) for _ in range(3)]
    labels = _t(rng.integers(0, 5, size=(2, 8, 8)), "int64")
    ce = CrossEntropyLoss()
    total = ce(outs, labels)
    parts = [float(ce(o, labels)) for o in outs]
    assert float(total) == pytest.approx(sum(parts), rel=1e-6)
    assert float(ce(tuple(outs), labels)) == pytest.approx(sum(parts), rel=1e-6)
    assert len(set(round(p, 6) for p in parts)) == 3  # distinct parts: the sum is not 3 x one of them


def test_ce_gradient_matches_softmax_minus_onehot():
    logits = _t([[0.2, -0.3, 1.0]])
    logits.stop_gradient = False
    CrossEntropyLoss()(logits, _t([1], "int64")).backward()
    p = np.exp(_logsoftmax(np.array([[0.2, -0.3, 1.0]]), 1))
    np.testing.assert_allclose(logits.grad.numpy(), p - np.array([[0, 1, 0]]), atol=1e-6)


def test_ce_errors():
    ce = CrossEntropyLoss()
    with pytest.raises(ValueError, match="ignore_index=255 is a valid class index"):
        ce(paddle.randn([2, 1000]), _t([3, 999], "int64"))
    ok = CrossEntropyLoss(ignore_index=None)(paddle.randn([2, 1000]), _t([255, 999], "int64"))
    assert np.isfinite(float(ok))
    with pytest.raises(ValueError, match="label 7 is outside"):
        ce(paddle.randn([2, 5]), _t([1, 7], "int64"))
    with pytest.raises(ValueError, match="label -1 is outside"):
        ce(paddle.randn([1, 5, 2, 2]), _t([[[0, -1], [1, 255]]], "int64"))
    with pytest.raises(ValueError, match="SoftTargetCrossEntropy"):
        ce(paddle.randn([2, 5]), paddle.rand([2]))
    with pytest.raises(ValueError, match=r"need labels of shape \[2\]"):
        ce(paddle.randn([2, 5]), _t([1, 2, 3], "int64"))
    with pytest.raises(ValueError, match="weight has 2 entries"):
        CrossEntropyLoss(weight=[1.0, 2.0])(paddle.randn([2, 5]), _t([1, 2], "int64"))
    with pytest.raises(ValueError, match="expected logits"):
        ce(paddle.randn([2, 5, 3]), _t([1, 2], "int64"))
    with pytest.raises(ConfigError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ConfigError, match="ignore_index"):
        CrossEntropyLoss(ignore_index="255")
    with pytest.raises(ConfigError, match="weight"):
        CrossEntropyLoss(weight=[1.0, -1.0])


def test_soft_target_cross_entropy_hand_computed():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    target = np.array([[0.7, 0.3, 0.0], [0.1, 0.1, 0.8]], dtype=np.float32)
    logp = _logsoftmax(logits.astype(np.float64), 1)
    expected = np.mean((-target * logp).sum(1))
    loss = SoftTargetCrossEntropy()(_t(logits), _t(target))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    onehot = np.eye(3, dtype=np.float32)[[0, 2]]
    hard = CrossEntropyLoss()(_t(logits), _t([0, 2], "int64"))
    assert float(SoftTargetCrossEntropy()(_t(logits), _t(onehot))) == pytest.approx(float(hard), rel=1e-6)
    with pytest.raises(ValueError, match="must equal logits shape"):
        SoftTargetCrossEntropy()(_t(logits), _t(target[:, :2]))


class _Teacher(paddle.nn.Layer):
    def __init__(self, weight):
        super().__init__()
        self.fc = paddle.nn.Linear(weight.shape[0], weight.shape[1])
        self.fc.weight.set_value(weight)
        self.fc.bias.set_value(np.zeros(weight.shape[1], dtype=np.float32))
        self.drop = paddle.nn.Dropout(0.9)  # would scramble the logits if left in train mode
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.drop(self.fc(x))


def _distill_setup():
    rng = np.random.default_rng(4)
    inputs = rng.normal(size=(3, 4)).astype(np.float32)
    w_teacher = rng.normal(size=(4, 5)).astype(np.float32)
    cls = rng.normal(size=(3, 5)).astype(np.float32)
    dist = rng.normal(size=(3, 5)).astype(np.float32)
    labels = np.array([1, 4, 0])
    return inputs, w_teacher, cls, dist, labels


def test_hard_distillation_uses_teacher_argmax():
    inputs, w_teacher, cls, dist, labels = _distill_setup()
    teacher = _Teacher(w_teacher)
    teacher.train()
    loss_fn = DistillationLoss({"name": "CrossEntropyLoss"}, teacher, "hard", alpha=0.3)
    cls_t, dist_t = _t(cls), _t(dist)
    cls_t.stop_gradient = False
    dist_t.stop_gradient = False
    loss = loss_fn((cls_t, dist_t), _t(labels, "int64"), _t(inputs))

    t_arg = (inputs @ w_teacher).argmax(1)
    ce = lambda z, y: -_logsoftmax(z.astype(np.float64), 1)[np.arange(len(y)), y].mean()  # noqa: E731
    expected = 0.7 * ce(cls, labels) + 0.3 * ce(dist, t_arg)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert not teacher.training and teacher.calls == 1
    loss.backward()
    assert cls_t.grad is not None and dist_t.grad is not None
    assert teacher.fc.weight.grad is None
    assert len(loss_fn.parameters()) == 0  # the teacher is not a sublayer of the loss


def test_soft_distillation_kl_hand_computed():
    inputs, w_teacher, cls, dist, labels = _distill_setup()
    tau = 2.0
    loss_fn = DistillationLoss(SoftTargetCrossEntropy(), _Teacher(w_teacher), "soft", alpha=0.5, tau=tau)
    target = np.eye(5, dtype=np.float32)[labels]
    loss = loss_fn((_t(cls), _t(dist)), _t(target), _t(inputs))
    logp_s = _logsoftmax(dist.astype(np.float64) / tau, 1)
    logp_t = _logsoftmax((inputs @ w_teacher).astype(np.float64) / tau, 1)
    kl = (np.exp(logp_t) * (logp_t - logp_s)).sum() * tau * tau / dist.size
    base = np.mean((-target * _logsoftmax(cls.astype(np.float64), 1)).sum(1))
    assert float(loss) == pytest.approx(0.5 * base + 0.5 * kl, rel=1e-5)


def test_distillation_none_uses_class_logits_only():
    inputs, _, cls, dist, labels = _distill_setup()

    def boom(_):
        raise AssertionError("teacher must not run for distillation_type='none'")

    loss_fn = DistillationLoss({"name": "CrossEntropyLoss"}, boom, "none")
    loss = loss_fn((_t(cls), _t(dist)), _t(labels, "int64"))
    base = CrossEntropyLoss()(_t(cls), _t(labels, "int64"))
    assert float(loss) == pytest.approx(float(base), rel=1e-6)
    assert float(DistillationLoss({"name": "CrossEntropyLoss"}, None, "none")(_t(cls), _t(labels, "int64"))) \
        == pytest.approx(float(base), rel=1e-6)


def test_distillation_errors():
    inputs, w_teacher, cls, dist, labels = _distill_setup()
    teacher = _Teacher(w_teacher)
    with pytest.raises(ConfigError, match="distillation_type"):
        DistillationLoss({"name": "CrossEntropyLoss"}, teacher, "medium")
    with pytest.raises(ConfigError, match="needs a teacher"):
        DistillationLoss({"name": "CrossEntropyLoss"}, None, "hard")
    with pytest.raises(ConfigError, match="alpha"):
        DistillationLoss({"name": "CrossEntropyLoss"}, teacher, "hard", alpha=2)
    with pytest.raises(ConfigError, match=r"loss.base_loss.name: unknown loss 'CrossEntropy'"):
        DistillationLoss({"name": "CrossEntropy"}, teacher, "hard")
    loss_fn = DistillationLoss({"name": "CrossEntropyLoss"}, teacher, "hard")
    with pytest.raises(ValueError, match="single tensor"):
        loss_fn(_t(cls), _t(labels, "int64"), _t(inputs))
    with pytest.raises(ValueError, match="teacher needs the images"):
        loss_fn((_t(cls), _t(dist)), _t(labels, "int64"))
    with pytest.raises(ValueError, match="do not match"):
        loss_fn((_t(cls[:, :4]), _t(dist[:, :4])), _t(labels % 4, "int64"), _t(inputs))


def test_build_loss():
    loss = build_loss({"name": "CrossEntropyLoss", "label_smoothing": 0.1})
    assert isinstance(loss, CrossEntropyLoss) and loss.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="Did you mean: SoftTargetCrossEntropy"):
        build_loss({"name": "SoftTargetCrossEntropi"})
    with pytest.raises(ConfigError, match="unknown key 'smoothing'"):
        build_loss({"name": "CrossEntropyLoss", "smoothing": 0.1})
    distill = build_loss({"name": "DistillationLoss", "base_loss": {"name": "SoftTargetCrossEntropy"},
                          "distillation_type": "hard"}, teacher=_Teacher(np.eye(4, 5, dtype=np.float32)))
    assert isinstance(distill.base_loss, SoftTargetCrossEntropy) and distill.needs_inputs
