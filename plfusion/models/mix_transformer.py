"""MiT, the SegFormer encoder (Xie et al., NeurIPS 2021), with the names of NVlabs/SegFormer's mit_b*.pth.

Four stages; each is an overlapping patch embedding (a strided conv + LayerNorm), a stack of blocks
with spatial-reduction attention and a Mix-FFN (fc1 -> 3x3 depthwise conv -> GELU -> fc2), and a
LayerNorm. The encoder returns the four stage maps (NCHW, strides 4, 8, 16, 32). There are no
position embeddings, so any input size works: grids follow the conv output shapes.

The fusion patches (TokenFusion, GeminiFusion) build on this file: every piece takes and returns
plain tensors through small methods (see the class docstrings) so a subclass can run them per
modality and intercept between them.
"""
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..registry import BACKBONES, NonNegativeInt, PositiveFloats, PositiveInt, PositiveInts, Rate
from .layers import (DropPath, LayerNorm, Linear, add_channel_bias, cached_ones, check_input, drop_path_rates,
                     init_transformer_weights, row_bands, stage_indices, zeros_)
from .pretrained import PretrainedMixin

__all__ = ["MixVisionTransformer", "OverlapPatchEmbed", "EfficientAttention", "MixFFN", "DWConv", "MiTBlock",
           "init_mit_weights"]

BLOCK_EPS = 1e-6   # block norms and the per-stage output norms (SegFormer passes eps=1e-6)
EMBED_EPS = 1e-5   # patch-embed norm and attn.norm (torch's default LayerNorm in SegFormer)
NUM_STAGES = 4
# (kernel, stride) of the overlapping patch embedding of each stage; padding is kernel // 2
PATCH_EMBEDS = ((7, 4), (3, 2), (3, 2), (3, 2))


def init_mit_weights(layer):
    """SegFormer's init: the transformer init for Linear/LayerNorm, He-normal (fan-out) convs, zero biases."""
    init_transformer_weights(layer)
    if isinstance(layer, nn.Conv2D):
        out_c, _, kh, kw = layer.weight.shape
        fan_out = kh * kw * out_c // layer._groups
        nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_out))(layer.weight)
        if layer.bias is not None:
            zeros_(layer.bias)


def _conv_out(n, kernel, stride, padding):
    return (n + 2 * padding - kernel) // stride + 1


class OverlapPatchEmbed(nn.Layer):
    """[B, C, H, W] -> (tokens [B, H'*W', D] after `norm`, H', W') with a conv of stride < kernel."""

    def __init__(self, patch_size=7, stride=4, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2D(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = LayerNorm(embed_dim, EMBED_EPS)

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose([0, 2, 1])), H, W


class DWConv(nn.Layer):
    """3x3 depthwise conv on tokens laid out as an H x W grid (the 'Mix' of Mix-FFN)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2D(dim, dim, 3, stride=1, padding=1, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        conv = self.dwconv
        # the bias goes on in token layout, where add_channel_bias is cheap (a NCHW broadcast add is not)
        x = F.conv2d(x.transpose([0, 2, 1]).reshape([B, C, H, W]), conv.weight, None, conv._stride, conv._padding,
                     conv._dilation, conv._groups)
        x = x.flatten(2).transpose([0, 2, 1])
        return x if conv.bias is None else add_channel_bias(x, conv.bias)

    def flops_hook(self, inputs, output):
        """The conv's multiply-adds (its layer is not called, so count_flops's conv hook does not see it)."""
        return int(np.prod(output.shape)) * _taps(self.dwconv)


def _taps(conv):
    """Multiply-adds per output element of a depthwise conv (its kernel size)."""
    return int(np.prod(conv.weight.shape[1:]))


def _channels_first_ok(x, mlp):
    """MixFFN's channels-first path: dygraph on the CPU, static sizes, all biases present."""
    return (paddle.in_dynamic_mode() and x.place.is_cpu_place() and -1 not in x.shape
            and mlp.fc1.bias is not None and mlp.fc2.bias is not None and mlp.dwconv.dwconv.bias is not None)


