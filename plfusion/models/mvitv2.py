"""MViTv2 (Li et al., CVPR 2022) for images, with timm's parameter names.

Pooling attention: q, k and v are each pooled by a 3x3 depthwise conv (per head, shared
across heads) and normalised with LayerNorm(head_dim); q is strided at the first block of
stages 1-3, k/v by 4, 2, 1, 1 per stage. Decomposed relative positions are added to the
attention logits and the pooled q is added back to the output (residual pooling). The channel
count doubles at each stage change: inside the attention of the first block of the new stage
(`expand_attn=True`, `shortcut_proj_attn`; T/S/B) or in the MLP of the last block of the old
stage (`expand_attn=False`, `shortcut_proj_mlp`; L), as the official ImageNet configs do.

Checkpoints load from timm, the official repo (flat `blocks.N`, `head.projection`) and
mmpretrain (`backbone.` prefix, `patch_embed.projection`, `norm3`, `head.fc`).
"""
import re

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..registry import BACKBONES, ImageSize, NonNegativeInt, PositiveFloat, PositiveInt, PositiveInts, Rate
from .layers import DropPath, LayerNorm, Linear, Mlp, check_input, drop_path_rates, init_transformer_weights, \
    stage_indices, to_2tuple, trunc_normal_
from .pretrained import PretrainedMixin


__all__ = ["MultiScaleVit", "MultiScaleAttention", "MultiScaleBlock", "resize_decomposed_rel_pos",
           "rel_pos_indices"]


def resize_decomposed_rel_pos(table, new_len):
    """Linearly resample a [L, head_dim] relative position table to `new_len` rows.

    Same as torch `F.interpolate(mode='linear', align_corners=False)` over L, which the
    references use: sample points (i + 0.5) * L / new_len - 0.5, clamped to the table."""
    table = np.asarray(table)
    L = table.shape[0]
    if L == new_len:
        return table
    src = np.clip((np.arange(new_len) + 0.5) * L / new_len - 0.5, 0, L - 1)
    out = np.stack([np.interp(src, np.arange(L), table[:, c]) for c in range(table.shape[1])], axis=1)
    return out.astype(table.dtype)


def rel_pos_indices(q_len, k_len):
    """[q_len, k_len] row of the rel-pos table for each (query, key) pair along one axis.

    The shorter axis is scaled up so that pooled maps index the table at matching distances."""
    q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    dist = np.arange(q_len)[:, None] * q_ratio - np.arange(k_len)[None, :] * k_ratio + (k_len - 1) * k_ratio
    return dist.astype("int64")


class ConvPatchEmbed(nn.Layer):
    """Overlapping 7x7 stride-4 conv stem: [B, C, H, W] -> tokens [B, H/4 * W/4, D]."""

    def __init__(self, in_chans=3, embed_dim=96, kernel=7, stride=4, padding=3):
        super().__init__()
        self.proj = nn.Conv2D(in_chans, embed_dim, kernel, stride=stride, padding=padding)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose([0, 2, 1]), (x.shape[2], x.shape[3])


