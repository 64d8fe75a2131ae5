"""Heads that sit on a backbone's output: classification (and, later, dense decoders)."""
import paddle.nn as nn

from ..registry import HEADS
from .layers import trunc_normal_, zeros_

__all__ = ["LinearClsHead"]


@HEADS.register
class LinearClsHead(nn.Layer):
    """Dropout + Linear on pooled features [B, C] -> logits [B, num_classes]."""

    def __init__(self, in_channels, num_classes=1000, dropout=0.0):
        super().__init__()
        if in_channels <= 0 or num_classes <= 0:
            raise ValueError(f"LinearClsHead: in_channels and num_classes must be positive, "
                             f"got {in_channels} and {num_classes}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
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
