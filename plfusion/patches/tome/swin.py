"""ToMe for Swin (dense or classification, bare, in a Segmentor or Classifier, with GeminiFusion).

Each block matches inside its (shifted, padded) windows, on norm1's output, with the 2x2-cell
map of dense.py: every window merges the same r = ratio * w*w tokens, so the windows stay one
batch (ToMe issue #42). Attention takes the merged queries and all of the window's keys and
values; a merged query's relative position bias and shift-mask row is the mean of its tokens'
rows, as its query is the mean of theirs. `proj`, the fusion of a GeminiFusion backbone
(`post_attention`) and the MLP run on the merged rows (a Swin block has no spatial op after
attention); the residual stream keeps every token, each adding its row's value.

Tokens the shift mask keeps apart, and image tokens and padding, never merge: with the usual
even `window - shift` the 2x2 cells never straddle a shift region, and padding only limits r in
windows that hold little image.
"""
import numpy as np
import paddle
import paddle.nn.functional as F

from ...models.layers import linear
from .dense import RowMerge, _grid, match_rows

__all__ = ["WindowMerge"]

_LAYOUTS = {}


@paddle.jit.not_to_static   # numpy on static sizes: constants of a traced program
def _layout(H, W, w, s):
    """For an H x W map in windows of w (shift s): (window-batch position of each token [H*W],
    penalty of forbidden merges [nW, sources] or None, fewest allowed merges in any window)."""
    key = (H, W, w, s)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    i, j = np.meshgrid(np.arange(Hp), np.arange(Wp), indexing="ij")          # shifted, padded map
    pad = ((i + s) % Hp >= H) | ((j + s) % Wp >= W)
    region = np.zeros_like(i)
    if s:    # the three bands per axis of shifted_window_mask
        def band(c, n):
            return np.where(c < n - w, 0, np.where(c < n - s, 1, 2))
        region = band(i, Hp) * 3 + band(j, Wp)
    label = region * 2 + pad
    nW, N = (Hp // w) * (Wp // w), w * w
    flat = ((i // w) * (Wp // w) + j // w) * N + (i % w) * w + j % w
    y, x = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    perm = flat[(y - s) % Hp, (x - s) % Wp].reshape(-1)                         # roll by -s
    by_window = np.empty(nW * N, label.dtype)
    by_window[flat.reshape(-1)] = label.reshape(-1)
    by_window = by_window.reshape(nW, N)
    src_cell, src, dst, _ = _grid(w, w)
    bad = by_window[:, src] != by_window[:, dst[src_cell]]
    penalty = np.where(bad, -1e4, 0.0).astype("float32") if bad.any() else None
    _LAYOUTS[key] = perm, penalty, int((~bad).sum(1).min())
    return _LAYOUTS[key]


class WindowMerge(RowMerge):
    """A merge map for windows [M*B*nW, N, C]: R rows per window (`num_rows`), as matrices in the window
    batch (`merge_windows`), and over the map [M*B, H*W, C] (RowMerge's `merge` / `unmerge`, nW*R rows
    per item)."""

    def __init__(self, windows, hw, window, shift, r, num_modalities=1):
        perm, penalty, _ = _layout(hw[0], hw[1], window, shift)
        BW, N, _ = windows.shape
        nW = (-(-hw[0] // window)) * (-(-hw[1] // window))
        if penalty is not None:
            penalty = paddle.tile(paddle.to_tensor(penalty), [BW // num_modalities // nW, 1])
        inverse, R = match_rows(windows, window, window, r, num_modalities, penalty)
        self.num_rows = R
        unmerge = F.one_hot(inverse, R).astype(windows.dtype)                         # [BW, N, R]
        self.average = (unmerge / unmerge.sum(axis=1, keepdim=True)).transpose([0, 2, 1])  # [BW, R, N]
        rows = (inverse + paddle.arange(BW, dtype="int64").unsqueeze(1) * R).reshape([-1, nW * N])
        self.token_rows = paddle.index_select(rows, paddle.to_tensor(perm), axis=1)   # [M*B, H*W]
        super().__init__(self.token_rows.reshape([-1]), BW // nW, nW * R, hw[0] * hw[1])

    def merge_windows(self, x):
        """[BW, N, ...] -> [BW, R, ...] means, by a batched matmul."""
        shape = x.shape
        y = paddle.bmm(self.average, x.reshape([shape[0], shape[1], -1]))
        return y.reshape([shape[0], self.num_rows] + list(shape[2:]))


class _WindowToMeAttention:
    """WindowAttention on merged queries: returns [BW, R, C] after proj."""

    def forward(self, x, mask=None):
        merge = getattr(self, "_tome_merge", None)
        if merge is None:
            return self._tome_orig_class.forward(self, x, mask)
        BW, N, C = x.shape
        h, R = self.num_heads, merge.num_rows
        w, b = self.qkv.weight, self.qkv.bias
        q = linear(merge.merge_windows(x), w[:, :C] * self.scale, None if b is None else b[:C] * self.scale)
        kv = linear(x, w[:, C:], None if b is None else b[C:]).reshape([BW, N, 2, h, C // h])
        k, v = paddle.unbind(kv.transpose([2, 0, 3, 1, 4]), axis=0)
        q = q.reshape([BW, R, h, C // h]).transpose([0, 2, 1, 3])
        attn = paddle.matmul(q, k, transpose_y=True) + self._merged_bias(merge, mask).astype(q.dtype)
        attn = self.attn_drop(F.softmax(attn, axis=-1))
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([BW, R, C])
        return self.proj_drop(self.proj(out))

    def _merged_bias(self, merge, mask):
        """[BW, heads, R, N]: the mean of the bias (+ mask) rows of each row's tokens."""
        h, N, R = self.num_heads, self.window_size[0] * self.window_size[1], merge.num_rows
        bias = self.relative_position_bias()                                   # [h, N, N]
        BW = merge.average.shape[0]
        if mask is None:
            table = bias.transpose([1, 0, 2]).reshape([N, h * N])
            out = paddle.matmul(merge.average.reshape([BW * R, N]), table)
            return out.reshape([BW, R, h, N]).transpose([0, 2, 1, 3])
        nW = mask.shape[0]
        table = (bias.unsqueeze(0) + mask.astype(bias.dtype).unsqueeze(1)).transpose([0, 2, 1, 3]).reshape(
            [nW, N, h * N])
        avg = merge.average.reshape([BW // nW, nW, R, N]).transpose([1, 0, 2, 3]).reshape([nW, -1, N])
        out = paddle.bmm(avg, table).reshape([nW, BW // nW, R, h, N])
        return out.transpose([1, 0, 3, 2, 4]).reshape([BW, h, R, N])

    def flops_hook(self, inputs, output):
        x = inputs[0]
        merge = getattr(self, "_tome_merge", None)
        if merge is None:
            return self._tome_orig_class.flops_hook(self, inputs, output)
        BW, N, C = x.shape
        R = merge.num_rows
        # q on the merged rows and k, v on all tokens (not through the qkv layer), q@k^T and attn@v
        return BW * R * C * C + 2 * BW * N * C * C + 2 * BW * R * N * C


class _SwinToMeBlock:
    """Swin block whose attention, fusion and MLP run on the merged rows of its windows."""

    def forward(self, x, hw, mask=None):
        info = self._tome_info
        if self._tome_stage == 0 and self._tome_index == 0:
            info["maps"] = {}
        w, s = self.window_size, self.shift_size
        r = min(int(info["ratios"][self._tome_stage] * w * w), _layout(hw[0], hw[1], w, s)[2])
        if r < 1:
            return self._tome_orig_class.forward(self, x, hw, mask)
        M = getattr(info["backbone"], "num_modalities", 1)
        windows = self.windows(x, hw)
        merge = WindowMerge(windows, hw, w, s, r, M)
        if info["trace_source"]:
            info["maps"][(self._tome_stage, self._tome_index)] = (merge.token_rows[:x.shape[0] // M], hw[0], hw[1])
        self.attn._tome_merge = merge
        try:
            rows = self.attn(windows, mask if s else None)
        finally:
            self.attn._tome_merge = None
        rows = self.post_attention(rows.reshape([x.shape[0], -1, x.shape[2]]))
        x = x + self.drop_path(merge.unmerge(rows))
        return x + self.drop_path(merge.unmerge(self.mlp(merge.merge(self.norm2(x)))))
