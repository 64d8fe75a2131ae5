"""ToMe for dense maps: the 2x2-cell merge map, the per-stage ratio, and the MiT (SegFormer) patch,
bare or in a Segmentor, with TokenFusion/GeminiFusion (Swin: swin.py; MViTv2: mvit.py).

Merging happens only around attention, as Segformer++ does, so every feature map keeps its
shape: each block builds a merge map from the attention's input, the queries are computed on
the merged tokens, attention (and GeminiFusion's pixel-wise fusion) runs on them, and after
`proj` every token gets back the row it was merged into. With `merge_kv` (default) the reduced
key/value grid merges at the same ratio with its own map, and proportional attention weighs each
merged key by the tokens it holds. With `merge_mlp` the MixFFN's fc1, GELU and fc2 run on the merged tokens too, unmerged
around its depthwise conv; off by default: on the CPU the extra 4C-wide merges cost about what
they save, and quality drops more.

The map is local, as tomesd's destinations: the grid is cut into 2x2 cells, the top-left token
of each cell is a destination, and each other token may merge only into its own cell's
destination. The `r` most similar (cosine) of them are merged, by mean. Cost O(N C), where a
global bipartite match would cost more than MiT's reduced attention itself. r = ratio * N per
block, at most 3/4 of the tokens.

Several modalities (stacked on the batch axis) share one map, built from the sum of their
normalised features, so token i of RGB still pairs with token i of depth in the fusion layers.
"""
import numbers

import numpy as np
import paddle
import paddle.nn.functional as F

__all__ = ["CellMerge", "DenseMerge", "RowMerge", "dense_merge", "match_rows", "check_ratio", "parse_ratio", "parse_ratio_text", "MAX_RATIO", "DEFAULT_RATIO", "MIT_DEFAULT_RATIO"]

CELL = 2                       # destinations: one per CELL x CELL block of the grid
MAX_RATIO = 1.0 - 1.0 / (CELL * CELL)
# Swin and MViTv2, per stage: their MLPs merge too, and the Swin-T quickstart keeps most of its
# accuracy only at this; the small last stage is left alone
DEFAULT_RATIO = (0.5, 0.5, 0.25, 0.0)
# MiT: every 2x2 cell one query and one key/value (Segformer++'s 2x2 setting: -0.4 mIoU on Cityscapes
# MiT-B5 at 1.9x); within 1 mIoU of unmerged on the three RGB/RGB-D demo models at 64x96 and 128x192
MIT_DEFAULT_RATIO = MAX_RATIO


def check_ratio(ratio, num_stages, where="model.ratio"):
    """A float for every stage or one per stage, each in [0, MAX_RATIO]."""
    values = list(ratio) if isinstance(ratio, (list, tuple)) else [ratio]
    if isinstance(ratio, (list, tuple)) and len(values) != num_stages:
        raise ValueError(f"{where}: expected one merge ratio per stage ({num_stages}), got {len(values)}: {ratio!r}")
    for v in values:
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0.0 <= float(v) <= MAX_RATIO:
            raise ValueError(f"{where}: a merge ratio is the fraction of a stage's tokens merged, a number in "
                             f"[0, {MAX_RATIO}] (2x2 cells keep one token each); got {v!r} in {ratio!r}")
    return ratio


def parse_ratio_text(text, where="--tome-ratio"):
    """A command-line merge ratio: '0.5' -> 0.5, '0.5,0.5,0.25,0' -> [0.5, 0.5, 0.25, 0.0] (one per stage)."""
    try:
        parts = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{where}: cannot read {text!r}; expected a number like 0.5 or one per stage like "
                         f"'0.5,0.5,0.25,0'") from None
    return parts[0] if len(parts) == 1 else parts


def parse_ratio(ratio, num_stages):
    values = list(ratio) if isinstance(ratio, (list, tuple)) else [ratio] * num_stages
    return [float(v) for v in values]


_GRIDS = {}   # every block of a stage asks for the same grid, every pass


