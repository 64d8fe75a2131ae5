import math

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from conftest import param_count
from plfusion.config import get_config
from plfusion.models import build_backbone, build_head, create_model, list_models
from plfusion.models.layers import Block
from plfusion.models.pretrained import linear_weight_keys
from plfusion.models.t2t_vit import T2TViT, sinusoid_table
from plfusion.models.vision_transformer import VisionTransformer
from plfusion.utils.flops import count_flops

# REFERENCE.md, T2T-ViT: params (M) all / trainable, GMACs @224
REF = {
    "t2t_vit_14": (21.5455, 21.4658, 4.8), "t2t_vit_19": (39.1774, 39.0851, 8.5),
    "t2t_vit_24": (64.1059, 64.0010, 13.8), "t2t_vit_t_14": (21.5411, 21.4654, 6.1),
    "t2t_vit_t_19": (39.1729, 39.0847, 9.8), "t2t_vit_t_24": (64.1015, 64.0006, 15.0),
}
TINY = dict(embed_dim=24, depth=2, num_heads=2, mlp_ratio=3.0, token_dim=8, num_classes=5)


@pytest.mark.parametrize("name", sorted(REF))
def test_param_counts_all_and_trainable(name):
    with paddle.LazyGuard():
        m = create_model(name)
    assert round(param_count(m) / 1e6, 4) == REF[name][0]
    assert round(param_count(m, trainable_only=True) / 1e6, 4) == REF[name][1]


def test_every_t2t_variant_is_checked():
    assert set(list_models("t2t_vit*")) == set(REF)


@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
def test_gmacs_match_paper(name):
    # the paper counts the attention matmuls, the performer's random-feature maps included
    assert abs(count_flops(create_model(name), (1, 3, 224, 224)) - REF[name][2]) / REF[name][2] < 0.02


