"""GeminiFusion patch: the 2-key pixel attention against numpy, the vectorised fusion against a
per-sample loop, placement in MiT and Swin, weights kept in place, M = 3, official checkpoints,
errors, parameter counts and MACs."""
import math
import re

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from safetensors.numpy import save_file

from plfusion.models import build_model, create_model
from plfusion.models.pretrained import linear_weight_keys
from plfusion.patches import geminifusion
from plfusion.patches.geminifusion import PixelCrossAttention
from plfusion.patches.multimodal import ModalityLayerNorm
from plfusion.utils.flops import count_flops
from conftest import assert_norms_split, shape_only_linears

HEAD = {"name": "SegFormerHead", "num_classes": 5, "embed_dim": 32}
SEG_B0 = {"name": "Segmentor", "architecture": {"name": "mit_b0"}, "head": HEAD}
SWIN_SMALLEST = {"name": "swin_tiny_patch4_window7_224", "num_classes": 0, "out_indices": [0, 1, 2, 3],
                 "embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]}
SEG_SWIN = {"name": "Segmentor", "architecture": SWIN_SMALLEST, "head": HEAD}
GF = [{"name": "geminifusion"}]

_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _pixel_attention_numpy(w, prefix, q, keys, values, heads):
    """Per pixel and head: softmax over the keys of q.k / sqrt(d), weighted sum of the values."""
    lin = lambda name, x: x @ w[f"{prefix}{name}.weight"] + w[f"{prefix}{name}.bias"]  # noqa: E731
    Q = lin("q_proj", q)
    K = [lin("k_proj", k) for k in keys]
    V = [lin("v_proj", v) for v in values]
    T, C = q.shape
    d = C // heads
    out = np.zeros((T, C))
    for t in range(T):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            logits = np.array([Q[t, sl] @ k[t, sl] / math.sqrt(d) for k in K])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[t, sl] = sum(p_s * v[t, sl] for p_s, v in zip(p, V))
    return lin("out_proj", out)


def _fuse_numpy(layer, x, M, heads=8):
    """The official per-sample loop, generalised to M modalities, written out in numpy."""
    w = {k: v.numpy().astype("float64") for k, v in layer.state_dict().items()}
    B = x.shape[0] // M
    out = np.empty_like(x, dtype="float64")
    for b in range(B):
        for m in range(M):
            a = x[m * B + b]
            keys, values = [a + w["k_noise.weight"][m]], [a + w["v_noise.weight"][m]]
            for o in range(M):
                if o == m:
                    continue
                other = x[o * B + b]
                h = _gelu(np.concatenate([a, other], -1) @ w["relation_judger.fc1.weight"]
                          + w["relation_judger.fc1.bias"])
                r = _softmax(h @ w["relation_judger.fc2.weight"] + w["relation_judger.fc2.bias"])
                keys.append(a * r)
                values.append(other)
            out[m * B + b] = a + _pixel_attention_numpy(w, f"cross_attn.{m}.", a, keys, values, heads)
    return out


def _count(model):
    return sum(int(np.prod(p.shape)) for k, p in model.named_parameters() if not k.endswith(("_mean", "_variance")))


def _randomise_norms(model, seed=0):
    rng = np.random.RandomState(seed)
    for _, layer in model.named_sublayers():
        if type(layer) is nn.LayerNorm:
            layer.weight.set_value(1 + 0.2 * rng.randn(*layer.weight.shape).astype("float32"))
            layer.bias.set_value(0.2 * rng.randn(*layer.bias.shape).astype("float32"))


def test_two_key_attention_equals_per_pixel_softmax():
    paddle.seed(3)
    att = PixelCrossAttention(16, num_heads=8)
    for p in att.parameters():    # non-zero biases, so every term of the projections is checked
        p.set_value(paddle.randn(p.shape) * 0.5)
    rng = np.random.RandomState(0)
    q = rng.randn(5, 16).astype("float32")
    keys, values = rng.randn(5, 2, 16).astype("float32"), rng.randn(5, 2, 16).astype("float32")
    out = att(paddle.to_tensor(q), paddle.to_tensor(keys), paddle.to_tensor(values)).numpy()
    w = {k: v.numpy().astype("float64") for k, v in att.state_dict().items()}
    ref = _pixel_attention_numpy(w, "", q, [keys[:, 0], keys[:, 1]], [values[:, 0], values[:, 1]], 8)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("M", [2, 3])
def test_vectorised_fusion_equals_per_sample_loop(M):
    seg = build_model(dict(SEG_B0, patches=[{"name": "geminifusion", "num_modalities": M}]))
    attn = seg.backbone.block1[0].attn                    # C = 32, 8 heads of 4
    x = np.random.RandomState(M).randn(M * 2, 20, 32).astype("float32")
    out = attn.fuse(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(out, _fuse_numpy(attn, x, M), rtol=1e-4, atol=1e-5)


def test_fusion_sits_before_proj_in_mit_and_before_the_shortcut_in_swin():
    seg = build_model(dict(SEG_B0, patches=GF))
    seg.eval()
    attn, H, W = seg.backbone.block2[0].attn, 8, 8
    x = paddle.randn([4, H * W, 64])
    with paddle.no_grad():
        attended = attn.attend(attn.query(x), *attn.key_value(x, H, W))
        expected = attn.project(paddle.to_tensor(_fuse_numpy(attn, attended.numpy(), 2).astype("float32")))
        np.testing.assert_allclose(attn(x, H, W).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)

    swin = build_model(dict(SEG_SWIN, patches=GF))
    swin.eval()
    blk = swin.backbone.layers[0].blocks[1]                # a shifted-window block
    hw = (16, 16)
    mask = swin.backbone.layers[0].attn_mask(hw)
    x = paddle.randn([4, 256, 32])
    with paddle.no_grad():
        branch = _fuse_numpy(blk, blk.attention_branch(x, hw, mask).numpy(), 2).astype("float32")
        expected = blk.mlp_residual(x + paddle.to_tensor(branch))
        np.testing.assert_allclose(blk(x, hw, mask).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def _zero_fusion(backbone):
    for layer in backbone.sublayers():
        if isinstance(layer, PixelCrossAttention):
            layer.out_proj.weight.set_value(paddle.zeros(layer.out_proj.weight.shape))
            layer.out_proj.bias.set_value(paddle.zeros(layer.out_proj.bias.shape))


@pytest.mark.parametrize("cfg, per_modality_norms", [(SEG_B0, 30), (SEG_SWIN, 5)])
def test_patch_in_place_keeps_weights_and_zero_fusion_reproduces_the_unimodal_model(cfg, per_modality_norms):
    seg = build_model(cfg)
    _randomise_norms(seg)
    seg.eval()
    before = {k: v.numpy().copy() for k, v in seg.state_dict().items()}
    rgb, depth = paddle.randn([2, 3, 64, 64]), paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        ref = [seg(rgb).numpy(), seg(depth).numpy()]

    geminifusion.apply_patch(seg, norm_eps=None)
    assert assert_norms_split(before, seg.state_dict()) == 2 * per_modality_norms
    if cfg is SEG_SWIN:   # Swin: in-block and patch-merging norms stay shared
        names = sorted(n for n, layer in seg.backbone.named_sublayers() if isinstance(layer, ModalityLayerNorm))
        assert names == ["norm0", "norm1", "norm2", "norm3", "patch_embed.norm"]

    _zero_fusion(seg.backbone)
    with paddle.no_grad():
        outs = seg([rgb, depth])
    np.testing.assert_allclose(outs[0].numpy(), ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[1].numpy(), ref[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [SEG_B0, SEG_SWIN])
def test_three_modalities_attend_over_all_others(cfg):
    seg = build_model(dict(cfg, patches=[{"name": "geminifusion", "num_modalities": 3}]))
    seg.eval()
    xs = [paddle.randn([1, 3, 64, 64]) for _ in range(3)]
    with paddle.no_grad():
        outs = seg(xs)
        changed = seg([xs[0], xs[1], paddle.randn([1, 3, 64, 64])])
    assert len(outs) == 4 and all(list(o.shape) == [1, 5, 16, 16] for o in outs)
    # modality 0 attends over modality 2 too: changing modality 2 changes modality 0's logits
    assert float(np.abs(changed[0].numpy() - outs[0].numpy()).max()) > 1e-4
    noise = [layer for layer in seg.backbone.sublayers() if isinstance(layer, nn.Embedding)]
    assert noise and all(list(e.weight.shape)[0] == 3 for e in noise)


def _mit_official(k):
    return re.sub(r"(patch_embed\d\.proj|attn\.(?:q|kv|proj|sr)|mlp\.fc[12])\.(weight|bias)$", r"\1.module.\2", k)


def _swin_official(k):
    k = re.sub(r"^patch_embed\.proj\.", "patch_embed.proj.module.", k)
    k = re.sub(r"\.(norm1|norm2)\.(weight|bias)$", r".\1.module.\2", k)
    k = re.sub(r"\.attn\.(qkv|proj|relative_position_bias_table)", r".attn.module.\1", k)
    k = re.sub(r"\.mlp\.(fc1|fc2)\.", r".mlp.\1.module.", k)
    return re.sub(r"\.downsample\.", ".downsample.module.", k)


def _to_official_geminifusion(seg, swin):
    """Our state dict -> the official WeTr's (DataParallel `module.`, `encoder.` / `encoder.body.`,
    ModuleParallel `.module.`, nn.MultiheadAttention's stacked in_proj, torch Linear layout)."""
    linear = linear_weight_keys(seg)
    sd = {k: (v.numpy().T if k in linear else v.numpy()) for k, v in seg.state_dict().items()}
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*)\.cross_attn\.(\d)\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$", k)
        if m:
            prefix, query, proj, kind = m.groups()
            name = f"{prefix}.cross_attn_{query}_to_{1 - int(query)}"
            if proj == "out_proj":
                k = f"{name}.out_proj.{kind}"
            elif proj == "q_proj":
                v = np.concatenate([sd[f"{prefix}.cross_attn.{query}.{p}.{kind}"]
                                    for p in ("q_proj", "k_proj", "v_proj")])
                k = f"{name}.in_proj_{kind}"
            else:
                continue
        k = k.replace(".relation_judger.", ".relation_judger.0.")
        if k.startswith("backbone."):
            tail = k[len("backbone."):]
            k = "encoder.body." + _swin_official(tail) if swin else "encoder." + _mit_official(tail)
        elif k.startswith("head."):
            k = "decoder." + k[len("head."):].replace("bn._mean", "bn.running_mean").replace(
                "bn._variance", "bn.running_var")
        out["module." + k] = np.ascontiguousarray(v)
    if swin:   # the official checkpoint also carries this buffer; the filter must drop it
        out["module.encoder.body.layers.0.blocks.0.attn.module.relative_position_index"] = np.zeros(
            (49, 49), dtype="int64")
    return out


@pytest.mark.parametrize("cfg", [SEG_B0, SEG_SWIN])
def test_official_checkpoint_loads_and_reproduces(cfg, tmp_path):
    swin = cfg is SEG_SWIN
    src = build_model(dict(cfg, patches=GF))
    _randomise_norms(src, seed=1)
    src.alpha.set_value(paddle.to_tensor([0.2, -0.4]))
    src.eval()
    sd = _to_official_geminifusion(src, swin)
    probe = "module.encoder.body.layers.1.blocks.0" if swin else "module.encoder.block2.0.attn"
    assert f"{probe}.cross_attn_1_to_0.in_proj_weight" in sd and f"{probe}.relation_judger.0.fc1.weight" in sd
    path = str(tmp_path / "geminifusion_official.safetensors")
    save_file(sd, path)

    paddle.seed(321)
    dst = build_model(dict(cfg, patches=GF))
    report = dst.load_pretrained(path)
    assert not report.missing and not report.unexpected, str(report)
    dst.eval()
    xs = [paddle.randn([2, 3, 64, 64]), paddle.randn([2, 3, 64, 64])]
    with paddle.no_grad():
        for a, b in zip(src(xs), dst(xs)):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_errors():
    seg = build_model(dict(SEG_B0, patches=GF))
    with pytest.raises(RuntimeError, match="already patched with geminifusion"):
        geminifusion.apply_patch(seg)
    from plfusion.patches import tokenfusion
    with pytest.raises(RuntimeError, match="already patched with geminifusion"):
        tokenfusion.apply_patch(seg)
    with pytest.raises(TypeError, match="expected a MixVisionTransformer or SwinTransformer .* got VisionTransformer"):
        geminifusion.apply_patch(create_model("vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="classification mode"):
        geminifusion.apply_patch(create_model("swin_tiny_patch4_window7_224"))
    with pytest.raises(ValueError, match="num_heads=3 does not divide the feature dim 32"):
        geminifusion.apply_patch(build_model(SEG_B0), num_heads=3)
    x = paddle.randn([1, 3, 64, 64])
    with pytest.raises(ValueError, match="expected 2 modality tensors .* got 1"):
        seg([x])
    with pytest.raises(ValueError, match=r"modality 1 has shape \[2, 3, 64, 64\] but modality 0 has \[1, 3, 64, 64\]"):
        seg([x, paddle.randn([2, 3, 64, 64])])


@pytest.mark.parametrize("arch, millions", [
    ({"name": "mit_b3"}, 74.55),
    ({"name": "mit_b5"}, 137.21),
    ({"name": "swin_tiny_patch4_window7_224", "num_classes": 0, "out_indices": [0, 1, 2, 3]}, 52.0),
    ({"name": "swin_small_patch4_window7_224", "num_classes": 0, "out_indices": [0, 1, 2, 3]}, 92.8),
    ({"name": "swin_large_patch4_window7_224", "num_classes": 0, "out_indices": [0, 1, 2, 3]}, 369.0),
])
def test_parameter_counts(arch, millions):
    with paddle.LazyGuard():
        seg = build_model({"name": "Segmentor", "architecture": arch,
                           "head": {"name": "SegFormerHead", "num_classes": 40}, "patches": GF})
    digits = 2 if arch["name"].startswith("mit") else 1        # REFERENCE's precision per row
    assert round(_count(seg) / 1e6, digits) == millions




def test_fusion_macs_and_mit_b3_at_480x640():
    # exactly what the fusion adds per block, per pixel: M(M-1) relation judgers (3C^2), and per
    # modality q, out (2C^2), k and v over M keys (2M C^2) and the attention itself (2M C)
    plain, fused = build_model(SEG_B0), build_model(dict(SEG_B0, patches=GF))
    shape = [1, 3, 64, 64]
    added = 1e9 * (count_flops(fused, [shape, shape]) - 2 * count_flops(plain, shape))
    M = 2
    expected = sum(2 * n * (M * (M - 1) * 3 * c * c + M * (2 + 2 * M) * c * c + M * 2 * M * c)
                   for n, c in zip([256, 64, 16, 4], [32, 64, 160, 256]))
    assert abs(added - expected) < 1e-6 * expected + 1

    seg = build_model({"name": "Segmentor", "architecture": {"name": "mit_b3"},
                       "head": {"name": "SegFormerHead", "num_classes": 40}, "patches": GF})
    with shape_only_linears():
        gmacs = count_flops(seg, [[1, 3, 480, 640], [1, 3, 480, 640]])
    assert abs(gmacs - 154.5) / 154.5 < 0.02, gmacs       # REFERENCE: 154.5 G
