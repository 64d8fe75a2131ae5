"""ViT (Dosovitskiy et al.) and DeiT (Touvron et al.), with timm's parameter names."""
import paddle
import paddle.nn as nn

from ..registry import BACKBONES, ImageSize, NonNegativeInt, PositiveFloat, PositiveInt, Rate
from .layers import Block, LayerNorm, Linear, PatchEmbed, drop_path_rates, init_transformer_weights, trunc_normal_
from .pretrained import PretrainedMixin, resize_pos_embed

__all__ = ["VisionTransformer"]


class VisionTransformer(PretrainedMixin, nn.Layer):
    """Plain ViT. `distilled=True` adds DeiT's distillation token and head.

    forward_features -> all tokens after the final norm [B, N, D];
    forward_head -> logits (or pooled features with pre_logits=True / num_classes=0).
    """

    # False in subclasses that replace the patch embedding (T2T-ViT): img_size need not tile into patches
    _patch_embed_used = True

    def __init__(self, img_size: ImageSize = 224, patch_size: ImageSize = 16, in_chans: PositiveInt = 3,
                 num_classes: NonNegativeInt = 1000, global_pool="token", embed_dim: PositiveInt = 768,
                 depth: PositiveInt = 12, num_heads: PositiveInt = 12, mlp_ratio: PositiveFloat = 4.0,
                 qkv_bias=True, qk_scale=None, distilled=False, drop_rate: Rate = 0.0, attn_drop_rate: Rate = 0.0,
                 drop_path_rate: Rate = 0.0, norm_eps: PositiveFloat = 1e-6, fc_norm=None, class_token=True):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"VisionTransformer: global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("VisionTransformer: global_pool='token' needs class_token=True")
        if distilled and not class_token:
            raise ValueError("VisionTransformer: distilled=True needs class_token=True")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.distilled = distilled
        self.num_prefix_tokens = int(class_token) + int(distilled)
        self.in_chans = in_chans

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, owner=type(self).__name__,
                                      strict_img_size=self._patch_embed_used)
        num_patches = self.patch_embed.num_patches
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=nn.initializer.Normal(std=1e-6)) \
            if class_token else None
        self.dist_token = self.create_parameter([1, 1, embed_dim], default_initializer=trunc_normal_) \
            if distilled else None
        self.pos_embed = self.create_parameter([1, num_patches + self.num_prefix_tokens, embed_dim],
                                               default_initializer=trunc_normal_)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.LayerList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth)])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim, norm_eps)
        self.fc_norm = LayerNorm(embed_dim, norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) \
            if distilled else None
        self.apply(init_transformer_weights)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    def prefix_tokens(self, batch):
        toks = [t.expand([batch, -1, -1]) for t in (self.cls_token, self.dist_token) if t is not None]
        return toks

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = paddle.concat(self.prefix_tokens(x.shape[0]) + [x], axis=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, x):
        """Tokens [B, N, D] -> pooled [B, D] (for the class head)."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(axis=1)
        return x[:, 0]

    def forward_head(self, x, pre_logits=False):
        if self.distilled:
            x, x_dist = self.fc_norm(x[:, 0]), self.fc_norm(x[:, 1])
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(self.head_drop(x)), self.head_dist(self.head_drop(x_dist))
            # DeiT: both heads while training (for the distillation loss), their mean at inference
            return (x, x_dist) if self.training else (x + x_dist) / 2
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def _checkpoint_filter(self, sd, layout):
        """timm/DeiT checkpoints: resample pos_embed to this grid; drop keys of absent heads."""
        resized = []
        if "pos_embed" in sd and list(sd["pos_embed"].shape) != list(self.pos_embed.shape):
            old = sd["pos_embed"]
            sd["pos_embed"] = resize_pos_embed(old, self.patch_embed.grid_size, self.num_prefix_tokens)
            resized.append(f"pos_embed {list(old.shape)} -> {list(sd['pos_embed'].shape)}")
        if "patch_embed.proj.weight" in sd and sd["patch_embed.proj.weight"].shape[-2:] != \
                tuple(self.patch_embed.proj.weight.shape[-2:]):
            raise ValueError(f"checkpoint patch size {sd['patch_embed.proj.weight'].shape[-2:]} differs from "
                             f"the model's {tuple(self.patch_embed.proj.weight.shape[-2:])}")
        sd["__resized__"] = resized
        return sd


def _variant(name, **defaults):
    return BACKBONES.register_variant(VisionTransformer, name, **defaults)


_TI = dict(embed_dim=192, depth=12, num_heads=3)
_S = dict(embed_dim=384, depth=12, num_heads=6)
_B = dict(embed_dim=768, depth=12, num_heads=12)
_L = dict(embed_dim=1024, depth=24, num_heads=16)

vit_tiny_patch16_224 = _variant("vit_tiny_patch16_224", **_TI)
vit_small_patch16_224 = _variant("vit_small_patch16_224", **_S)
vit_base_patch16_224 = _variant("vit_base_patch16_224", **_B)
vit_large_patch16_224 = _variant("vit_large_patch16_224", **_L)
vit_base_patch16_384 = _variant("vit_base_patch16_384", img_size=384, **_B)
deit_tiny_patch16_224 = _variant("deit_tiny_patch16_224", **_TI)
deit_small_patch16_224 = _variant("deit_small_patch16_224", **_S)
deit_base_patch16_224 = _variant("deit_base_patch16_224", **_B)
deit_tiny_distilled_patch16_224 = _variant("deit_tiny_distilled_patch16_224", distilled=True, **_TI)
deit_small_distilled_patch16_224 = _variant("deit_small_distilled_patch16_224", distilled=True, **_S)
deit_base_distilled_patch16_224 = _variant("deit_base_distilled_patch16_224", distilled=True, **_B)