def test_official_parameter_names():
    with paddle.LazyGuard():
        perf, tr = create_model("t2t_vit_14"), create_model("t2t_vit_t_14")
    perf_keys = {k for k in perf.state_dict() if k.startswith("tokens_to_token.")}
    tr_keys = {k for k in tr.state_dict() if k.startswith("tokens_to_token.")}
    common = {"tokens_to_token.project.weight", "tokens_to_token.project.bias"}
    perf_layer = ["kqv.weight", "kqv.bias", "proj.weight", "proj.bias", "norm1.weight", "norm1.bias",
                  "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "w"]
    tr_layer = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert perf_keys == common | {f"tokens_to_token.attention{i}.{k}" for i in (1, 2) for k in perf_layer}
    assert tr_keys == common | {f"tokens_to_token.attention{i}.{k}" for i in (1, 2) for k in tr_layer}
    assert list(perf.tokens_to_token.attention1.w.shape) == [32, 64]
    body = set(perf.state_dict()) - perf_keys
    assert {"cls_token", "pos_embed", "norm.weight", "head.weight", "blocks.13.attn.qkv.weight"} <= body
    assert "blocks.0.attn.qkv.bias" not in body and "patch_embed.proj.weight" not in body


def test_fixed_tensors_are_saved_but_not_trained():
    m = T2TViT(img_size=32, **TINY)
    fixed = {n for n, p in m.named_parameters() if p.stop_gradient}
    assert fixed == {"pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"}
    # the performer features are orthogonal rows of norm sqrt(m)
    w = m.tokens_to_token.attention1.w.numpy()
    assert w.shape == (4, 8)  # token_dim 8, kernel_ratio 0.5
    np.testing.assert_allclose(w @ w.T, 4 * np.eye(4), atol=1e-4)
    np.testing.assert_allclose(m.pos_embed.numpy(), sinusoid_table(5, 24))


def test_sinusoid_table_formula():
    n, d = 7, 10
    ref = np.zeros((n, d))
    for pos in range(n):
        for j in range(d):
            angle = pos / 10000 ** (2 * (j // 2) / d)
            ref[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    np.testing.assert_allclose(sinusoid_table(n, d)[0], ref, atol=1e-6)


def test_seed_usage_builds_backbone_and_head_from_config(root_dir):
    cfg = get_config(f"{root_dir}/configs/t2t_vit/t2t_vit_14.yaml")
    backbone = build_backbone(cfg.model.architecture)
    head = build_head(cfg.model.head)
    backbone.eval()
    x = paddle.randn([2, 3, 224, 224])
    feats = backbone(x)
    assert feats.shape == [2, 384]
    np.testing.assert_allclose(feats.numpy(), backbone.forward_features(x)[:, 0].numpy(), atol=1e-6)
    logits = head(feats)
    assert logits.shape == [2, 1000]
    ref = feats.numpy() @ head.fc.weight.numpy() + head.fc.bias.numpy()
    np.testing.assert_allclose(logits.numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REF))
def test_every_config_builds_its_variant(root_dir, name):
    cfg = get_config(f"{root_dir}/configs/t2t_vit/{name}.yaml")
    assert cfg.model.architecture.name == name
    with paddle.LazyGuard():
        backbone = build_backbone(cfg.model.architecture)
    assert backbone.num_features == cfg.model.head.in_channels and backbone.num_classes == 0


def test_is_a_vit_for_token_patches():
    m = create_model("t2t_vit_14", img_size=32, depth=2)
    assert isinstance(m, VisionTransformer)
    assert all(type(b) is Block for b in m.blocks) and len(m.blocks) == 2
    assert m.num_prefix_tokens == 1 and m.global_pool == "token" and m.cls_token is not None
    blk = m.blocks[0]
    assert blk.attn.qkv.bias is None and blk.norm1._epsilon == 1e-5 and m.norm._epsilon == 1e-5
    assert blk.attn.scale == (384 // 6) ** -0.5
    m.eval()
    x = paddle.randn([1, 3, 32, 32])
    tokens = m.forward_features(x)
    assert tokens.shape == [1, 5, 384]
    np.testing.assert_allclose(m(x).numpy(), m.forward_head(tokens).numpy(), atol=1e-6)


# ---- an independent numpy forward from an official-named, torch-layout state dict ----

def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _softmax(a):
    a = np.exp(a - a.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


def _unfold(x, k, s, p):
    """[B, C, H, W] -> [B, L, C*k*k] patches, channel-major within a patch (torch's nn.Unfold)."""
    B, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    oh, ow = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    out = np.empty((B, oh * ow, C * k * k))
    for i in range(oh):
        for j in range(ow):
            out[:, i * ow + j] = xp[:, :, i * s:i * s + k, j * s:j * s + k].reshape(B, -1)
    return out, (oh, ow)


def _lin(sd, name, x):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _performer(sd, p, x):
    h = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    k, q, v = np.split(_lin(sd, p + "kqv", h), 3, axis=-1)
    w = sd[p + "w"]

    def feat(t):
        return np.exp(t @ w.T - (t * t).sum(-1, keepdims=True) / 2) / math.sqrt(w.shape[0])
    kp, qp = feat(k), feat(q)
    d = np.einsum("btm,bm->bt", qp, kp.sum(1))[..., None]
    y = np.einsum("btm,bnm->btn", qp, np.einsum("btn,btm->bnm", v, kp)) / (d + 1e-8)
    y = v + _lin(sd, p + "proj", y)
    h = _ln(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    return y + _lin(sd, p + "mlp.2", _gelu(_lin(sd, p + "mlp.0", h)))


def _token_transformer(sd, p, x):
    h = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    q, k, v = np.split(_lin(sd, p + "attn.qkv", h), 3, axis=-1)
    a = _softmax(q @ k.transpose(0, 2, 1) * x.shape[-1] ** -0.5)
    y = v + _lin(sd, p + "attn.proj", a @ v)
    h = _ln(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    return y + _lin(sd, p + "mlp.fc2", _gelu(_lin(sd, p + "mlp.fc1", h)))


def numpy_t2t_vit(sd, x, tokens_type, heads, depth):
    layer = _performer if tokens_type == "performer" else _token_transformer
    B = x.shape[0]
    t, grid = _unfold(x, 7, 4, 2)
    t = layer(sd, "tokens_to_token.attention1.", t)
    t, grid = _unfold(t.transpose(0, 2, 1).reshape(B, -1, *grid), 3, 2, 1)
    t = layer(sd, "tokens_to_token.attention2.", t)
    t, grid = _unfold(t.transpose(0, 2, 1).reshape(B, -1, *grid), 3, 2, 1)
    t = _lin(sd, "tokens_to_token.project", t)
    D = t.shape[-1]
    t = np.concatenate([np.broadcast_to(sd["cls_token"], (B, 1, D)), t], axis=1) + sd["pos_embed"]
    hd = D // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = _ln(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        N = t.shape[1]
        q, k, v = _lin(sd, p + "attn.qkv", h).reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        o = (_softmax(q @ k.transpose(0, 1, 3, 2) * hd ** -0.5) @ v).transpose(0, 2, 1, 3).reshape(B, N, D)
        t = t + _lin(sd, p + "attn.proj", o)
        h = _ln(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        t = t + _lin(sd, p + "mlp.fc2", _gelu(_lin(sd, p + "mlp.fc1", h)))
    t = _ln(t, sd["norm.weight"], sd["norm.bias"])
    return t, _lin(sd, "head", t[:, 0])


def official_state_dict(model, rng):
    """The model's tensors with random values, official names, torch layout (Linear weights [out, in])."""
    linear = linear_weight_keys(model)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.numpy()
        if k == "pos_embed" or k.endswith(".w"):
            arr = v                                            # fixed tensors keep their values
        elif v.ndim == 1:
            arr = (v + rng.standard_normal(v.shape) * 0.1).astype("float32")
        else:
            arr = (rng.standard_normal(v.shape) * 0.15).astype("float32")
        sd[k] = np.ascontiguousarray(arr.T) if k in linear else arr
    return sd


@pytest.mark.parametrize("tokens_type,img_size", [("performer", 32), ("transformer", (40, 32))])
def test_matches_numpy_reference(tmp_path, tokens_type, img_size):
    model = T2TViT(img_size=img_size, tokens_type=tokens_type, **TINY)
    sd = official_state_dict(model, np.random.default_rng(1))
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    fresh = T2TViT(img_size=img_size, tokens_type=tokens_type, **TINY)
    report = fresh.load_pretrained(path)
    assert not report.missing and not report.unexpected
    fresh.eval()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = np.random.default_rng(2).standard_normal((2, 3, h, w)).astype("float32")
    tokens = fresh.forward_features(paddle.to_tensor(x))
    ref_tokens, ref_logits = numpy_t2t_vit({k: v.astype("float64") for k, v in sd.items()}, x.astype("float64"),
                                           tokens_type, heads=2, depth=2)
    np.testing.assert_allclose(tokens.numpy(), ref_tokens, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fresh.forward_head(tokens).numpy(), ref_logits, atol=1e-4, rtol=1e-4)


def test_load_roundtrip_ddp_prefix_and_pos_embed_for_another_size(tmp_path):
    src = T2TViT(img_size=48, **TINY)
    src.eval()
    x = paddle.randn([2, 3, 48, 48])
    want = src(x).numpy()
    linear = linear_weight_keys(src)
    sd = {f"module.{k}": np.ascontiguousarray(v.numpy().T if k in linear else v.numpy())
          for k, v in src.state_dict().items()}
    path = str(tmp_path / "ddp.safetensors")
    save_file(sd, path)

    same = T2TViT(img_size=48, **TINY)
    report = same.load_pretrained(path)
    assert not report.missing and not report.unexpected and not report.resized
    same.eval()
    np.testing.assert_array_equal(same(x).numpy(), want)

    small = T2TViT(img_size=32, **TINY)   # 4 patch tokens instead of 9
    report = small.load_pretrained(path)
    assert not report.missing and not report.unexpected and len(report.resized) == 1
    np.testing.assert_array_equal(small.pos_embed.numpy(), sinusoid_table(5, 24))
    np.testing.assert_array_equal(small.tokens_to_token.project.weight.numpy(),
                                  src.tokens_to_token.project.weight.numpy())

    feats = T2TViT(img_size=48, **{**TINY, "num_classes": 0})
    report = feats.load_pretrained(path)    # the head is dropped, not reported as unexpected
    assert not report.missing and not report.unexpected
    feats.eval()
    np.testing.assert_allclose(feats(x).numpy(), src.forward_head(src.forward_features(x), pre_logits=True).numpy(),
                               atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    m = T2TViT(img_size=32, **TINY)
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        m(paddle.randn([1, 1, 32, 32]))
    with pytest.raises(ValueError, match="built for 32x32 images, got 48x48"):
        m(paddle.randn([1, 3, 48, 48]))
    with pytest.raises(ValueError, match="tokens_type must be one of"):
        T2TViT(img_size=32, tokens_type="convolution", **TINY)
    with pytest.raises(ValueError, match="too small"):
        T2TViT(img_size=2, **TINY)


def test_tome_patches_t2t_vit_like_a_vit():
    from plfusion.patches import tome
    m = create_model("t2t_vit_14", img_size=64, depth=3, num_classes=0)   # 16 patch tokens + cls
    m.eval()
    x = paddle.randn([2, 3, 64, 64])
    want_tokens, want = m.forward_features(x).numpy(), m(x).numpy()
    tome.apply_patch(m)
    assert m.r == 0
    np.testing.assert_array_equal(m.forward_features(x).numpy(), want_tokens)
    np.testing.assert_array_equal(m(x).numpy(), want)
    m.r = 3
    tokens = m.forward_features(x)
    assert tokens.shape == [2, 17 - 3 * 3, 384]
    size = m._tome_info["size"].numpy()
    np.testing.assert_array_equal(size.sum(axis=(1, 2)), [17, 17])
    assert (size[:, 0] == 1).all()        # the cls token is never merged
    assert not np.allclose(m(x).numpy(), want)
    tome.remove_patch(m)
    np.testing.assert_array_equal(m(x).numpy(), want)
