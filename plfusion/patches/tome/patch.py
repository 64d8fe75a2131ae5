"""apply_patch / remove_patch: ToMe in place on any model built from plfusion's Block and Attention.

The patch swaps classes (no weights change): each Block merges r tokens between its attention and
its MLP, each Attention adds log(size) to its logits and hands back its keys averaged over heads,
the backbone's 'avg' pooling weighs tokens by size, and the model given to apply_patch (and its
backbone, if it wraps one) gets a validated `r` property. The first patched block resets the shared state, so `forward`,
`forward_features` or a wrapping Classifier all start each pass clean.
"""
import logging
import warnings

import paddle

from ...models.layers import Attention, Block
from . import dense
from .merge import bipartite_soft_matching, check_r, merge_source, merge_wavg, parse_r

logger = logging.getLogger(__name__)

__all__ = ["apply_patch", "remove_patch", "is_patched", "parse_r_text"]

_CLASS_CACHE = {}


class _ToMeAttention:
    """Proportional attention; also returns the metric for matching (keys averaged over heads)."""

    def forward(self, x, size=None, need_metric=True):
        q, k, v = self.qkv_heads(x)
        metric = k.mean(axis=1) if need_metric else None
        if size is not None:
            # softmax(q.k * scale + log s): a token of size s counts as s identical keys. The log(s)
            # term rides along as one extra channel (q, already scaled: 1, k: log(s)) so the matmul adds it;
            # on CPU that is much cheaper than a broadcast add over the [B, H, N, N] logits.
            log_s = paddle.log(size).astype(k.dtype).unsqueeze(1).expand([-1, k.shape[1], -1, -1])
            q = paddle.concat([q, paddle.ones_like(q[..., :1])], axis=-1)
            k = paddle.concat([k, log_s], axis=-1)
        return self.attend(q, k, v), metric


class _ToMeBlock:
    """attention -> merge r tokens (size-weighted) -> MLP, with r from the shared schedule."""

    def forward(self, x):
        info = self._tome_info
        if self._tome_index == 0:
            _start_pass(info, x)
        r = info["r"][self._tome_index]
        size = info["size"] if info["prop_attn"] else None
        x_attn, metric = self.attn(self.norm1(x), size, r > 0)
        x = x + self.drop_path(x_attn)
        if r > 0:
            merge, _ = bipartite_soft_matching(metric, r, info["class_token"], info["distill_token"])
            if info["trace_source"]:
                info["source"] = merge_source(merge, x, info["source"])
            x, info["size"] = merge_wavg(merge, x, info["size"])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _ToMePool:
    """global_pool='avg' over merged tokens: each token weighs as many patches as it covers."""

    def pool(self, x):
        size = self._tome_info["size"]
        if getattr(self, "global_pool", None) != "avg" or size is None:
            # no zero-argument super(): to_static's code transform breaks it
            return self._tome_orig_class.pool(self, x)
        p = self.num_prefix_tokens
        w = size[:, p:].astype(x.dtype)
        return (x[:, p:] * w).sum(axis=1) / w.sum(axis=1)


class _ToMeModel:
    """The model given to apply_patch and its backbone: `r` is validated when set, shared by both."""

    @property
    def r(self):
        return self._tome_info["r_setting"]

    @r.setter
    def r(self, value):
        check_r(value, self._tome_info["num_layers"], where=f"model.r ({type(self).__name__})")
        self._tome_info["r_setting"] = value


def _start_pass(info, x):
    """Reset size/source and expand r for this forward pass; warn once if layer 1 cannot take r."""
    info["r"] = parse_r(info["num_layers"], info["r_setting"])
    info["size"] = None
    info["source"] = None
    t, r0 = x.shape[1], info["r"][0]
    info["num_tokens"] = t
    cap = (t - info["protected"]) // 2
    if r0 > cap:
        key = (repr(info["r_setting"]), t)
        if key not in info["warned"]:
            info["warned"].add(key)
            warnings.warn(f"ToMe: r={info['r_setting']!r} asks the first block to remove {r0} of {t} tokens; "
                          f"at most {cap} can be merged (half the non-prefix tokens), so it is clamped to {cap} "
                          f"as in the paper", stacklevel=2)


