"""What the fusion patches (TokenFusion, GeminiFusion) share: M modality streams through one backbone.

The M streams run as one batch: modality m occupies rows [m*B, (m+1)*B) of every activation.
Shared layers (convs, linears, attention) then run once on all streams, and only the layers that
must tell the streams apart look at the split:

- per-modality norms (`ModalityLayerNorm`, sublayers `ln_0 .. ln_{M-1}` as the official
  `LayerNormParallel`, so official checkpoints load by name);
- the fusion points the patches add (token exchange, pixel-wise cross attention).

`make_multimodal` turns a backbone into one whose forward takes a list of M NCHW tensors and
returns M lists of feature maps, as the official encoders do; a `Segmentor` holding it then
returns per-modality logits plus their ensemble. Both patches work in place and keep every
weight the model already has (norm copies start from the original norm).
"""
import logging
import math
import numbers
import re
from typing import Annotated, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..models.segmentor import Segmentor
from ..registry import Spec

logger = logging.getLogger(__name__)

__all__ = ["ModalityLayerNorm", "MultimodalBackbone", "make_multimodal", "replace_layer_norms", "swap_class",
           "split_modalities", "check_modalities", "resolve_target", "OFFICIAL_EPS", "NormEps"]

# The official LayerNormParallel builds every per-modality norm with eps 1e-6, whatever the norm
# it replaces used (MiT's patch-embed and attn.norm, Swin's norms: 1e-5).
OFFICIAL_EPS = 1e-6


def _valid_eps(v):
    return v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0)


# the patches' `norm_eps` argument, checked by the registry when a config applies a patch
NormEps = Annotated[Optional[float], Spec("a positive number, or null to keep each norm's own eps", _valid_eps)]


def _copy_(dst, src):
    """dst <- src, unless src is still lazy (built under paddle.LazyGuard: nothing to copy yet)."""
    if src._is_initialized():
        dst.set_value(src)


class ModalityLayerNorm(nn.Layer):
    """One LayerNorm per modality over the modality-stacked batch [M*B, ..., C].

    Each modality's rows go through Paddle's fused layer_norm with their own affine (split + concat
    costs a third of normalising once and applying the affine by broadcast ops)."""

    def __init__(self, num_modalities, dim, epsilon=1e-6):
        super().__init__()
        self.num_modalities = num_modalities
        self.dim = dim
        self.epsilon = epsilon
        for m in range(num_modalities):
            setattr(self, f"ln_{m}", nn.LayerNorm(dim, epsilon=epsilon))

    @classmethod
    def from_layer_norm(cls, norm, num_modalities, epsilon=None):
        """Copies of `norm`'s weight and bias, one per modality; `epsilon=None` keeps its eps."""
        shape = list(norm._normalized_shape)
        if len(shape) != 1 or norm.weight is None or norm.bias is None:
            raise TypeError(f"ModalityLayerNorm: can only split a LayerNorm over the last axis with weight and "
                            f"bias, got normalized_shape {shape}")
        new = cls(num_modalities, shape[0], norm._epsilon if epsilon is None else epsilon)
        for m in range(num_modalities):
            ln = new.norm(m)
            _copy_(ln.weight, norm.weight)
            _copy_(ln.bias, norm.bias)
        return new

    def norm(self, m):
        return getattr(self, f"ln_{m}")

    def forward(self, x):
        M, C = self.num_modalities, self.dim
        parts = paddle.split(x, M, axis=0)
        return paddle.concat([F.layer_norm(part, [C], weight=self.norm(m).weight, bias=self.norm(m).bias,
                                           epsilon=self.epsilon) for m, part in enumerate(parts)])

    def extra_repr(self):
        return f"num_modalities={self.num_modalities}, dim={self.dim}, epsilon={self.epsilon}"


def split_modalities(x, num_modalities):
    """[M*B, ...] -> list of M tensors [B, ...]."""
    return paddle.split(x, num_modalities, axis=0)


def replace_layer_norms(root, num_modalities, epsilon=None, select=None):
    """Replace every nn.LayerNorm under `root` (whose dotted name passes `select`) by a
    ModalityLayerNorm initialised from it. Returns the replaced names."""
    found = []
    for name, layer in root.named_sublayers(include_self=True):
        if isinstance(layer, ModalityLayerNorm):
            continue
        for child_name, child in layer._sub_layers.items():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.LayerNorm and (select is None or select(full)):
                found.append((layer, child_name, child, full))
    for parent, child_name, child, _ in found:
        setattr(parent, child_name, ModalityLayerNorm.from_layer_norm(child, num_modalities, epsilon))
    return [full for *_, full in found]


_CLASS_CACHE = {}


def swap_class(layer, mixin):
    """Give `layer` the class (mixin, type(layer)) in place: its weights and state stay as they are."""
    base = type(layer)
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
    layer.__class__ = _CLASS_CACHE[key]
    return layer


