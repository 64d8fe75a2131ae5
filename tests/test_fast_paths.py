"""The speed rewrites compute the same function as the plain formulation they replace: the bias
inside the GEMM (`layers.Linear`), bilinear resizing as two GEMMs, the SegFormer head's composed per-map projections (instead of
concat -> 1x1 fuse conv at stride 4), and the softmax scale carried by q's weights."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from plfusion.models.heads import SegFormerHead
from plfusion.models.layers import Attention, Linear, resize_bilinear
from plfusion.utils.flops import count_flops


@pytest.mark.parametrize("shape, bias", [([5, 8], True), ([2, 7, 8], True), ([2, 3, 4, 8], True), ([2, 7, 8], False)])
def test_linear_with_the_bias_in_the_gemm_equals_f_linear(shape, bias):
    paddle.seed(0)
    layer = Linear(8, 6, bias_attr=None if bias else False)
    x = paddle.randn(shape)
    x.stop_gradient = False
    y = layer(x)
    ref = F.linear(x, layer.weight, layer.bias)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    assert y.shape == ref.shape
    g = paddle.randn(y.shape)
    grads = paddle.grad([y], [x, layer.weight] + ([layer.bias] if bias else []), [g])
    grads_ref = paddle.grad([ref], [x, layer.weight] + ([layer.bias] if bias else []), [g])
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def _head_by_concat(head, feats):
    """SegFormer's own formulation: per-map Linear, resize, concat deepest first, 1x1 fuse conv."""
    size = feats[0].shape[2:]
    embedded = []
    for i, x in enumerate(feats):
        B, _, h, w = x.shape
        e = getattr(head, f"linear_c{i + 1}")(x).transpose([0, 2, 1]).reshape([B, head.embed_dim, h, w])
        if i:
            e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
        embedded.append(e)
    x = head.linear_fuse(paddle.concat(embedded[::-1], axis=1))
    return head.linear_pred(head.dropout(x))


