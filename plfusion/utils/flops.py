"""Analytic FLOP counting by running the model once with hooks.

Counts multiply-adds (the convention of fvcore and of the papers' "FLOPs"): nn.Linear and
nn.Conv2D from their real input/output shapes, plus anything a layer reports through a
`flops_hook(inputs, output) -> int` method (attention matmuls, pooling attention...). Because the
hooks see the real shapes, a ToMe-patched model is counted with its shrinking token counts.
"""
import numpy as np
import paddle
import paddle.nn as nn

__all__ = ["count_flops"]


def _numel(t):
    return int(np.prod(t.shape))


def _linear(layer, inputs, output):
    in_f, out_f = layer.weight.shape
    return _numel(output) // out_f * in_f * out_f


def _conv(layer, inputs, output):
    w = layer.weight.shape  # [out, in/groups, *kernel]
    return _numel(output) * int(np.prod(w[1:]))


def _make_inputs(inputs):
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], int):
        return paddle.randn(list(inputs))
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], (tuple, list)):
        return [paddle.randn(list(s)) for s in inputs]
    return inputs


def count_flops(model, inputs, per_image=True):
    """GFLOPs (multiply-adds / 1e9) of one forward pass of `model` on `inputs`.

    inputs: a tensor, a list of tensors (multimodal), or a shape like (1, 3, 224, 224).
    per_image divides by the batch size.
    """
    x = _make_inputs(inputs)
    first = x[0] if isinstance(x, (list, tuple)) and x else x
    if not isinstance(first, paddle.Tensor):
        raise TypeError(f"count_flops: inputs must be a tensor, a list of tensors or a shape such as "
                        f"(1, 3, 224, 224), got {inputs!r}")
    batch = first.shape[0]
    total = [0]
    hooks = []
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, nn.Linear):
            fn = _linear
        elif isinstance(layer, (nn.Conv2D, nn.Conv1D, nn.Conv3D)):
            fn = _conv
        elif hasattr(layer, "flops_hook"):
            fn = type(layer).flops_hook
        else:
            continue

        def hook(lyr, inp, out, fn=fn):
            total[0] += int(fn(lyr, inp, out))
        hooks.append(layer.register_forward_post_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        if was_training:
            model.train()
    return total[0] / 1e9 / (batch if per_image else 1)
