"""Segmentor(architecture, head): a multi-scale backbone and a decode head, single- or multi-modal.

Single-modal, forward(x [B, C, H, W]) returns logits [B, K, H/4, W/4]. After a fusion patch
(`plfusion.patches.tokenfusion` / `geminifusion`) it takes a list of M tensors and returns
[logits_0, ..., logits_{M-1}, ensemble], as the official TokenFusion / GeminiFusion `WeTr`:
the shared head decodes every modality's maps, and the ensemble is sum_m softmax(alpha)_m *
logits_m with the logits detached, so it trains alpha alone. alpha starts at ones and, as in the
official code (where it is in no optimizer group), stays fixed unless `ensemble_trainable`.
`CrossEntropyLoss` takes the whole list and sums the per-output losses, as the official training.
"""
import paddle.nn as nn
import paddle.nn.functional as F

from ..registry import MODELS, ConfigError
from .pretrained import PretrainedMixin

__all__ = ["Segmentor"]

# BatchNorm statistics: torch names -> paddle names (num_batches_tracked has no paddle counterpart).
_BN_NAMES = {"running_mean": "_mean", "running_var": "_variance"}


def _split_prefix(k, prefixes):
    for p in prefixes:
        if k.startswith(p):
            return p, k[len(p):]
    return None, k


@MODELS.register
class Segmentor(PretrainedMixin, nn.Layer):
    """`architecture` is a dense backbone config (mit_b*, or swin_* with out_indices), `head` a
    head config; the head's `in_channels` default to the backbone's `out_channels`."""

    # a num_classes mismatch drops the classifier conv; a bare ImageNet backbone checkpoint's own
    # classifier (`head.*`, here `backbone.head.*`) has no place in a Segmentor
    _head_keys = ("head.linear_pred.", "backbone.head.")

    def __init__(self, architecture, head, ensemble_trainable=False):
        super().__init__()
        from . import build_backbone, build_head
        self.backbone = build_backbone(architecture)
        name = type(self.backbone).__name__
        if getattr(self.backbone, "dense", True) is False:
            raise ConfigError(f"model.architecture: {name} is in classification mode; set out_indices: "
                              f"[0, 1, 2, 3] and num_classes: 0 so it returns the multi-scale maps a Segmentor needs")
        if getattr(self.backbone, "num_classes", 0):
            raise ConfigError(f"model.architecture: a Segmentor needs the backbone's feature maps; set num_classes: "
                              f"0 (got {self.backbone.num_classes})")
        out_channels = getattr(self.backbone, "out_channels", None)
        if not hasattr(head, "get"):
            raise ConfigError(f"model.head: expected a mapping with a 'name' key, got {head!r}")
        head = dict(head)
        if "in_channels" not in head:
            if out_channels is None:
                raise ConfigError(f"model.head.in_channels: {name} does not report out_channels; give them")
            head["in_channels"] = list(out_channels)
        elif out_channels is not None and list(head["in_channels"]) != list(out_channels):
            raise ConfigError(f"model.head.in_channels: {list(head['in_channels'])} does not match the "
                              f"backbone's out_channels {list(out_channels)}")
        self.head = build_head(head)
        self.num_modalities = 1
        self.ensemble_trainable = bool(ensemble_trainable)
        self.alpha = None

    def set_num_modalities(self, num_modalities):
        """Called by the fusion patches once the backbone takes `num_modalities` streams."""
        if self.num_modalities != 1:
            raise RuntimeError(f"Segmentor: already set to {self.num_modalities} modalities")
        self.num_modalities = int(num_modalities)
        self.alpha = self.create_parameter([self.num_modalities], default_initializer=nn.initializer.Constant(1.0))
        self.alpha.stop_gradient = not self.ensemble_trainable

    def forward(self, x):
        if self.num_modalities == 1:
            if isinstance(x, (list, tuple)):
                if len(x) != 1:
                    raise ValueError(f"Segmentor: this model takes one input tensor, got a list of {len(x)}; "
                                     f"apply a fusion patch (model.patches: [{{name: geminifusion}}]) for "
                                     f"multimodal input")
                x = x[0]
            return self.head(self.backbone(x))
        feats = self.backbone(x)            # checks the list of modalities
        logits = [self.head(f) for f in feats]
        weights = F.softmax(self.alpha, axis=0)
        ensemble = logits[0].detach() * weights[0]
        for m in range(1, self.num_modalities):
            ensemble = ensemble + logits[m].detach() * weights[m]
        return logits + [ensemble]

    def extra_losses(self):
        """Loss terms the patches add (TokenFusion's mask sparsity); {} when there are none."""
        fn = getattr(self.backbone, "extra_losses", None)
        return dict(fn()) if fn is not None else {}

    def _checkpoint_filter(self, sd, layout):
        """Our layout, the official TokenFusion / GeminiFusion WeTr (`encoder.`, `encoder.body.` for
        Swin, `decoder.`, `alpha`), an mmseg SegFormer (`backbone.`, `decode_head.`), or a bare
        backbone checkpoint (then the head stays as initialised)."""
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        enc_prefixes = ("encoder.body.", "encoder.", "backbone.")
        dec_prefixes = ("decoder.", "decode_head.", "head.")
        prefixed = any(k.startswith(enc_prefixes) for k in sd)
        enc, dec, rest = {}, {}, {}
        for k, v in sd.items():
            p, tail = _split_prefix(k, enc_prefixes)
            if p is not None or not prefixed:
                enc[tail] = v
                continue
            p, tail = _split_prefix(k, dec_prefixes)
            if p is not None:
                dec[tail] = v
            else:
                rest[k] = v
        filt = getattr(self.backbone, "_checkpoint_filter", None)
        if filt is not None:
            enc = filt(enc, layout)
        out = {"__resized__": list(enc.pop("__resized__", []))}
        out.update({"backbone." + k: v for k, v in enc.items()})
        for k, v in dec.items():
            if k.endswith(".num_batches_tracked"):
                continue
            parts = k.split(".")
            parts[-1] = _BN_NAMES.get(parts[-1], parts[-1])
            out["head." + ".".join(parts)] = v
        out.update(rest)
        return out
