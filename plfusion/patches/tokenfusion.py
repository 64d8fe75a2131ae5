"""TokenFusion (Wang et al., CVPR 2022) as an in-place patch of a MiT backbone.

One MiT is shared by the M modalities; every LayerNorm becomes per modality. Before every block
a per-stage score net (one MLP per modality, `score_predictor.{stage}.score_nets.{m}` as in the
official code) scores each input token; its mask m = softmax(score)[..., 0] multiplies the
attention branch, and where m < threshold the token's branch output is replaced by the other
modality's (masked) branch output, exactly as the official `TokenExchange`. With M > 2 the
replacement is the mean over the other modalities (the official code has only M = 2).
The model's `extra_losses()` returns the sparsity term lambda * sum |m| over every block's masks.

    from plfusion.patches import tokenfusion
    tokenfusion.apply_patch(segmentor, num_modalities=2, threshold=0.02, sparsity_weight=1e-6)
"""
import numbers

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..models.layers import Linear
from ..models.mix_transformer import MiTBlock, MixVisionTransformer, init_mit_weights
from ..registry import PATCHES
from .multimodal import OFFICIAL_EPS, MultimodalBackbone, NormEps, make_multimodal, resolve_target, swap_class

__all__ = ["apply_patch", "ScorePredictor", "exchange_tokens"]


def _score_net(dim):
    """LN -> C -> C/2 -> C/4 -> 2 with GELUs, then LogSoftmax (the official PredictorLG net)."""
    return nn.Sequential(
        nn.LayerNorm(dim), Linear(dim, dim), nn.GELU(), Linear(dim, dim // 2), nn.GELU(),
        Linear(dim // 2, dim // 4), nn.GELU(), Linear(dim // 4, 2), nn.LogSoftmax(axis=-1))


class ScorePredictor(nn.Layer):
    """Per-modality token scores of one stage: [M*B, N, C] -> mask [M*B, N] in (0, 1)."""

    def __init__(self, dim, num_modalities):
        super().__init__()
        self.num_modalities = num_modalities
        self.score_nets = nn.LayerList([_score_net(dim) for _ in range(num_modalities)])

    def forward(self, x):
        chunks = paddle.split(x, self.num_modalities, axis=0)
        masks = [F.softmax(net(c), axis=-1)[:, :, 0] for net, c in zip(self.score_nets, chunks)]
        return paddle.concat(masks, axis=0)


def exchange_tokens(x, mask, num_modalities, threshold):
    """x: masked branch outputs [M*B, N, C]; mask [M*B, N]. Tokens whose own mask is below
    `threshold` take the other modality's value (mean of the others when M > 2)."""
    M = num_modalities
    xs = x.reshape([M, -1] + list(x.shape[1:]))
    if M == 2:   # the other modality itself, bit for bit (the mean below would round)
        other = paddle.flip(xs, axis=[0])
    else:
        other = (xs.sum(axis=0, keepdim=True) - xs) / (M - 1)
    keep = (mask.reshape([M, -1, mask.shape[1], 1]) >= threshold)
    return paddle.where(keep, xs, other).reshape(x.shape)


class TokenFusionBlock:
    """Mixed into every MiTBlock: the attention branch is masked and exchanged before the residual."""

    def forward(self, x, H, W, mask=None):
        a = self.attn_branch(x, H, W)
        if mask is not None:
            a = exchange_tokens(a * mask.unsqueeze(-1), mask, self._tf_num_modalities, self._tf_threshold)
        x = x + self.drop_path(a)
        return x + self.drop_path(self.mlp_branch(x, H, W))


class TokenFusionBackbone(MultimodalBackbone):
    """Mixed into the MiT: scores tokens before every block and keeps the masks for the sparsity loss."""

    def forward(self, xs):
        self._token_masks = []
        return super(TokenFusionBackbone, self).forward(xs)   # two-argument form: to_static breaks super()

    def forward_stage(self, i, x):
        patch_embed, blocks, norm = self.stage_layers(i)
        x, H, W = patch_embed(x)
        predictor = self.score_predictor[i]
        for blk in blocks:
            mask = predictor(x)
            self._token_masks.append(mask)
            x = blk(x, H, W, mask)
        x = norm(x)
        return x.reshape([x.shape[0], H, W, x.shape[2]]).transpose([0, 3, 1, 2])

    def token_masks(self):
        """Masks of the last forward: one [M*B, N] tensor per block (modality m in rows m*B..)."""
        return list(getattr(self, "_token_masks", []))

    def extra_losses(self):
        masks = self.token_masks()
        if not masks or self._tf_sparsity_weight == 0:
            return {}
        total = masks[0].abs().sum()
        for m in masks[1:]:
            total = total + m.abs().sum()
        return {"tokenfusion_sparsity": total * self._tf_sparsity_weight}


def apply_patch(model, num_modalities=2, threshold=0.02, sparsity_weight=1e-6, norm_eps: NormEps = OFFICIAL_EPS):
    """Make `model` (a MixVisionTransformer, or a Segmentor holding one) a TokenFusion model in place.

    threshold: tokens with mask below it are exchanged (0.02 in the paper and code).
    sparsity_weight: lambda of the L1 term on the masks returned by `extra_losses()` (README: 1e-6).
    norm_eps: eps of the per-modality norms (1e-6 as the official LayerNormParallel; None keeps
    each original norm's eps)."""
    def number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if not (number(threshold) and 0.0 <= threshold < 1.0):
        raise ValueError(f"tokenfusion.apply_patch: threshold must be a number in [0, 1), got {threshold!r}")
    if not (number(sparsity_weight) and sparsity_weight >= 0):
        raise ValueError(f"tokenfusion.apply_patch: sparsity_weight must be a number >= 0, got {sparsity_weight!r}")
    seg, backbone = resolve_target(model, "tokenfusion", (MixVisionTransformer,))
    if backbone.num_classes:
        raise ValueError(f"tokenfusion.apply_patch: the MiT has a classifier (num_classes={backbone.num_classes}); "
                         f"TokenFusion fuses the feature maps of a num_classes=0 backbone")
    make_multimodal(backbone, num_modalities, "tokenfusion", TokenFusionBackbone, norm_eps=norm_eps,
                    segmentor=seg)
    M = backbone.num_modalities
    backbone._tf_sparsity_weight = float(sparsity_weight)
    backbone._token_masks = []
    backbone.score_predictor = nn.LayerList([ScorePredictor(d, M) for d in backbone.embed_dims])
    backbone.score_predictor.apply(init_mit_weights)
    for i in range(len(backbone.embed_dims)):
        for blk in backbone.stage_layers(i)[1]:
            if not isinstance(blk, MiTBlock):
                raise TypeError(f"tokenfusion.apply_patch: stage {i + 1} holds a {type(blk).__name__}, "
                                f"expected MiTBlock")
            swap_class(blk, TokenFusionBlock)
            blk._tf_num_modalities = M
            blk._tf_threshold = float(threshold)
    return model


PATCHES.register(apply_patch, name="tokenfusion")
