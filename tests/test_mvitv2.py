import math
import re

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from safetensors.numpy import save_file

from conftest import param_count
from plfusion.models import build_model, create_model, list_models
from plfusion.models.mvitv2 import MultiScaleBlock, MultiScaleVit

# REFERENCE.md, MViTv2 ImageNet-1k (params in M, 2 decimals as published; GFLOPs @224)
PARAMS = {"mvitv2_tiny": 24.17, "mvitv2_small": 34.87, "mvitv2_base": 51.47, "mvitv2_large": 217.99}
CONFIGS = {"mvitv2_tiny": "mvitv2-tiny_8xb256_in1k", "mvitv2_small": "mvitv2-small_8xb256_in1k",
           "mvitv2_base": "mvitv2-base_8xb256_in1k", "mvitv2_large": "mvitv2-large_8xb256_in1k"}
SMALL = dict(img_size=64, embed_dim=8, depths=(1, 2, 1, 1), num_heads=1)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts_match_reference(name):
    with paddle.LazyGuard():
        m = create_model(name)
    assert round(param_count(m) / 1e6, 2) == PARAMS[name]


def test_every_mvit_variant_is_checked():
    assert set(list_models("mvitv2_*")) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_configs_build_the_reference_model(name, root_dir):
    from plfusion.config import get_config
    cfg = get_config(f"{root_dir}/configs/mvit/{CONFIGS[name]}.yaml")
    with paddle.LazyGuard():
        m = build_model(cfg.model)
    assert round(param_count(m) / 1e6, 2) == PARAMS[name]


def test_gflops_mvitv2_t():
    from plfusion.utils.flops import count_flops
    m = create_model("mvitv2_tiny")
    assert abs(count_flops(m, (1, 3, 224, 224)) - 4.70) / 4.70 < 0.02


def test_large_changes_width_in_the_mlp_the_others_in_the_attention():
    with paddle.LazyGuard():
        t, l = create_model("mvitv2_tiny"), create_model("mvitv2_large")
    keys_t, keys_l = set(t.state_dict()), set(l.state_dict())
    assert "stages.1.blocks.0.shortcut_proj_attn.weight" in keys_t
    assert not [k for k in keys_t if "shortcut_proj_mlp" in k]
    assert "stages.0.blocks.1.shortcut_proj_mlp.weight" in keys_l    # last block of stage 0 widens
    assert not [k for k in keys_l if "shortcut_proj_attn" in k]
    # kv stride 4, 2, 1, 1; rel-pos rows 2*max(q, kv)-1 for the map a block sees at 224: first blocks
    # 56 (q 56, kv 14), 56 (q 28, kv 28), 28 (q 14, kv 28), 14 (q 7, kv 14); later blocks 28, 14, 7
    sd = t.state_dict()
    assert [sd[f"stages.{s}.blocks.0.attn.rel_pos_h"].shape[0] for s in range(4)] == [111, 55, 55, 27]
    assert [sd[f"stages.{s}.blocks.1.attn.rel_pos_h"].shape[0] for s in (1, 2, 3)] == [55, 27, 13]
    assert t.stages[0].blocks[0].attn.pool_k._stride == [4, 4] and t.stages[2].blocks[1].attn.pool_k._stride == [1, 1]


# ------------------------------------------------------- an independent numpy pooling-attention block

