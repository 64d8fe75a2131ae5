"""GeminiFusion (Jia et al., ICML 2024) as an in-place patch of a MiT or Swin backbone.

At every fusion point each modality's features `a` attend, pixel by pixel, over a handful of
keys: its own features plus a learned per-layer noise row, and, for every other modality o, a
copy of itself gated by a relation score r = softmax_C(MLP(cat(a, o))), whose value is o:

    keys   [a + k_noise_m, a * r_mo, ...]     values [a + v_noise_m, o, ...]
    a <- a + MHA_m(q=a, keys, values)         (softmax over 1 + (M-1) keys per pixel)

so the cost is linear in the number of pixels. Placement (as the official code):
- MiT: inside every attention, between the attention output and `proj`; all norms per modality.
- Swin: on the attention branch of every block, before drop path and the shortcut; the in-block
  and patch-merging norms stay shared, `patch_embed.norm` and the output norms are per modality.

The per-pixel attention runs on all B*H*W pixels at once (the official code loops over the
batch). Parameter names follow the official code, except that each `nn.MultiheadAttention`
(`cross_attn_0_to_1`, `cross_attn_1_to_0`) is `cross_attn.{m}` with separate `q_proj`, `k_proj`,
`v_proj` and `out_proj`, and `relation_judger.0` is `relation_judger`; the checkpoint filter maps
official checkpoints (splitting `in_proj_weight`/`in_proj_bias`).

    from plfusion.patches import geminifusion
    geminifusion.apply_patch(segmentor, num_modalities=2, num_heads=8)
"""
import math
import re

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..models.layers import Linear, linear, trunc_normal_, zeros_
from ..models.mix_transformer import EfficientAttention, MixVisionTransformer
from ..models.swin_transformer import SwinTransformer, SwinTransformerBlock
from ..registry import PATCHES
from .multimodal import OFFICIAL_EPS, MultimodalBackbone, NormEps, make_multimodal, resolve_target, swap_class

__all__ = ["apply_patch", "PixelCrossAttention", "RelationJudger"]


class PixelCrossAttention(nn.Layer):
    """Multi-head attention of one query token over S keys of its own, for T tokens at once.

    forward(q [T, C], k [T, S, C], v [T, S, C]) -> [T, C]; the math of torch's
    nn.MultiheadAttention (in-projections with bias, q scaled by head_dim^-0.5, out_proj) with
    a sequence of one query per token."""

    def __init__(self, dim, num_heads=8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"geminifusion: feature dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        # torch initialises the stacked [3C, C] in_proj_weight xavier-uniform, biases zero
        bound = math.sqrt(6.0 / (dim + 3 * dim))
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, Linear(dim, dim, weight_attr=nn.initializer.Uniform(-bound, bound),
                                          bias_attr=nn.initializer.Constant(0.0)))
        self.out_proj = Linear(dim, dim)
        trunc_normal_(self.out_proj.weight)
        zeros_(self.out_proj.bias)

    def forward(self, q, k, v, k_noise=None, v_noise=None):
        """(q, keys, values), or for two modalities (a, a * r, o, k_noise row, v_noise row): `forward_two`."""
        if k_noise is not None:
            return self.forward_two(q, k, v, k_noise, v_noise)
        T, S = k.shape[0], k.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(q).reshape([T, 1, h, d]) * (d ** -0.5)
        k = self.k_proj(k).reshape([T, S, h, d])
        v = self.v_proj(v).reshape([T, S, h, d])
        w = F.softmax((q * k).sum(axis=-1), axis=1)           # [T, S, h]: softmax over the S keys
        out = (w.unsqueeze(-1) * v).sum(axis=1).reshape([T, self.dim])
        return self.out_proj(out)

    def forward_two(self, a, ar, o, k_noise, v_noise):
        """forward(a, keys [a + k_noise, ar], values [a + v_noise, o]) for two modalities, in fewer passes.

        A softmax over two scores is sigmoid(s0 - s1), and s0 - s1 = q.(k0 - k1) where k0 - k1 is
        the k projection of (a - ar) with k_noise's projection as its bias (k's bias cancels);
        likewise out = v1 + w0 (v0 - v1). So there are no stacked keys/values, one k projection
        instead of two, and the noise rows enter as biases."""
        T, C = a.shape
        h, d = self.num_heads, self.head_dim
        s = d ** -0.5
        q = linear(a, self.q_proj.weight * s, self.q_proj.bias * s)
        dk = linear(a - ar, self.k_proj.weight, paddle.matmul(k_noise.unsqueeze(0), self.k_proj.weight).squeeze(0))
        w0 = F.sigmoid((q * dk).reshape([T, h, d]).sum(axis=-1)).unsqueeze(-1)          # [T, h, 1]
        v1 = linear(o, self.v_proj.weight, self.v_proj.bias)
        dv = linear(a - o, self.v_proj.weight, paddle.matmul(v_noise.unsqueeze(0), self.v_proj.weight).squeeze(0))
        out = v1.reshape([T, h, d]) + w0 * dv.reshape([T, h, d])
        return self.out_proj(out.reshape([T, C]))

    def flops_hook(self, inputs, output):
        """q.k over S keys and the weighted sum of S values (the projections count as Linears). In the
        two-modality form q, k, v are projected functionally: their multiply-adds as in the stacked form."""
        if len(inputs) > 3 and inputs[3] is not None:
            T, C = inputs[0].shape
            return 5 * T * C * C + 2 * T * 2 * C
        T, S, C = inputs[1].shape
        return 2 * T * S * C