@pytest.mark.parametrize("train", [False, True])
def test_segformer_head_composed_projections_equal_the_concat_formulation(train):
    paddle.seed(1)
    head = SegFormerHead([8, 16, 24, 32], num_classes=5, embed_dim=12, dropout=0.0)
    for p in head.parameters():   # nonzero biases everywhere, so the bias algebra is exercised
        p.set_value(paddle.randn(p.shape) * 0.3)
    # odd sizes: resizing with fractional scale factors
    feats = [paddle.randn([2, c, 23 // s + 1, 31 // s + 1]) for c, s in zip([8, 16, 24, 32], [1, 2, 4, 8])]
    head.train() if train else head.eval()
    got = head(feats)
    want = _head_by_concat(head, feats)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    if train:
        params = [head.linear_c3.proj.weight, head.linear_c1.proj.bias, head.linear_fuse.conv.weight]
        g = paddle.randn(got.shape)
        for a, b in zip(paddle.grad([head(feats)], params, [g]), paddle.grad([_head_by_concat(head, feats)], params, [g])):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def test_segformer_head_counts_the_papers_multiply_adds():
    head = SegFormerHead([32, 64, 160, 256], num_classes=150, embed_dim=256)
    shapes = [(1, 32, 128, 128), (1, 64, 64, 64), (1, 160, 32, 32), (1, 256, 16, 16)]
    gmacs = count_flops(head, [list(s) for s in shapes])
    expected = sum(h * w * c * 256 for _, c, h, w in shapes) + 128 * 128 * (4 * 256 * 256 + 256 * 150)
    assert gmacs == pytest.approx(expected / 1e9, rel=1e-9)


@pytest.mark.parametrize("band_floats", [1, 3000, 1 << 20])
def test_segformer_head_in_bands_of_rows_equals_the_whole_map(monkeypatch, band_floats):
    """Eval runs the fused map, ReLU and linear_pred one band of rows at a time (1 row, bands that do
    not divide the height, one band): the logits of the whole-map path, and the same multiply-adds."""
    import plfusion.models.layers as layers
    paddle.seed(5)
    head = SegFormerHead([8, 16, 24, 32], num_classes=5, embed_dim=16)
    bn = head.linear_fuse.bn
    bn._mean.set_value(paddle.randn([16]) * 0.1)
    bn._variance.set_value(paddle.rand([16]) + 0.5)
    head.eval()
    feats = [paddle.randn([2, c, h, w]) for c, (h, w) in zip([8, 16, 24, 32], [(13, 17), (7, 9), (4, 5), (2, 3)])]
    monkeypatch.setattr(layers, "BAND_FLOATS", band_floats)
    got, macs = head(feats).numpy(), count_flops(head, [list(f.shape) for f in feats])
    monkeypatch.setattr(SegFormerHead, "_by_bands", lambda self, feats: False)
    np.testing.assert_allclose(got, head(feats).numpy(), rtol=1e-5, atol=1e-5)
    assert macs == count_flops(head, [list(f.shape) for f in feats])


def test_segformer_head_bands_trace_into_a_program_with_a_free_batch(monkeypatch):
    """Exports take the banded head too (matmul + add per band, unrolled): same logits as dygraph."""
    import plfusion.models.layers as layers
    from paddle.static import InputSpec
    monkeypatch.setattr(layers, "BAND_FLOATS", 1000)     # a traced batch of -1 sizes the bands for 1: 5 bands
    paddle.seed(9)
    head = SegFormerHead([8, 16, 24, 32], num_classes=5, embed_dim=16)
    head.eval()
    sizes = [(13, 17), (7, 9), (4, 5), (2, 3)]
    feats = [paddle.randn([2, c, h, w]) for c, (h, w) in zip([8, 16, 24, 32], sizes)]

    class Wrap(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, a, b, c, d):
            return self.head([a, b, c, d])

    spec = [InputSpec([None, c, h, w], "float32") for c, (h, w) in zip([8, 16, 24, 32], sizes)]
    static = paddle.jit.to_static(Wrap(), input_spec=spec, full_graph=True)
    np.testing.assert_allclose(static(*feats).numpy(), head(feats).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("band_floats", [1, 3000, 1 << 20])
def test_mixffn_in_bands_of_rows_equals_the_layer_by_layer_function(monkeypatch, band_floats):
    """MixFFN in eval runs one band of rows at a time (the conv's neighbour rows recomputed at each
    band's edge); training keeps the whole map. Both give fc1 -> dwconv -> GELU -> fc2 of the layers."""
    import plfusion.models.layers as layers
    from plfusion.models.mix_transformer import MixFFN
    paddle.seed(6)
    mlp = MixFFN(8, 32)
    H, W = 11, 7
    x = paddle.randn([3, H * W, 8])
    want = mlp.fc2(mlp.act(mlp.dwconv(mlp.fc1(x), H, W))).numpy()
    monkeypatch.setattr(layers, "BAND_FLOATS", band_floats)
    mlp.eval()
    np.testing.assert_allclose(mlp(x, H, W).numpy(), want, rtol=1e-5, atol=1e-5)
    mlp.train()
    np.testing.assert_allclose(mlp(x, H, W).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("band_floats", [1, 3000, 1 << 20])
def test_mit_attention_in_bands_of_queries_equals_the_whole_softmax(monkeypatch, band_floats):
    import plfusion.models.layers as layers
    from plfusion.models.mix_transformer import EfficientAttention
    paddle.seed(7)
    attn = EfficientAttention(16, num_heads=2, qkv_bias=True, sr_ratio=2)
    H, W = 9, 11
    x = paddle.randn([3, H * W, 16])
    want = attn(x, H, W).numpy()           # training mode (no dropout here): the whole logits at once
    monkeypatch.setattr(layers, "BAND_FLOATS", band_floats)
    attn.eval()
    np.testing.assert_allclose(attn(x, H, W).numpy(), want, rtol=1e-5, atol=1e-5)


def test_attention_with_the_scale_on_q_weights_equals_the_textbook_formula():
    paddle.seed(2)
    attn = Attention(24, num_heads=3, qkv_bias=True)
    attn.eval()
    x = paddle.randn([2, 5, 24])
    w, b = attn.qkv.weight.numpy(), attn.qkv.bias.numpy()
    qkv = (x.numpy() @ w + b).reshape(2, 5, 3, 3, 8).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    s = q @ k.transpose(0, 1, 3, 2) * 8 ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(2, 5, 24) @ attn.proj.weight.numpy() + attn.proj.bias.numpy()
    np.testing.assert_allclose(attn(x).numpy(), o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("src, dst", [((15, 20), (120, 160)), ((17, 23), (64, 61)), ((8, 8), (8, 8)), ((9, 6), (3, 4))])
def test_resize_by_two_gemms_equals_bilinear_interpolate(src, dst, align_corners):
    paddle.seed(3)
    x = paddle.randn([2, 3, *src])
    x.stop_gradient = False
    got = resize_bilinear(x, dst, align_corners)
    want = F.interpolate(x, size=list(dst), mode="bilinear", align_corners=align_corners)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=2e-5)
    g = paddle.randn(got.shape)
    np.testing.assert_allclose(paddle.grad([got], [x], [g])[0].numpy(), paddle.grad([want], [x], [g])[0].numpy(),
                               rtol=1e-4, atol=1e-4)


def test_import_turns_the_slow_strided_copies_off_unless_the_environment_chooses():
    import os
    import subprocess
    import sys
    code = "import paddle, plfusion; print(paddle.get_flags(['FLAGS_use_stride_kernel'])['FLAGS_use_stride_kernel'])"
    env = {k: v for k, v in os.environ.items() if k != "FLAGS_use_stride_kernel"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                                   timeout=120).stdout.split()[-1]
    assert run(env) == "False"
    assert run(dict(env, FLAGS_use_stride_kernel="1")) == "True"
