"""Classifier(architecture, head): a backbone and a head built from YAML, as PASSL/PLSC configs do."""
import paddle.nn as nn

from ..registry import MODELS
from .pretrained import PretrainedMixin

__all__ = ["Classifier"]


@MODELS.register
class Classifier(PretrainedMixin, nn.Layer):
    """`architecture` is a backbone config (usually with num_classes: 0), `head` a head config.

    With `head: null` the backbone's own head classifies (timm-style full models)."""

    def __init__(self, architecture, head=None):
        super().__init__()
        from . import build_backbone, build_head
        self.backbone = build_backbone(architecture)
        self.head = build_head(head) if head else None

    def forward(self, x):
        x = self.backbone(x)
        return self.head(x) if self.head is not None else x

    def _checkpoint_filter(self, sd, layout):
        """Accept a bare backbone checkpoint (timm names) as well as a Classifier one."""
        mine = set(self.state_dict())
        if sum(k in mine for k in sd) * 2 >= len(sd):   # already a Classifier checkpoint
            return sd
        inner = self.backbone._checkpoint_filter(sd, layout) if hasattr(self.backbone, "_checkpoint_filter") else sd
        out = {"__resized__": inner.pop("__resized__", [])}
        own = set(self.backbone.state_dict())
        for k, v in inner.items():
            if k in own:
                out["backbone." + k] = v
            elif self.head is not None and k.startswith("head.") and k.endswith((".weight", ".bias")):
                out["head.fc." + k.rsplit(".", 1)[1]] = v   # the backbone's classifier -> our head
            else:
                out[k] = v
        return out
