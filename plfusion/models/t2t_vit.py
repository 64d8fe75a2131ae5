"""T2T-ViT (Yuan et al., ICCV 2021) with the parameter names of yitu-opensource/T2T-ViT.

The Tokens-to-Token module replaces ViT's patch conv: three soft splits (unfold 7/4/2, then
3/2/1 twice) with a small one-head transformer or performer between them, then a linear
projection to the embedding. The body is plain ViT (shared `Block`, qkv without bias, LayerNorm
eps 1e-5) with a fixed sinusoid position table, so token-level patches such as ToMe apply as they
do to `VisionTransformer`.
"""
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..registry import BACKBONES, ImageSize, NonNegativeInt, PositiveFloat, PositiveInt, Rate
from .layers import LayerNorm, Linear, Mlp, qkv_scaled_q, check_input, init_transformer_weights, to_2tuple, trunc_normal_
from .vision_transformer import VisionTransformer

__all__ = ["T2TViT", "T2TModule", "TokenPerformer", "TokenTransformer", "sinusoid_table"]

NORM_EPS = 1e-5  # the official code uses torch's default LayerNorm everywhere
# (kernel, stride, padding) of the three soft splits
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
TOKENS_TYPES = ("performer", "transformer")


def sinusoid_table(n_position, dim):
    """The fixed [1, n_position, dim] table of the official code: sin on even, cos on odd channels."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    rate = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
    table = pos / rate
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table[None].astype(np.float32)


def _fixed_parameter(layer, value):
    """A parameter that is saved in the state dict but never trained (stop_gradient=True)."""
    return layer.create_parameter(list(value.shape), attr=paddle.ParamAttr(trainable=False),
                                  default_initializer=nn.initializer.Assign(value))


class TokenPerformer(nn.Layer):
    """One-head performer layer of the T2T module: [B, T, dim] -> [B, T, in_dim].

    Attention is approximated with `m = in_dim * kernel_ratio` positive random features
    (`w`, fixed orthogonal rows of norm sqrt(m)); the residual of the attention branch is `v`,
    because the token width changes. Dropout 0.1 after `proj` and in the MLP, as in the official code.
    """

    def __init__(self, dim, in_dim, kernel_ratio=0.5, drop=0.1):
        super().__init__()
        self.emb = in_dim
        self.kqv = Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(drop)
        self.proj = Linear(in_dim, in_dim)
        self.norm1 = LayerNorm(dim, NORM_EPS)
        self.norm2 = LayerNorm(in_dim, NORM_EPS)
        self.mlp = nn.Sequential(Linear(in_dim, in_dim), nn.GELU(), Linear(in_dim, in_dim), nn.Dropout(drop))
        self.m = int(in_dim * kernel_ratio)
        self.w = self.create_parameter([self.m, in_dim], attr=paddle.ParamAttr(trainable=False),
                                       default_initializer=nn.initializer.Orthogonal(gain=math.sqrt(self.m)))

    def prm_exp(self, x):
        """Positive random features exp(w x - |x|^2 / 2) / sqrt(m): [B, T, emb] -> [B, T, m]."""
        xd = (x * x).sum(axis=-1, keepdim=True) / 2
        wtx = paddle.matmul(x, self.w, transpose_y=True)
        return paddle.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x):
        k, q, v = paddle.split(self.kqv(x), 3, axis=-1)  # the official split order is k, q, v
        kp, qp = self.prm_exp(k), self.prm_exp(q)
        denom = paddle.matmul(qp, kp.sum(axis=1, keepdim=True), transpose_y=True)  # [B, T, 1]
        kptv = paddle.matmul(v, kp, transpose_x=True)                               # [B, emb, m]
        y = paddle.matmul(qp, kptv, transpose_y=True) / (denom + 1e-8)              # [B, T, emb]
        return v + self.dp(self.proj(y))

    def forward(self, x):
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def flops_hook(self, inputs, output):
        """Random-feature maps of q and k, the normaliser, k'^T v and q' (k'^T v)."""
        B, T = output.shape[:2]
        return B * T * self.m * (4 * self.emb + 1)


class TokenAttention(nn.Layer):
    """One-head attention from `dim` to `in_dim` channels; the residual is `v` (widths differ).

    The scale is dim^-0.5 (the input width), as in the official code."""

    def __init__(self, dim, in_dim, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.in_dim = in_dim
        self.scale = qk_scale or dim ** -0.5
        self.qkv = Linear(dim, in_dim * 3, bias_attr=None if qkv_bias else False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = qkv_scaled_q(x, self.qkv, self.scale).reshape([B, N, 3, self.in_dim]).unbind(axis=2)
        attn = self.attn_drop(F.softmax(paddle.matmul(q, k, transpose_y=True), axis=-1))
        return v + self.proj_drop(self.proj(paddle.matmul(attn, v)))

    def flops_hook(self, inputs, output):
        B, N = inputs[0].shape[:2]
        return 2 * B * N * N * self.in_dim


class TokenTransformer(nn.Layer):
    """Transformer layer of the T2T module: x = attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim, in_dim, mlp_ratio=1.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, NORM_EPS)
        self.attn = TokenAttention(dim, in_dim)
        self.norm2 = LayerNorm(in_dim, NORM_EPS)
        self.mlp = Mlp(in_dim, int(in_dim * mlp_ratio), in_dim)

    def forward(self, x):
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _split_out(n, kernel, stride, padding):
    return (n + 2 * padding - kernel) // stride + 1


class T2TModule(nn.Layer):
    """Image [B, C, H, W] -> tokens [B, N, embed_dim] by soft split / re-structurise, twice.

    The token grids follow the unfold arithmetic, so any H, W >= 3 works (224 -> 56, 28, 14).
    """

    def __init__(self, img_size=224, tokens_type="performer", in_chans=3, embed_dim=768, token_dim=64):
        super().__init__()
        if tokens_type not in TOKENS_TYPES:
            raise ValueError(f"T2TModule: tokens_type must be one of {TOKENS_TYPES}, got {tokens_type!r}")
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.tokens_type = tokens_type
        grids, size = [], self.img_size
        for k, s, p in SOFT_SPLITS:
            size = tuple(_split_out(n, k, s, p) for n in size)
            grids.append(size)
        if min(grids[-1]) < 1:
            raise ValueError(f"T2TModule: img_size {self.img_size} is too small for the soft splits")
        self.grids = grids  # token grid after each soft split
        self.grid_size = grids[-1]
        self.num_patches = grids[-1][0] * grids[-1][1]

        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(kernel_sizes=k0, strides=s0, paddings=p0)
        self.soft_split1 = nn.Unfold(kernel_sizes=k1, strides=s1, paddings=p1)
        self.soft_split2 = nn.Unfold(kernel_sizes=k2, strides=s2, paddings=p2)
        dim0, dim1 = in_chans * k0 * k0, token_dim * k1 * k1
        if tokens_type == "performer":
            self.attention1 = TokenPerformer(dim0, token_dim, kernel_ratio=0.5)
            self.attention2 = TokenPerformer(dim1, token_dim, kernel_ratio=0.5)
        else:
            self.attention1 = TokenTransformer(dim0, token_dim, mlp_ratio=1.0)
            self.attention2 = TokenTransformer(dim1, token_dim, mlp_ratio=1.0)
        self.project = Linear(token_dim * k2 * k2, embed_dim)

    @staticmethod
    def _to_map(x, grid):
        """Tokens [B, N, C] back to the image layout [B, C, h, w] for the next soft split."""
        return x.transpose([0, 2, 1]).reshape([x.shape[0], x.shape[2], grid[0], grid[1]])

    def forward(self, x):
        check_input(x, self.in_chans, img_size=self.img_size, model="T2TViT")
        x = self.attention1(self.soft_split0(x).transpose([0, 2, 1]))
        x = self.attention2(self.soft_split1(self._to_map(x, self.grids[0])).transpose([0, 2, 1]))
        x = self.soft_split2(self._to_map(x, self.grids[1])).transpose([0, 2, 1])
        return self.project(x)


class T2TViT(VisionTransformer):
    """T2T-ViT: the T2T module, a cls token, a fixed sinusoid position table and a ViT body.

    It is a `VisionTransformer` whose patch embedding is the T2T module (`tokens_to_token`) and
    whose `pos_embed` is fixed, so pooling, the head, `forward_head`, `blocks` and
    `num_prefix_tokens` are ViT's and ToMe patches it like any ViT. `forward_features` returns all
    tokens after `norm`; with `num_classes=0` the forward output is the cls feature [B, embed_dim].
    `pos_embed` and the performer's `w` are parameters with stop_gradient=True: in the checkpoint,
    never trained.
    """

    _patch_embed_used = False

    def __init__(self, img_size: ImageSize = 224, tokens_type="performer", in_chans: PositiveInt = 3,
                 num_classes: NonNegativeInt = 1000, embed_dim: PositiveInt = 768, depth: PositiveInt = 12,
                 num_heads: PositiveInt = 12, mlp_ratio: PositiveFloat = 4.0, qkv_bias=False, qk_scale=None,
                 drop_rate: Rate = 0.0, attn_drop_rate: Rate = 0.0, drop_path_rate: Rate = 0.0,
                 token_dim: PositiveInt = 64):
        # ViT builds the body, norm, head and pooling; its patch conv and learned table are replaced below.
        super().__init__(img_size=img_size, patch_size=16, in_chans=in_chans, num_classes=num_classes,
                         global_pool="token", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_eps=NORM_EPS)
        del self.patch_embed
        self.tokens_type = tokens_type
        self.tokens_to_token = T2TModule(img_size, tokens_type, in_chans, embed_dim, token_dim)
        self.tokens_to_token.apply(init_transformer_weights)
        self.img_size = self.tokens_to_token.img_size
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=trunc_normal_)
        self.pos_embed = _fixed_parameter(self, sinusoid_table(self.tokens_to_token.num_patches + 1, embed_dim))

    def forward_features(self, x):
        x = self.tokens_to_token(x)
        x = paddle.concat(self.prefix_tokens(x.shape[0]) + [x], axis=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _checkpoint_filter(self, sd, layout):
        """Official checkpoints: strip DDP's 'module.', rebuild the sinusoid table for another token
        count (it is fixed, so recomputing it is exact), drop head keys when num_classes=0."""
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        resized = []
        want = list(self.pos_embed.shape)
        if "pos_embed" in sd:
            old = list(np.shape(sd["pos_embed"]))
            if old != want and len(old) == 3 and old[-1] == want[-1]:
                sd["pos_embed"] = sinusoid_table(want[1], want[2])
                resized.append(f"pos_embed {old} -> {want} (sinusoid table recomputed)")
        sd["__resized__"] = resized
        return sd


def _variant(name, **defaults):
    return BACKBONES.register_variant(T2TViT, name, **defaults)


_14 = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
_19 = dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
_24 = dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)

t2t_vit_14 = _variant("t2t_vit_14", tokens_type="performer", **_14)
t2t_vit_19 = _variant("t2t_vit_19", tokens_type="performer", **_19)
t2t_vit_24 = _variant("t2t_vit_24", tokens_type="performer", **_24)
t2t_vit_t_14 = _variant("t2t_vit_t_14", tokens_type="transformer", **_14)
t2t_vit_t_19 = _variant("t2t_vit_t_19", tokens_type="transformer", **_19)
t2t_vit_t_24 = _variant("t2t_vit_t_24", tokens_type="transformer", **_24)