def _patched_class(orig, mixins):
    key = (orig, mixins)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"ToMe{orig.__name__}", mixins + (orig,), {"_tome_orig_class": orig})
    return _CLASS_CACHE[key]


def _swap(layer, mixins):
    layer.__class__ = _patched_class(type(layer), mixins)


def _supported_block(layer):
    """A stock Block (its forward unchanged) whose attention is a stock Attention."""
    return (isinstance(layer, Block) and type(layer).forward is Block.forward
            and isinstance(getattr(layer, "attn", None), Attention) and type(layer.attn).forward is Attention.forward)


def _find_owner(model):
    """The layer that owns the prefix tokens and the pooling (the backbone), or None."""
    for layer in model.sublayers(include_self=True):
        if hasattr(layer, "num_prefix_tokens") or hasattr(layer, "cls_token"):
            return layer
    return None


def is_patched(model):
    return any(hasattr(m, "_tome_info") for m in model.sublayers(include_self=True))


def apply_patch(model, trace_source=False, prop_attn=True, r=None, ratio=None, merge_mlp=False, merge_kv=True):
    """Patch `model` in place with ToMe and return it.

    ViT-family models (plfusion's Block): then set `model.r` (default 0: no merging).
    trace_source keeps model._tome_info["source"] ([B, T, T0], which input tokens each token
    covers); prop_attn adds log(size) to the attention logits (keep it for off-the-shelf models).
    `r` (optional) sets model.r at once, as configs do with `patches: [{name: tome, r: 16}]`.

    MiT, Swin and MViTv2 models (the backbone, or a Segmentor or Classifier holding one, with or
    without TokenFusion/GeminiFusion): `ratio` is the fraction of tokens merged per stage (a number
    or one per stage; default dense.MIT_DEFAULT_RATIO for MiT, dense.DEFAULT_RATIO for Swin and
    MViTv2), later `model.ratio`; merge_mlp merges MiT's MixFFN per-token layers too (Swin and MViTv2
    always merge their MLP); merge_kv (default on) merges MiT's reduced keys/values at the same
    ratio, with log-size logits when prop_attn; trace_source keeps the merge maps in
    model._tome_info["maps"]. See plfusion/patches/tome/dense.py, swin.py and mvit.py.
    A second call on a patched model changes nothing.
    """
    blocks = [m for m in model.sublayers(include_self=True) if _supported_block(m)]
    backbone = dense.find_dense_backbone(model) if not blocks else None
    if backbone is not None:
        if is_patched(model):
            logger.warning("ToMe: %s is already patched; apply_patch changes nothing (set model.ratio, or call "
                           "remove_patch first)", type(model).__name__)
            return model
        if r is not None:
            raise ValueError(f"tome.apply_patch: r (tokens per layer) is for ViT-family models; a "
                             f"{type(backbone).__name__} takes ratio (the fraction of each stage's tokens merged), "
                             f"e.g. ratio=0.5")
        count = dense.apply_dense_patch(model, backbone, ratio, trace_source, _swap, merge_mlp, merge_kv, prop_attn)
        logger.info("ToMe: patched %d %s blocks of %s, ratio %s per stage", count, type(backbone).__name__,
                    type(model)._tome_orig_class.__name__, model.ratio)
        return model
    if ratio is not None:
        raise ValueError(f"tome.apply_patch: ratio is for MiT, Swin and MViTv2 models; {type(model).__name__} takes r "
                         f"(tokens merged per layer), e.g. r=16")
    if is_patched(model):
        info = getattr(model, "_tome_info", None)
        if info is None or info["trace_source"] != trace_source or info["prop_attn"] != prop_attn or r is not None:
            logger.warning("ToMe: %s is already patched; apply_patch(trace_source=%s, prop_attn=%s, r=%s) changes "
                           "nothing (call remove_patch first, or set model.r)", type(model).__name__,
                           trace_source, prop_attn, r)
        return model
    if not blocks:
        raise TypeError(f"ToMe apply_patch: {type(model).__name__} has no supported transformer blocks "
                        f"(plfusion.models.layers.Block with a stock Attention); cannot patch it")
    owner = _find_owner(model)
    if owner is None:
        class_token = distill_token = False
        logger.warning("ToMe: %s has no cls_token/num_prefix_tokens; treating every token as mergeable",
                       type(model).__name__)
    else:
        class_token = getattr(owner, "cls_token", None) is not None or getattr(owner, "num_prefix_tokens", 0) >= 1
        distill_token = getattr(owner, "dist_token", None) is not None
    if r is not None:
        check_r(r, len(blocks), where="apply_patch(r=...)")

    info = {
        "r_setting": 0 if r is None else r,
        "r": [0] * len(blocks),
        "size": None,
        "source": None,
        "trace_source": bool(trace_source),
        "prop_attn": bool(prop_attn),
        "class_token": class_token,
        "distill_token": distill_token,
        "protected": int(class_token) + int(distill_token),
        "num_layers": len(blocks),
        "num_tokens": None,   # tokens entering the first block in the last pass
        "warned": set(),
    }
    for i, blk in enumerate(blocks):
        _swap(blk, (_ToMeBlock,))
        _swap(blk.attn, (_ToMeAttention,))
        blk._tome_info, blk._tome_index = info, i
    # the backbone gets size-weighted pooling and `r` too (so model.backbone.r = 16 works as well)
    owner_mixins = (_ToMeModel, _ToMePool) if owner is not None and hasattr(owner, "pool") else (_ToMeModel,)
    if owner is not None and owner is not model:
        _swap(owner, owner_mixins)
        owner._tome_info = info
    _swap(model, owner_mixins if owner is model else (_ToMeModel,))
    model._tome_info = info
    model._tome_root = True
    logger.info("ToMe: patched %d blocks of %s (class_token=%s, distill_token=%s)", len(blocks),
                type(model)._tome_orig_class.__name__, class_token, distill_token)
    return model