class RelationJudger(nn.Layer):
    """softmax over channels of fc2(GELU(fc1(cat(a, o)))): [.., 2C] -> [.., C] (official `Mlp_2`)."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = Linear(2 * dim, dim)
        self.act = nn.GELU()
        self.fc2 = Linear(dim, dim)
        for fc in (self.fc1, self.fc2):
            trunc_normal_(fc.weight)
            zeros_(fc.bias)

    def forward(self, x):
        return F.softmax(self.fc2(self.act(self.fc1(x))), axis=-1)


class GeminiFusionMixin:
    """The fusion layers and `fuse`, added to a MiT attention or a Swin block."""

    def _add_fusion(self, dim, num_modalities, num_heads):
        self._gf_num_modalities = num_modalities
        self.cross_attn = nn.LayerList([PixelCrossAttention(dim, num_heads) for _ in range(num_modalities)])
        self.relation_judger = RelationJudger(dim)
        # one learned row per modality per layer; torch's nn.Embedding init, N(0, 1)
        self.k_noise = nn.Embedding(num_modalities, dim, weight_attr=nn.initializer.Normal(0.0, 1.0))
        self.v_noise = nn.Embedding(num_modalities, dim, weight_attr=nn.initializer.Normal(0.0, 1.0))

    def fuse(self, x):
        """x: [M*B, N, C] (modality-stacked) -> the same with every modality's cross attention added."""
        M = self._gf_num_modalities
        shape = x.shape
        C = shape[-1]
        xs = x.reshape([M, -1, C])                                   # [M, T, C], T = B*N pixels
        if M == 2:
            return self._fuse_two(xs).reshape(shape)
        pairs = [(m, o) for m in range(M) for o in range(M) if o != m]
        # relation scores of every ordered pair (self m, other o) in one call
        judged = self.relation_judger(paddle.concat(
            [paddle.stack([xs[m] for m, _ in pairs]), paddle.stack([xs[o] for _, o in pairs])], axis=-1))
        relation = dict(zip(pairs, judged))
        out = []
        for m in range(M):       # a loop over modalities; batch and pixels are one axis
            a = xs[m]
            others = [o for o in range(M) if o != m]
            keys = paddle.stack([a + self.k_noise.weight[m]] + [a * relation[(m, o)] for o in others], axis=1)
            values = paddle.stack([a + self.v_noise.weight[m]] + [xs[o] for o in others], axis=1)
            out.append(a + self.cross_attn[m](a, keys, values))
        return paddle.stack(out).reshape(shape)


    def _fuse_two(self, xs):
        """`fuse` for two modalities: pairs (0, 1) and (1, 0) judged in one call, keys and values never stacked."""
        x0, x1 = paddle.unbind(xs, axis=0)      # unbind's backward is one stack; slices' build zeros
        r01, r10 = paddle.unbind(self.relation_judger(paddle.concat([xs, paddle.flip(xs, axis=[0])], axis=-1)), 0)
        kn, vn = self.k_noise.weight, self.v_noise.weight
        c0 = self.cross_attn[0](x0, x0 * r01, x1, kn[0], vn[0])
        c1 = self.cross_attn[1](x1, x1 * r10, x0, kn[1], vn[1])
        return xs + paddle.stack([c0, c1])


