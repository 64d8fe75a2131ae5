import math

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from safetensors.numpy import save_file

from conftest import param_count
from plfusion.config import get_config
from plfusion.models import build_model, create_model, list_models
from plfusion.models.mix_transformer import MixVisionTransformer
from plfusion.models.pretrained import linear_weight_keys
from plfusion.utils.flops import count_flops

# REFERENCE.md, MiT: encoder params (M), no head
PARAMS = {"mit_b0": 3.319, "mit_b1": 13.151, "mit_b2": 24.196, "mit_b3": 44.072, "mit_b4": 60.843,
          "mit_b5": 81.443}
TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 2, 1),
            sr_ratios=(4, 2, 2, 1), drop_path_rate=0.0)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_encoder_param_counts(name):
    with paddle.LazyGuard():
        m = create_model(name)
    assert m.head is None
    assert round(param_count(m) / 1e6, 3) == PARAMS[name]


def test_every_mit_variant_is_checked():
    assert set(list_models("mit_*")) == set(PARAMS)


def segformer_head_gmacs(channels, embed, num_classes, H, W):
    """SegFormer's all-MLP decoder: per-stage Linear to `embed`, 1x1 fuse of 4*embed, 1x1 classifier,
    all at stride 4 except the per-stage Linears."""
    strides = (4, 8, 16, 32)
    linear = sum(c * embed * (H // s) * (W // s) for c, s in zip(channels, strides))
    hw = (H // 4) * (W // 4)
    return (linear + 4 * embed * embed * hw + embed * num_classes * hw) / 1e9


def test_gflops_with_segformer_head_match_the_paper():
    # SegFormer-B0, ADE20K (150 classes) at 512x512: 8.4 GFLOPs for encoder + decoder (embed 256)
    enc = count_flops(create_model("mit_b0"), (1, 3, 512, 512))
    total = enc + segformer_head_gmacs((32, 64, 160, 256), 256, 150, 512, 512)
    assert abs(total - 8.4) / 8.4 < 0.02


def test_layernorm_eps_and_names_follow_segformer():
    with paddle.LazyGuard():
        m = create_model("mit_b1")
    eps = {n: l._epsilon for n, l in m.named_sublayers() if isinstance(l, nn.LayerNorm)}
    for n, e in eps.items():
        want = 1e-5 if n.endswith(("patch_embed1.norm", "patch_embed2.norm", "patch_embed3.norm",
                                   "patch_embed4.norm", "attn.norm")) else 1e-6
        assert e == want, n
    # patch-embed norms, stage norms, block norms, attn.norm in the 6 blocks of stages 1-3 (sr > 1)
    assert len(eps) == 4 + 4 + 2 * 8 + 6
    keys = set(m.state_dict())
    for k in ("patch_embed1.proj.weight", "patch_embed1.norm.bias", "block1.0.norm1.weight", "block1.0.attn.q.bias",
              "block1.0.attn.kv.weight", "block1.0.attn.sr.weight", "block1.0.attn.norm.weight",
              "block1.0.attn.proj.bias", "block1.1.mlp.fc1.weight", "block1.1.mlp.dwconv.dwconv.weight",
              "block4.1.mlp.fc2.bias", "norm4.weight"):
        assert k in keys, k
    assert not any(k.startswith("block4.0.attn.sr") or k.startswith("block4.0.attn.norm") for k in keys)
    assert list(m.patch_embed1.proj.weight.shape) == [64, 3, 7, 7]
    assert list(m.patch_embed2.proj.weight.shape) == [128, 64, 3, 3]


@pytest.mark.parametrize("size", [(64, 96), (67, 101)])
def test_four_maps_at_strides_4_to_32_for_any_size(size):
    m = create_model("mit_b0", drop_path_rate=0.0)
    m.eval()
    outs = m(paddle.randn([1, 3, *size]))
    H, W = size
    for i, (o, c) in enumerate(zip(outs, (32, 64, 160, 256))):
        H, W = (H - 1) // (4 if i == 0 else 2) + 1, (W - 1) // (4 if i == 0 else 2) + 1  # ceil division
        assert o.shape == [1, c, H, W]


def test_out_indices_and_classification_head():
    m = MixVisionTransformer(**TINY)
    m.eval()
    x = paddle.randn([2, 3, 40, 48])
    full = m(x)
    assert m.out_channels == [8, 16, 24, 32] and m.num_features == 32
    part = MixVisionTransformer(**TINY, out_indices=(1,))
    part.set_state_dict(m.state_dict())
    part.eval()
    (only,) = part(x)
    np.testing.assert_array_equal(only.numpy(), full[1].numpy())
    assert part.out_channels == [16]

    clf = MixVisionTransformer(**TINY, num_classes=5)
    clf.set_state_dict({**clf.state_dict(), **m.state_dict()})
    clf.eval()
    pooled = full[3].numpy().mean(axis=(2, 3))
    ref = pooled @ clf.head.weight.numpy() + clf.head.bias.numpy()
    np.testing.assert_allclose(clf(x).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(clf.forward_head(full, pre_logits=True).numpy(), pooled, atol=1e-6)


def test_classification_config_builds(root_dir):
    cfg = get_config(f"{root_dir}/configs/mit/mit_b0.yaml")
    model = build_model(cfg.model)
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    logits = model(x)
    assert logits.shape == [2, 1000]
    (last,) = model.backbone(x)
    ref = last.numpy().mean(axis=(2, 3)) @ model.head.fc.weight.numpy() + model.head.fc.bias.numpy()
    np.testing.assert_allclose(logits.numpy(), ref, atol=1e-4)


def test_drop_path_rates_increase_over_all_blocks():
    with paddle.LazyGuard():
        m = create_model("mit_b0", drop_path_rate=0.35)
    rates = [float(b.drop_path.drop_prob) if hasattr(b.drop_path, "drop_prob") else 0.0
             for i in range(4) for b in m.stage_layers(i)[1]]
    np.testing.assert_allclose(rates, np.linspace(0, 0.35, 8), atol=1e-7)


def test_kv_len_matches_the_sr_conv_on_odd_grids():
    m = MixVisionTransformer(**TINY)
    attn = m.block1[0].attn          # sr_ratio 4
    H, W = 13, 10
    k, v = attn.key_value(paddle.randn([1, H * W, 8]), H, W)
    assert k.shape[2] == attn.kv_len(H, W) == 3 * 2


# ---- an independent numpy forward from a SegFormer-named, torch-layout state dict ----

def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _conv(x, w, b, stride, pad, groups=1):
    B, C, H, W = x.shape
    O, cg, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    out = np.zeros((B, O, oh, ow))
    og = O // groups
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        for i in range(k):
            for j in range(k):
                patch = xs[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
                out[:, g * og:(g + 1) * og] += np.einsum("bchw,oc->bohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out + b[None, :, None, None]


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def numpy_mit(sd, x, heads, depths, srs):
    outs = []
    for i in range(4):
        k, s = (7, 4) if i == 0 else (3, 2)
        x = _conv(x, sd[f"patch_embed{i + 1}.proj.weight"], sd[f"patch_embed{i + 1}.proj.bias"], s, k // 2)
        B, C, H, W = x.shape
        t = _ln(x.reshape(B, C, H * W).transpose(0, 2, 1), sd[f"patch_embed{i + 1}.norm.weight"],
                sd[f"patch_embed{i + 1}.norm.bias"], 1e-5)
        nh, hd, N = heads[i], C // heads[i], H * W
        for j in range(depths[i]):
            p = f"block{i + 1}.{j}."
            h = _ln(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
            q = _lin(sd, p + "attn.q", h).reshape(B, N, nh, hd).transpose(0, 2, 1, 3)
            r = h
            if srs[i] > 1:
                r = _conv(h.transpose(0, 2, 1).reshape(B, C, H, W), sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"],
                          srs[i], 0)
                r = _ln(r.reshape(B, C, -1).transpose(0, 2, 1), sd[p + "attn.norm.weight"], sd[p + "attn.norm.bias"],
                        1e-5)
            kv = _lin(sd, p + "attn.kv", r).reshape(B, r.shape[1], 2, nh, hd).transpose(2, 0, 3, 1, 4)
            a = q @ kv[0].transpose(0, 1, 3, 2) * hd ** -0.5
            a = np.exp(a - a.max(-1, keepdims=True))
            a = a / a.sum(-1, keepdims=True)
            t = t + _lin(sd, p + "attn.proj", (a @ kv[1]).transpose(0, 2, 1, 3).reshape(B, N, C))
            h = _lin(sd, p + "mlp.fc1", _ln(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6))
            hid = h.shape[-1]
            h = _conv(h.transpose(0, 2, 1).reshape(B, hid, H, W), sd[p + "mlp.dwconv.dwconv.weight"],
                      sd[p + "mlp.dwconv.dwconv.bias"], 1, 1, groups=hid)
            t = t + _lin(sd, p + "mlp.fc2", _gelu(h.reshape(B, hid, N).transpose(0, 2, 1)))
        t = _ln(t, sd[f"norm{i + 1}.weight"], sd[f"norm{i + 1}.bias"], 1e-6)
        x = t.transpose(0, 2, 1).reshape(B, C, H, W)
        outs.append(x)
    return outs


def segformer_state_dict(model, rng):
    """The model's tensors with random values, SegFormer names, torch layout (Linear weights [out, in])."""
    linear = linear_weight_keys(model)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.numpy()
        scale = 0.1 if v.ndim == 1 else 0.15
        arr = (v * (v.ndim == 1) + rng.standard_normal(v.shape) * scale).astype("float32")
        sd[k] = np.ascontiguousarray(arr.T) if k in linear else arr
    return sd


def test_matches_numpy_reference(tmp_path):
    model = MixVisionTransformer(**TINY)
    sd = segformer_state_dict(model, np.random.default_rng(1))
    path = str(tmp_path / "mit.safetensors")
    save_file(sd, path)
    fresh = MixVisionTransformer(**TINY)
    report = fresh.load_pretrained(path)
    assert not report.missing and not report.unexpected
    fresh.eval()
    x = np.random.default_rng(2).standard_normal((2, 3, 45, 38)).astype("float32")
    ours = fresh(paddle.to_tensor(x))
    ref = numpy_mit({k: v.astype("float64") for k, v in sd.items()}, x.astype("float64"), TINY["num_heads"],
                    TINY["depths"], TINY["sr_ratios"])
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-4, rtol=1e-4)


def test_loads_segformer_encoder_classifier_and_segmentor_checkpoints(tmp_path):
    src = MixVisionTransformer(**TINY, num_classes=5)
    src.eval()
    x = paddle.randn([1, 3, 40, 40])
    want = [o.numpy() for o in src.forward_features(x)]
    linear = linear_weight_keys(src)
    sd = {k: np.ascontiguousarray(v.numpy().T if k in linear else v.numpy()) for k, v in src.state_dict().items()}

    save_file(sd, str(tmp_path / "cls.safetensors"))           # mit_b*.pth style: encoder + ImageNet head
    enc = MixVisionTransformer(**TINY)
    report = enc.load_pretrained(str(tmp_path / "cls.safetensors"))
    assert not report.missing and not report.unexpected       # the head is dropped for num_classes=0
    enc.eval()
    for o, w in zip(enc(x), want):
        np.testing.assert_array_equal(o.numpy(), w)
    clf = MixVisionTransformer(**TINY, num_classes=5)
    assert not clf.load_pretrained(str(tmp_path / "cls.safetensors")).missing
    clf.eval()
    np.testing.assert_array_equal(clf(x).numpy(), src(x).numpy())

    seg = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("head.")}
    seg["decode_head.linear_pred.weight"] = np.zeros((3, 8, 1, 1), "float32")
    save_file(seg, str(tmp_path / "seg.safetensors"))           # a whole SegFormer segmentor checkpoint
    enc = MixVisionTransformer(**TINY)
    report = enc.load_pretrained(str(tmp_path / "seg.safetensors"))
    assert not report.missing and report.unexpected == ["decode_head.linear_pred.weight"]
    enc.eval()
    for o, w in zip(enc(x), want):
        np.testing.assert_array_equal(o.numpy(), w)


def test_bad_inputs_raise_clear_errors():
    m = MixVisionTransformer(**TINY)
    with pytest.raises(ValueError, match="expected 3 input channels, got 4"):
        m(paddle.randn([1, 4, 32, 32]))
    msg = "input 12x40 is too small: stage 1 has a 3x10 grid, smaller than its sr_ratio 4"
    with pytest.raises(ValueError, match=msg):
        m(paddle.randn([1, 3, 12, 40]))
    with pytest.raises(ValueError, match="out_indices"):
        MixVisionTransformer(**TINY, out_indices=(0, 4))
    with pytest.raises(ValueError, match="out_indices"):
        MixVisionTransformer(**TINY, out_indices=(2, 1))
    with pytest.raises(ValueError, match="must end with 3"):
        MixVisionTransformer(**TINY, num_classes=10, out_indices=(0, 1))
    with pytest.raises(ValueError, match="depths needs one entry per stage"):
        MixVisionTransformer(**{**TINY, "depths": (1, 1, 1)})
