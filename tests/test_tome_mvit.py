"""ToMe on MViTv2 (plfusion/patches/tome/mvit.py): ratio 0 is the unpatched model exactly, shapes stay,
each merged logit row (rel-pos terms included) is the mean of its tokens' rows, every ratio merges
the tokens it says in every stage and costs fewer MACs, remove_patch restores the model, and the
backward pass works."""
import numpy as np
import paddle
import pytest
from conftest import tome_macs_and_maps

from plfusion.models import create_model
from plfusion.patches import tome
from plfusion.patches.tome.dense import DenseMerge
from plfusion.patches.tome.mvit import _merge_heads


@pytest.fixture(scope="module")
def mvit():
    paddle.seed(0)
    m = create_model("mvitv2_tiny", num_classes=10)
    m.eval()
    return m


def test_ratio_zero_is_exact_shapes_stay_and_remove_restores(mvit):
    x = paddle.randn([2, 3, 224, 224])
    with paddle.no_grad():
        plain = mvit(x).numpy()
        tome.apply_patch(mvit, ratio=0.0)
        np.testing.assert_array_equal(mvit(x).numpy(), plain)
        mvit.ratio = [0.5, 0.5, 0.25, 0.0]
        merged = mvit(x).numpy()
        tome.remove_patch(mvit)
        np.testing.assert_array_equal(mvit(x).numpy(), plain)
    assert merged.shape == plain.shape and np.isfinite(merged).all() and not np.allclose(merged, plain)


def test_a_merged_logit_row_is_the_mean_of_its_tokens_rows(mvit):
    blk = mvit.stages[1].blocks[0]                  # a block that pools its queries (stride 2)
    attn = blk.attn
    x = paddle.randn([2, 56 * 56, blk.norm1.weight.shape[0]])
    with paddle.no_grad():
        q, k, v, q_hw, k_hw = attn.pooled_qkv(blk.norm1(x), (56, 56))
        full = attn.add_rel_pos(paddle.matmul(q * attn.scale, k, transpose_y=True), q, q_hw, k_hw)
        B, n, Nq, hd = q.shape
        merge = DenseMerge(q.transpose([0, 2, 1, 3]).reshape([B, Nq, n * hd]), q_hw[0], q_hw[1], Nq // 2)
        rel_h, rel_w = attn.rel_terms(q, q_hw, k_hw)
        qm = _merge_heads(merge, q)
        got = attn.add_rel_terms(paddle.matmul(qm * attn.scale, k, transpose_y=True), _merge_heads(merge, rel_h),
                                 _merge_heads(merge, rel_w), k_hw)
    np.testing.assert_allclose(got.numpy(), _merge_heads(merge, full).numpy(), rtol=1e-4, atol=1e-4)


def test_every_ratio_merges_in_every_stage_and_costs_fewer_macs(mvit):
    tome.apply_patch(mvit, ratio=0.0, trace_source=True)
    try:
        macs, maps = tome_macs_and_maps(mvit, (0.25, 0.5))
    finally:
        tome.remove_patch(mvit)
    for ratio, found in zip((0.25, 0.5), maps):
        assert {s for s, _ in found} == {0, 1, 2, 3}
        for inverse, H, W in found.values():
            assert len(np.unique(inverse.numpy()[0])) == H * W - int(ratio * H * W)
    assert macs[0] > macs[1] > macs[2]


def test_backward_works_with_merging_on():
    paddle.seed(1)
    m = create_model("mvitv2_tiny", num_classes=10)
    tome.apply_patch(m, ratio=0.5)
    m(paddle.randn([2, 3, 224, 224])).mean().backward()
    grads = [p.grad for p in m.parameters() if not p.stop_gradient]
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