def remove_patch(model):
    """Undo apply_patch: restore every original class and drop the ToMe state. Returns the model."""
    if not hasattr(model, "_tome_info"):
        raise ValueError(f"ToMe remove_patch: {type(model).__name__} is not patched by apply_patch")
    if not model.__dict__.get("_tome_root", False):
        raise ValueError(f"ToMe remove_patch: this {type(model)._tome_orig_class.__name__} was patched as part of a "
                         f"larger model; call remove_patch on the model that was given to apply_patch")
    for layer in model.sublayers(include_self=True):
        orig = type(layer).__dict__.get("_tome_orig_class")
        if orig is not None:
            layer.__class__ = orig
        elif hasattr(type(layer), "_tome_orig_class"):
            # a fusion patch applied after ToMe wrapped the ToMe class: rebuild it on the original
            cls = type(layer)
            bases = tuple(b.__dict__.get("_tome_orig_class", b) for b in cls.__bases__)
            layer.__class__ = type(cls.__name__.replace("ToMe", ""), bases, {})
        for attr in ("_tome_info", "_tome_index", "_tome_root"):
            if attr in layer.__dict__:
                object.__delattr__(layer, attr)
    return model


def parse_r_text(text, where="--tome-r"):
    """A command-line r: '16' -> 16, '16,-1' -> (16, -1.0), '[8,8,4]' -> [8, 8, 4]."""
    s = str(text).strip()
    try:
        if s.startswith("["):
            value = [int(v) for v in s.strip("[]").split(",") if v.strip()]
        elif "," in s:
            a, b = s.split(",")
            value = (int(a), float(b))
        else:
            value = int(s)
    except ValueError:
        raise ValueError(f"{where}: cannot read r from {text!r}; expected an int like 16, 'r,inflection' "
                         f"like '16,-1', or a per-layer list like '[8,8,4]'") from None
    check_r(value, where=where)
    return value
