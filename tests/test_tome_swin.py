"""ToMe on Swin (plfusion/patches/tome/swin.py): ratio 0 is the unpatched model exactly, shapes never
change (padded and shifted windows too), every window merges the same count, merges never cross a
shift region or join image and padding, a merged query's bias row is the mean of its tokens' rows,
a block on a map whose merged tokens are equal gives the unmerged block's output, GeminiFusion in
either order gives one model sharing one map, and training, FLOP counting and tracing work."""
import numpy as np
import paddle
import pytest
from conftest import outputs_numpy, segmentor_inputs, tome_macs_and_maps

from plfusion.models import build_model
from plfusion.models.swin_transformer import SwinTransformer, SwinTransformerBlock, shifted_window_mask
from plfusion.patches import geminifusion, tome
from plfusion.patches.tome.dense import _grid
from plfusion.patches.tome.swin import WindowMerge, _WindowToMeAttention, _layout
from plfusion.utils.flops import count_flops

SIZE = (61, 90)    # stage maps 16x23, 8x12, 4x6, 2x3: every stage padded to the window
SMALL = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))


def _seg(fusion=False, tome_first=False, ratio=0.5):
    paddle.seed(0)
    seg = build_model({"name": "Segmentor",
                       "architecture": dict(name="swin_tiny_patch4_window7_224", num_classes=0,
                                            out_indices=[0, 1, 2, 3], **SMALL),
                       "head": {"name": "SegFormerHead", "num_classes": 5, "embed_dim": 32}})
    steps = [lambda m: geminifusion.apply_patch(m, num_modalities=2)] if fusion else []
    steps = steps + [lambda m: tome.apply_patch(m, ratio=ratio)] if ratio is not None else steps
    for step in (reversed(steps) if tome_first else steps):
        step(seg)
    seg.eval()
    return seg


def _inputs(fusion, batch=2):
    return segmentor_inputs(fusion, SIZE, batch)


_outs = outputs_numpy


@pytest.mark.parametrize("fusion", [False, True])
def test_ratio_zero_is_the_unpatched_model_and_shapes_never_change(fusion):
    x = _inputs(fusion)
    plain = _outs(_seg(fusion, ratio=None), x)
    seg = _seg(fusion, ratio=0.0)
    for a, b in zip(_outs(seg, x), plain):
        np.testing.assert_array_equal(a, b)
    for ratio in (0.3, 0.75, [0.75, 0.5, 0.25, 0.0]):
        seg.ratio = ratio
        got = _outs(seg, x)
        assert [g.shape for g in got] == [p.shape for p in plain]
        assert all(np.isfinite(g).all() for g in got)
    assert not np.allclose(got[0], plain[0])


def test_either_order_with_geminifusion_gives_one_model_and_remove_restores_it():
    x = _inputs(True)
    a, b = _seg(True, tome_first=False), _seg(True, tome_first=True)
    for u, v in zip(_outs(a, x), _outs(b, x)):
        np.testing.assert_array_equal(u, v)
    plain = _outs(_seg(True, ratio=None), x)
    for seg in (a, b):
        tome.remove_patch(seg)
        assert not any("ToMe" in type(m).__name__ for m in seg.sublayers(include_self=True))
        for u, v in zip(_outs(seg, x), plain):
            np.testing.assert_array_equal(u, v)


def test_modalities_share_one_map_and_every_window_merges_the_same_count():
    paddle.seed(2)
    B, hw, w, r = 2, (10, 12), 7, 20
    blk = SwinTransformerBlock(16, 2, w, shift_size=3)
    x = paddle.randn([2 * B, hw[0] * hw[1], 16])
    windows = blk.windows(x, hw)
    merge = WindowMerge(windows, hw, w, 3, r, num_modalities=2)
    rows = merge.token_rows.numpy()
    nW = windows.shape[0] // (2 * B)
    # token i of RGB and of depth: the same row, offset by the modality's block of rows
    np.testing.assert_array_equal(rows[:B], rows[B:] - B * nW * merge.num_rows)
    assert merge.num_rows == w * w - r
    avg = merge.average.numpy()                       # [windows, rows, tokens]: every row is used
    assert (avg.sum(-1) > 0.999).all() and ((avg > 0).sum(1) == 1).all()
    const = paddle.ones([2 * B, hw[0] * hw[1], 16]) * paddle.arange(16, dtype="float32")
    back = merge.unmerge(merge.merge(const))
    np.testing.assert_allclose(back.numpy(), const.numpy(), rtol=1e-6)


