"""TokenFusion patch: token exchange at the threshold, the sparsity term, weights kept in place,
M = 3, official checkpoints, errors, parameter count and MACs."""
import re

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from safetensors.numpy import save_file

from plfusion.models import build_model, create_model
from plfusion.models.pretrained import linear_weight_keys
from plfusion.patches import tokenfusion
from plfusion.patches.multimodal import ModalityLayerNorm
from plfusion.patches.tokenfusion import exchange_tokens
from plfusion.utils.flops import count_flops
from conftest import assert_norms_split, shape_only_linears

SEG_B0 = {"name": "Segmentor", "architecture": {"name": "mit_b0"},
          "head": {"name": "SegFormerHead", "num_classes": 5, "embed_dim": 32}}
TF_B0 = dict(SEG_B0, patches=[{"name": "tokenfusion"}])


def _count(model):
    return sum(int(np.prod(p.shape)) for k, p in model.named_parameters() if not k.endswith(("_mean", "_variance")))


def _randomise_norms(model, seed=0):
    """LayerNorm affines away from 1/0, so copying them is checked."""
    rng = np.random.RandomState(seed)
    for _, layer in model.named_sublayers():
        if type(layer) is nn.LayerNorm:
            layer.weight.set_value(1 + 0.2 * rng.randn(*layer.weight.shape).astype("float32"))
            layer.bias.set_value(0.2 * rng.randn(*layer.bias.shape).astype("float32"))


def _fix_scores(backbone, logits_per_modality):
    """Score nets ignore their input and give every token the logits of its modality."""
    for predictor in backbone.score_predictor:
        for m, net in enumerate(predictor.score_nets):
            net[7].weight.set_value(paddle.zeros(net[7].weight.shape))
            net[7].bias.set_value(paddle.to_tensor(logits_per_modality[m], dtype="float32"))


