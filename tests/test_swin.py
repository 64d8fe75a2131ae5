import math
import re

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from safetensors.numpy import save_file

from conftest import param_count
from plfusion.models import build_model, create_model, list_models
from plfusion.models.swin_transformer import SwinTransformer

# REFERENCE.md, Swin (params in M incl. the 1000-class head)
PARAMS = {
    "swin_tiny_patch4_window7_224": 28.288, "swin_small_patch4_window7_224": 49.606,
    "swin_base_patch4_window7_224": 87.768, "swin_base_patch4_window12_384": 87.904,
    "swin_large_patch4_window7_224": 196.532, "swin_large_patch4_window12_384": 196.736,
}
SMALL = dict(patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts_match_reference(name):
    with paddle.LazyGuard():
        m = create_model(name)
    assert round(param_count(m) / 1e6, 3) == PARAMS[name]


def test_every_swin_variant_is_checked():
    assert set(list_models("swin_*")) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_configs_build_the_reference_model(name, root_dir):
    from plfusion.config import get_config
    cfg = get_config(f"{root_dir}/configs/swin/{name}.yaml")
    with paddle.LazyGuard():
        m = build_model(cfg.model)
    assert round(param_count(m) / 1e6, 3) == PARAMS[name]


def test_gflops_swin_t():
    from plfusion.utils.flops import count_flops
    m = create_model("swin_tiny_patch4_window7_224")
    assert abs(count_flops(m, (1, 3, 224, 224)) - 4.49) / 4.49 < 0.02


def test_derived_buffers_are_not_in_the_state_dict():
    m = SwinTransformer(img_size=64, num_classes=3, **SMALL)
    keys = list(m.state_dict())
    assert not [k for k in keys if "relative_position_index" in k or "attn_mask" in k]
    assert "layers.0.downsample.reduction.weight" in keys and "layers.3.downsample.norm.weight" not in keys


# ---------------------------------------------------------------- an independent numpy Swin

def _ln(x, sd, name, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _lin(x, sd, name):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _np_block(x, H, W, sd, p, heads, w, s):
    B, L, C = x.shape
    h = _ln(x, sd, p + "norm1").reshape(B, H, W, C)
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    h = np.pad(h, ((0, 0), (0, Hp - H), (0, Wp - W), (0, 0)))
    if s:
        h = np.roll(h, (-s, -s), axis=(1, 2))
    win = h.reshape(B, Hp // w, w, Wp // w, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
    N, hd = w * w, C // heads
    qkv = _lin(win, sd, p + "attn.qkv").reshape(-1, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    a = qkv[0] * hd ** -0.5 @ qkv[1].transpose(0, 1, 3, 2)
    ys, xs = np.divmod(np.arange(N), w)
    idx = (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
    a = a + sd[p + "attn.relative_position_bias_table"][idx].transpose(2, 0, 1)
    if s:
        # after the roll, rows/cols >= size - s wrapped around; tokens may only see their own kind
        wr = (np.arange(Hp)[:, None] >= Hp - s).astype(int) * 2 + (np.arange(Wp)[None, :] >= Wp - s)
        lab = wr.reshape(Hp // w, w, Wp // w, w).transpose(0, 2, 1, 3).reshape(-1, N)
        mask = np.where(lab[:, :, None] != lab[:, None, :], -100.0, 0.0)
        a = (a.reshape(B, -1, heads, N, N) + mask[None, :, None]).reshape(-1, heads, N, N)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = _lin((a @ qkv[2]).transpose(0, 2, 1, 3).reshape(-1, N, C), sd, p + "attn.proj")
    o = o.reshape(B, Hp // w, Wp // w, w, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if s:
        o = np.roll(o, (s, s), axis=(1, 2))
    x = x + o[:, :H, :W].reshape(B, H * W, C)
    return x + _lin(_gelu(_lin(_ln(x, sd, p + "norm2"), sd, p + "mlp.fc1")), sd, p + "mlp.fc2")


def _np_merge(x, H, W, sd, p):
    B, _, C = x.shape
    x = np.pad(x.reshape(B, H, W, C), ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    x = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return _lin(_ln(x.reshape(B, -1, 4 * C), sd, p + "norm"), sd, p + "reduction")


def numpy_swin(sd, x, depths, heads, window, dense, patch=4):
    """Official Swin (dense: the segmentation backbone) from an official-named torch-layout dict."""
    B = x.shape[0]
    if dense:
        x = np.pad(x, ((0, 0), (0, 0), (0, -x.shape[2] % patch), (0, -x.shape[3] % patch)))
    wgt = sd["patch_embed.proj.weight"]
    D, C = wgt.shape[:2]
    H, W = x.shape[2] // patch, x.shape[3] // patch
    t = x.reshape(B, C, H, patch, W, patch).transpose(0, 2, 4, 1, 3, 5).reshape(B, H * W, -1)
    t = _ln(t @ wgt.reshape(D, -1).T + sd["patch_embed.proj.bias"], sd, "patch_embed.norm")
    outs = []
    for i, depth in enumerate(depths):
        w, s = window, window // 2
        if not dense and min(H, W) <= window:
            w, s = min(H, W), 0
        for j in range(depth):
            t = _np_block(t, H, W, sd, f"layers.{i}.blocks.{j}.", heads[i], w, s if j % 2 else 0)
        if dense:
            outs.append(_ln(t, sd, f"norm{i}").reshape(B, H, W, -1).transpose(0, 3, 1, 2))
        if i < len(depths) - 1:
            t = _np_merge(t, H, W, sd, f"layers.{i}.downsample.")
            H, W = (H + 1) // 2, (W + 1) // 2
    if dense:
        return outs
    return _lin(_ln(t, sd, "norm").mean(1), sd, "head")


def randomize(model, seed):
    """Random weights (norm scales around 1) so that every tensor matters."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, v in model.state_dict().items():
        a = rng.standard_normal(v.shape).astype("float32") * 0.2
        sd[k] = 1 + a if re.search(r"norm\d*\.weight$", k) else a
    model.set_state_dict(sd)
    model.eval()
    return model


def torch_layout(model):
    """Our state dict in torch layout (Linear weights [out, in]); names unchanged (= official)."""
    linear = {f"{n}.weight" for n, l in model.named_sublayers() if isinstance(l, nn.Linear)}
    return {k: np.ascontiguousarray(v.numpy().T if k in linear else v.numpy()) for k, v in model.state_dict().items()}


def to_timm_layout(sd):
    """Official -> timm names: PatchMerging moves to the start of the next stage; head -> head.fc."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        out[re.sub(r"^head\.", "head.fc.", k)] = v
    return out


@pytest.mark.parametrize("dense", [False, True])
def test_matches_numpy_reference(tmp_path, dense):
    kw = dict(SMALL, num_classes=0 if dense else 5, out_indices=(0, 1, 2, 3) if dense else None, img_size=64)
    src = randomize(SwinTransformer(**kw), 1)
    sd = torch_layout(src)
    save_file(sd, str(tmp_path / "w.safetensors"))
    model = SwinTransformer(**kw)
    report = model.load_pretrained(str(tmp_path / "w.safetensors"))
    assert not report.missing and not report.unexpected
    model.eval()
    # dense: 50x70 needs padding to the patch (52x72) and, per stage, to the window; the last
    # stage (2x3) is smaller than the window and still shifted, as the segmentation backbone does
    shape = (2, 3, 50, 70) if dense else (2, 3, 64, 64)
    x = np.random.default_rng(2).standard_normal(shape).astype("float32")
    ours = model(paddle.to_tensor(x))
    ref = numpy_swin(sd, x, SMALL["depths"], SMALL["num_heads"], SMALL["window_size"], dense)
    if dense:
        assert [list(o.shape) for o in ours] == [[2, 16, 13, 18], [2, 32, 7, 9], [2, 64, 4, 5], [2, 128, 2, 3]]
        for o, r in zip(ours, ref):
            np.testing.assert_allclose(o.numpy(), r, atol=2e-4, rtol=1e-4)
    else:
        # at 64 the last two stages (4x4, 2x2) fit one window: no shift, window clipped to 2 at the end
        assert model.layers[3].window_size == 2 and model.layers[2].shift_size == 0
        np.testing.assert_allclose(ours.numpy(), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_official_and_timm_checkpoints_reproduce_outputs(tmp_path, layout):
    kw = dict(SMALL, img_size=64, num_classes=7)
    src = randomize(SwinTransformer(**kw), 3)
    sd = torch_layout(src)
    # derived buffers as the references save them: must be skipped without a report entry
    for i in range(4):
        sd[f"layers.{i}.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), dtype="int64")
    sd["layers.0.blocks.1.attn_mask"] = np.zeros((16, 16, 16), dtype="float32")
    if layout == "timm":
        sd = to_timm_layout(sd)
        assert "layers.1.downsample.reduction.weight" in sd and "head.fc.weight" in sd
    path = str(tmp_path / f"{layout}.safetensors")
    save_file(sd, path)
    model = SwinTransformer(**kw)
    report = model.load_pretrained(path)
    assert not report.missing and not report.unexpected and not report.resized
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    np.testing.assert_array_equal(model(x).numpy(), src(x).numpy())


def _np_bicubic_matrix(n_in, n_out, a=-0.75):
    """Rows: output samples; half-pixel centres, Keys cubic, indices clamped to the border."""
    def k(t):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else \
            (a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0)
    M = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        f = math.floor(src)
        for j in range(f - 1, f + 3):
            M[i, min(max(j, 0), n_in - 1)] += k(src - j)
    return M


def test_window7_table_loads_into_window12_model_bicubically(tmp_path):
    kw = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), num_classes=0, out_indices=(0, 1, 2, 3))
    src = randomize(SwinTransformer(window_size=7, **kw), 4)
    sd = torch_layout(src)
    save_file(sd, str(tmp_path / "w7.safetensors"))
    model = SwinTransformer(window_size=12, **kw)
    report = model.load_pretrained(str(tmp_path / "w7.safetensors"))
    assert not report.missing and not report.unexpected
    assert len(report.resized) == 4 and "[169, 2] -> [529, 2]" in report.resized[1]
    M = _np_bicubic_matrix(13, 23)
    for i in range(4):
        key = f"layers.{i}.blocks.0.attn.relative_position_bias_table"
        old = sd[key]                                        # [(2*7-1)^2, heads]
        want = np.stack([M @ old[:, h].reshape(13, 13) @ M.T for h in range(old.shape[1])], -1).reshape(529, -1)
        np.testing.assert_allclose(model.state_dict()[key].numpy(), want, atol=1e-5)
    np.testing.assert_array_equal(model.state_dict()["layers.1.blocks.0.mlp.fc1.weight"].numpy(),
                                  src.state_dict()["layers.1.blocks.0.mlp.fc1.weight"].numpy())
    feats = model(paddle.randn([1, 3, 96, 96]))
    assert [f.shape[1:] for f in feats] == [[8, 24, 24], [16, 12, 12], [32, 6, 6], [64, 3, 3]]


def test_dense_mode_drops_the_classifier_from_an_imagenet_checkpoint(tmp_path):
    cls = randomize(SwinTransformer(img_size=64, num_classes=4, **SMALL), 5)
    save_file(torch_layout(cls), str(tmp_path / "in1k.safetensors"))
    dense = SwinTransformer(num_classes=0, out_indices=(1, 3), **SMALL)
    report = dense.load_pretrained(str(tmp_path / "in1k.safetensors"))
    assert not report.unexpected
    assert sorted(report.missing) == ["norm1.bias", "norm1.weight", "norm3.bias", "norm3.weight"]
    feats = dense(paddle.randn([1, 3, 120, 160]))      # 480x640 / 4: stage maps not window multiples
    assert [f.shape for f in feats] == [[1, 32, 15, 20], [1, 128, 4, 5]]


def test_attention_branch_is_the_unshortcut_attention_path():
    """The hook GeminiFusion builds on: forward == mlp_residual(x + attention_branch(x))."""
    m = randomize(SwinTransformer(num_classes=0, out_indices=(0,), **SMALL), 6)
    blk, stage = m.layers[0].blocks[1], m.layers[0]
    assert blk.shift_size == 2
    x, hw = paddle.randn([2, 6 * 5, 16]), (6, 5)
    mask = stage.attn_mask(hw)
    branch = blk.attention_branch(x, hw, mask)
    np.testing.assert_allclose(blk(x, hw, mask).numpy(), blk.mlp_residual(x + branch).numpy(), atol=1e-6)
    assert not np.allclose(branch.numpy(), 0)


def test_bad_inputs_raise_clear_errors():
    m = SwinTransformer(img_size=64, num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="built for 64x64 images, got 96x96"):
        m(paddle.randn([1, 3, 96, 96]))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        m(paddle.randn([1, 1, 64, 64]))
    dense = SwinTransformer(num_classes=0, out_indices=(0, 1, 2, 3), **SMALL)
    with pytest.raises(ValueError, match="expected 3 input channels, got 4"):
        dense(paddle.randn([1, 4, 50, 50]))
    with pytest.raises(ValueError, match="does not tile"):
        create_model("swin_tiny_patch4_window7_224", img_size=256)
    with pytest.raises(ValueError, match="pass num_classes=0"):
        create_model("swin_tiny_patch4_window7_224", out_indices=(0, 1, 2, 3))
    with pytest.raises(ValueError, match=r"out_indices \[4\]"):
        create_model("swin_tiny_patch4_window7_224", num_classes=0, out_indices=(4,))
