"""ToMe matching and merging against an independent numpy rendering of the reference algorithm,
plus the parse_r and token-count figures of REFERENCE.md."""
import numpy as np
import paddle
import pytest

from plfusion.patches import tome
from plfusion.patches.tome.merge import token_counts


# ---- the reference algorithm (facebookresearch/ToMe merge.py) written out in numpy ----

def ref_merge(metric, x, r, class_token, distill_token, mode):
    """Gather/scatter_reduce formulation, one image at a time: [T, D], [T, C] -> [T - r, C]."""
    t = metric.shape[0]
    protected = int(class_token) + int(distill_token)
    r = min(r, (t - protected) // 2)
    m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    scores = m[0::2] @ m[1::2].T
    if class_token:
        scores[0, :] = -np.inf
    if distill_token:
        scores[:, 0] = -np.inf
    node_max, node_idx = scores.max(-1), scores.argmax(-1)
    edge = np.argsort(-node_max, kind="stable")
    unm, src = edge[r:], edge[:r]
    if class_token:
        unm = np.sort(unm)
    a, b = x[0::2], x[1::2].astype(np.float64).copy()
    dst = node_idx[src]
    if mode == "amax":
        for s, d in zip(src, dst):
            b[d] = np.maximum(b[d], a[s])
    else:
        count = np.ones(len(b))
        for s, d in zip(src, dst):
            b[d] += a[s]
            count[d] += 1
        if mode == "mean":
            b /= count[:, None]
    if distill_token:
        return np.concatenate([a[unm[:1]], b[:1], a[unm[1:]], b[1:]])
    return np.concatenate([a[unm], b])


CASES = [(False, False), (True, False), (True, True)]


@pytest.mark.parametrize("class_token,distill_token", CASES)
@pytest.mark.parametrize("t", [11, 12])
@pytest.mark.parametrize("mode", ["sum", "mean", "amax"])
def test_merge_matches_reference(class_token, distill_token, t, mode):
    rng = np.random.default_rng(t)
    metric = rng.standard_normal((3, t, 6)).astype(np.float32)
    x = rng.standard_normal((3, t, 5)).astype(np.float32)
    merge, _ = tome.bipartite_soft_matching(paddle.to_tensor(metric), 3, class_token, distill_token)
    got = merge(paddle.to_tensor(x), mode=mode).numpy()
    want = np.stack([ref_merge(metric[i], x[i], 3, class_token, distill_token, mode) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("class_token,distill_token", CASES)
def test_unmerge_copies_each_group_back(class_token, distill_token):
    rng = np.random.default_rng(1)
    metric = paddle.to_tensor(rng.standard_normal((2, 13, 4)).astype(np.float32))
    merge, unmerge = tome.bipartite_soft_matching(metric, 4, class_token, distill_token)
    x = paddle.to_tensor(rng.standard_normal((2, 13, 3)).astype(np.float32))
    # merging one-hot token ids tells which group each token went to
    ids = paddle.eye(13).unsqueeze(0).expand([2, 13, 13])
    member = merge(ids, mode="sum").numpy()                      # [B, T', T]
    y = merge(x, mode="mean")
    back = unmerge(y).numpy()
    group = member.argmax(1)                                      # [B, T]
    np.testing.assert_allclose(back, np.take_along_axis(y.numpy(), group[..., None], 1), rtol=1e-6)
    # a group's mean, copied back, equals the mean of its members
    xs = x.numpy()
    for bi in range(2):
        for g in range(member.shape[1]):
            members = member[bi, g] > 0
            np.testing.assert_allclose(y.numpy()[bi, g], xs[bi, members].mean(0), rtol=1e-5, atol=1e-6)


def test_r_is_capped_at_half_the_unprotected_tokens():
    metric = paddle.randn([1, 9, 4])
    for class_token, distill_token, cap in [(False, False, 4), (True, False, 4), (True, True, 3)]:
        merge, _ = tome.bipartite_soft_matching(metric, 100, class_token, distill_token)
        assert merge(paddle.randn([1, 9, 2]), mode="sum").shape[1] == 9 - cap


def test_r_zero_is_the_identity():
    x = paddle.randn([2, 7, 3])
    merge, unmerge = tome.bipartite_soft_matching(paddle.randn([2, 7, 4]), 0)
    assert merge(x, mode="sum") is x and unmerge(x) is x


def test_bad_arguments():
    with pytest.raises(ValueError, match="distill_token=True needs class_token"):
        tome.bipartite_soft_matching(paddle.randn([1, 6, 4]), 2, class_token=False, distill_token=True)
    with pytest.raises(TypeError, match="r must be an int"):
        tome.bipartite_soft_matching(paddle.randn([1, 6, 4]), 2.0)
    merge, _ = tome.bipartite_soft_matching(paddle.randn([1, 6, 4]), 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        merge(paddle.randn([1, 6, 2]), mode="max")


def _protected_metric(t, distill=False):
    """A metric where the cls (and distill) token is the most similar to everything."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((1, t, 8)).astype(np.float32) * 0.1 + 1.0
    m[0, 0] = m[0, 1:].mean(0)
    if distill:
        m[0, 1] = m[0, 2:].mean(0)
    return m


@pytest.mark.parametrize("distill", [False, True])
def test_prefix_tokens_stay_first_with_size_one(distill):
    t = 15
    metric = paddle.to_tensor(_protected_metric(t, distill))
    x = paddle.to_tensor(np.arange(t, dtype=np.float32)[None, :, None])
    size, source = None, None
    for r in (5, 3, 2):
        merge, _ = tome.bipartite_soft_matching(metric, r, True, distill)
        source = tome.merge_source(merge, x, source)
        x, size = tome.merge_wavg(merge, x, size)
        metric = merge(metric, mode="mean")
    s, xv = size.numpy()[0, :, 0], x.numpy()[0, :, 0]
    assert s[0] == 1 and xv[0] == 0                     # the cls token, untouched
    if distill:
        assert s[1] == 1 and xv[1] == 1                 # the distill token, untouched
    assert s.sum() == t                                 # sizes add up to the original count
    src = source.numpy()[0]
    np.testing.assert_array_equal(src.sum(0), np.ones(t))          # each input token in exactly one group
    np.testing.assert_array_equal(src.sum(-1), s)                  # a group's size is its member count
    # the merged value is the size-weighted mean of the original values = mean of the member ids
    np.testing.assert_allclose(xv, (src * np.arange(t)).sum(-1) / s, rtol=1e-6)


def test_merge_wavg_is_size_weighted():
    metric = paddle.to_tensor(np.array([[[1, 0], [0, 1], [0, 1], [1, 0.1]]], np.float32))
    merge, _ = tome.bipartite_soft_matching(metric, 1, class_token=False)
    # A = tokens 0, 2; B = 1, 3. Token 2 matches token 1 exactly, so it merges into it.
    x = paddle.to_tensor(np.array([[[10.0], [1.0], [4.0], [7.0]]], np.float32))
    size = paddle.to_tensor(np.array([[[1.0], [3.0], [1.0], [2.0]]], np.float32))
    y, s = tome.merge_wavg(merge, x, size)
    np.testing.assert_allclose(y.numpy()[0, :, 0], [10.0, (3 * 1 + 1 * 4) / 4, 7.0])
    np.testing.assert_allclose(s.numpy()[0, :, 0], [1.0, 4.0, 2.0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merge_wavg_accumulates_in_float32(dtype):
    # 40000 is representable in fp16 but 40000 + 40000 overflows it (max 65504)
    metric = paddle.to_tensor(np.array([[[1, 0], [1, 0], [0, 1], [0, 1]]], np.float32))
    merge, _ = tome.bipartite_soft_matching(metric, 2, class_token=False)
    x32 = np.array([[[40000.0], [40000.0], [-3.0], [5.0]]], np.float32)
    x = paddle.to_tensor(x32).astype(dtype)
    y, size = tome.merge_wavg(merge, x)
    assert y.dtype == x.dtype and size.dtype == paddle.float32
    np.testing.assert_allclose(y.astype("float32").numpy()[0, :, 0], [40000.0, 1.0], rtol=1e-2)
    if dtype == "float16":   # what accumulating in fp16 would have given
        assert not np.isfinite(merge(x, mode="sum").astype("float32").numpy()).all()


def test_batched_matching_equals_per_image():
    rng = np.random.default_rng(3)
    metric = rng.standard_normal((4, 17, 6)).astype(np.float32)
    x = rng.standard_normal((4, 17, 5)).astype(np.float32)
    merge, _ = tome.bipartite_soft_matching(paddle.to_tensor(metric), 6)
    y, s = tome.merge_wavg(merge, paddle.to_tensor(x))
    for i in range(4):
        m1, _ = tome.bipartite_soft_matching(paddle.to_tensor(metric[i:i + 1]), 6)
        y1, s1 = tome.merge_wavg(m1, paddle.to_tensor(x[i:i + 1]))
        np.testing.assert_array_equal(s.numpy()[i], s1.numpy()[0])
        np.testing.assert_allclose(y.numpy()[i], y1.numpy()[0], rtol=1e-6, atol=1e-7)


# ---- parse_r ----

def test_parse_r_forms():
    assert tome.parse_r(12, 8) == [8] * 12
    assert tome.parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert tome.parse_r(12, (16, 0.0)) == [16] * 12
    assert tome.parse_r(12, (8, 1)) == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]
    assert tome.parse_r(5, [3, 2]) == [3, 2, 0, 0, 0]
    assert tome.parse_r(1, (4, -1)) == [8]


@pytest.mark.parametrize("bad,err", [(-1, ValueError), ("16", TypeError), (1.5, TypeError), (True, TypeError),
                                     ((16,), TypeError), ((16, 2.0), ValueError), ((-2, 0.0), ValueError),
                                     ([4, -1], ValueError), ([1] * 13, ValueError)])
def test_parse_r_rejects(bad, err):
    with pytest.raises(err, match="parse_r"):
        tome.parse_r(12, bad)


def test_parse_r_text():
    assert tome.parse_r_text("16") == 16
    assert tome.parse_r_text("16,-1") == (16, -1.0)
    assert tome.parse_r_text("[8, 8,4]") == [8, 8, 4]
    with pytest.raises(ValueError, match="--tome-r"):
        tome.parse_r_text("sixteen")
    with pytest.raises(ValueError, match="--tome-r"):
        tome.parse_r_text("-3")


# ---- token counts (REFERENCE.md), checked by driving the matching itself ----

def _drive(t0, schedule, protected=1):
    """Token counts after each layer from running the real matching on random metrics."""
    counts, t = [t0], t0
    for r in schedule:
        merge, _ = tome.bipartite_soft_matching(paddle.randn([1, t, 4]), r, class_token=protected >= 1)
        t = merge(paddle.zeros([1, t, 1]), mode="sum").shape[1]
        counts.append(t)
    return counts


def test_vit_b_r16_token_counts():
    want = [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert _drive(197, tome.parse_r(12, 16)) == want == token_counts(197, [16] * 12)
    assert want[-2] - want[-1] == 10   # the last layer asks for 16 but can only merge (21 - 1) // 2


def test_vit_l_384_r25_ends_with_8_tokens():
    counts = _drive(577, tome.parse_r(24, 25))
    assert counts[-1] == 8 and counts == token_counts(577, [25] * 24)