class MixFFN(nn.Layer):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2 (SegFormer's `Mlp`)."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x, H, W):
        if _channels_first_ok(x, self):
            return self._forward_channels_first(x, H, W)
        x = self.drop(self.act(self.dwconv(self.fc1(x), H, W)))
        return self.drop(self.fc2(x))

    def _forward_channels_first(self, x, H, W):
        """The same function with the 4C-wide hidden map kept channels-first ([B, 4C, H*W]), as the
        depthwise conv wants it: fc1 and fc2 are batched GEMMs on the transposed (C-wide) tokens, the
        biases go in through the GEMMs. Two C-wide transposes instead of two 4C-wide ones (Paddle's
        transpose is single-threaded): ~1.4x faster inference and ~1.25x faster training of the block.
        Eval on a large map goes one band of rows at a time (fc1 also on the row above and below that
        the 3x3 conv reads), so the hidden map stays in the CPU cache instead of making six trips
        through memory; same arithmetic per token."""
        B, N, C = x.shape
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        D = w1.shape[1]
        conv = self.dwconv.dwconv
        bands = [(0, H)] if self.training else row_bands(H, B * D * W, halo=1)
        xt = x.transpose([0, 2, 1])
        w1t, w2t = w1.t().unsqueeze(0).expand([B, D, C]), w2.t().unsqueeze(0).expand([B, C, D])
        b1, b2, cb = b1.reshape([1, D, 1]), b2.reshape([1, C, 1]), paddle.tile(conv.bias, [B]).unsqueeze(1)
        out = []
        for r0, r1 in bands:
            h0, h1 = max(0, r0 - 1), min(H, r1 + 1)
            h = paddle.baddbmm(b1, w1t, xt if (h0, h1) == (0, H) else xt[:, :, h0 * W:h1 * W])
            h = F.conv2d(h.reshape([B, D, h1 - h0, W]), conv.weight, None, conv._stride, conv._padding,
                         conv._dilation, conv._groups)
            if (h0, h1) != (r0, r1):
                h = h[:, :, r0 - h0:r1 - h0]        # the rows whose taps are all in this band
            n = (r1 - r0) * W
            h = paddle.addmm(h.reshape([B * D, n]), cb, cached_ones([1, n], h.dtype))
            out.append(paddle.baddbmm(b2, w2t, self.drop(self.act(h)).reshape([B, D, n])))
        out = out[0] if len(out) == 1 else paddle.concat(out, axis=-1)
        return self.drop(out.transpose([0, 2, 1]))

    def flops_hook(self, inputs, output):
        """fc1, the depthwise conv and fc2 when the channels-first path ran (its layers were not called)."""
        if not _channels_first_ok(inputs[0], self):
            return 0
        B, N, C = inputs[0].shape
        D = self.fc1.weight.shape[1]
        return B * N * D * (2 * C + _taps(self.dwconv.dwconv))


class EfficientAttention(nn.Layer):
    """Multi-head attention whose keys/values come from a grid shrunk by `sr_ratio` (a strided conv).

    forward(x, H, W) = project(attend(query(x), *key_value(x, H, W))), with the pieces:
      query(x)            -> q [B, heads, N, d]
      reduce(x, H, W)     -> the tokens k/v are computed from: sr conv + `norm`, or x when sr_ratio == 1
      key_value(x, H, W)  -> k, v [B, heads, N / sr_ratio^2, d]: kv_heads(reduce(x, H, W))
      attend(q, k, v)     -> softmax(q k^T) v (q carries the scale) with heads merged: [B, N, C], BEFORE `proj`;
                             merge_heads(weighted(q, k, v)), weighted = probs(q, k) @ v
      project(x)          -> proj + dropout
    A fusion subclass overrides forward to mix modalities between `attend` and `project`.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0, sr_ratio=1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"EfficientAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.q = Linear(dim, dim, bias_attr=None if qkv_bias else False)
        self.kv = Linear(dim, dim * 2, bias_attr=None if qkv_bias else False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2D(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = LayerNorm(dim, EMBED_EPS)

    def query(self, x):
        """q, already multiplied by the softmax scale (on the [C, C] weights, not the scores)."""
        B, N, _ = x.shape
        return self.q(x, self.scale).reshape([B, N, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])

    def reduce(self, x, H, W):
        if self.sr_ratio == 1:
            return x
        B, N, C = x.shape
        x = self.sr(x.transpose([0, 2, 1]).reshape([B, C, H, W]))
        return self.norm(x.flatten(2).transpose([0, 2, 1]))

    def key_value(self, x, H, W):
        return self.kv_heads(self.reduce(x, H, W))

    def kv_heads(self, x):
        """k, v [B, heads, M, d] of the (reduced) tokens x [B, M, C]."""
        B, M, _ = x.shape
        kv = self.kv(x).reshape([B, M, 2, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        return paddle.unbind(kv, axis=0)

    def probs(self, q, k):
        """Attention weights [B, heads, N, M] (after attention dropout)."""
        return self.attn_drop(F.softmax(paddle.matmul(q, k, transpose_y=True), axis=-1))

    @staticmethod
    def merge_heads(x):
        """[B, heads, N, d] -> [B, N, heads * d]."""
        B, _, N, _ = x.shape
        return x.transpose([0, 2, 1, 3]).reshape([B, N, -1])

    def attend(self, q, k, v):
        return self.merge_heads(self.weighted(q, k, v))

    def weighted(self, q, k, v):
        """probs(q, k) @ v, [B, heads, N, d]. Eval in dygraph takes the queries in bands when the logits
        are large (stage 1 at 480x640: [B, 1, 19200, 300]), so each band's logits stay in the CPU cache
        through the matmul, softmax and matmul instead of three trips through memory."""
        bands = [None]
        if not self.training and paddle.in_dynamic_mode():
            B, heads, N, _ = q.shape
            bands = row_bands(N, B * heads * k.shape[2])
        if len(bands) == 1:
            return paddle.matmul(self.probs(q, k), v)
        return paddle.concat([paddle.matmul(self.probs(q[:, :, a:b], k), v) for a, b in bands], axis=2)

    def project(self, x):
        return self.proj_drop(self.proj(x))

    def forward(self, x, H, W):
        q = self.query(x)
        k, v = self.key_value(x, H, W)
        return self.project(self.attend(q, k, v))

    def kv_grid(self, H, W):
        """The key/value tokens' grid (h, w) for an H x W query grid."""
        if self.sr_ratio == 1:
            return H, W
        return (H - self.sr_ratio) // self.sr_ratio + 1, (W - self.sr_ratio) // self.sr_ratio + 1

    def kv_len(self, H, W):
        """Number of key/value tokens for an H x W query grid."""
        h, w = self.kv_grid(H, W)
        return h * w

    def flops_hook(self, inputs, output):
        """q k^T and attn v: N queries against the reduced key/value tokens."""
        x, H, W = inputs[:3]
        B, N, C = x.shape
        return 2 * B * N * self.kv_len(H, W) * C


class MiTBlock(nn.Layer):
    """x + drop_path(attn(norm1(x), H, W)), then x + drop_path(mlp(norm2(x), H, W)).

    `attn_branch` and `mlp_branch` are the two residual branches (without the drop path), so a
    subclass can scale or exchange the attention output before it is added (TokenFusion)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, sr_ratio=1):
        super().__init__()
        self.norm1 = LayerNorm(dim, BLOCK_EPS)
        self.attn = EfficientAttention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                                       proj_drop=drop, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, BLOCK_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop=drop)

    def attn_branch(self, x, H, W):
        return self.attn(self.norm1(x), H, W)

    def mlp_branch(self, x, H, W):
        return self.mlp(self.norm2(x), H, W)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn_branch(x, H, W))
        return x + self.drop_path(self.mlp_branch(x, H, W))


def _stage_list(value, name):
    value = list(value)
    if len(value) != NUM_STAGES:
        raise ValueError(f"MixVisionTransformer: {name} needs one entry per stage ({NUM_STAGES}), got {value}")
    return value


class MixVisionTransformer(PretrainedMixin, nn.Layer):
    """MiT encoder. Stage i (0-based) lives in `patch_embed{i+1}`, `block{i+1}` and `norm{i+1}`.

    forward_features(x) -> [maps of the stages in `out_indices`], NCHW at strides 4, 8, 16, 32;
    only the stages up to the last requested one run.
    forward(x) -> those maps when num_classes == 0 (the default: the segmentation use), else
    logits [B, num_classes] from `head` on the mean of the last stage's tokens (after `norm4`),
    as SegFormer's ImageNet classifier; then out_indices must end with 3.
    Hooks for patches: forward_stage(i, x) runs one stage (NCHW in, NCHW out) as
    patch_embed -> blocks(x, H, W) -> norm -> map; stage_layers(i) returns its three parts.
    """

    def __init__(self, in_chans: PositiveInt = 3, num_classes: NonNegativeInt = 0,
                 embed_dims: PositiveInts = (64, 128, 256, 512), num_heads: PositiveInts = (1, 2, 4, 8),
                 mlp_ratios: PositiveFloats = (4, 4, 4, 4), qkv_bias=True, qk_scale=None, drop_rate: Rate = 0.0,
                 attn_drop_rate: Rate = 0.0, drop_path_rate: Rate = 0.1, depths: PositiveInts = (3, 4, 6, 3),
                 sr_ratios: PositiveInts = (8, 4, 2, 1), out_indices=(0, 1, 2, 3)):
        super().__init__()
        embed_dims, num_heads = _stage_list(embed_dims, "embed_dims"), _stage_list(num_heads, "num_heads")
        mlp_ratios, depths = _stage_list(mlp_ratios, "mlp_ratios"), _stage_list(depths, "depths")
        sr_ratios = _stage_list(sr_ratios, "sr_ratios")
        out_indices = list(stage_indices(out_indices, NUM_STAGES, "MixVisionTransformer"))
        if out_indices != sorted(out_indices):
            raise ValueError(f"MixVisionTransformer: out_indices must be increasing stage indices in 0..3, "
                             f"got {out_indices}")
        if num_classes > 0 and out_indices[-1] != NUM_STAGES - 1:
            raise ValueError(f"MixVisionTransformer: num_classes={num_classes} classifies the last stage, "
                             f"so out_indices must end with 3, got {out_indices}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.depths = depths
        self.sr_ratios = sr_ratios
        self.out_indices = out_indices
        self.out_channels = [embed_dims[i] for i in out_indices]
        self.num_features = embed_dims[-1]

        dpr = drop_path_rates(drop_path_rate, sum(depths))
        cur = 0
        for i in range(NUM_STAGES):
            kernel, stride = PATCH_EMBEDS[i]
            prev = in_chans if i == 0 else embed_dims[i - 1]
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(kernel, stride, prev, embed_dims[i]))
            setattr(self, f"block{i + 1}", nn.LayerList([
                MiTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias=qkv_bias, qk_scale=qk_scale,
                         drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j], sr_ratio=sr_ratios[i])
                for j in range(depths[i])]))
            setattr(self, f"norm{i + 1}", LayerNorm(embed_dims[i], BLOCK_EPS))
            cur += depths[i]
        self.head = Linear(embed_dims[-1], num_classes) if num_classes > 0 else None
        self.apply(init_mit_weights)

    def stage_layers(self, i):
        """(patch_embed, blocks, norm) of stage i (0-based)."""
        return getattr(self, f"patch_embed{i + 1}"), getattr(self, f"block{i + 1}"), getattr(self, f"norm{i + 1}")

    def forward_stage(self, i, x):
        patch_embed, blocks, norm = self.stage_layers(i)
        x, H, W = patch_embed(x)
        for blk in blocks:
            x = blk(x, H, W)
        x = norm(x)
        return x.reshape([x.shape[0], H, W, x.shape[2]]).transpose([0, 3, 1, 2])

    def stage_grids(self, H, W):
        """Token grid (h, w) of every stage for an H x W input, from the conv arithmetic."""
        grids = []
        for kernel, stride in PATCH_EMBEDS:
            H, W = _conv_out(H, kernel, stride, kernel // 2), _conv_out(W, kernel, stride, kernel // 2)
            grids.append((H, W))
        return grids

    @paddle.jit.not_to_static   # shape checks run in dygraph only; to_static cannot convert the loop's targets
    def check_size(self, x):
        """Channel count, and every reduced attention grid must keep at least one token."""
        check_input(x, self.in_chans, model="MixVisionTransformer")
        if not paddle.in_dynamic_mode():
            return
        H, W = x.shape[2:]
        for i, ((h, w), sr) in enumerate(zip(self.stage_grids(H, W), self.sr_ratios)):
            if i > self.out_indices[-1]:
                break
            if min(h, w) < max(sr, 1):
                raise ValueError(f"MixVisionTransformer: input {H}x{W} is too small: stage {i + 1} has a {h}x{w} "
                                 f"grid, smaller than its sr_ratio {sr}")

    def forward_features(self, x):
        self.check_size(x)
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = self.forward_stage(i, x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    def forward_head(self, x, pre_logits=False):
        """Last-stage map [B, C, h, w] (or the forward_features list) -> logits, or pooled with pre_logits."""
        if isinstance(x, (list, tuple)):
            x = x[-1]
        x = x.mean(axis=[2, 3])
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, x):
        feats = self.forward_features(x)
        return feats if self.head is None else self.forward_head(feats[-1])

    def _checkpoint_filter(self, sd, layout):
        """SegFormer encoder checkpoints load as they are; a whole segmentor checkpoint loads its
        `backbone.` part (the decode head keys stay and are reported as unexpected)."""
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        if "patch_embed1.proj.weight" not in sd and "backbone.patch_embed1.proj.weight" in sd:
            sd = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
        return sd


def _variant(name, **defaults):
    return BACKBONES.register_variant(MixVisionTransformer, name, **defaults)


_COMMON = dict(num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), qkv_bias=True)
_WIDE = (64, 128, 320, 512)

mit_b0 = _variant("mit_b0", embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), **_COMMON)
mit_b1 = _variant("mit_b1", embed_dims=_WIDE, depths=(2, 2, 2, 2), **_COMMON)
mit_b2 = _variant("mit_b2", embed_dims=_WIDE, depths=(3, 4, 6, 3), **_COMMON)
mit_b3 = _variant("mit_b3", embed_dims=_WIDE, depths=(3, 4, 18, 3), **_COMMON)
mit_b4 = _variant("mit_b4", embed_dims=_WIDE, depths=(3, 8, 27, 3), **_COMMON)
mit_b5 = _variant("mit_b5", embed_dims=_WIDE, depths=(3, 6, 40, 3), **_COMMON)