def _ln(x, sd, name, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _lin(x, sd, name):          # paddle layout: weight [in, out]
    return x @ sd[name + ".weight"] + sd[name + ".bias"]


_erf = np.vectorize(math.erf)


def _dwconv3(x, w, stride):
    """Depthwise 3x3 conv, padding 1: x [M, C, H, W], w [C, 1, 3, 3]."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    Ho, Wo = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    out = np.zeros(x.shape[:2] + (Ho, Wo))
    for dy in range(3):
        for dx in range(3):
            out += w[None, :, 0, dy, dx, None, None] * xp[:, :, dy:dy + stride * Ho:stride, dx:dx + stride * Wo:stride]
    return out


def _maxpool(x, k, s, p):
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    Ho, Wo = (x.shape[2] + 2 * p - k) // s + 1, (x.shape[3] + 2 * p - k) // s + 1
    return np.max([xp[:, :, dy:dy + s * Ho:s, dx:dx + s * Wo:s] for dy in range(k) for dx in range(k)], axis=0)


def _pool(t, sd, name, stride, hw):
    B, n, _, hd = t.shape
    x = _dwconv3(t.reshape(B * n, hw[0], hw[1], hd).transpose(0, 3, 1, 2), sd[f"attn.pool_{name}.weight"], stride)
    out_hw = x.shape[2:]
    x = x.reshape(B, n, hd, -1).transpose(0, 1, 3, 2)
    return _ln(x, sd, f"attn.norm_{name}"), out_hw


def numpy_block(sd, x, hw, heads, stride_q, stride_kv):
    B, N, _ = x.shape
    xn = _ln(x, sd, "norm1")
    qkv = _lin(xn, sd, "attn.qkv")
    att_dim = qkv.shape[-1] // 3
    hd = att_dim // heads
    qkv = qkv.reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, (qh, qw) = _pool(qkv[0], sd, "q", stride_q, hw)
    k, (kh, kw) = _pool(qkv[1], sd, "k", stride_kv, hw)
    v, _ = _pool(qkv[2], sd, "v", stride_kv, hw)
    a = q * hd ** -0.5 @ k.transpose(0, 1, 3, 2)
    # decomposed rel pos: the coarser axis is stretched to the finer one before differencing
    def rel(table, nq, nk):
        fine = max(nq, nk)
        d = np.array([[qi * fine // nq - ki * fine // nk + (nk - 1) * fine // nk for ki in range(nk)]
                      for qi in range(nq)])
        return table[d]
    Rh, Rw = rel(sd["attn.rel_pos_h"], qh, kh), rel(sd["attn.rel_pos_w"], qw, kw)
    qr = q.reshape(B, heads, qh, qw, hd)
    bias = np.einsum("bnyxc,ykc->bnyxk", qr, Rh)[..., :, None] + np.einsum("bnyxc,xlc->bnyxl", qr, Rw)[..., None, :]
    a = a + bias.reshape(B, heads, qh * qw, kh * kw)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = _lin((a @ v + q).transpose(0, 2, 1, 3).reshape(B, qh * qw, att_dim), sd, "attn.proj")
    short = _lin(xn, sd, "shortcut_proj_attn") if "shortcut_proj_attn.weight" in sd else x
    if stride_q > 1:
        C = short.shape[-1]
        short = _maxpool(short.reshape(B, hw[0], hw[1], C).transpose(0, 3, 1, 2), stride_q + 1, stride_q,
                         (stride_q + 1) // 2).reshape(B, C, -1).transpose(0, 2, 1)
    x = short + o
    xn = _ln(x, sd, "norm2")
    short = _lin(xn, sd, "shortcut_proj_mlp") if "shortcut_proj_mlp.weight" in sd else x
    h = _lin(xn, sd, "mlp.fc1")
    return short + _lin(0.5 * h * (1 + _erf(h / math.sqrt(2))), sd, "mlp.fc2"), (qh, qw)


def randomize(model, seed):
    rng = np.random.default_rng(seed)
    sd = {}
    for k, v in model.state_dict().items():
        a = rng.standard_normal(v.shape).astype("float32") * 0.3
        sd[k] = 1 + a if re.search(r"norm\d*(_[qkv])?\.weight$", k) else a
    model.set_state_dict(sd)
    model.eval()
    return model


@pytest.mark.parametrize("dim,dim_out,heads,stride_q,stride_kv,expand", [
    (8, 16, 2, 2, 2, True),      # stage transition: q strided, shortcut projected and max-pooled
    (8, 8, 1, 1, 4, True),       # q 8x8 against k 2x2: rel-pos distances stretched along k
    (8, 8, 2, 2, 1, True),       # q 4x4 against k 8x8: stretched along q
    (8, 16, 1, 1, 2, False),     # width change in the MLP (MViTv2-L)
])
def test_block_matches_numpy_reference(dim, dim_out, heads, stride_q, stride_kv, expand):
    blk = randomize(MultiScaleBlock(dim, dim_out, heads, (8, 8), stride_q=stride_q, stride_kv=stride_kv,
                                    expand_attn=expand), 1)
    sd = {k: v.numpy().astype("float64") for k, v in blk.state_dict().items()}
    x = np.random.default_rng(2).standard_normal((2, 64, dim)).astype("float32")
    ours, hw = blk(paddle.to_tensor(x), (8, 8))
    ref, ref_hw = numpy_block(sd, x.astype("float64"), (8, 8), heads, stride_q, stride_kv)
    assert tuple(hw) == tuple(ref_hw)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------ checkpoint layouts

def torch_layout(model):
    linear = {f"{n}.weight" for n, l in model.named_sublayers() if isinstance(l, nn.Linear)}
    return {k: np.ascontiguousarray(v.numpy().T if k in linear else v.numpy()) for k, v in model.state_dict().items()}


def to_official(sd, depths):
    """timm names -> facebookresearch/mvit: flat block numbering, `proj`, `head.projection`."""
    start = np.cumsum((0,) + tuple(depths))
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.",
                   lambda m: f"blocks.{start[int(m.group(1))] + int(m.group(2))}.", k)
        k = re.sub(r"\.shortcut_proj_(attn|mlp)\.", ".proj.", k)
        out[k.replace("head.fc.", "head.projection.")] = v
    return out


def to_mmpretrain(sd, depths):
    """official -> mmpretrain: `backbone.` prefix, `patch_embed.projection`, `norm3`, head `head.fc`."""
    out = {}
    for k, v in to_official(sd, depths).items():
        if k.startswith("head."):
            out[k.replace("head.projection.", "head.fc.")] = v
            continue
        k = k.replace("patch_embed.proj.", "patch_embed.projection.")
        out["backbone." + re.sub(r"^norm\.", "norm3.", k)] = v
    return out


@pytest.mark.parametrize("layout", ["timm", "official", "mmpretrain"])
@pytest.mark.parametrize("expand", [True, False])
def test_checkpoint_layouts_reproduce_outputs(tmp_path, layout, expand):
    kw = dict(SMALL, num_classes=5, expand_attn=expand)
    src = randomize(MultiScaleVit(**kw), 3)
    sd = torch_layout(src)
    if layout == "official":
        sd = to_official(sd, SMALL["depths"])
        # the width changes in flat block 1 (first of stage 1) or, with expand=False, 0 (last of stage 0)
        assert f"blocks.{1 if expand else 0}.proj.weight" in sd and "head.projection.weight" in sd
    elif layout == "mmpretrain":
        sd = to_mmpretrain(sd, SMALL["depths"])
        assert "backbone.norm3.weight" in sd and "backbone.patch_embed.projection.weight" in sd
    path = str(tmp_path / f"{layout}.safetensors")
    save_file(sd, path)
    model = MultiScaleVit(**kw)
    report = model.load_pretrained(path)
    assert not report.missing and not report.unexpected
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    np.testing.assert_array_equal(model(x).numpy(), src(x).numpy())


def test_rel_pos_tables_resized_linearly_for_a_new_img_size(tmp_path):
    src = randomize(MultiScaleVit(**SMALL, num_classes=0), 4)
    sd = torch_layout(src)
    save_file(sd, str(tmp_path / "w64.safetensors"))
    model = MultiScaleVit(**dict(SMALL, img_size=96), num_classes=0)
    report = model.load_pretrained(str(tmp_path / "w64.safetensors"))
    assert not report.missing and not report.unexpected
    assert len(report.resized) == 2 * sum(SMALL["depths"])
    key = "stages.0.blocks.0.attn.rel_pos_h"        # 64/4 = 16: 2*16-1 = 31 rows -> 96/4: 47 rows
    old, new = sd[key], model.state_dict()[key].numpy()
    assert old.shape[0] == 31 and new.shape[0] == 47
    # torch F.interpolate(mode='linear', align_corners=False), written out
    want = np.zeros_like(new)
    for i in range(47):
        src_i = max((i + 0.5) * 31 / 47 - 0.5, 0.0)
        i0 = int(math.floor(src_i))
        i1, lam = min(i0 + 1, 30), src_i - i0
        want[i] = (1 - lam) * old[i0] + lam * old[i1]
    np.testing.assert_allclose(new, want, atol=1e-6)
    # and the same against paddle's own linear interpolation
    t = paddle.nn.functional.interpolate(paddle.to_tensor(old.T[None]), size=[47], mode="linear",
                                         align_corners=False, data_format="NCW")
    np.testing.assert_allclose(new, t.numpy()[0].T, atol=1e-5)
    out = model(paddle.randn([1, 3, 96, 96]))
    assert out.shape == [1, 64] and np.isfinite(out.numpy()).all()


def test_out_indices_give_nchw_stage_maps():
    m = randomize(MultiScaleVit(**SMALL, num_classes=0, out_indices=(0, 1, 2, 3)), 5)
    full = randomize(MultiScaleVit(**SMALL, num_classes=0), 5)
    x = paddle.randn([2, 3, 64, 64])
    feats = m(x)
    assert [f.shape for f in feats] == [[2, 8, 16, 16], [2, 16, 8, 8], [2, 32, 4, 4], [2, 64, 2, 2]]
    assert m.out_channels == [8, 16, 32, 64]
    # the last map is the final-normed token sequence of the classifier path, laid out as NCHW
    tokens = full.forward_features(x)
    np.testing.assert_allclose(feats[-1].flatten(2).transpose([0, 2, 1]).numpy(), tokens.numpy(), atol=1e-6)
    np.testing.assert_allclose(full(x).numpy(), tokens.mean(axis=1).numpy(), atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    m = MultiScaleVit(**SMALL, num_classes=3)
    with pytest.raises(ValueError, match="built for 64x64 images, got 96x96"):
        m(paddle.randn([1, 3, 96, 96]))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        m(paddle.randn([1, 1, 64, 64]))
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("mvitv2_tiny", img_size=200)
    with pytest.raises(ValueError, match="pass num_classes=0"):
        create_model("mvitv2_tiny", out_indices=(3,))
    with pytest.raises(ValueError, match=r"out_indices \[5\]"):
        create_model("mvitv2_tiny", num_classes=0, out_indices=(5,))