class MultiScaleAttention(nn.Layer):
    """Pooling attention with decomposed relative positions and residual pooling."""

    def __init__(self, dim, dim_out, feat_size, num_heads=1, qkv_bias=True, kernel=(3, 3), stride_q=(1, 1),
                 stride_kv=(1, 1), norm_eps=1e-6, residual_pooling=True):
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"MultiScaleAttention: dim_out {dim_out} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dim_out = num_heads, dim_out
        self.head_dim = dim_out // num_heads
        self.scale = self.head_dim ** -0.5
        self.residual_pooling = residual_pooling
        self.stride_kv = to_2tuple(stride_kv)
        self.qkv = Linear(dim, dim_out * 3, bias_attr=None if qkv_bias else False)
        self.proj = Linear(dim_out, dim_out)
        kernel, stride_q, stride_kv = to_2tuple(kernel), to_2tuple(stride_q), to_2tuple(stride_kv)
        pad = [k // 2 for k in kernel]
        hd = self.head_dim

        def pool(stride):  # a 1x1 stride-1 "pool" is the identity, which the references skip
            if kernel == (1, 1) and stride == (1, 1):
                return None, None
            return (nn.Conv2D(hd, hd, kernel, stride=stride, padding=pad, groups=hd, bias_attr=False),
                    LayerNorm(hd, norm_eps))
        self.pool_q, self.norm_q = pool(stride_q)
        self.pool_k, self.norm_k = pool(stride_kv)
        self.pool_v, self.norm_v = pool(stride_kv)

        # one table row per relative distance along each axis, sized for the build-time map
        q_size = [s // st for s, st in zip(feat_size, stride_q)]
        kv_size = [s // st for s, st in zip(feat_size, stride_kv)]
        self.rel_pos_h = self.create_parameter([2 * max(q_size[0], kv_size[0]) - 1, hd],
                                               default_initializer=trunc_normal_)
        self.rel_pos_w = self.create_parameter([2 * max(q_size[1], kv_size[1]) - 1, hd],
                                               default_initializer=trunc_normal_)

    @staticmethod
    def _pool(t, pool, norm, hw):
        """[B, heads, H*W, hd] -> pooled and normed [B, heads, H'*W', hd], (H', W')."""
        if pool is None:
            return t, hw
        B, n, _, hd = t.shape
        t = t.reshape([B * n, hw[0], hw[1], hd]).transpose([0, 3, 1, 2])
        t = pool(t)
        out_hw = (t.shape[2], t.shape[3])
        t = t.reshape([B, n, hd, -1]).transpose([0, 1, 3, 2])
        return norm(t), out_hw

    def rel_terms(self, q, q_hw, k_hw):
        """The decomposed relative-position terms of each query: q . Rh[qh, kh] and q . Rw[qw, kw],
        as [B, heads, Nq, kh] and [B, heads, Nq, kw]."""
        B, n, _, hd = q.shape
        Rh = paddle.index_select(self.rel_pos_h, paddle.to_tensor(rel_pos_indices(q_hw[0], k_hw[0]).reshape(-1)))
        Rw = paddle.index_select(self.rel_pos_w, paddle.to_tensor(rel_pos_indices(q_hw[1], k_hw[1]).reshape(-1)))
        r = q.reshape([B, n, q_hw[0], q_hw[1], hd])
        rel_h = paddle.einsum("byhwc,hkc->byhwk", r, Rh.reshape([q_hw[0], k_hw[0], hd]))
        rel_w = paddle.einsum("byhwc,wkc->byhwk", r, Rw.reshape([q_hw[1], k_hw[1], hd]))
        return rel_h.reshape([B, n, -1, k_hw[0]]), rel_w.reshape([B, n, -1, k_hw[1]])

    @staticmethod
    def add_rel_terms(attn, rel_h, rel_w, k_hw):
        """attn[b, n, i, (kh, kw)] += rel_h[b, n, i, kh] + rel_w[b, n, i, kw]."""
        B, n, Nq, Nk = attn.shape
        attn = attn.reshape([B, n, Nq, k_hw[0], k_hw[1]]) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
        return attn.reshape([B, n, Nq, Nk])

    def add_rel_pos(self, attn, q, q_hw, k_hw):
        """attn[b, n, (qh, qw), (kh, kw)] += q . Rh[qh, kh] + q . Rw[qw, kw]."""
        return self.add_rel_terms(attn, *self.rel_terms(q, q_hw, k_hw), k_hw)

    def pooled_qkv(self, x, hw):
        """qkv projection and pooling: q, k, v [B, heads, N', head_dim], q's grid, k's grid."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape([B, N, 3, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        q, k, v = paddle.unbind(qkv, axis=0)      # unbind's backward is one stack; slices' build zeros
        q, q_hw = self._pool(q, self.pool_q, self.norm_q, hw)
        k, k_hw = self._pool(k, self.pool_k, self.norm_k, hw)
        v, _ = self._pool(v, self.pool_v, self.norm_v, hw)
        return q, k, v, q_hw, k_hw

    def attend(self, q, k, v, attn):
        """softmax(attn) @ v (+ q, residual pooling) -> tokens [B, Nq, dim_out], before proj."""
        x = paddle.matmul(F.softmax(attn, axis=-1), v)
        if self.residual_pooling:
            x = x + q
        return x.transpose([0, 2, 1, 3]).reshape([x.shape[0], -1, self.dim_out])

    def forward(self, x, hw):
        q, k, v, q_hw, k_hw = self.pooled_qkv(x, hw)
        attn = paddle.matmul(q * self.scale, k, transpose_y=True)
        return self.proj(self.attend(q, k, v, self.add_rel_pos(attn, q, q_hw, k_hw))), q_hw

    def flops_hook(self, inputs, output):
        """Multiply-adds of q@k^T, attn@v and the two rel-pos products (linears and pool convs are
        counted by utils.flops). The query count is the output's token count: ToMe's merged rows count
        as such."""
        B = inputs[0].shape[0]
        hw = inputs[1]
        k_hw = [-(-s // st) for s, st in zip(hw, self.stride_kv)]   # conv k3 p1: ceil(size / stride)
        nq, nk = output[0].shape[1], k_hw[0] * k_hw[1]
        d = self.num_heads * self.head_dim
        return B * d * (2 * nq * nk + nq * (k_hw[0] + k_hw[1]))


class MultiScaleBlock(nn.Layer):
    """Pre-norm block: pooled (and maybe projected) shortcut + attention, then shortcut + MLP."""

    def __init__(self, dim, dim_out, num_heads, feat_size, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 norm_eps=1e-6, kernel=(3, 3), stride_q=(1, 1), stride_kv=(1, 1), expand_attn=True,
                 residual_pooling=True):
        super().__init__()
        stride_q = to_2tuple(stride_q)
        proj_needed = dim != dim_out
        att_dim = dim_out if expand_attn else dim
        self.norm1 = LayerNorm(dim, norm_eps)
        self.shortcut_proj_attn = Linear(dim, dim_out) if proj_needed and expand_attn else None
        if stride_q != (1, 1):
            k_skip = [s + 1 if s > 1 else s for s in stride_q]
            self.shortcut_pool_attn = nn.MaxPool2D(k_skip, stride_q, [k // 2 for k in k_skip])
        else:
            self.shortcut_pool_attn = None
        self.attn = MultiScaleAttention(dim, att_dim, feat_size, num_heads, qkv_bias, kernel, stride_q, stride_kv,
                                        norm_eps, residual_pooling)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(att_dim, norm_eps)
        self.shortcut_proj_mlp = Linear(dim, dim_out) if proj_needed and not expand_attn else None
        self.mlp = Mlp(att_dim, int(att_dim * mlp_ratio), dim_out)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _shortcut_pool(self, x, hw):
        if self.shortcut_pool_attn is None:
            return x
        B, _, C = x.shape
        x = self.shortcut_pool_attn(x.reshape([B, hw[0], hw[1], C]).transpose([0, 3, 1, 2]))
        return x.flatten(2).transpose([0, 2, 1])

    def forward(self, x, hw):
        x_norm = self.norm1(x)
        # as in the references, the shortcut is the un-normalised input unless it is projected
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        shortcut = self._shortcut_pool(shortcut, hw)
        y, hw = self.attn(x_norm, hw)
        x = shortcut + self.drop_path1(y)
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(self.mlp(x_norm)), hw


class MultiScaleVitStage(nn.Layer):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.LayerList(blocks)

    def forward(self, x, hw):
        for blk in self.blocks:
            x, hw = blk(x, hw)
        return x, hw


class _ClsHead(nn.Layer):
    """timm's `head` (dropout + `fc`), so checkpoints name the classifier `head.fc`."""

    def __init__(self, dim, num_classes, drop=0.0):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.drop(x))


class MultiScaleVit(PretrainedMixin, nn.Layer):
    """MViTv2 without a cls token (the ImageNet-1k models).

    forward: logits, pooled features [B, C] with num_classes=0, or with `out_indices` a list of
    NCHW stage outputs (the last stage after the final `norm`, as timm's forward_intermediates
    with norm=True). The input must be `img_size`, a multiple of 32: the rel-pos tables are sized
    for it (load_pretrained resizes them to a new img_size).
    """

    def __init__(self, img_size: ImageSize = 224, in_chans: PositiveInt = 3, num_classes: NonNegativeInt = 1000,
                 embed_dim: PositiveInt = 96, depths: PositiveInts = (2, 3, 16, 3), num_heads: PositiveInt = 1,
                 mlp_ratio: PositiveFloat = 4.0, qkv_bias=True, expand_attn=True, kernel_qkv: ImageSize = (3, 3),
                 stride_kv_adaptive: PositiveInt = 4, residual_pooling=True, drop_rate: Rate = 0.0,
                 drop_path_rate: Rate = 0.0, norm_eps: PositiveFloat = 1e-6, out_indices=None):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % 32 or self.img_size[1] % 32:
            raise ValueError(f"MultiScaleVit: img_size {self.img_size} must be a multiple of 32 (stem stride 4 "
                             f"and three 2x stage reductions)")
        self.depths = tuple(depths)
        n = len(self.depths)
        if out_indices is not None:
            out_indices = stage_indices(out_indices, n, "MultiScaleVit")
            if num_classes:
                raise ValueError(f"MultiScaleVit: out_indices {out_indices} returns feature maps, not logits; "
                                 f"pass num_classes=0 (got {num_classes})")
        self.out_indices = out_indices
        self.num_classes, self.in_chans, self.expand_attn = num_classes, in_chans, expand_attn
        dims = [embed_dim * 2 ** i for i in range(n)]
        heads = [num_heads * 2 ** i for i in range(n)]
        self.patch_embed = ConvPatchEmbed(in_chans, embed_dim)

        dpr = drop_path_rates(drop_path_rate, sum(self.depths))
        feat = (self.img_size[0] // 4, self.img_size[1] // 4)
        kv = stride_kv_adaptive
        self.stages = nn.LayerList()
        dim = embed_dim
        idx = 0
        for s in range(n):
            stride_q = 1 if s == 0 else 2
            kv = max(kv // stride_q, 1)
            stage_out = dims[s] if expand_attn else dims[min(s + 1, n - 1)]
            out_dims = [stage_out] * self.depths[s] if expand_attn else \
                [dim] * (self.depths[s] - 1) + [stage_out]
            blocks = []
            for b in range(self.depths[s]):
                sq = stride_q if b == 0 else 1
                blocks.append(MultiScaleBlock(dim, out_dims[b], heads[s], feat, mlp_ratio, qkv_bias, dpr[idx],
                                              norm_eps, kernel_qkv, sq, kv, expand_attn, residual_pooling))
                dim = out_dims[b]
                idx += 1
                if b == 0:
                    feat = (feat[0] // sq, feat[1] // sq)
            self.stages.append(MultiScaleVitStage(blocks))
        self.num_features = dim
        self.out_channels = [(dims[s] if expand_attn else dims[min(s + 1, n - 1)]) for s in
                             (out_indices or [n - 1])]
        self.norm = LayerNorm(dim, norm_eps)
        self.head = _ClsHead(dim, num_classes, drop_rate) if num_classes > 0 else nn.Identity()
        self.apply(init_transformer_weights)

    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if "rel_pos" in n}

    def forward_stages(self, x):
        """Yield (stage index, tokens [B, H*W, C], (H, W))."""
        check_input(x, self.in_chans, 32, self.img_size, model="MultiScaleVit")
        x, hw = self.patch_embed(x)
        for s, stage in enumerate(self.stages):
            x, hw = stage(x, hw)
            yield s, x, hw

    def forward_features(self, x):
        """Final-normed tokens [B, L, C], or the NCHW maps of `out_indices`."""
        if self.out_indices is None:
            for _, x, _ in self.forward_stages(x):
                pass
            return self.norm(x)
        feats = []
        last = len(self.stages) - 1
        for s, t, (H, W) in self.forward_stages(x):
            if s in self.out_indices:
                t = self.norm(t) if s == last else t
                feats.append(t.reshape([t.shape[0], H, W, -1]).transpose([0, 3, 1, 2]))
            if s == max(self.out_indices):
                break
        return feats

    def forward_head(self, x, pre_logits=False):
        x = x.mean(axis=1)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        if self.out_indices is not None:
            return self.forward_features(x)
        return self.forward_head(self.forward_features(x))

    def _flat_to_stage(self):
        out, i = {}, 0
        for s, d in enumerate(self.depths):
            for b in range(d):
                out[i] = (s, b)
                i += 1
        return out

    def _checkpoint_filter(self, sd, layout):
        """timm, official (facebookresearch/mvit) or mmpretrain checkpoints -> timm names; rel-pos
        tables are resampled (linear, as the references do) when img_size differs."""
        if any(k.startswith("backbone.") for k in sd):            # mmpretrain
            last = len(self.depths) - 1
            sd = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
            sd = {re.sub(r"^patch_embed\.projection\.", "patch_embed.proj.", k): v for k, v in sd.items()}
            sd = {re.sub(rf"^norm{last}\.", "norm.", k): v for k, v in sd.items()}
        if any(k.startswith("blocks.") for k in sd):                # flat block numbering
            where = self._flat_to_stage()
            proj = "shortcut_proj_attn" if self.expand_attn else "shortcut_proj_mlp"
            out = {}
            for k, v in sd.items():
                m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
                if m:
                    i, rest = int(m.group(1)), m.group(2)
                    if i not in where:
                        raise ValueError(f"checkpoint block {i} ({k}) does not exist in this {sum(self.depths)}-block "
                                         f"MViTv2 (depths {list(self.depths)})")
                    rest = re.sub(r"^proj\.", proj + ".", rest)
                    k = f"stages.{where[i][0]}.blocks.{where[i][1]}.{rest}"
                out[re.sub(r"^head\.projection\.", "head.fc.", k)] = v
            sd = out
        own = self.state_dict()
        resized = []
        for k in [k for k in sd if re.search(r"\.rel_pos_[hw]$", k) and k in own]:
            old, want = np.asarray(sd[k]), list(own[k].shape)
            if list(old.shape) != want and old.shape[1] == want[1]:
                sd[k] = resize_decomposed_rel_pos(old, want[0])
                resized.append(f"{k} {list(old.shape)} -> {want}")
        sd["__resized__"] = resized
        return sd


def _variant(name, **defaults):
    return BACKBONES.register_variant(MultiScaleVit, name, **defaults)


mvitv2_tiny = _variant("mvitv2_tiny", depths=(1, 2, 5, 2))
mvitv2_small = _variant("mvitv2_small", depths=(1, 2, 11, 2))
mvitv2_base = _variant("mvitv2_base", depths=(2, 3, 16, 3))
mvitv2_large = _variant("mvitv2_large", depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, expand_attn=False)
