"""Heads that sit on a backbone's output: classification, and the SegFormer decoder for segmentation."""
import paddle
import paddle.nn as nn

from ..registry import HEADS, PositiveInt, PositiveInts, Rate
from .layers import Linear, resize_bilinear, resize_matrices, row_bands, trunc_normal_, zeros_

__all__ = ["LinearClsHead", "SegFormerHead"]


@HEADS.register
class LinearClsHead(nn.Layer):
    """Dropout + Linear on pooled features [B, C] -> logits [B, num_classes]."""

    def __init__(self, in_channels: PositiveInt, num_classes: PositiveInt = 1000, dropout: Rate = 0.0):
        super().__init__()
        if in_channels <= 0 or num_classes <= 0:
            raise ValueError(f"LinearClsHead: in_channels and num_classes must be positive, "
                             f"got {in_channels} and {num_classes}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.drop = nn.Dropout(dropout)
        self.fc = Linear(in_channels, num_classes)
        trunc_normal_(self.fc.weight)
        zeros_(self.fc.bias)

    def forward(self, x):
        if isinstance(x, (list, tuple)):  # multi-scale backbones: classify the last stage
            x = x[-1]
        if x.ndim == 4:                   # NCHW feature map: global average pool
            x = x.mean(axis=[2, 3])
        elif x.ndim == 3:                 # tokens: average them
            x = x.mean(axis=1)
        return self.fc(self.drop(x))


class _LinearEmbed(nn.Layer):
    """NCHW map -> tokens [B, H*W, embed_dim] through one Linear (`proj`, SegFormer's `MLP`)."""

    def __init__(self, in_channels, embed_dim):
        super().__init__()
        self.proj = Linear(in_channels, embed_dim)

    def forward(self, x):
        return self.proj(x.flatten(2).transpose([0, 2, 1]))


class _ConvBNReLU(nn.Layer):
    """1x1 conv (no bias) + BatchNorm + ReLU; names as mmcv's ConvModule (`conv`, `bn`)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, 1, bias_attr=False,
                              weight_attr=nn.initializer.KaimingNormal(nonlinearity="relu"))
        self.bn = nn.BatchNorm2D(out_channels, momentum=0.9, epsilon=1e-5)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@HEADS.register
class SegFormerHead(nn.Layer):
    """SegFormer's all-MLP decoder: multi-scale NCHW maps -> logits [B, num_classes, h1, w1].

    Each map i goes through `linear_c{i+1}` (a Linear to embed_dim), is resized bilinearly to the
    first (stride-4) map, the maps are concatenated deepest first, fused by `linear_fuse`
    (1x1 conv + BN + ReLU), dropped out channel-wise and classified by `linear_pred` (1x1 conv).
    Names follow the official SegFormer / TokenFusion / GeminiFusion head."""

    def __init__(self, in_channels: PositiveInts, num_classes: PositiveInt, embed_dim: PositiveInt = 256,
                 dropout: Rate = 0.1, align_corners=False):
        super().__init__()
        if not isinstance(in_channels, (list, tuple)) or not in_channels or any(
                not isinstance(c, int) or c <= 0 for c in in_channels):
            raise ValueError(f"SegFormerHead: in_channels must be a list of positive channel counts, one per "
                             f"feature map, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes <= 0 or embed_dim <= 0:
            raise ValueError(f"SegFormerHead: num_classes and embed_dim must be positive ints, got "
                             f"{num_classes!r} and {embed_dim!r}")
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.align_corners = align_corners
        for i, c in enumerate(self.in_channels):
            setattr(self, f"linear_c{i + 1}", _LinearEmbed(c, embed_dim))
        self.linear_fuse = _ConvBNReLU(embed_dim * len(self.in_channels), embed_dim)
        self.dropout = nn.Dropout2D(dropout)
        self.linear_pred = nn.Conv2D(embed_dim, num_classes, 1)

    def forward(self, feats):
        if not isinstance(feats, (list, tuple)) or len(feats) != len(self.in_channels):
            got = f"a list of {len(feats)}" if isinstance(feats, (list, tuple)) else type(feats).__name__
            raise ValueError(f"SegFormerHead: expected a list of {len(self.in_channels)} feature maps "
                             f"(channels {self.in_channels}), got {got}")
        # linear_c{i} and linear_fuse's 1x1 conv are per-pixel linear maps, and bilinear resizing
        # (weights summing to 1) commutes with them: each map is projected straight to the fused
        # space at its own resolution with the composed weight, resized, and summed. Same function
        # as concat -> linear_fuse, without the 4*embed_dim-channel tensor at stride 4. In eval,
        # BatchNorm is a per-channel affine and is folded into those weights and the bias too.
        n, dim = len(feats), self.embed_dim
        fuse = self.linear_fuse.conv.weight.reshape([dim, n * dim])
        bn = self.linear_fuse.bn
        if not self.training:
            scale = bn.weight / paddle.sqrt(bn._variance + bn._epsilon)
            fuse = fuse * scale.unsqueeze(-1)
        weights, bias = [], None
        for i, x in enumerate(feats):
            if x.ndim != 4 or x.shape[1] != self.in_channels[i]:
                raise ValueError(f"SegFormerHead: feature map {i} should be [B, {self.in_channels[i]}, h, w], "
                                 f"got {list(x.shape)}")
            proj = getattr(self, f"linear_c{i + 1}").proj
            block = fuse[:, (n - 1 - i) * dim:(n - i) * dim]          # maps are concatenated deepest first
            weights.append(paddle.matmul(block, proj.weight, transpose_y=True))   # [dim, C_i]
            b = paddle.matmul(block, proj.bias.unsqueeze(-1)).squeeze(-1)
            bias = b if bias is None else bias + b
        if not self.training:
            bias = bias + bn.bias - bn._mean * scale
        bias = bias.reshape([1, dim, 1])
        if self._by_bands(feats):
            return self._logits_by_bands(feats, weights, bias)
        x = self._fused_maps(feats, weights, bias)
        x = self.linear_fuse.act(x if not self.training else self.linear_fuse.bn(x))
        return self.linear_pred(self.dropout(x))

    def _by_bands(self, feats):
        return not self.training and -1 not in feats[0].shape[2:]

    def _projected_maps(self, feats, weights):
        """Per map: (x [B, C, H*W], its weight, None) at the output size H x W, else (weight @ x
        [B, dim, h, w], rows [H, h], cols^T [w, W]) to be resized as rows @ y @ cols^T."""
        B, _, H, W = feats[0].shape
        dim = weights[0].shape[0]
        maps = []
        for x, weight in zip(feats, weights):
            _, C, h, w = x.shape
            x = x.reshape([B, C, h * w])
            if (h, w) == (H, W):
                maps.append((x, weight.unsqueeze(0).expand([B, dim, C]) if paddle.in_dynamic_mode() else weight, None))
            else:
                rows, cols = resize_matrices((h, w), (H, W), self.align_corners, x.dtype)
                maps.append((paddle.matmul(weight, x).reshape([B, dim, h, w]), rows, cols.t()))
        return maps

    @staticmethod
    def _fused_band(maps, bias, r0, r1, H, W):
        """Rows r0..r1 of sum_i resize(map i) + bias, [B, dim, (r1 - r0) * W]. Dygraph accumulates inside
        the GEMMs (baddbmm / addmm: no full-size adds); a traced program keeps matmul + add, which Paddle
        Inference and paddle2onnx know, and may have a free batch size."""
        dynamic, whole, n = paddle.in_dynamic_mode(), (r0, r1) == (0, H), (r1 - r0) * W
        acc = None
        for x, a, cols in maps:
            if cols is None:
                xs = x if whole else x[:, :, r0 * W:r1 * W]
                if dynamic:
                    acc = paddle.baddbmm(bias if acc is None else acc, a, xs)
                else:
                    acc = paddle.matmul(a, xs) + (bias if acc is None else acc)
                continue
            t = paddle.matmul(a if whole else a[r0:r1], x).reshape([-1, x.shape[3]])     # [B*dim*rows, w]
            if acc is None or not dynamic:
                y = paddle.matmul(t, cols).reshape([x.shape[0], x.shape[1], n])
                acc = y + (bias if acc is None else acc)
            else:
                acc = paddle.addmm(acc.reshape([-1, W]), t, cols).reshape([x.shape[0], x.shape[1], n])
        return acc

    @paddle.jit.not_to_static   # the Python loops unroll into the traced program as they are
    def _logits_by_bands(self, feats, weights, bias):
        """Eval: the fused map, ReLU and linear_pred one band of output rows at a time, so the embed_dim-wide
        map (the largest tensor of a SegFormer at 480x640) stays in the CPU cache instead of making ~10
        trips through memory. Same arithmetic per pixel as _fused_maps."""
        B, _, H, W = feats[0].shape
        dim = weights[0].shape[0]
        maps = self._projected_maps(feats, weights)
        pred = self.linear_pred.weight.reshape([self.num_classes, dim])
        pred_bias = self.linear_pred.bias.reshape([1, self.num_classes, 1])
        dynamic = paddle.in_dynamic_mode()
        if dynamic:
            pred = pred.unsqueeze(0).expand([B, self.num_classes, dim])
        out = []
        for r0, r1 in row_bands(H, max(B, 1) * dim * W):
            act = self.linear_fuse.act(self._fused_band(maps, bias, r0, r1, H, W))
            out.append(paddle.baddbmm(pred_bias, pred, act) if dynamic else paddle.matmul(pred, act) + pred_bias)
        return paddle.concat(out, axis=-1).reshape([B, self.num_classes, H, W])

    @paddle.jit.not_to_static
    def _fused_maps(self, feats, weights, bias):
        """sum_i resize(weights[i] @ feats[i]) + bias at the first map's size, [B, dim, H, W], whole."""
        B, _, H, W = feats[0].shape
        dim = weights[0].shape[0]
        if -1 not in (H, W):
            return self._fused_band(self._projected_maps(feats, weights), bias, 0, H, H, W).reshape([B, dim, H, W])
        out = None      # sizes known only when the traced program runs: resize_bilinear's own matrices
        for x, weight in zip(feats, weights):
            _, C, h, w = x.shape
            y = resize_bilinear(paddle.matmul(weight, x.reshape([B, C, -1])).reshape([B, dim, h, w]), (H, W),
                                self.align_corners)
            out = y + bias.unsqueeze(-1) if out is None else out + y
        return out

    def flops_hook(self, inputs, output):
        """Multiply-adds of SegFormer's formulation (per-map Linear, then the 1x1 fuse conv at stride 4),
        the figure papers quote; the composed form above runs fewer. linear_pred counts itself, unless
        the banded path ran it inside."""
        feats = inputs[0]
        B, _, h1, w1 = feats[0].shape
        dim = self.embed_dim
        per_map = sum(int(f.shape[2]) * int(f.shape[3]) * c * dim for f, c in zip(feats, self.in_channels))
        pred = h1 * w1 * dim * self.num_classes if self._by_bands(feats) else 0
        return B * (per_map + h1 * w1 * len(feats) * dim * dim + pred)
