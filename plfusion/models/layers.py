"""Pieces shared by every transformer in plfusion: MLP, DropPath, PatchEmbed, Attention, Block."""
import numbers

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

__all__ = ["linear", "add_channel_bias", "cached_ones", "Linear", "qkv_scaled_q", "resize_bilinear", "resize_matrices", "DropPath", "Mlp", "PatchEmbed", "Attention", "Block", "LayerNorm", "trunc_normal_", "zeros_", "ones_",
           "init_transformer_weights", "to_2tuple", "check_input", "drop_path_rates", "stage_indices"]

trunc_normal_ = nn.initializer.TruncatedNormal(std=0.02)
zeros_ = nn.initializer.Constant(0.0)
ones_ = nn.initializer.Constant(1.0)


_ONES = {}


BAND_FLOATS = 1 << 21   # eval passes that go in bands of rows keep ~8 MB per band: within the last-level cache


def row_bands(H, row_floats, halo=0):
    """[(r0, r1)] covering 0..H: bands of rows of about BAND_FLOATS floats (a row holding `row_floats`,
    plus `halo` rows each side that a conv reads); one band when the map is under twice that size
    (splitting it would cost more in halo rows and calls than the cache saves)."""
    if H * row_floats <= 2 * BAND_FLOATS:
        return [(0, H)]
    band = max(1, BAND_FLOATS // max(1, row_floats) - 2 * halo)
    return [(r0, min(H, r0 + band)) for r0 in range(0, H, band)]


def cached_ones(shape, dtype):
    """A ones tensor of this shape and dtype, made once (the rank-1 GEMMs that add biases use them)."""
    key = (tuple(shape), str(dtype))
    if key not in _ONES:
        if len(_ONES) > 64:     # a run repeats a few shapes; do not grow without bound
            _ONES.clear()
        _ONES[key] = paddle.ones(shape, dtype)
    return _ONES[key]


def linear(x, weight, bias=None):
    """x @ weight + bias with the bias added inside the GEMM (addmm) in dygraph on the CPU.

    Paddle's CPU linear adds the bias in a separate broadcast pass that costs 2-3x the GEMM
    itself; addmm writes it into the GEMM's output first (bit-identical results here). With
    gradients on, the bias is added by a second, rank-1 addmm after the matmul instead: the
    backward of addmm(bias, x, w) reduces the bias's gradient with a single-threaded kernel and is
    ~1.3x slower than matmul + rank-1 addmm. Traced programs keep matmul + add, which Paddle
    Inference fuses."""
    lead = x.shape[:-1]
    if bias is None or not paddle.in_dynamic_mode() or not x.place.is_cpu_place() or -1 in lead:
        return F.linear(x, weight, bias)
    x2 = x.reshape([-1, x.shape[-1]])
    if paddle.is_grad_enabled() and not (x.stop_gradient and weight.stop_gradient and bias.stop_gradient):
        y = add_channel_bias(paddle.matmul(x2, weight), bias)
    else:
        y = paddle.addmm(bias.unsqueeze(0), x2, weight)
    return y if len(lead) == 1 else y.reshape([*lead, y.shape[-1]])


def add_channel_bias(x, bias):
    """x [..., C] + bias [C], the bias added by a rank-1 GEMM (ones column @ bias row) in dygraph on the CPU.

    Paddle's broadcast add and, above all, its backward (a single-threaded reduction for the
    bias's gradient) cost ~4x the GEMM form here; traced programs keep the add, which Paddle
    Inference fuses into the producer."""
    if not paddle.in_dynamic_mode() or not x.place.is_cpu_place() or -1 in x.shape:
        return x + bias
    C = x.shape[-1]
    rows = int(np.prod(x.shape[:-1]))
    return paddle.addmm(x.reshape([rows, C]), cached_ones([rows, 1], x.dtype), bias.unsqueeze(0)).reshape(x.shape)


_RESIZE_CACHE = {}


@paddle.jit.not_to_static   # plain numpy on static sizes: a constant of the traced program
def _resize_matrix(n_in, n_out, align_corners):
    """[n_out, n_in] weights of 1-D linear interpolation, as F.interpolate(mode='bilinear') samples."""
    key = (n_in, n_out, align_corners)
    if key not in _RESIZE_CACHE:
        dst = np.arange(n_out, dtype=np.float64)
        if align_corners:
            src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
        else:
            src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        lam = src - i0
        i1 = np.minimum(i0 + 1, n_in - 1)
        m = np.zeros((n_out, n_in), np.float32)
        np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
        np.add.at(m, (np.arange(n_out), i1), lam)
        _RESIZE_CACHE[key] = m
    return _RESIZE_CACHE[key]


def resize_bilinear(x, size, align_corners=False):
    """F.interpolate(x, size, mode='bilinear') for NCHW `x`, as two small GEMMs (rows, then columns).

    On the CPU Paddle's bilinear_interp kernel is single-threaded (2x slower here than the GEMMs),
    and in exported programs it cannot run on oneDNN, which switched oneDNN off for every
    segmentor; matmuls run on both."""
    h, w = int(x.shape[2]), int(x.shape[3])
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return x
    rows, cols = resize_matrices((h, w), (H, W), align_corners, x.dtype)
    return paddle.matmul(paddle.matmul(rows, x), cols, transpose_y=True)


def resize_matrices(in_hw, out_hw, align_corners, dtype):
    """(rows [H, h], cols [W, w]): bilinear resizing of an h x w map to H x W is rows @ x @ cols^T."""
    return tuple(paddle.to_tensor(_resize_matrix(int(n), int(m), align_corners), dtype=dtype)
                 for n, m in zip(in_hw, out_hw))


def qkv_scaled_q(x, layer, scale):
    """A fused qkv Linear (q, k, v along the output) with q's output multiplied by `scale`.

    The softmax scale rides on q's weights (a [C, C] multiply) instead of a pass over q or
    over the [B, heads, N, N] scores."""
    out = layer.weight.shape[1]
    col = paddle.concat([paddle.full([out // 3], scale, layer.weight.dtype),
                         paddle.ones([out - out // 3], layer.weight.dtype)])
    return layer(x, col)


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (same parameters and names). `weight_scale` (a number, or one
    factor per output) multiplies the output through the weights and bias, not a pass over it."""

    def forward(self, x, weight_scale=None):
        if weight_scale is None:
            return linear(x, self.weight, self.bias)
        return linear(x, self.weight * weight_scale, self.bias * weight_scale if self.bias is not None else None)


def to_2tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x, x)


def LayerNorm(dim, eps):
    """LayerNorm with an explicit eps: the references differ (1e-6 timm, 1e-5 torch default)."""
    return nn.LayerNorm(dim, epsilon=eps)


def init_transformer_weights(layer):
    """timm's ViT init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorm."""
    if isinstance(layer, nn.Linear):
        trunc_normal_(layer.weight)
        if layer.bias is not None:
            zeros_(layer.bias)
    elif isinstance(layer, nn.LayerNorm):
        if layer.weight is not None:
            ones_(layer.weight)
        if layer.bias is not None:
            zeros_(layer.bias)


def stage_indices(value, num_stages, model):
    """`out_indices` as a tuple of distinct stage indices in [0, num_stages); one int is one stage."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    ok = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < num_stages for i in items)
    if not items or not ok or len(set(items)) != len(items):
        raise ValueError(f"{model}: out_indices {items!r} must be distinct stage indices in [0, {num_stages})")
    return tuple(int(i) for i in items)


def check_input(x, in_chans, divisor=None, img_size=None, model="model"):
    """Raise a clear error for a wrong channel count or an unsupported image size.

    Runs only in dygraph: under to_static the shapes were checked when tracing."""
    if isinstance(x, (list, tuple)):
        raise TypeError(f"{model}: expected one NCHW image batch, got a {type(x).__name__} of {len(x)}; a list of "
                        f"modalities needs a fusion patch (model.patches: [{{name: geminifusion}}] or tokenfusion)")
    if not paddle.in_dynamic_mode():
        return
    if not isinstance(x, paddle.Tensor):
        raise TypeError(f"{model}: expected a paddle.Tensor NCHW image batch, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{model}: expected a 4-D NCHW image batch, got shape {list(x.shape)}")
    c, h, w = x.shape[1:]
    if c != in_chans:
        raise ValueError(f"{model}: expected {in_chans} input channels, got {c} (input shape {list(x.shape)})")
    if img_size is not None and (h, w) != tuple(img_size):
        raise ValueError(f"{model}: built for {img_size[0]}x{img_size[1]} images, got {h}x{w}. Build it with "
                         f"img_size=({h}, {w}); load_pretrained() adapts a checkpoint's position tables to it.")
    if divisor is not None:
        dh, dw = to_2tuple(divisor)
        if h % dh or w % dw:
            raise ValueError(f"{model}: image size {h}x{w} must be divisible by {dh}x{dw}")


class DropPath(nn.Layer):
    """Stochastic depth per sample (drop the whole residual branch)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        mask = paddle.floor(keep + paddle.rand(shape, dtype=x.dtype))
        return x * (mask / keep)     # one pass over x

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Layer):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0,
                 bias=True):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features, bias_attr=None if bias else False)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, out_features, bias_attr=None if bias else False)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Layer):
    """Image to patch tokens with a strided conv: [B,C,H,W] -> [B, N, D] (or NCHW if flatten=False)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None,
                 flatten=True, strict_img_size=True, owner="PatchEmbed"):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.owner = owner  # the model named in input errors
        if strict_img_size and (self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]):
            raise ValueError(f"{owner}: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.flatten = flatten
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2D(in_chans, embed_dim, self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x):
        check_input(x, self.in_chans, self.patch_size, self.img_size if self.strict_img_size else None,
                    model=self.owner)
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose([0, 2, 1])
            if self.norm is not None:
                x = self.norm(x)
        elif self.norm is not None:
            x = self.norm(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])
        return x


class Attention(nn.Layer):
    """Multi-head self-attention with a fused qkv projection (timm layout: q, k, v along the output)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3, bias_attr=None if qkv_bias else False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x):
        """[B, N, C] -> q (already scaled), k, v, each [B, heads, N, head_dim]."""
        B, N, C = x.shape
        qkv = qkv_scaled_q(x, self.qkv, self.scale).reshape([B, N, 3, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        return paddle.unbind(qkv, axis=0)   # unbind's backward is one stack; slices' build zeros

    def attend(self, q, k, v, bias=None):
        """softmax(q k^T + bias) v for a scaled q, merged back to [B, N, C] and projected."""
        attn = paddle.matmul(q, k, transpose_y=True)
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(F.softmax(attn, axis=-1))
        x = paddle.matmul(attn, v)
        B, H, N, D = x.shape
        x = x.transpose([0, 2, 1, 3]).reshape([B, N, H * D])
        return self.proj_drop(self.proj(x))

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return self.attend(q, k, v)

    def flops_hook(self, inputs, output):
        """Multiply-adds of q@k^T and attn@v; the linears are counted by utils.flops itself."""
        B, N = inputs[0].shape[:2]
        return 2 * B * N * N * self.num_heads * self.head_dim


class Block(nn.Layer):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_eps=1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(rate, depth):
    """Linearly increasing stochastic-depth rates, as every reference uses."""
    if depth <= 1:
        return [0.0] * depth
    return [rate * i / (depth - 1) for i in range(depth)]

