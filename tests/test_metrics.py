import math

import numpy as np
import paddle
import pytest

from plfusion.metrics import ConfusionMatrix, topk_accuracy

# Hand-worked case (3 classes, one ignored pixel):
#   label 0 0 0 1 1 2 255
#   pred  0 0 1 1 2 2 0
# matrix (rows label, cols pred) = [[2,1,0],[0,1,1],[0,0,1]]
# IoU = 2/3, 1/3, 1/2 -> mIoU 50 ; pixel acc 4/6 ; class acc 2/3, 1/2, 1 -> mean 13/18
LABEL = np.array([[0, 0, 0, 1, 1, 2, 255]])
PRED = np.array([[0, 0, 1, 1, 2, 2, 0]])
MATRIX = np.array([[2, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_hand_worked_confusion_matrix_and_scores():
    cm = ConfusionMatrix(3).update(PRED, LABEL)
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    assert cm.matrix.dtype == np.int64
    r = cm.compute()
    np.testing.assert_allclose(r["per_class_iou"], [200 / 3, 100 / 3, 50])
    assert r["miou"] == pytest.approx(50.0)
    assert r["pixel_acc"] == pytest.approx(400 / 6)
    assert r["mean_acc"] == pytest.approx(1300 / 18)
    np.testing.assert_allclose(r["per_class_acc"], [200 / 3, 50, 100])


def test_absent_class_is_nan_and_excluded_but_false_positive_class_counts():
    # Class 3 appears in neither label nor prediction: NaN, mIoU unchanged.
    r = ConfusionMatrix(4).update(PRED, LABEL).compute()
    assert math.isnan(r["per_class_iou"][3]) and math.isnan(r["per_class_acc"][3])
    assert r["miou"] == pytest.approx(50.0)
    assert r["mean_acc"] == pytest.approx(1300 / 18)
    # Predicting class 3 where the label is 2: IoU_3 = 0 counts, Acc_3 stays NaN (not in label).
    pred = PRED.copy()
    pred[0, 5] = 3
    r = ConfusionMatrix(4).update(pred, LABEL).compute()
    assert r["per_class_iou"][3] == 0.0 and math.isnan(r["per_class_acc"][3])
    # IoU: 2/3, 1/3, 0/2, 0 -> mean over 4 classes
    assert r["miou"] == pytest.approx((200 / 3 + 100 / 3 + 0 + 0) / 4)


def test_logits_numpy_and_paddle_batches_are_argmaxed():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, size=(2, 6, 7))
    label[0, 0, :3] = 255
    pred = rng.integers(0, 5, size=(2, 6, 7))
    logits = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    logits += 10 * np.moveaxis(np.eye(5, dtype=np.float32)[pred], -1, 1)
    ref = ConfusionMatrix(5).update(pred, label).matrix
    np.testing.assert_array_equal(ConfusionMatrix(5).update(logits, label).matrix, ref)
    np.testing.assert_array_equal(
        ConfusionMatrix(5).update(paddle.to_tensor(logits), paddle.to_tensor(label)).matrix, ref)
    # CHW logits for one HW label
    np.testing.assert_array_equal(ConfusionMatrix(5).update(logits[1], label[1]).matrix,
                                  ConfusionMatrix(5).update(pred[1], label[1]).matrix)
    assert ref.sum() == label.size - 3


def test_merge_equals_single_pass_and_reset():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, size=(4, 8, 8))
    pred = rng.integers(0, 4, size=(4, 8, 8))
    whole = ConfusionMatrix(4).update(pred, label)
    a = ConfusionMatrix(4).update(pred[:2], label[:2])
    b = ConfusionMatrix(4).update(pred[2:], label[2:])
    np.testing.assert_array_equal(a.merge(b.matrix).matrix, whole.matrix)
    c = ConfusionMatrix(4).update(pred[:2], label[:2]).merge(paddle.to_tensor(b.matrix))
    assert c.compute() == whole.compute()
    with pytest.raises(ValueError, match="shape"):
        a.merge(np.zeros((3, 3), np.int64))
    a.reset()
    assert a.matrix.sum() == 0 and math.isnan(a.compute()["miou"])


def test_update_rejects_bad_values_with_the_value():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label value 7"):
        cm.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="label value -1"):
        cm.update(np.array([0, 1]), np.array([0, -1]))
    with pytest.raises(ValueError, match="predicted class 5"):
        cm.update(np.array([0, 5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3), np.int64), np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="4 classes"):
        cm.update(np.zeros((1, 4, 2, 2), np.float32), np.zeros((1, 2, 2), np.int64))
    assert cm.matrix.sum() == 0  # failed updates leave the matrix untouched


def test_custom_ignore_index():
    cm = ConfusionMatrix(2, ignore_index=-1).update(np.array([0, 1, 1]), np.array([0, -1, 1]))
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 1]])


# top-k, hand-worked: true-class ranks are 0, 1 and 3.
LOGITS = np.array([[0.1, 0.5, 0.2, 0.9],
                   [0.8, 0.1, 0.7, 0.0],
                   [0.3, 0.2, 0.1, 0.4]], dtype=np.float32)
LABELS = np.array([3, 2, 2])


def test_topk_hand_worked():
    r = topk_accuracy(LOGITS, LABELS, ks=(1, 2, 3, 4))
    assert r == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top3": 200 / 3, "top4": 100.0})


def test_topk_soft_targets_and_paddle_inputs():
    soft = np.full((3, 4), 0.1 / 4, np.float32)
    soft[np.arange(3), LABELS] += 0.9
    ref = topk_accuracy(LOGITS, LABELS, ks=(1, 2))
    assert topk_accuracy(LOGITS, soft, ks=(1, 2)) == ref
    assert topk_accuracy(paddle.to_tensor(LOGITS), paddle.to_tensor(LABELS), ks=(1, 2)) == ref
    assert topk_accuracy(LOGITS, LABELS[:, None], ks=(1, 2)) == ref


def test_topk_ties_count_against_the_prediction():
    assert topk_accuracy(np.zeros((5, 10)), np.arange(5), ks=(1, 5))["top1"] == 0.0
    # tie between the true class and one other: a hit for top-2, not for top-1
    r = topk_accuracy(np.array([[1.0, 1.0, 0.0]]), np.array([0]), ks=(1, 2))
    assert r == {"top1": 0.0, "top2": 100.0}
    assert topk_accuracy(np.array([[np.nan, 1.0, 0.0]]), np.array([0]), ks=(1, 3))["top3"] == 0.0


def test_topk_errors():
    with pytest.raises(ValueError, match="k=5"):
        topk_accuracy(LOGITS, LABELS, ks=(1, 5))
    with pytest.raises(ValueError, match="label 4"):
        topk_accuracy(LOGITS, np.array([0, 4, 1]), ks=(1,))
    with pytest.raises(ValueError, match="shape"):
        topk_accuracy(LOGITS, np.array([0, 1]), ks=(1,))