def test_exchange_tokens_at_threshold():
    rng = np.random.RandomState(0)
    B, N, C = 2, 6, 4
    a = rng.randn(2 * B, N, C).astype("float32")
    m = rng.uniform(0.1, 1.0, (2 * B, N)).astype("float32")
    m[0, :3] = [0.01, 0.0199, 0.02]          # below, just below, at the threshold (kept)
    m[B + 0, :3] = 1.0
    m[B + 1, 4] = 0.005
    masked = a * m[..., None]
    out = exchange_tokens(paddle.to_tensor(masked), paddle.to_tensor(m), 2, 0.02).numpy()
    expected = masked.copy()
    for r in range(2 * B):
        other = (r + B) % (2 * B)
        low = m[r] < 0.02
        expected[r, low] = masked[other, low]
    np.testing.assert_array_equal(out, expected)
    # tokens 0, 1 of modality 0 are exactly modality 1's attention output (its mask there is 1)
    np.testing.assert_array_equal(out[0, :2], a[B, :2])
    np.testing.assert_array_equal(out[0, 2:], masked[0, 2:])     # the others are scaled by their own m
    np.testing.assert_array_equal(out[B + 1, 4], masked[1, 4])

    # three modalities: a dropped token takes the mean of the other two
    a3 = rng.randn(3 * B, N, C).astype("float32")
    m3 = np.full((3 * B, N), 0.5, dtype="float32")
    m3[B, 2] = 0.001
    out3 = exchange_tokens(paddle.to_tensor(a3), paddle.to_tensor(m3), 3, 0.02).numpy()
    np.testing.assert_allclose(out3[B, 2], (a3[0, 2] + a3[2 * B, 2]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(np.delete(out3.reshape(-1, C), B * N + 2, axis=0),
                                  np.delete(a3.reshape(-1, C), B * N + 2, axis=0))


def test_block_masks_and_exchanges_the_attention_branch():
    seg = build_model(TF_B0)
    seg.eval()
    blk = seg.backbone.block2[0]                 # dim 64 on an 8 x 8 grid
    B, H, W, C = 2, 8, 8, 64
    rng = np.random.RandomState(1)
    x = paddle.to_tensor(rng.randn(2 * B, H * W, C).astype("float32"))
    m = rng.uniform(0.05, 1.0, (2 * B, H * W)).astype("float32")
    m[0, :10], m[B, :10] = 0.01, 1.0
    m[B + 1, 20:25] = 0.001
    with paddle.no_grad():
        out = blk(x, H, W, paddle.to_tensor(m)).numpy()
        a = blk.attn_branch(x, H, W).numpy()    # the unmasked attention branch of every row
        branch = a * m[..., None]
        for r in range(2 * B):
            low = m[r] < 0.02
            branch[r, low] = (a * m[..., None])[(r + B) % (2 * B), low]
        np.testing.assert_array_equal(branch[0, :10], a[B, :10])
        x1 = x.numpy() + branch
        expected = x1 + blk.mlp_branch(paddle.to_tensor(x1), H, W).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_sparsity_term_against_hand_computation():
    seg = build_model(dict(SEG_B0, patches=[{"name": "tokenfusion", "sparsity_weight": 1e-3}]))
    assert seg.extra_losses() == {}                # nothing before a forward
    _fix_scores(seg.backbone, [[0.0, 1.0], [2.0, 0.0]])
    seg([paddle.randn([2, 3, 64, 64]), paddle.randn([2, 3, 64, 64])])
    m0, m1 = 1 / (1 + np.exp(1.0)), 1 / (1 + np.exp(-2.0))     # softmax(score)[0] per modality
    tokens = 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2                     # 64x64 input: strides 4, 8, 16, 32
    expected = 1e-3 * 2 * 2 * tokens * (m0 + m1)                 # 2 blocks per stage, batch 2
    losses = seg.extra_losses()
    assert list(losses) == ["tokenfusion_sparsity"]
    assert abs(float(losses["tokenfusion_sparsity"]) - expected) < 1e-5 * expected
    assert len(seg.backbone.token_masks()) == 8
    losses["tokenfusion_sparsity"].backward()          # the term trains the score nets
    grad = seg.backbone.score_predictor[0].score_nets[0][7].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_patch_in_place_keeps_weights_and_unit_masks_reproduce_the_unimodal_model():
    seg = build_model(SEG_B0)
    _randomise_norms(seg)
    seg.eval()
    before = {k: v.numpy().copy() for k, v in seg.state_dict().items()}
    rgb, depth = paddle.randn([2, 3, 64, 64]), paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        ref = [seg(rgb).numpy(), seg(depth).numpy()]

    tokenfusion.apply_patch(seg, norm_eps=None)
    assert assert_norms_split(before, seg.state_dict()) == 2 * 30                      # every LayerNorm of mit_b0 (weight and bias)
    assert sum(isinstance(layer, ModalityLayerNorm) for layer in seg.sublayers()) == 30

    _fix_scores(seg.backbone, [[30.0, -30.0], [30.0, -30.0]])   # m == 1: no scaling, no exchange
    with paddle.no_grad():
        outs = seg([rgb, depth])
    np.testing.assert_allclose(outs[0].numpy(), ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[1].numpy(), ref[1], rtol=1e-4, atol=1e-5)


def test_default_norm_eps_is_the_official_one():
    seg = build_model(TF_B0)
    eps = {layer.epsilon for layer in seg.sublayers() if isinstance(layer, ModalityLayerNorm)}
    assert eps == {1e-6}


def test_three_modalities_run():
    seg = build_model(dict(SEG_B0, patches=[{"name": "tokenfusion", "num_modalities": 3}]))
    seg.eval()
    xs = [paddle.randn([1, 3, 64, 64]) for _ in range(3)]
    outs = seg(xs)
    assert len(outs) == 4 and all(list(o.shape) == [1, 5, 16, 16] for o in outs)
    assert len(seg.backbone.score_predictor[0].score_nets) == 3
    assert not np.allclose(outs[0].numpy(), outs[2].numpy())
    np.testing.assert_allclose(outs[3].numpy(), sum(o.numpy() for o in outs[:3]) / 3, rtol=1e-5, atol=1e-6)


def _to_official_tokenfusion(seg):
    """Our state dict -> the official WeTr's, as saved from DataParallel: `module.encoder.` with
    ModuleParallel's `.module.` inside, `module.decoder.` with torch BN names, torch Linear layout."""
    linear = linear_weight_keys(seg)
    out = {}
    for k, v in seg.state_dict().items():
        v = v.numpy()
        if k in linear:
            v = v.T
        if k.startswith("backbone."):
            name = "encoder." + re.sub(r"(patch_embed\d\.proj|attn\.(?:q|kv|proj|sr)|mlp\.fc[12])\.(weight|bias)$",
                                       r"\1.module.\2", k[len("backbone."):])
        elif k.startswith("head."):
            name = "decoder." + k[len("head."):].replace("bn._mean", "bn.running_mean").replace(
                "bn._variance", "bn.running_var")
        else:
            name = k
        out["module." + name] = np.ascontiguousarray(v)
    out["module.decoder.linear_fuse.bn.num_batches_tracked"] = np.array(7, dtype="int64")
    return out


def test_official_checkpoint_loads_and_reproduces(tmp_path):
    src = build_model(TF_B0)
    _randomise_norms(src, seed=1)
    src.alpha.set_value(paddle.to_tensor([0.5, -0.5]))
    src.eval()
    sd = _to_official_tokenfusion(src)
    assert "module.encoder.block1.0.norm1.ln_1.weight" in sd and "module.encoder.block1.0.attn.q.module.weight" in sd
    path = str(tmp_path / "tokenfusion_official.safetensors")
    save_file(sd, path)

    paddle.seed(123)
    dst = build_model(TF_B0)
    report = dst.load_pretrained(path)
    assert not report.missing and not report.unexpected
    dst.eval()
    xs = [paddle.randn([2, 3, 64, 64]), paddle.randn([2, 3, 64, 64])]
    with paddle.no_grad():
        for a, b in zip(src(xs), dst(xs)):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_unimodal_checkpoint_fills_every_modality_norm(tmp_path):
    mit = create_model("mit_b0")
    _randomise_norms(mit, seed=2)
    path = str(tmp_path / "mit_b0.pdparams")
    paddle.save(mit.state_dict(), path)
    seg = build_model(TF_B0)
    report = seg.backbone.load_pretrained(path)
    assert not report.unexpected
    assert all(k.startswith("score_predictor.") for k in report.missing)
    w = mit.block3[1].norm2.weight.numpy()
    np.testing.assert_array_equal(seg.backbone.block3[1].norm2.ln_0.weight.numpy(), w)
    np.testing.assert_array_equal(seg.backbone.block3[1].norm2.ln_1.weight.numpy(), w)


def test_errors():
    seg = build_model(TF_B0)
    with pytest.raises(RuntimeError, match="already patched with tokenfusion"):
        tokenfusion.apply_patch(seg)
    swin = build_model(dict(SEG_B0, architecture={"name": "swin_tiny_patch4_window7_224", "num_classes": 0,
                                                  "out_indices": [0, 1, 2, 3], "embed_dim": 32,
                                                  "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}))
    with pytest.raises(TypeError, match="expected a MixVisionTransformer .* got Segmentor with a SwinTransformer"):
        tokenfusion.apply_patch(swin)
    with pytest.raises(TypeError, match="got VisionTransformer"):
        tokenfusion.apply_patch(create_model("vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="num_modalities must be an int >= 2"):
        tokenfusion.apply_patch(build_model(SEG_B0), num_modalities=1)
    with pytest.raises(ValueError, match="threshold"):
        tokenfusion.apply_patch(build_model(SEG_B0), threshold=1.5)
    x = paddle.randn([1, 3, 64, 64])
    with pytest.raises(ValueError, match="expected 2 modality tensors .* got 3"):
        seg([x, x, x])
    with pytest.raises(ValueError, match=r"modality 1 has shape \[1, 3, 64, 32\] but modality 0 has \[1, 3, 64, 64\]"):
        seg([x, paddle.randn([1, 3, 64, 32])])
    with pytest.raises(ValueError, match="modality 1 has 1 channels, expected 3"):
        seg([x, paddle.randn([1, 1, 64, 64])])
    with pytest.raises(TypeError, match="expected a list of 2 modality tensors"):
        seg(x)


def test_mit_b3_parameter_count():
    with paddle.LazyGuard():
        seg = build_model({"name": "Segmentor", "architecture": {"name": "mit_b3"},
                           "head": {"name": "SegFormerHead", "num_classes": 40},
                           "patches": [{"name": "tokenfusion"}]})
    assert round(_count(seg) / 1e6, 2) == 45.92          # REFERENCE, 40-class head




def test_score_net_macs_and_mit_b3_at_480x640():
    # at 64x64 the patch adds exactly the score nets: per token C^2 + C^2/2 + C^2/8 + C/2 per modality
    plain = build_model(SEG_B0)
    fused = build_model(TF_B0)
    shape = [1, 3, 64, 64]
    added = 1e9 * (count_flops(fused, [shape, shape]) - 2 * count_flops(plain, shape))
    expected = sum(2 * 2 * n * (c * c + c * c // 2 + c * c // 8 + c // 2)
                   for n, c in zip([256, 64, 16, 4], [32, 64, 160, 256]))
    assert abs(added - expected) < 1e-6 * expected + 1

    seg = build_model({"name": "Segmentor", "architecture": {"name": "mit_b3"},
                       "head": {"name": "SegFormerHead", "num_classes": 40}, "patches": [{"name": "tokenfusion"}]})
    with shape_only_linears():
        gmacs = count_flops(seg, [[1, 3, 480, 640], [1, 3, 480, 640]])
    assert abs(gmacs - 110.2) / 110.2 < 0.02, gmacs       # REFERENCE: 110.2 G