@pytest.mark.parametrize("hw,shift", [((14, 14), 3), ((9, 11), 3), ((9, 11), 0), ((8, 8), 2)])
def test_merges_never_cross_a_shift_region_or_join_image_and_padding(hw, shift):
    w = 7 if shift != 2 else 4
    perm, penalty, allowed = _layout(hw[0], hw[1], w, shift)
    Hp, Wp = -(-hw[0] // w) * w, -(-hw[1] // w) * w
    assert sorted(perm) == sorted(set(perm)) and len(perm) == hw[0] * hw[1]
    # the labels the mask and the padding imply, in the window batch
    mask = shifted_window_mask(Hp, Wp, w, shift) if shift else np.zeros(((Hp // w) * (Wp // w), w * w, w * w))
    is_pad = np.ones((Hp // w) * (Wp // w) * w * w, bool)
    is_pad[perm] = False
    is_pad = is_pad.reshape(-1, w * w)
    paddle.seed(3)
    blk = SwinTransformerBlock(8, 2, w, shift_size=shift)
    x = paddle.randn([1, hw[0] * hw[1], 8])
    r = min(int(0.75 * w * w), allowed)
    merge = WindowMerge(blk.windows(x, hw), hw, w, shift, r)
    avg = merge.average.numpy()
    for win in range(avg.shape[0]):
        for row in avg[win]:
            members = np.flatnonzero(row)
            assert (mask[win][np.ix_(members, members)] == 0).all()
            assert len(set(is_pad[win, members])) == 1


def test_a_merged_query_takes_the_mean_bias_row_and_equal_tokens_merge_exactly():
    paddle.seed(4)
    hw, w = (14, 14), 7
    for shift in (0, 3):
        blk = SwinTransformerBlock(16, 2, w, shift_size=shift)
        blk.eval()
        mask = paddle.to_tensor(shifted_window_mask(14, 14, w, shift)) if shift else None
        x = paddle.randn([2, 196, 16])
        merge = WindowMerge(blk.windows(x, hw), hw, w, shift, 30)
        attn = blk.attn
        got = _WindowToMeAttention._merged_bias(attn, merge, mask).numpy()     # [BW, h, R, N]
        bias = attn.relative_position_bias().numpy()[None] + (mask.numpy()[:, None] if shift else 0)
        bias = np.tile(bias, (2, 1, 1, 1)) if shift else np.broadcast_to(bias, (8, 2, 49, 49))
        want = np.einsum("brn,bhnm->bhrm", merge.average.numpy(), bias)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        # tokens equal within each 2x2 cell and no position bias: merging is exact
        attn.relative_position_bias_table.set_value(paddle.zeros_like(attn.relative_position_bias_table))
        cells = paddle.randn([2, 8, 8, 16])
        i = (np.arange(14) - shift) % 14               # shifted-map coordinate of each map row/column
        rows = i // w * 4 + i % w // 2                 # its 2x2 cell inside its window
        x = cells.numpy()[:, rows][:, :, rows].reshape(2, 196, 16)
        x = paddle.to_tensor(x)
        with paddle.no_grad():
            plain = blk(x, hw, mask)
            model = tome.apply_patch(_Wrap(blk), ratio=0.75)
            merged = blk(x, hw, mask)
            tome.remove_patch(model)
        np.testing.assert_allclose(merged.numpy(), plain.numpy(), rtol=1e-4, atol=1e-5)


class _Wrap(SwinTransformer):
    """A one-block Swin so apply_patch finds a backbone around the block under test."""

    def __init__(self, blk):
        paddle.nn.Layer.__init__(self)
        self.layers = paddle.nn.LayerList([paddle.nn.Layer()])
        self.layers[0].blocks = paddle.nn.LayerList([blk])
        self.num_layers = 1


def test_every_ratio_removes_tokens_in_every_stage_and_costs_fewer_macs():
    m = SwinTransformer(num_classes=10, **SMALL)
    tome.apply_patch(m, ratio=0.0, trace_source=True)
    m.eval()
    macs, maps = tome_macs_and_maps(m, (0.25, 0.5))
    for ratio, found in zip((0.25, 0.5), maps):
        assert sorted(found) == [(s, b) for s in range(4) for b in range(2)]
        for groups, H, W in found.values():
            w = min(7, H)
            r = min(int(ratio * w * w), _layout(H, W, w, 0)[2])
            assert len(np.unique(groups.numpy()[0])) == (H // w) * (W // w) * (w * w - r)
    assert macs[0] > macs[1] > macs[2]
    assert macs[0] == count_flops(SwinTransformer(num_classes=10, **SMALL), (1, 3, 224, 224))


def test_backward_and_a_traced_program_work_with_merging_on(tmp_path):
    m = SwinTransformer(num_classes=10, **SMALL)
    tome.apply_patch(m, ratio=0.5)
    x = paddle.randn([2, 3, 224, 224])
    loss = m(x).mean()
    loss.backward()
    grads = [p.grad for p in m.parameters() if not p.stop_gradient]
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    m.eval()
    with paddle.no_grad():
        want = m(x).numpy()
    static = paddle.jit.to_static(m, input_spec=[paddle.static.InputSpec([2, 3, 224, 224], "float32")],
                                  full_graph=True)
    np.testing.assert_allclose(static(x).numpy(), want, rtol=1e-4, atol=1e-4)


def test_a_swin_classifier_config_takes_the_ratio():
    m = build_model({"architecture": dict(name="swin_tiny_patch4_window7_224", num_classes=10, **SMALL),
                     "patches": [{"name": "tome", "ratio": 0.5}]})
    assert tome.is_patched(m) and m.ratio == 0.5
    with pytest.raises(ValueError, match="takes ratio"):
        tome.apply_patch(SwinTransformer(num_classes=10, **SMALL), r=8)


def test_export_of_a_merged_swin_fusion_segmentor_matches_dygraph(tmp_path):
    from plfusion.export import export_model
    seg = _seg(True, ratio=0.5)
    info = export_model(seg, str(tmp_path / "exp"), img_size=SIZE, check_batch=2, batch_size=2)
    assert info["tome_ratio"] == 0.5
    assert max(info["check"]["max_abs_diff"].values()) < 1e-3
