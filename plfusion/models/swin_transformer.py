"""Swin Transformer (Liu et al., ICCV 2021) with the official repo's parameter names.

Two modes, chosen by `out_indices`:

- classification (`out_indices=None`, the official `models/swin_transformer.py`): the input
  must be exactly `img_size`; a stage whose resolution is not larger than the window uses one
  window covering it and no shift. Returns logits, or pooled features with `num_classes=0`.
- dense (`out_indices=(0, 1, 2, 3)`, the official Swin segmentation/detection backbone): any
  input size. The image is padded to a patch multiple, every block pads its map to a window
  multiple (the shifted-window mask is built on the padded map), and patch merging pads odd
  sizes. Each requested stage goes through its own `norm{i}` and comes back as NCHW.

Modality fusion (GeminiFusion) overrides `SwinTransformerBlock.post_attention`, which sees the
attention branch's output before drop path and the shortcut; ToMe overrides `forward` and still
calls it, so the two patches compose in either order.
"""
import logging
import re

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..registry import BACKBONES, ImageSize, NonNegativeInt, PositiveFloat, PositiveInt, PositiveInts, Rate
from .layers import (DropPath, LayerNorm, Linear, Mlp, qkv_scaled_q, PatchEmbed, check_input, drop_path_rates,
                     init_transformer_weights, stage_indices, to_2tuple, trunc_normal_)
from .pretrained import PretrainedMixin, resize_rel_pos_table

logger = logging.getLogger(__name__)

__all__ = ["SwinTransformer", "SwinTransformerBlock", "WindowAttention", "PatchMerging", "SwinStage",
           "window_partition", "window_reverse", "shifted_window_mask", "relative_position_index"]

_BUFFER_KEYS = ("relative_position_index", "attn_mask")   # derived from the window size, never loaded


