import math

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from conftest import param_count
from plfusion.models import create_model, list_models

# REFERENCE.md, ViT / DeiT (params in M, all parameters incl. the 1000-class head)
PARAMS = {
    "vit_tiny_patch16_224": 5.717, "vit_small_patch16_224": 22.051, "vit_base_patch16_224": 86.568,
    "vit_large_patch16_224": 304.327, "vit_base_patch16_384": 86.859,
    "deit_tiny_patch16_224": 5.717, "deit_small_patch16_224": 22.051, "deit_base_patch16_224": 86.568,
    "deit_tiny_distilled_patch16_224": 5.911, "deit_small_distilled_patch16_224": 22.436,
    "deit_base_distilled_patch16_224": 87.338,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts_match_reference(name):
    with paddle.LazyGuard():
        m = create_model(name)
    assert round(param_count(m) / 1e6, 3) == PARAMS[name]


def test_every_vit_variant_is_checked():
    assert set(list_models("vit_*")) | set(list_models("deit_*")) == set(PARAMS)


def test_gflops_vit_s():
    from plfusion.utils.flops import count_flops
    m = create_model("vit_small_patch16_224")
    assert abs(count_flops(m, (1, 3, 224, 224)) - 4.60) / 4.60 < 0.01


# ---- an independent numpy forward of a timm-named, torch-layout state dict ----

def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def numpy_vit(sd, x, patch, heads, depth, eps=1e-6, prefix=1):
    """ViT forward from a torch-layout state dict (Linear weights [out, in])."""
    B, C, H, W = x.shape
    w = sd["patch_embed.proj.weight"]                      # [D, C, p, p]
    D = w.shape[0]
    gh, gw = H // patch, W // patch
    patches = x.reshape(B, C, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, -1)
    t = patches @ w.reshape(D, -1).T + sd["patch_embed.proj.bias"]
    toks = [np.broadcast_to(sd["cls_token"], (B, 1, D))]
    if "dist_token" in sd:
        toks.append(np.broadcast_to(sd["dist_token"], (B, 1, D)))
    t = np.concatenate(toks + [t], axis=1) + sd["pos_embed"]
    hd = D // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = _ln(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        N = qkv.shape[1]
        qkv = qkv.reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        a = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
        a = np.exp(a - a.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, N, D)
        t = t + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = _ln(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = _gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        t = t + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    t = _ln(t, sd["norm.weight"], sd["norm.bias"], eps)
    out = t[:, 0] @ sd["head.weight"].T + sd["head.bias"]
    if "head_dist.weight" in sd:
        out = (out + t[:, 1] @ sd["head_dist.weight"].T + sd["head_dist.bias"]) / 2
    return out


def random_timm_state_dict(model, rng):
    """Random weights in timm naming and torch layout for every tensor of `model`."""
    import paddle.nn as nn
    linear = {f"{n}.weight" for n, l in model.named_sublayers() if isinstance(l, nn.Linear)}
    sd = {}
    for k, v in model.state_dict().items():
        arr = rng.standard_normal(v.shape).astype("float32") * 0.2
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            arr = 1 + arr
        sd[k] = np.ascontiguousarray(arr.T) if k in linear else arr
    return sd


@pytest.mark.parametrize("distilled", [False, True])
def test_matches_numpy_reference_from_timm_named_safetensors(tmp_path, distilled):
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, distilled=distilled)
    from plfusion.models.vision_transformer import VisionTransformer
    model = VisionTransformer(**kw)
    sd = random_timm_state_dict(model, np.random.default_rng(1))
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    fresh = VisionTransformer(**kw)
    report = fresh.load_pretrained(path)
    assert not report.missing and not report.unexpected
    fresh.eval()
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype("float32")
    ours = fresh(paddle.to_tensor(x)).numpy()
    ref = numpy_vit(sd, x, patch=8, heads=3, depth=2)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_distilled_train_returns_both_heads_eval_their_mean():
    m = create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5)
    x = paddle.randn([2, 3, 32, 32])
    m.train()
    cls, dist = m(x)
    m.eval()
    np.testing.assert_allclose(m(x).numpy(), ((cls + dist) / 2).numpy(), atol=1e-6)
    assert not np.allclose(cls.numpy(), dist.numpy())


def test_feature_extractor_and_avg_pool():
    m = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0,
                     global_pool="avg")
    m.eval()
    x = paddle.randn([2, 3, 32, 32])
    tokens = m.forward_features(x)
    assert tokens.shape == [2, 17, 192]
    pooled = m(x)
    # avg pool over patch tokens (not cls) followed by fc_norm
    ref = m.fc_norm(tokens[:, 1:].mean(axis=1))
    np.testing.assert_allclose(pooled.numpy(), ref.numpy(), atol=1e-6)
    assert "fc_norm.weight" in m.state_dict() and "norm.weight" not in m.state_dict()


def test_bad_inputs_raise_clear_errors():
    m = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        m(paddle.randn([1, 1, 32, 32]))
    with pytest.raises(ValueError, match="built for 32x32 images, got 40x40"):
        m(paddle.randn([1, 3, 40, 40]))
    with pytest.raises(ValueError, match="global_pool"):
        create_model("vit_tiny_patch16_224", global_pool="max")


def test_drop_path_is_stochastic_in_train_only():
    m = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, drop_path_rate=0.5)
    x = paddle.randn([4, 3, 32, 32])
    m.eval()
    np.testing.assert_allclose(m(x).numpy(), m(x).numpy())
    m.train()
    assert not np.allclose(m(x).numpy(), m(x).numpy())
    assert m.blocks[0].drop_path.__class__.__name__ == "Identity"   # rate 0 at the first block
    assert m.blocks[1].drop_path.drop_prob == pytest.approx(0.5)
