"""ToMe apply_patch / remove_patch on ViT, DeiT-distilled, T2T-ViT and a Classifier: REFERENCE.md's
invariants, token counts and GFLOPs, and the patch's contract (idempotence, validation, reset)."""
import warnings

import numpy as np
import paddle
import pytest

from plfusion.models import build_model, create_model
from plfusion.models.layers import Attention, Block
from plfusion.models.vision_transformer import VisionTransformer
from plfusion.patches import tome
from plfusion.utils.flops import count_flops


def tiny(**kw):
    cfg = dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    cfg.update(kw)
    m = VisionTransformer(**cfg)
    m.eval()
    return m


def run(m, x):
    with paddle.no_grad():
        return m(x).numpy()


def block_inputs(m, x):
    """Token count entering each block, seen by forward pre-hooks."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda layer, inp: seen.append(inp[0].shape[1])) for b in m.blocks]
    run(m, x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("kw", [{}, {"distilled": True}, {"global_pool": "avg"}])
def test_r0_is_identical_to_unpatched(kw):
    m = tiny(**kw)
    x = paddle.randn([2, 3, 64, 64])
    before = run(m, x)
    tome.apply_patch(m)
    assert m.r == 0
    np.testing.assert_array_equal(run(m, x), before)


def test_token_counts_vit_b_r16():
    # token counts do not depend on width: a narrow ViT-B/16@224 has ViT-B's 197 tokens and 12 blocks
    m = tiny(img_size=224, embed_dim=16, depth=12, num_heads=1)
    tome.apply_patch(m)
    m.r = 16
    x = paddle.randn([1, 3, 224, 224])
    assert block_inputs(m, x) == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]
    assert m._tome_info["size"].shape[1] == 11           # last block clamped from 16 to 10


def test_token_counts_vit_l_384_r25():
    m = tiny(img_size=384, embed_dim=16, depth=24, num_heads=1)
    tome.apply_patch(m)
    m.r = 25
    assert block_inputs(m, paddle.randn([1, 3, 384, 384]))[0] == 577
    assert m._tome_info["size"].shape[1] == 8


@pytest.mark.parametrize("distilled", [False, True])
def test_size_and_source_invariants(distilled):
    m = tiny(distilled=distilled)
    tome.apply_patch(m, trace_source=True)
    m.r = 3
    run(m, paddle.randn([2, 3, 64, 64]))
    size = m._tome_info["size"].numpy()[..., 0]
    source = m._tome_info["source"].numpy()
    t0, prefix = 17 + int(distilled), 1 + int(distilled)
    assert size.shape[1] == t0 - 4 * 3
    np.testing.assert_array_equal(size.sum(1), [t0, t0])
    np.testing.assert_array_equal(size[:, :prefix], np.ones((2, prefix)))   # cls (and distill) kept, size 1
    np.testing.assert_array_equal(source[:, :prefix, :prefix], np.broadcast_to(np.eye(prefix), (2, prefix, prefix)))
    np.testing.assert_array_equal(source.sum(1), np.ones((2, t0)))
    np.testing.assert_array_equal(source.sum(-1), size)


def test_proportional_attention_equals_duplicated_token():
    m = tiny()
    tome.apply_patch(m)
    attn = m.blocks[0].attn
    x = paddle.randn([1, 5, 32])
    size = paddle.to_tensor(np.array([[[1], [1], [2], [1], [1]]], np.float32))
    with paddle.no_grad():
        got, metric = attn(x, size)
        dup = paddle.concat([x, x[:, 2:3]], axis=1)            # token 2 twice, plain attention
        want = Attention.forward(attn, dup)
        k = attn.qkv_heads(x)[1]
    np.testing.assert_allclose(got.numpy(), want.numpy()[:, :5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metric.numpy(), k.mean(1).numpy(), rtol=1e-6)


def test_batched_equals_per_image():
    m = tiny(distilled=True)
    tome.apply_patch(m)
    m.r = (3, -0.5)
    x = paddle.randn([3, 3, 64, 64])
    batched = run(m, x)
    single = np.concatenate([run(m, x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_avg_pool_weighs_tokens_by_size():
    m = tiny(global_pool="avg", num_classes=0)
    tome.apply_patch(m)
    m.r = 3
    x = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        pooled = m(x).numpy()
        tokens = m.forward_features(x).numpy()
    size = m._tome_info["size"].numpy()
    want = (tokens[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
    with paddle.no_grad():
        want = m.fc_norm(paddle.to_tensor(want)).numpy()
    np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(size[:, 1:], 1)                 # the weighting is not trivially uniform


def test_merging_changes_the_output_and_r_is_read_each_forward():
    m = tiny()
    x = paddle.randn([1, 3, 64, 64])
    base = run(m, x)
    tome.apply_patch(m)
    m.r = 4
    merged = run(m, x)
    assert not np.allclose(merged, base)
    m.r = 0
    np.testing.assert_array_equal(run(m, x), base)


def test_state_resets_when_forward_features_is_called_directly():
    m = tiny()
    tome.apply_patch(m, trace_source=True)
    m.r = 2
    x = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        a = m.forward_features(x).numpy()
        b = m.forward_features(x).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.shape[1] == 17 - 4 * 2 and m._tome_info["source"].shape == [2, 9, 17]


def test_remove_patch_restores_classes_and_outputs():
    m = tiny(distilled=True)
    x = paddle.randn([2, 3, 64, 64])
    before = run(m, x)
    tome.apply_patch(m)
    m.r = 3
    tome.remove_patch(m)
    assert type(m) is VisionTransformer
    assert all(type(b) is Block and type(b.attn) is Attention for b in m.blocks)
    assert not any(hasattr(layer, "_tome_info") for layer in m.sublayers(include_self=True))
    assert not hasattr(m, "r")
    np.testing.assert_array_equal(run(m, x), before)
    with pytest.raises(ValueError, match="is not patched"):
        tome.remove_patch(m)


def test_apply_patch_twice_does_nothing():
    m = tiny()
    tome.apply_patch(m)
    cls, info, blk_cls = type(m), m._tome_info, type(m.blocks[0])
    m.r = 2
    tome.apply_patch(m, trace_source=True)
    assert type(m) is cls and m._tome_info is info and type(m.blocks[0]) is blk_cls
    assert m.r == 2 and not info["trace_source"]
    tome.remove_patch(m)
    assert type(m) is VisionTransformer and type(m.blocks[0]) is Block


def test_r_is_validated():
    m = tiny()
    tome.apply_patch(m)
    for bad, err in [(-1, ValueError), ("16", TypeError), (2.5, TypeError), ((4, 3.0), ValueError),
                     ([1] * 5, ValueError)]:
        with pytest.raises(err, match=r"model\.r"):
            m.r = bad
    assert m.r == 0
    m.r = [1, 2]
    assert m.r == [1, 2]


def test_unreachable_r_is_clamped_with_one_warning():
    m = tiny()
    tome.apply_patch(m)
    m.r = 100
    x = paddle.randn([1, 3, 64, 64])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(m, x)
        run(m, x)
    msgs = [str(w.message) for w in caught if "ToMe" in str(w.message)]
    assert len(msgs) == 1 and "clamped to 8" in msgs[0]
    assert m._tome_info["size"].shape[1] == 17 - 8 - 4 - 2 - 1


def test_model_without_blocks_is_rejected():
    with pytest.raises(TypeError, match="Sequential"):
        tome.apply_patch(paddle.nn.Sequential(paddle.nn.Linear(4, 4)))


def test_classifier_from_config_with_patch_entry():
    arch = dict(name="vit_tiny_patch16_224", img_size=64, depth=3, num_classes=0)
    plain = build_model({"architecture": arch, "head": {"name": "LinearClsHead", "in_channels": 192,
                                                         "num_classes": 5}})
    patched = build_model({"architecture": arch, "head": {"name": "LinearClsHead", "in_channels": 192,
                                                           "num_classes": 5},
                           "patches": [{"name": "tome", "r": 4}]})
    patched.set_state_dict(plain.state_dict())
    plain.eval()
    patched.eval()
    assert patched.r == 4 and patched.backbone.r == 4
    x = paddle.randn([2, 3, 64, 64])
    out = run(patched, x)
    assert patched._tome_info["size"].shape[1] == 17 - 4 - 4 - 4
    assert not np.allclose(out, run(plain, x))
    patched.backbone.r = 0                                   # the backbone shares the setting
    assert patched.r == 0
    np.testing.assert_array_equal(run(patched, x), run(plain, x))
    with pytest.raises(ValueError, match="given to apply_patch"):
        tome.remove_patch(patched.backbone)
    tome.remove_patch(patched)
    assert type(patched.backbone) is VisionTransformer and not hasattr(patched.backbone, "r")


def test_t2t_vit_blocks_are_patched():
    m = create_model("t2t_vit_t_14", img_size=64, depth=2, num_classes=3)
    m.eval()
    x = paddle.randn([1, 3, 64, 64])
    before = run(m, x)
    tome.apply_patch(m)
    np.testing.assert_array_equal(run(m, x), before)
    m.r = 2
    run(m, x)
    assert m._tome_info["num_tokens"] == 17 and m._tome_info["size"].shape[1] == 13


def test_merge_is_differentiable():
    m = tiny()
    m.train()
    tome.apply_patch(m)
    m.r = 3
    loss = m(paddle.randn([2, 3, 64, 64])).sum()
    loss.backward()
    g = m.blocks[0].attn.qkv.weight.grad
    assert g is not None and float(g.abs().sum()) > 0


def test_gflops_vit_b_match_the_paper():
    m = create_model("vit_base_patch16_224")
    tome.apply_patch(m)
    # REFERENCE.md: 17.56 unpatched; 8.77 at r=16; 10.37 at r=13; 13.10 at r=8; 5.86 at (16, -1)
    for r, want in [(0, 17.56), (16, 8.77), (13, 10.37), (8, 13.10), ((16, -1), 5.86)]:
        m.r = r
        got = count_flops(m, (1, 3, 224, 224))
        assert abs(got - want) / want < 0.01, (r, got, want)