class GeminiMiTAttention(GeminiFusionMixin):
    """MiT attention with the fusion between the attention output and `proj`."""

    def forward(self, x, H, W):
        q = self.query(x)
        k, v = self.key_value(x, H, W)
        return self.project(self.fuse(self.attend(q, k, v)))


class GeminiSwinBlock(GeminiFusionMixin):
    """Swin block with the fusion on the attention branch, before drop path and the shortcut."""

    def post_attention(self, y):
        return self.fuse(y)


_OFFICIAL_CROSS = re.compile(r"^(.*)\.cross_attn_(\d+)_to_(\d+)\.(.+)$")


class GeminiFusionBackbone(MultimodalBackbone):
    """Mixed into the backbone: maps official GeminiFusion checkpoint names to ours."""

    def _fusion_key_map(self, sd, layout):
        out = {}
        for k, v in sd.items():
            m = _OFFICIAL_CROSS.match(k)
            if m is None:
                out[k.replace(".relation_judger.0.", ".relation_judger.")] = v
                continue
            prefix, query, tail = m.group(1), int(m.group(2)), m.group(4)
            base = f"{prefix}.cross_attn.{query}"
            if tail in ("in_proj_weight", "in_proj_bias"):
                parts = np.split(np.asarray(v), 3, axis=0)   # [3C, C] / [3C]: q, k, v rows (torch layout)
                kind = "weight" if tail.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                    out[f"{base}.{name}.{kind}"] = part
            else:
                out[f"{base}.{tail}"] = v
        return out


def _fusion_sites(backbone):
    """(layer to patch, mixin, channel dim) for every fusion point of the backbone."""
    if isinstance(backbone, MixVisionTransformer):
        sites = []
        for i in range(len(backbone.embed_dims)):
            for blk in backbone.stage_layers(i)[1]:
                if not isinstance(blk.attn, EfficientAttention):
                    raise TypeError(f"geminifusion.apply_patch: block attention is a {type(blk.attn).__name__}, "
                                    f"expected EfficientAttention")
                sites.append((blk.attn, GeminiMiTAttention, blk.attn.dim))
        return sites
    sites = []
    for layer in backbone.layers:
        for blk in layer.blocks:
            if not isinstance(blk, SwinTransformerBlock):
                raise TypeError(f"geminifusion.apply_patch: Swin stage holds a {type(blk).__name__}, "
                                f"expected SwinTransformerBlock")
            sites.append((blk, GeminiSwinBlock, blk.dim))
    return sites


def _swin_norm(name):
    """Swin norms that become per modality: the patch-embed norm and the output norms."""
    return name == "patch_embed.norm" or re.fullmatch(r"norm\d+", name) is not None


def apply_patch(model, num_modalities=2, num_heads=8, norm_eps: NormEps = OFFICIAL_EPS):
    """Make `model` (a MixVisionTransformer or dense SwinTransformer, or a Segmentor holding one) a
    GeminiFusion model in place, keeping its weights.

    num_heads: heads of the pixel-wise cross attention (8 in the paper).
    norm_eps: eps of the per-modality norms (1e-6 as the official LayerNormParallel; None keeps
    each original norm's eps)."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"geminifusion.apply_patch: num_heads must be a positive int, got {num_heads!r}")
    seg, backbone = resolve_target(model, "geminifusion", (MixVisionTransformer, SwinTransformer))
    is_swin = isinstance(backbone, SwinTransformer)
    if is_swin and not backbone.dense:
        raise ValueError("geminifusion.apply_patch: the Swin backbone is in classification mode; build it with "
                         "out_indices=[0, 1, 2, 3] and num_classes=0 (the dense backbone GeminiFusion fuses)")
    if not is_swin and backbone.num_classes:
        raise ValueError(f"geminifusion.apply_patch: the MiT has a classifier (num_classes={backbone.num_classes}); "
                         f"GeminiFusion fuses the feature maps of a num_classes=0 backbone")
    sites = _fusion_sites(backbone)
    for _, _, dim in sites:
        if dim % num_heads:
            raise ValueError(f"geminifusion.apply_patch: num_heads={num_heads} does not divide the feature dim "
                             f"{dim} of a fusion layer")
    make_multimodal(backbone, num_modalities, "geminifusion", GeminiFusionBackbone,
                    norm_select=_swin_norm if is_swin else None, norm_eps=norm_eps, segmentor=seg)
    for layer, mixin, dim in sites:
        swap_class(layer, mixin)
        layer._add_fusion(dim, backbone.num_modalities, num_heads)
    return model


PATCHES.register(apply_patch, name="geminifusion")
