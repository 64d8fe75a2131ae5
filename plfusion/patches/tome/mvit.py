"""ToMe for MViTv2: merging after the pooling, on the block's output grid.

MViTv2's attention pools q, k and v with strided convs right after the qkv projection, so the
tokens must be whole up to there: each block computes qkv and the pools as usual, builds the
2x2-cell map of dense.py from the pooled queries (heads side by side) on the output grid, and
merges the queries. Attention runs with the merged queries against all pooled keys/values; a
merged query's decomposed relative-position terms (which depend on each query's position) are
the mean of its tokens' terms, as its query is the mean of theirs, so each merged logit row is
exactly the mean of its tokens' rows. Residual pooling, `proj` and the MLP run on the merged
rows, with the same map; the residual stream and the pooled shortcut keep every token.
"""
import paddle

from .dense import DenseMerge


def _merge_heads(merge, t):
    """[B, heads, N, X] -> [B, heads, R, X], rows merged alike in every head."""
    B, n, N, X = t.shape
    y = merge.merge(t.transpose([0, 2, 1, 3]).reshape([B, N, n * X]))
    return y.reshape([B, merge.num_rows, n, X]).transpose([0, 2, 1, 3])


def _pooled_size(hw, pool):
    if pool is None:
        return hw
    k, s, p = pool._kernel_size, pool._stride, pool._padding
    k, s, p = (k if isinstance(k, (list, tuple)) else [k] * 2, s if isinstance(s, (list, tuple)) else [s] * 2,
               p if isinstance(p, (list, tuple)) else [p] * 2)
    return tuple((hw[i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2))


class _MViTToMeBlock:
    """MViTv2 block: attention (merged queries), proj and MLP on the merged rows of its output grid."""

    def forward(self, x, hw):
        info = self._tome_info
        if self._tome_stage == 0 and self._tome_index == 0:
            info["maps"] = {}
        attn = self.attn
        q_hw = _pooled_size(hw, attn.pool_q)
        r = int(info["ratios"][self._tome_stage] * q_hw[0] * q_hw[1])
        if r < 1:
            return self._tome_orig_class.forward(self, x, hw)
        x_norm = self.norm1(x)
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        shortcut = self._shortcut_pool(shortcut, hw)
        attn._tome_r = r
        try:
            y, q_hw = attn(x_norm, hw)           # merged rows [B, R, C]
            merge = attn._tome_merge
        finally:
            attn._tome_r, attn._tome_merge = None, None
        if info["trace_source"]:
            info["maps"][(self._tome_stage, self._tome_index)] = (merge.inverse, q_hw[0], q_hw[1])
        x = shortcut + self.drop_path1(merge.unmerge(y))
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(merge.unmerge(self.mlp(merge.merge(x_norm)))), q_hw


class _MViTToMeAttention:
    """With `_tome_r` set by the block: merged queries; returns the merged rows after proj and keeps the
    map in `_tome_merge`."""

    def forward(self, x, hw):
        r = getattr(self, "_tome_r", None)
        if not r:
            return self._tome_orig_class.forward(self, x, hw)
        q, k, v, q_hw, k_hw = self.pooled_qkv(x, hw)
        B, n, Nq, hd = q.shape
        merge = DenseMerge(q.transpose([0, 2, 1, 3]).reshape([B, Nq, n * hd]), q_hw[0], q_hw[1], r)
        rel_h, rel_w = self.rel_terms(q, q_hw, k_hw)
        q = _merge_heads(merge, q)
        logits = self.add_rel_terms(paddle.matmul(q * self.scale, k, transpose_y=True), _merge_heads(merge, rel_h),
                                    _merge_heads(merge, rel_w), k_hw)
        self._tome_merge = merge
        return self.proj(self.attend(q, k, v, logits)), q_hw