def check_modalities(xs, num_modalities, in_chans, where):
    """Raise a clear error unless xs is a list of M NCHW tensors of one shape with `in_chans` channels."""
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{where}: expected a list of {num_modalities} modality tensors [B, {in_chans}, H, W] "
                        f"(e.g. [rgb, depth]), got a {type(xs).__name__}"
                        + (f" of shape {list(xs.shape)}" if hasattr(xs, "shape") else ""))
    if len(xs) != num_modalities:
        raise ValueError(f"{where}: expected {num_modalities} modality tensors (the model was patched with "
                         f"num_modalities={num_modalities}), got {len(xs)}")
    if not paddle.in_dynamic_mode():
        return
    ref = None
    for m, x in enumerate(xs):
        if not isinstance(x, paddle.Tensor):
            raise TypeError(f"{where}: modality {m} is a {type(x).__name__}, expected a paddle.Tensor")
        if x.ndim != 4:
            raise ValueError(f"{where}: modality {m} should be an NCHW batch [B, {in_chans}, H, W], "
                             f"got shape {list(x.shape)}")
        if x.shape[1] != in_chans:
            raise ValueError(f"{where}: modality {m} has {x.shape[1]} channels, expected {in_chans} "
                             f"(shape {list(x.shape)}; a 1-channel depth map is tiled to {in_chans} channels "
                             f"by the dataset)")
        if ref is None:
            ref = list(x.shape)
        elif list(x.shape) != ref:
            raise ValueError(f"{where}: modality {m} has shape {list(x.shape)} but modality 0 has {ref}; "
                             f"the modalities are fused pixel by pixel, so batch size and H x W must match")


class MultimodalBackbone:
    """Mixed into a backbone by `make_multimodal`: forward(list of M tensors) -> M lists of maps."""

    def forward(self, xs):
        check_modalities(xs, self.num_modalities, self.in_chans, where=self._fusion_where)
        # two-argument super: to_static's code transform breaks the zero-argument form
        feats = super(MultimodalBackbone, self).forward(paddle.concat(list(xs), axis=0))
        per = [split_modalities(f, self.num_modalities) for f in feats]
        return [[p[m] for p in per] for m in range(self.num_modalities)]

    def _checkpoint_filter(self, sd, layout):
        """Official multimodal names -> ours, a unimodal checkpoint's norms -> every modality's copy,
        then the backbone's own filter (prefixes, buffers, resizing)."""
        sd = {re.sub(r"(^|\.)module\.", r"\1", k): v for k, v in sd.items()}
        sd = self._fusion_key_map(sd, layout)
        own = set(self.state_dict())
        out = {}
        for k, v in sd.items():
            m = re.match(r"^(.*)\.(weight|bias)$", k)
            if k not in own and m and f"{m.group(1)}.ln_0.{m.group(2)}" in own:
                for i in range(self.num_modalities):       # one unimodal norm -> all modality copies
                    out[f"{m.group(1)}.ln_{i}.{m.group(2)}"] = v
            else:
                out[k] = v
        return super()._checkpoint_filter(out, layout)

    def _fusion_key_map(self, sd, layout):
        return sd


def resolve_target(model, patch, backbone_types):
    """(segmentor or None, backbone) for a patch applied to a Segmentor or to a bare backbone."""
    seg = model if isinstance(model, Segmentor) else None
    backbone = model.backbone if seg is not None else model
    if getattr(backbone, "_fusion", None):
        raise RuntimeError(f"{patch}.apply_patch: the model is already patched with {backbone._fusion} "
                           f"({backbone.num_modalities} modalities); build a fresh model to patch it again")
    if not isinstance(backbone, backbone_types):
        names = " or ".join(t.__name__ for t in backbone_types)
        inner = getattr(model, "backbone", None) if seg is None else backbone
        raise TypeError(f"{patch}.apply_patch: expected a {names} (or a Segmentor holding one), got "
                        f"{type(model).__name__}" + (f" with a {type(inner).__name__} backbone" if inner is not None
                                                     else ""))
    return seg, backbone


def make_multimodal(backbone, num_modalities, fusion, mixin, norm_select=None, norm_eps=OFFICIAL_EPS,
                    segmentor=None):
    """The shared part of applying a fusion patch: per-modality norms, list-in/list-out forward.

    `mixin` (a subclass of MultimodalBackbone) becomes the backbone's class; `norm_select`
    picks which LayerNorms become per-modality (all by default)."""
    if not isinstance(num_modalities, (int, np.integer)) or isinstance(num_modalities, bool) or num_modalities < 2:
        raise ValueError(f"{fusion}.apply_patch: num_modalities must be an int >= 2, got {num_modalities!r}")
    if not _valid_eps(norm_eps):
        raise ValueError(f"{fusion}.apply_patch: norm_eps must be a positive number or None, got {norm_eps!r}")
    num_modalities = int(num_modalities)
    replaced = replace_layer_norms(backbone, num_modalities, epsilon=norm_eps, select=norm_select)
    backbone._fusion_where = f"{type(backbone).__name__} ({fusion})"   # names the input errors
    swap_class(backbone, mixin)
    backbone.num_modalities = num_modalities
    backbone._fusion = fusion
    if segmentor is not None:
        segmentor.set_num_modalities(num_modalities)
    logger.info("%s: %d modalities; %d LayerNorms are now per modality", fusion, num_modalities, len(replaced))
    return replaced
