"""Shared by the torch-side reference scripts (run in a scratch torch venv, never in CI).

`import_timm()` makes timm importable without torchvision (there is no CPU torchvision build
here): the few torchvision names timm touches at import time are stubbed.
"""
import argparse
import enum
import json
import os
import sys
import types

import numpy as np


def stub_torchvision():
    if "torchvision" in sys.modules:
        return
    import torch
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0-stub"
    sub = {}

    def _anything(name):  # any other name timm imports resolves to an inert placeholder class
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})
    for name in ("ops", "ops.misc", "transforms", "transforms.functional", "transforms.v2",
                 "datasets", "io", "models", "utils"):
        mod = types.ModuleType(f"torchvision.{name}")
        mod.__getattr__ = _anything
        sub[name] = mod
        sys.modules[f"torchvision.{name}"] = mod
    sub["ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    sub["transforms"].InterpolationMode = sub["transforms.functional"].InterpolationMode = enum.Enum(
        "InterpolationMode", {n: n.lower() for n in ("NEAREST", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")})
    tv.ops, tv.transforms = sub["ops"], sub["transforms"]
    sub["ops"].misc = sub["ops.misc"]
    sub["transforms"].functional = sub["transforms.functional"]
    sys.modules["torchvision"] = tv


def import_timm():
    stub_torchvision()
    import timm
    return timm


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--variant", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ref-repo", default=None)
    p.add_argument("--img-size", type=int, nargs=2, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def perturb_(model, seed=0, scale=0.05):
    """Move norm affine params and biases away from 1/0 so the check sees them."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(1 + torch.rand(b.shape, generator=g) * 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def save_case(out, model, inputs, outputs, our_name, kwargs):
    """Write weights.safetensors, input_*.npy, output_*.npy and meta.json for the driver."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "weights.safetensors"))
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    for i, t in enumerate(inputs):
        np.save(os.path.join(out, f"input_{i}.npy"), t.detach().numpy())
    for i, t in enumerate(outputs):
        np.save(os.path.join(out, f"output_{i}.npy"), t.detach().numpy())
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"our_name": our_name, "kwargs": kwargs, "num_inputs": len(inputs)}, f)
