"""ToMe's bipartite soft matching and the merges built on it (Bolya et al., ICLR 2023).

A matching is turned into one output slot per input token (`dest`). Merging is then a single
scatter-add of every token into its slot and unmerging a single gather, with no expanded
[B, T, C] index tensors; all token counts are Python ints, so the ops trace under to_static.
"""
import numbers

import numpy as np
import paddle

__all__ = ["bipartite_soft_matching", "merge_wavg", "merge_source", "parse_r", "check_r", "token_counts",
           "MERGE_MODES"]

MERGE_MODES = ("sum", "mean", "amax")


def _identity(x, mode=None):
    return x


def _batch_offsets(ref, stride):
    """[B, 1] int64 tensor of b * stride; works when the batch is dynamic under to_static."""
    if paddle.in_dynamic_mode():
        batch = paddle.arange(ref.shape[0], dtype="int64")
    else:
        batch = paddle.arange(paddle.shape(ref)[0], dtype="int64")
    return (batch * stride).unsqueeze(-1)


def bipartite_soft_matching(metric, r, class_token=True, distill_token=False):
    """Match r tokens of set A (tokens 0::2) onto their most similar token of set B (1::2).

    metric: [B, T, D] (the keys averaged over heads). r is capped at (T - protected) // 2.
    The cls token is never merged away; the distill token (token 1) is never a destination.
    Returns (merge, unmerge): merge(x [B, T, C], mode) -> [B, T - r, C] with the unmerged A tokens
    first (in token order when there is a cls token, else by falling similarity), then B;
    unmerge(y [B, T - r, C]) -> [B, T, C] copies each group's value back to all its tokens.
    """
    if distill_token and not class_token:
        raise ValueError("bipartite_soft_matching: distill_token=True needs class_token=True "
                         "(DeiT puts the distill token right after the cls token)")
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"bipartite_soft_matching: r must be an int, got {r!r} ({type(r).__name__})")
    if metric.ndim != 3:
        raise ValueError(f"bipartite_soft_matching: metric must be [B, T, D], got shape {list(metric.shape)}")
    t = metric.shape[1]
    protected = int(class_token) + int(distill_token)
    r = min(int(r), (t - protected) // 2)
    if r <= 0:
        return _identity, _identity

    ta, tb = (t + 1) // 2, t // 2
    t_out = t - r
    unm_len = ta - r
    pa, pb = int(class_token), int(distill_token)   # leading A / B tokens that never match

    metric = metric.detach()
    metric = metric / metric.norm(axis=-1, keepdim=True)
    a, b = metric[:, 2 * pa::2], metric[:, 1 + 2 * pb::2]
    scores = paddle.matmul(a, b, transpose_y=True)          # [B, ta - pa, tb - pb]
    node_max = scores.max(axis=-1)
    node_idx = scores.argmax(axis=-1) + pb                   # index into B
    # stable sorts: ties (identical patches) resolve the same way batched or per image
    order = paddle.argsort(node_max, axis=-1, descending=True, stable=True)
    rank = paddle.argsort(order, axis=-1, stable=True)       # each A candidate's place in `order`
    merged = rank < r
    if class_token:
        # unmerged candidates keep token order, after the cls token (and the distill token's slot)
        unm_pos = paddle.cumsum(paddle.logical_not(merged).astype("int64"), axis=-1) + pb
    else:
        unm_pos = rank - r
    dest_a = paddle.where(merged, node_idx + unm_len, unm_pos)
    if class_token:
        dest_a = paddle.concat([paddle.zeros_like(dest_a[:, :1]), dest_a], axis=1)

    dest_b = np.arange(tb, dtype="int64") + unm_len
    if distill_token:
        dest_b[0] = 1  # output order: cls, distill, other unmerged A, other B
    dest_b = paddle.to_tensor(dest_b).unsqueeze(0).expand_as(dest_a[:, :tb])
    dest = paddle.stack([dest_a[:, :tb], dest_b], axis=-1).reshape([-1, 2 * tb])
    if ta > tb:
        dest = paddle.concat([dest, dest_a[:, tb:]], axis=1)
    flat_dest = (dest + _batch_offsets(dest, t_out)).reshape([-1])   # [B * T] rows of the output

    counts = []

    def merge(x, mode="mean"):
        if mode not in MERGE_MODES:
            raise ValueError(f"merge: mode must be one of {MERGE_MODES}, got {mode!r}")
        c = x.shape[-1]
        rows = x.reshape([-1, c])
        if mode == "amax":
            out = paddle.put_along_axis(paddle.zeros_like(x[:, :t_out]).reshape([-1, c]),
                                        flat_dest.unsqueeze(-1).expand_as(rows), rows, axis=0,
                                        reduce="amax", include_self=False, broadcast=False)
            return out.reshape([-1, t_out, c])
        out = paddle.index_add(paddle.zeros_like(x[:, :t_out]).reshape([-1, c]), flat_dest, 0, rows)
        out = out.reshape([-1, t_out, c])
        if mode == "mean":
            if not counts:
                ones = paddle.ones_like(metric[..., :1])
                counts.append(paddle.index_add(paddle.zeros_like(ones[:, :t_out]).reshape([-1, 1]), flat_dest,
                                               0, ones.reshape([-1, 1])).reshape([-1, t_out, 1]))
            out = out / counts[0].astype(out.dtype)
        return out

    def unmerge(x):
        c = x.shape[-1]
        return paddle.gather(x.reshape([-1, c]), flat_dest, axis=0).reshape([-1, t, c])

    return merge, unmerge


def merge_wavg(merge, x, size=None):
    """Merge x by size-weighted average; returns (x, size) with size [B, T', 1] float32.

    Accumulates in float32 whatever x's dtype (fp16 sums overflow at 65504), then casts back."""
    dtype = x.dtype
    xf = x if dtype == paddle.float32 else x.astype("float32")
    if size is None:
        size = paddle.ones_like(xf[..., :1])
    else:
        size = size.astype("float32")
        xf = xf * size
    xf = merge(xf, mode="sum")
    size = merge(size, mode="sum")
    xf = xf / size
    return (xf if dtype == paddle.float32 else xf.astype(dtype)), size


def merge_source(merge, x, source=None):
    """Track which input tokens each merged token covers: source [B, T', T0], 0/1 entries.

    source None starts from the identity over x's T tokens."""
    if source is None:
        # zeros [B, T, 1] + eye [T, T] broadcasts to [B, T, T] even with a dynamic batch
        source = paddle.zeros_like(x[:, :, :1], dtype="float32") + paddle.eye(x.shape[1], dtype="float32")
    return merge(source, mode="amax")


def check_r(r, num_layers=None, where="model.r"):
    """Raise a TypeError/ValueError naming `where` unless r is a valid ToMe setting."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(r):
        if r < 0:
            raise ValueError(f"{where}: r must be >= 0, got {r}")
        return
    if isinstance(r, tuple):
        if len(r) != 2 or not is_int(r[0]) or isinstance(r[1], bool) or not isinstance(r[1], numbers.Real):
            raise TypeError(f"{where}: a tuple r must be (int r, float inflection), got {r!r}")
        if r[0] < 0:
            raise ValueError(f"{where}: r in (r, inflection) must be >= 0, got {r!r}")
        if not -1.0 <= float(r[1]) <= 1.0:
            raise ValueError(f"{where}: inflection in (r, inflection) must be in [-1, 1], got {r!r}")
        return
    if isinstance(r, list):
        bad = [v for v in r if not is_int(v) or v < 0]
        if bad:
            raise ValueError(f"{where}: a per-layer r list must hold ints >= 0, got {r!r}")
        if num_layers is not None and len(r) > num_layers:
            raise ValueError(f"{where}: per-layer r list has {len(r)} entries but the model has "
                             f"{num_layers} blocks")
        return
    raise TypeError(f"{where}: r must be an int, an (r, inflection) tuple or a per-layer list of ints, "
                    f"got {r!r} ({type(r).__name__})")


def parse_r(num_layers, r):
    """Per-layer r from an int (constant), an (r, inflection) tuple (linear ramp) or a list (zero-padded).

    (r, inflection): min = int(r * (1 - inflection)), max = 2r - min, linear in between;
    (16, -1) on 12 layers is [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0].
    """
    check_r(r, num_layers, where="parse_r")
    if isinstance(r, list):
        return [int(v) for v in r] + [0] * (num_layers - len(r))
    r, inflect = (r if isinstance(r, tuple) else (r, 0.0))
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(lo + step * i) for i in range(num_layers)]


def token_counts(num_tokens, schedule, protected=1):
    """Token count entering the first block, then after each block, with r capped as in the matching."""
    counts = [num_tokens]
    for r in schedule:
        t = counts[-1]
        counts.append(t - max(0, min(r, (t - protected) // 2)))
    return counts