def _cell_of_tokens(H, W):
    """[H*W]: the CELL x CELL cell (row-major) each token of an H x W grid lies in."""
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return ((rows // CELL) * ((W + CELL - 1) // CELL) + cols // CELL).reshape(-1)


@paddle.jit.not_to_static   # numpy on static sizes: constants of a traced program
def _grid(H, W):
    """(dst index per src, src indices, dst indices, inverse of the [dst, src] order) for an H x W grid."""
    if (H, W) in _GRIDS:
        return _GRIDS[(H, W)]
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    is_dst = ((rows % CELL == 0) & (cols % CELL == 0)).reshape(-1)
    cell = _cell_of_tokens(H, W)
    dst = np.flatnonzero(is_dst)            # row-major, so dst number k is cell k
    src = np.flatnonzero(~is_dst)
    order = np.concatenate([dst, src])
    _GRIDS[(H, W)] = cell[src], src, dst, np.argsort(order)
    return _GRIDS[(H, W)]


def match_rows(metric, H, W, r, num_modalities=1, penalty=None):
    """The merge map of tokens [M*B, H*W, C] on an H x W grid: each token's row, [M*B, H*W] int64.

    Rows 0.. are the cells' destinations, then the unmerged sources in grid order; N - r rows per
    item. The M modalities (stacked on the batch axis) share one map, matched on the sum of their
    normalised features. `penalty` ([B or 1, sources] float, added to the similarities) keeps
    sources away from their destination (large negative: never merged)."""
    MB, N, C = metric.shape
    if MB < 0:
        raise ValueError("ToMe dense merging needs a fixed batch in a traced program (it sizes its index "
                         "tensors by the batch); export with a fixed batch size")
    M = int(num_modalities)
    B = MB // M
    src_cell, src, dst, inv = (paddle.to_tensor(a) for a in _grid(H, W))
    Nd, Ns = int(dst.shape[0]), int(src.shape[0])
    r = min(int(r), Ns)
    m = metric.astype("float32")
    # cosine similarity; 1/|m| from a sum of squares (F.normalize's p_norm is ~5x slower on the CPU)
    inv_norm = paddle.rsqrt(paddle.clip((m * m).sum(-1), min=1e-24))           # [M*B, N]
    dst_of_src = paddle.gather(dst, src_cell)
    if M > 1:
        m = (m * inv_norm.unsqueeze(-1)).reshape([M, B, N, C]).sum(axis=0)
    sim = (paddle.index_select(m, src, axis=1) * paddle.index_select(m, dst_of_src, axis=1)).sum(-1)
    if M == 1:
        sim = sim * paddle.index_select(inv_norm, src, axis=1) * paddle.index_select(inv_norm, dst_of_src, axis=1)
    if penalty is not None:
        sim = sim + penalty
    top = paddle.topk(sim, r, axis=1)[1]                                     # [B, r] merged src
    merged = paddle.put_along_axis(paddle.zeros([B, Ns]), top, paddle.ones([B, r]), axis=1)
    rank = paddle.cumsum(1.0 - merged, axis=1) - 1.0
    src_row = paddle.where(merged > 0, src_cell.astype("float32").unsqueeze(0).expand([B, Ns]), Nd + rank)
    rows = paddle.concat([paddle.arange(Nd, dtype="float32").unsqueeze(0).expand([B, Nd]), src_row], axis=1)
    inverse = paddle.index_select(rows, inv, axis=1).astype("int64")        # [B, N]: each token's row
    if M > 1:
        inverse = paddle.tile(inverse, [M, 1])
    return inverse, N - r


class RowMerge:
    """Tokens [items, tokens_per_item, C] and the rows they merge into, by a flat token -> row index
    (`flat`, over all items): `merge` (mean into rows) and `unmerge` (every token takes its row)."""

    def __init__(self, flat, num_items, rows_per_item, tokens_per_item, count=None):
        self._flat = flat
        self.rows_per_item, self.num_tokens = rows_per_item, tokens_per_item
        if count is None:
            ones = paddle.ones([flat.shape[0], 1], "float32")
            count = paddle.index_add(paddle.zeros([num_items * rows_per_item, 1], "float32"), flat, 0, ones)
        self._count = paddle.clip(count, min=1.0)     # a row no token maps to (Swin's padding-only rows)

    @property
    def sizes(self):
        """[items * rows] float32: how many tokens each row holds (at least 1)."""
        return self._count.reshape([-1])

    def merge(self, x):
        """[items, tokens, C] -> [items, rows, C]: each row the mean of the tokens merged into it."""
        MB, N, C = x.shape
        total = paddle.index_add(paddle.zeros([MB * self.rows_per_item, C], x.dtype), self._flat, 0,
                                 x.reshape([MB * N, C]))
        return (total / self._count.astype(x.dtype)).reshape([MB, self.rows_per_item, C])

    def unmerge(self, y):
        """[items, rows, C] -> [items, tokens, C]: every token takes its row's value."""
        MB, _, C = y.shape
        return paddle.gather(y.reshape([MB * self.rows_per_item, C]), self._flat).reshape([MB, self.num_tokens, C])


class DenseMerge(RowMerge):
    """A merge map for tokens [M*B, H*W, C] on an H x W grid: N - r rows per item (`num_rows`)."""

    def __init__(self, metric, H, W, r, num_modalities=1):
        MB, N, _ = metric.shape
        self.inverse, self.num_rows = match_rows(metric, H, W, r, num_modalities)
        flat = (self.inverse + paddle.arange(MB, dtype="int64").unsqueeze(1) * self.num_rows).reshape([-1])
        super().__init__(flat, MB, self.num_rows, N)


@paddle.jit.not_to_static   # numpy on static sizes: constants of a traced program
def _cells(num_items, H, W):
    """(flat row of each token over `num_items` items [items*H*W], tokens per row [items*rows, 1]) when
    every CELL x CELL cell of an H x W grid is one row."""
    key = ("cells", num_items, H, W)
    if key not in _GRIDS:
        cell = _cell_of_tokens(H, W)
        n = int(cell.max()) + 1
        flat = (cell[None, :] + n * np.arange(num_items)[:, None]).reshape(-1)
        count = np.tile(np.bincount(cell, minlength=n).astype("float32"), num_items)[:, None]
        _GRIDS[key] = flat, count
    return _GRIDS[key]


class CellMerge(RowMerge):
    """The merge map when every source merges (r >= the sources: the maximum ratio, nothing left to
    match): each 2x2 cell is one row. DenseMerge's rows, order and means at that r, from a constant
    map instead of a match (~20 ms per stage-1 block at 480x640); unmerge repeats each cell's row
    over its 2x2 tokens by a broadcast, not a gather."""

    def __init__(self, num_items, H, W):
        self.H, self.W = H, W
        self.Hc, self.Wc = -(-H // CELL), -(-W // CELL)
        self.num_rows = self.Hc * self.Wc
        flat, count = (paddle.to_tensor(a) for a in _cells(num_items, H, W))
        super().__init__(flat, num_items, self.num_rows, H * W, count)

    @property
    def inverse(self):
        return self._flat.reshape([-1, self.num_tokens]) % self.num_rows

    def unmerge(self, y):
        MB, _, C = y.shape
        y = y.reshape([MB, self.Hc, 1, self.Wc, 1, C]).expand([MB, self.Hc, CELL, self.Wc, CELL, C])
        y = y.reshape([MB, self.Hc * CELL, self.Wc * CELL, C])
        if (self.Hc * CELL, self.Wc * CELL) != (self.H, self.W):
            y = y[:, :self.H, :self.W]
        return y.reshape([MB, self.num_tokens, C])


def dense_merge(metric, H, W, r, num_modalities=1):
    """The merge map of tokens [M*B, H*W, C] with r merged: a CellMerge when r covers every source."""
    sources = H * W - (-(-H // CELL)) * (-(-W // CELL))
    if int(r) >= sources:
        return CellMerge(metric.shape[0], H, W)
    return DenseMerge(metric, H, W, r, num_modalities)


# ------------------------------------------------------------------ the patch

class _DenseToMeBlock:
    """MiT block: the attention branch runs on merged queries (ratio of this block's stage)."""

    def attn_branch(self, x, H, W):
        info = self._tome_info
        if self._tome_stage == 0 and self._tome_index == 0:
            info["maps"] = {}     # a new pass: no stale maps of blocks that merge nothing now
        ratio = info["ratios"][self._tome_stage]
        if int(ratio * H * W) < 1:      # nothing to merge (ratio 0, or a grid too small for the ratio)
            return self._tome_orig_class.attn_branch(self, x, H, W)
        h = self.norm1(x)
        M = getattr(info["backbone"], "num_modalities", 1)
        merge = dense_merge(h, H, W, ratio * H * W, M)
        if info["trace_source"]:
            info["maps"][(self._tome_stage, self._tome_index)] = (merge.inverse[:h.shape[0] // M], H, W)
        self.attn._tome_merge = merge
        self.attn._tome_kv = (ratio, M, info["prop_attn"]) if info["merge_kv"] else None
        try:
            out = self.attn(h, H, W)
        finally:
            self.attn._tome_merge = self.attn._tome_kv = None
        self._tome_mlp_merge = merge if info["merge_mlp"] else None
        return out

    def mlp_branch(self, x, H, W):
        """With `merge_mlp`, the attention's map also serves the MixFFN's per-token layers: fc1 on merged
        tokens, unmerged for the depthwise conv, merged again for GELU and fc2."""
        merge = getattr(self, "_tome_mlp_merge", None)
        self._tome_mlp_merge = None
        if merge is None:
            return self._tome_orig_class.mlp_branch(self, x, H, W)
        mlp = self.mlp
        y = merge.unmerge(mlp.fc1(merge.merge(self.norm2(x))))
        y = mlp.act(merge.merge(mlp.dwconv(y, H, W)))
        return merge.unmerge(mlp.drop(mlp.fc2(mlp.drop(y))))


class _DenseToMeAttention:
    """EfficientAttention (plain or GeminiFusion's): queries from merged tokens, output unmerged after proj;
    with merge_kv the reduced key/value tokens merge too (their own map on the reduced grid), and each
    merged key's logits get log(tokens it holds), so a key standing for s equal tokens weighs as they did."""

    def query(self, x):
        merge = getattr(self, "_tome_merge", None)
        return self._tome_orig_class.query(self, merge.merge(x) if merge is not None else x)

    def _kv_merge(self, H, W):
        """The reduced grid (h, w) and the number of its tokens to merge (0: none)."""
        kv = getattr(self, "_tome_kv", None)
        h, w = self.kv_grid(H, W)
        return h, w, (int(kv[0] * h * w) if kv is not None else 0)

    def key_value(self, x, H, W):
        self._tome_kv_merge = None      # a DenseMerge, not a tensor: a traced Layer takes no tensor attributes
        h, w, r = self._kv_merge(H, W)
        if r < 1:
            return self._tome_orig_class.key_value(self, x, H, W)
        t = self.reduce(x, H, W)
        merge = dense_merge(t, h, w, r, self._tome_kv[1])
        if self._tome_kv[2]:
            self._tome_kv_merge = merge
        return self.kv_heads(merge.merge(t))

    def attend(self, q, k, v):
        """softmax(q k^T + log s) v, with s the merged keys' sizes, as sum(p s v) / sum(p s) on the plain
        softmax p: the size-weighted values carry one more column, never an add over the whole logits."""
        merge = getattr(self, "_tome_kv_merge", None)
        self._tome_kv_merge = None
        if merge is None:
            return self._tome_orig_class.attend(self, q, k, v)
        B, heads, R, d = v.shape
        s = merge.sizes.reshape([B, 1, R, 1]).expand([B, heads, R, 1])
        y = self.weighted(q, k, paddle.concat([v * s, s], axis=-1))
        return self.merge_heads(y[:, :, :, :d] / y[:, :, :, d:])

    def project(self, x):
        y = self._tome_orig_class.project(self, x)
        merge = getattr(self, "_tome_merge", None)
        return merge.unmerge(y) if merge is not None else y

    def flops_hook(self, inputs, output):
        x, H, W = inputs[:3]
        merge = getattr(self, "_tome_merge", None)
        n = merge.num_rows if merge is not None else x.shape[1]
        h, w, r = self._kv_merge(H, W)
        return 2 * x.shape[0] * n * (h * w - max(r, 0)) * x.shape[2]


class _DenseToMeModel:
    """`ratio`: the fraction of tokens merged in each stage (a number, or one per stage); validated when set."""

    @property
    def ratio(self):
        return self._tome_info["ratio_setting"]

    @ratio.setter
    def ratio(self, value):
        info = self._tome_info
        check_ratio(value, info["num_stages"], where=f"model.ratio ({type(self).__name__})")
        info["ratio_setting"] = value
        info["ratios"] = parse_ratio(value, info["num_stages"])


def _dense_classes():
    from ...models.mix_transformer import MixVisionTransformer
    from ...models.mvitv2 import MultiScaleVit
    from ...models.swin_transformer import SwinTransformer
    return MixVisionTransformer, SwinTransformer, MultiScaleVit


def find_dense_backbone(model):
    """The MiT, Swin or MViTv2 backbone inside `model` (the models dense ToMe patches), or None."""
    classes = _dense_classes()
    return next((m for m in model.sublayers(include_self=True) if isinstance(m, classes)), None)


def _stages_and_mixins(backbone):
    """(blocks of each stage, block mixin, attention mixin) for a MiT, Swin or MViTv2 backbone."""
    from .mvit import _MViTToMeAttention, _MViTToMeBlock
    from .swin import _SwinToMeBlock, _WindowToMeAttention
    mit, swin, mvit = _dense_classes()
    if isinstance(backbone, swin):
        return [layer.blocks for layer in backbone.layers], _SwinToMeBlock, _WindowToMeAttention
    if isinstance(backbone, mvit):
        return [stage.blocks for stage in backbone.stages], _MViTToMeBlock, _MViTToMeAttention
    return ([backbone.stage_layers(i)[1] for i in range(len(backbone.embed_dims))], _DenseToMeBlock,
            _DenseToMeAttention)


def apply_dense_patch(model, backbone, ratio, trace_source, swap, merge_mlp=False, merge_kv=True, prop_attn=True):
    """Patch the MiT, Swin or MViTv2 `backbone` inside `model` (see the module docstrings); `swap(layer,
    mixins)` swaps classes. merge_mlp and merge_kv are MiT's choices: Swin and MViTv2 blocks always merge
    their MLP, and keep all keys/values."""
    stages, block_mixin, attn_mixin = _stages_and_mixins(backbone)
    num_stages = len(stages)
    if ratio is None:
        ratio = DEFAULT_RATIO if block_mixin is not _DenseToMeBlock else MIT_DEFAULT_RATIO
    check_ratio(ratio, num_stages, where="tome.apply_patch(ratio=...)")
    # `backbone` sits in a plain dict: a Layer attribute would register it as a sublayer
    info = {"ratio_setting": ratio, "ratios": parse_ratio(ratio, num_stages), "num_stages": num_stages,
            "backbone": backbone, "trace_source": bool(trace_source), "maps": {}, "dense": True,
            "merge_mlp": bool(merge_mlp), "merge_kv": bool(merge_kv), "prop_attn": bool(prop_attn)}
    count = 0
    for stage, blocks in enumerate(stages):
        for index, blk in enumerate(blocks):
            swap(blk, (block_mixin,))
            swap(blk.attn, (attn_mixin,))
            blk._tome_info, blk._tome_stage, blk._tome_index = info, stage, index
            count += 1
    for layer in {id(backbone): backbone, id(model): model}.values():
        swap(layer, (_DenseToMeModel,))
        layer._tome_info = info
    model._tome_root = True
    return count
