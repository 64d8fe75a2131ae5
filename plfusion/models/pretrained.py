"""load_pretrained: .pdparams / .safetensors / .pth weights into any plfusion model.

Checkpoints keep the reference names (timm / official repos), so loading is:
read -> model-specific rename (`_checkpoint_filter`) -> transpose torch Linear weights ->
shape check -> set_state_dict. Reading never executes code from the file.
"""
import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["load_pretrained", "PretrainedMixin", "LoadReport", "CheckpointMismatchError",
           "resize_pos_embed", "resize_rel_pos_table", "linear_weight_keys", "read_weights"]

MAX_LISTED = 10
_NP_DTYPES = {paddle.float32: np.float32, paddle.float64: np.float64, paddle.float16: np.float16,
              paddle.int64: np.int64, paddle.int32: np.int32, paddle.bool: np.bool_}


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; lists every mismatched key once."""


@dataclass
class LoadReport:
    path: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    dropped: list = field(default_factory=list)   # classifier-head weights not used (num_classes differs / no head)
    resized: list = field(default_factory=list)   # e.g. pos_embed resampled to a new grid

    def __str__(self):
        def short(keys):
            return ", ".join(keys[:MAX_LISTED]) + (f" ... (+{len(keys) - MAX_LISTED})" if len(keys) > MAX_LISTED else "")
        lines = [f"loaded {len(self.loaded)} tensors from {self.path}"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("dropped (classifier head not used)", self.dropped), ("resized", self.resized)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {short(keys)}")
        return "\n".join(lines)


def read_weights(path, key=None):
    """Read a checkpoint file into {name: ndarray} plus its layout ('paddle' or 'torch')."""
    from ..utils.checkpoint_io import read_state_dict
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_pretrained: expected the path of a checkpoint file, got {path!r} "
                        f"(plfusion never downloads weights)")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    sd = read_state_dict(path, key=key) if key else read_state_dict(path)
    layout = "paddle" if path.endswith((".pdparams", ".pdmodel.params")) else "torch"
    return sd, layout


def linear_weight_keys(model):
    """State-dict keys of every nn.Linear weight (these are stored transposed in torch)."""
    keys = set()
    for name, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, nn.Linear):
            keys.add(f"{name}.weight" if name else "weight")
    return keys


def resize_pos_embed(posemb, new_grid, num_prefix_tokens=1, old_grid=None):
    """Bicubically resample a [1, prefix + H*W, C] position table to `new_grid` (timm semantics)."""
    posemb = np.asarray(posemb)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    if old_grid is None:
        side = int(round(np.sqrt(grid.shape[1])))
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer the grid of a position table with {grid.shape[1]} patch entries")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    C = grid.shape[-1]
    t = paddle.to_tensor(grid.reshape(1, old_grid[0], old_grid[1], C).transpose(0, 3, 1, 2).astype("float32"))
    t = F.interpolate(t, size=list(new_grid), mode="bicubic", align_corners=False)
    grid = t.numpy().transpose(0, 2, 3, 1).reshape(1, -1, C).astype(posemb.dtype)
    return np.concatenate([prefix, grid], axis=1)


def resize_rel_pos_table(table, new_len, old_len=None):
    """Resize a relative-position table [L, heads] (Swin: L = (2W-1)^2) bicubically to `new_len` rows."""
    table = np.asarray(table)
    L, H = table.shape
    if L == new_len:
        return table
    s_old, s_new = int(round(np.sqrt(L))), int(round(np.sqrt(new_len)))
    if s_old * s_old != L or s_new * s_new != new_len:
        raise ValueError(f"relative position table of {L} rows cannot be resized to {new_len} rows")
    t = paddle.to_tensor(table.T.reshape(1, H, s_old, s_old).astype("float32"))
    t = F.interpolate(t, size=[s_new, s_new], mode="bicubic", align_corners=False)
    return t.numpy().reshape(H, new_len).T.astype(table.dtype)


def load_pretrained(model, path, key=None, layout="auto", strict=False, head_keys=None):
    """Load weights from `path` into `model` in place and return a LoadReport.

    layout: 'paddle' (Linear weights [in, out]), 'torch' ([out, in], transposed on load) or 'auto'
    (by file type: .pdparams is paddle, anything else torch). A `num_classes` mismatch drops the
    head weights with a log line; any other shape mismatch raises one CheckpointMismatchError.
    """
    if layout not in ("auto", "paddle", "torch"):
        raise ValueError(f"load_pretrained: layout must be 'auto', 'paddle' or 'torch', got {layout!r}")
    sd, detected = read_weights(path, key=key)
    layout = detected if layout == "auto" else layout
    path = os.fspath(path)
    return load_state_dict(model, sd, layout=layout, path=path, strict=strict, head_keys=head_keys)


def load_state_dict(model, sd, layout="paddle", path="<state dict>", strict=False, head_keys=None):
    """The part of load_pretrained after reading: rename, transpose, check, set.

    Every tensor is checked before any is set, so a failed load leaves the model as it was."""
    filt = getattr(model, "_checkpoint_filter", None)
    if filt is not None:
        try:
            sd = filt(dict(sd), layout)
        except CheckpointMismatchError:
            raise
        except (ValueError, IndexError, TypeError) as e:   # the renaming met tensors of another model
            raise CheckpointMismatchError(f"{path} does not fit {type(model).__name__}: {e}") from e
    report = LoadReport(path=path)
    report.resized = list(sd.pop("__resized__", []))
    own = model.state_dict()
    linear = linear_weight_keys(model)
    head_keys = tuple(head_keys if head_keys is not None else getattr(model, "_head_keys", ("head.", "head_dist.")))

    to_set, mismatched = {}, []
    for k, v in sd.items():
        if k not in own:
            (report.dropped if k.startswith(head_keys) else report.unexpected).append(k)
            continue
        v = np.asarray(v)
        if layout == "torch" and k in linear and v.ndim == 2:
            v = v.T
        want = list(own[k].shape)
        if list(v.shape) != want:
            if k.startswith(head_keys):
                report.dropped.append(k)
                continue
            mismatched.append((k, list(v.shape), want))
            continue
        to_set[k] = v
    if mismatched:
        lines = [f"  {k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:MAX_LISTED]]
        more = f"\n  ... and {len(mismatched) - MAX_LISTED} more" if len(mismatched) > MAX_LISTED else ""
        raise CheckpointMismatchError(
            f"{path} does not fit {type(model).__name__}: {len(mismatched)} tensors have other shapes "
            f"(is it for another architecture or size?)\n" + "\n".join(lines) + more)
    if not to_set:
        sample = ", ".join(list(sd)[:5])
        raise CheckpointMismatchError(
            f"{path}: no tensor name matches {type(model).__name__} (checkpoint keys start: {sample}); "
            f"is it for another architecture?")
    report.missing = [k for k in own if k not in to_set]
    if report.dropped:
        report.missing = [k for k in report.missing if k not in report.dropped]
        logger.info("%s: dropped head weights %s (num_classes differs or the model has no head); "
                    "the model's own head stays freshly initialised", path, report.dropped)
    if strict and (report.missing or report.unexpected):
        raise CheckpointMismatchError(f"strict load of {path} failed:\n{report}")
    for k, v in to_set.items():
        to_set[k] = v.astype(_NP_DTYPES.get(own[k].dtype, np.float32))
    with warnings.catch_warnings():  # paddle warns per key it skips; the report lists them once
        warnings.filterwarnings("ignore", message="Skip loading")
        model.set_state_dict(to_set)
    report.loaded = sorted(to_set)
    if report.missing or report.unexpected:
        logger.warning("%s", report)
    else:
        logger.info("%s", report)
    return report


class PretrainedMixin:
    """Gives every model `model.load_pretrained(path)`; models override `_checkpoint_filter`."""

    _head_keys = ("head.", "head_dist.")

    def load_pretrained(self, path, key=None, layout="auto", strict=False):
        return load_pretrained(self, path, key=key, layout=layout, strict=strict)

    def _checkpoint_filter(self, state_dict, layout):
        return state_dict