def window_partition(x, window):
    """[B, H, W, C] -> [B * nW, window * window, C] (H and W multiples of `window`)."""
    B, H, W, C = x.shape
    x = x.reshape([B, H // window, window, W // window, window, C]).transpose([0, 1, 3, 2, 4, 5])
    return x.reshape([-1, window * window, C])


def window_reverse(windows, window, H, W):
    """[B * nW, window * window, C] -> [B, H, W, C]; inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.reshape([-1, H // window, W // window, window, window, C]).transpose([0, 1, 3, 2, 4, 5])
    return x.reshape([-1, H, W, C])


def relative_position_index(window):
    """[wh*ww, wh*ww] index into the (2wh-1)*(2ww-1) relative position bias table."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shifted_window_mask(Hp, Wp, window, shift):
    """[nW, N, N] additive mask (0 / -100) that keeps shifted windows from mixing regions.

    Hp and Wp are the padded map size (multiples of `window`)."""
    img = np.zeros((Hp, Wp), dtype="float32")
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for h in cuts:
        for w in cuts:
            img[h, w] = region
            region += 1
    win = img.reshape(Hp // window, window, Wp // window, window).transpose(0, 2, 1, 3).reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype("float32")


class WindowAttention(nn.Layer):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = self.create_parameter(
            [(2 * wh - 1) * (2 * ww - 1), num_heads], default_initializer=trunc_normal_)
        self.register_buffer("relative_position_index",
                             paddle.to_tensor(relative_position_index(self.window_size).reshape(-1)),
                             persistable=False)
        self.qkv = Linear(dim, dim * 3, bias_attr=None if qkv_bias else False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self):
        N = self.window_size[0] * self.window_size[1]
        bias = paddle.index_select(self.relative_position_bias_table, self.relative_position_index, axis=0)
        return bias.reshape([N, N, self.num_heads]).transpose([2, 0, 1])

    def forward(self, x, mask=None):
        """x: [B * nW, N, C]; mask: [nW, N, N] or None."""
        B_, N, C = x.shape
        qkv = qkv_scaled_q(x, self.qkv, self.scale).reshape([B_, N, 3, self.num_heads, C // self.num_heads])
        q, k, v = paddle.unbind(qkv.transpose([2, 0, 3, 1, 4]), axis=0)
        attn = paddle.matmul(q, k, transpose_y=True)
        bias = self.relative_position_bias().astype(attn.dtype)
        if mask is None:
            attn = attn + bias.unsqueeze(0)
        else:   # bias and mask summed on the small [nW, heads, N, N] first: one pass over the scores
            nW = mask.shape[0]
            both = bias.unsqueeze(0) + mask.astype(attn.dtype).unsqueeze(1)
            attn = (attn.reshape([B_ // nW, nW, self.num_heads, N, N]) + both.unsqueeze(0)).reshape(
                [B_, self.num_heads, N, N])
        attn = self.attn_drop(F.softmax(attn, axis=-1))
        x = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([B_, N, C])
        return self.proj_drop(self.proj(x))

    def flops_hook(self, inputs, output):
        """Multiply-adds of q@k^T and attn@v over all windows (the linears are counted elsewhere)."""
        B_, N, C = inputs[0].shape
        return 2 * B_ * N * N * C

    def extra_repr(self):
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SwinTransformerBlock(nn.Layer):
    """W-MSA (shift_size 0) or SW-MSA block: x + attention_branch(x), then mlp_residual."""

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, norm_eps=1e-5):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"SwinTransformerBlock: shift_size {shift_size} must be in [0, window_size "
                             f"{window_size})")
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = LayerNorm(dim, norm_eps)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def attention_branch(self, x, hw, mask=None):
        """The attention residual branch, before drop_path and the shortcut: [B, H*W, C] -> [B, H*W, C].

        norm1, pad to a window multiple, cyclic shift, window attention, reverse shift, crop.
        `mask` is the stage's shifted-window mask for the padded map (used when shift_size > 0)."""
        H, W = hw
        B, _, C = x.shape
        w, s = self.window_size, self.shift_size
        x = self.attn(self.windows(x, hw), mask if s else None)
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        x = window_reverse(x, w, Hp, Wp)
        if s:
            x = paddle.roll(x, shifts=(s, s), axis=(1, 2))
        if Hp != H or Wp != W:
            x = x[:, :H, :W, :]
        return x.reshape([B, H * W, C])

    def windows(self, x, hw):
        """norm1, pad to a window multiple, cyclic shift, partition: [B, H*W, C] -> [B * nW, w*w, C]."""
        H, W = hw
        B, L, C = x.shape
        assert L == H * W, f"token count {L} does not match the {H}x{W} map"
        w, s = self.window_size, self.shift_size
        x = self.norm1(x).reshape([B, H, W, C])
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        if pad_b or pad_r:
            x = F.pad(x, [0, pad_r, 0, pad_b], data_format="NHWC")
        if s:
            x = paddle.roll(x, shifts=(-s, -s), axis=(1, 2))
        return window_partition(x, w)

    def mlp_residual(self, x):
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def post_attention(self, y):
        """The attention branch's output [B, tokens, C] before drop path; GeminiFusion fuses modalities here."""
        return y

    def forward(self, x, hw, mask=None):
        x = x + self.drop_path(self.post_attention(self.attention_branch(x, hw, mask)))
        return self.mlp_residual(x)


class PatchMerging(nn.Layer):
    """2x2 neighbourhood -> one token: concat (4C), LayerNorm, Linear to 2C. Odd sizes are zero-padded."""

    def __init__(self, dim, norm_eps=1e-5):
        super().__init__()
        self.dim = dim
        self.reduction = Linear(4 * dim, 2 * dim, bias_attr=False)
        self.norm = LayerNorm(4 * dim, norm_eps)

    def forward(self, x, hw):
        H, W = hw
        B, L, C = x.shape
        x = x.reshape([B, H, W, C])
        if H % 2 or W % 2:
            x = F.pad(x, [0, W % 2, 0, H % 2], data_format="NHWC")
            H, W = H + H % 2, W + W % 2
        # channel order (row, col) offsets: (0,0), (1,0), (0,1), (1,1), as the reference concatenates
        x = x.reshape([B, H // 2, 2, W // 2, 2, C]).transpose([0, 1, 3, 4, 2, 5]).reshape([B, -1, 4 * C])
        return self.reduction(self.norm(x))


class SwinStage(nn.Layer):
    """One stage (`layers.i` in the official names): blocks, then an optional PatchMerging.

    `resolution` (classification mode) fixes the map size; then a map not larger than the window
    gets a single window and no shift, as the official classification model does."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=(), norm_eps=1e-5, downsample=True, resolution=None):
        super().__init__()
        shift = window_size // 2
        if resolution is not None and min(resolution) <= window_size:
            window_size, shift = min(resolution), 0
        self.window_size, self.shift_size = window_size, shift
        self.blocks = nn.LayerList([
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else shift, mlp_ratio, qkv_bias,
                                 qk_scale, drop, attn_drop, drop_path[i] if drop_path else 0.0, norm_eps)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, norm_eps) if downsample else None
        self._masks = {}

    def attn_mask(self, hw, place=None):
        """Shifted-window mask for a map of size hw (padded to the window), cached per size and device.

        Derived from the shape alone, so it is never part of the state dict."""
        if not self.shift_size or len(self.blocks) < 2:
            return None
        w = self.window_size
        Hp, Wp = -(-hw[0] // w) * w, -(-hw[1] // w) * w
        key = (Hp, Wp, str(place))
        if key not in self._masks:
            self._masks[key] = paddle.to_tensor(shifted_window_mask(Hp, Wp, w, self.shift_size), place=place)
        return self._masks[key]

    def forward(self, x, hw):
        """Returns (stage output, its hw, input of the next stage, its hw)."""
        mask = self.attn_mask(hw, x.place)
        for blk in self.blocks:
            x = blk(x, hw, mask)
        if self.downsample is None:
            return x, hw, x, hw
        return x, hw, self.downsample(x, hw), ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


class SwinTransformer(PretrainedMixin, nn.Layer):
    """Swin Transformer; see the module docstring for the classification and dense modes.

    forward: logits [B, num_classes] (pooled features [B, C] with num_classes=0), or in dense
    mode a list of NCHW maps, one per `out_indices` entry.
    """

    def __init__(self, img_size: ImageSize = 224, patch_size: ImageSize = 4, in_chans: PositiveInt = 3,
                 num_classes: NonNegativeInt = 1000, embed_dim: PositiveInt = 96, depths: PositiveInts = (2, 2, 6, 2),
                 num_heads: PositiveInts = (3, 6, 12, 24), window_size: PositiveInt = 7,
                 mlp_ratio: PositiveFloat = 4.0, qkv_bias=True, qk_scale=None, drop_rate: Rate = 0.0,
                 attn_drop_rate: Rate = 0.0, drop_path_rate: Rate = 0.0, norm_eps: PositiveFloat = 1e-5,
                 patch_norm=True, out_indices=None):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinTransformer: depths {depths} and num_heads {num_heads} must have the same length")
        self.num_layers = len(depths)
        self.dense = out_indices is not None
        if self.dense:
            out_indices = stage_indices(out_indices, self.num_layers, "SwinTransformer")
            if num_classes:
                raise ValueError(f"SwinTransformer: out_indices {out_indices} makes a dense backbone without a "
                                 f"classifier; pass num_classes=0 (got {num_classes})")
        self.out_indices = tuple(out_indices) if self.dense else None
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.embed_dim = embed_dim
        dims = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.num_features = dims[-1]
        self.out_channels = [dims[i] for i in self.out_indices] if self.dense else [dims[-1]]

        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, in_chans, embed_dim,
                                      norm_layer=(lambda d: LayerNorm(d, norm_eps)) if patch_norm else None,
                                      strict_img_size=not self.dense, owner="SwinTransformer")
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = drop_path_rates(drop_path_rate, sum(depths))
        res = self.patch_embed.grid_size
        self.layers = nn.LayerList()
        for i in range(self.num_layers):
            stage_res = None if self.dense else res
            if stage_res is not None:
                self._check_resolution(i, stage_res, window_size, last=i == self.num_layers - 1)
            self.layers.append(SwinStage(
                dims[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_eps,
                downsample=i < self.num_layers - 1, resolution=stage_res))
            res = (res[0] // 2, res[1] // 2)

        if self.dense:
            for i in self.out_indices:   # the segmentation backbone's per-output norms
                self.add_sublayer(f"norm{i}", LayerNorm(dims[i], norm_eps))
            self.norm, self.head = None, None
        else:
            self.norm = LayerNorm(self.num_features, norm_eps)
            self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_transformer_weights)

    def _check_resolution(self, i, res, window, last):
        w = min(window, min(res))
        if res[0] % w or res[1] % w or (not last and (res[0] % 2 or res[1] % 2)):
            raise ValueError(
                f"SwinTransformer: img_size {self.img_size} gives a {res[0]}x{res[1]} map at stage {i}, which "
                f"window_size {window} does not tile{'' if last else ' (or is odd for patch merging)'}; use an "
                f"img_size that is a multiple of {self.patch_size[0] * window * 2 ** (self.num_layers - 1)}, or "
                f"out_indices=... for the padding dense backbone")

    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def forward_stages(self, x):
        """Yield (stage index, stage output [B, H*W, C], (H, W)) for every stage."""
        if self.dense:
            check_input(x, self.in_chans, model="SwinTransformer")
            ph, pw = self.patch_size
            pad_b, pad_r = -x.shape[2] % ph, -x.shape[3] % pw
            if pad_b or pad_r:
                x = F.pad(x, [0, pad_r, 0, pad_b])
        tokens = self.patch_embed(x)
        hw = (x.shape[2] // self.patch_size[0], x.shape[3] // self.patch_size[1])
        x = self.pos_drop(tokens)
        for i, layer in enumerate(self.layers):
            out, out_hw, x, hw = layer(x, hw)
            yield i, out, out_hw

    def forward_features(self, x):
        """Classification: final-normed tokens [B, L, C]. Dense: list of normed NCHW maps."""
        if not self.dense:
            for _, out, _ in self.forward_stages(x):
                pass
            return self.norm(out)
        feats = []
        for i, out, (H, W) in self.forward_stages(x):
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                feats.append(out.reshape([out.shape[0], H, W, -1]).transpose([0, 3, 1, 2]))
            if i == max(self.out_indices):
                break
        return feats

    def forward_head(self, x, pre_logits=False):
        x = x.mean(axis=1)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        if self.dense:
            return self.forward_features(x)
        return self.forward_head(self.forward_features(x))

    def _checkpoint_filter(self, sd, layout):
        """Official or timm Swin checkpoints -> our (official) names.

        timm puts PatchMerging at the start of the next stage (`layers.{i+1}.downsample`) and
        names the classifier `head.fc`. Derived buffers are dropped; relative position tables
        are resized bicubically to this model's windows."""
        sd = {k: v for k, v in sd.items() if not k.endswith(_BUFFER_KEYS)}
        has = lambda i: any(k.startswith(f"layers.{i}.downsample.") for k in sd)  # noqa: E731
        if has(self.num_layers - 1) and not has(0):    # timm layout
            sd = {re.sub(r"^layers\.(\d+)\.downsample\.",
                         lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k): v for k, v in sd.items()}
        sd = {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v for k, v in sd.items()}

        own = self.state_dict()
        resized = []
        for k in [k for k in sd if k.endswith("relative_position_bias_table") and k in own]:
            old, want = np.asarray(sd[k]), list(own[k].shape)
            if list(old.shape) != want:
                if old.shape[1] != want[1]:
                    raise ValueError(f"{k}: checkpoint has {old.shape[1]} heads, the model {want[1]}")
                sd[k] = resize_rel_pos_table(old, want[0])
                resized.append(f"{k} {list(old.shape)} -> {want}")
        absent = [k for k in sd if k.startswith("norm.")] if self.dense else []
        if absent:
            logger.info("Swin checkpoint: not using %s (the dense model has per-stage norms)", absent)
            for k in absent:
                sd.pop(k)
        sd["__resized__"] = resized
        return sd


def _variant(name, **defaults):
    return BACKBONES.register_variant(SwinTransformer, name, **defaults)


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

swin_tiny_patch4_window7_224 = _variant("swin_tiny_patch4_window7_224", **_T)
swin_small_patch4_window7_224 = _variant("swin_small_patch4_window7_224", **_S)
swin_base_patch4_window7_224 = _variant("swin_base_patch4_window7_224", **_B)
swin_base_patch4_window12_384 = _variant("swin_base_patch4_window12_384", img_size=384, window_size=12, **_B)
swin_large_patch4_window7_224 = _variant("swin_large_patch4_window7_224", **_L)
swin_large_patch4_window12_384 = _variant("swin_large_patch4_window12_384", img_size=384, window_size=12, **_L)
