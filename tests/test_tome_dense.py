"""ToMe on dense MiT models (plfusion/patches/tome/dense.py): ratio 0 is the unpatched model exactly,
shapes never change (odd grids too), modalities share one merge map, merge/unmerge keep a constant
map, every ratio removes the tokens it says, either order with the fusion patches gives one model,
remove_patch restores it, and training and tracing work."""
import numpy as np
import paddle
import pytest
from conftest import outputs_numpy, segmentor_inputs

from plfusion.models import build_model, create_model
from plfusion.patches import geminifusion, tokenfusion, tome
from plfusion.patches.tome.dense import (DEFAULT_RATIO, MAX_RATIO, MIT_DEFAULT_RATIO, CellMerge, DenseMerge,
                                         dense_merge)
from plfusion.utils.flops import count_flops

SIZE = (45, 62)   # stage grids 12x16, 6x8, 3x4, 2x2: odd cells at the edges


def _seg(fusion=None, tome_first=False, ratio=0.5):
    paddle.seed(0)
    seg = build_model({"name": "Segmentor", "architecture": {"name": "mit_b0"},
                       "head": {"name": "SegFormerHead", "num_classes": 5, "embed_dim": 32}})
    patch = {"gemini": lambda m: geminifusion.apply_patch(m, num_modalities=2),
             "token": lambda m: tokenfusion.apply_patch(m, num_modalities=2), None: lambda m: m}[fusion]
    if tome_first:
        tome.apply_patch(seg, ratio=ratio)
        patch(seg)
    else:
        patch(seg)
        tome.apply_patch(seg, ratio=ratio)
    seg.eval()
    return seg


def _inputs(fusion, batch=2):
    return segmentor_inputs(fusion, SIZE, batch)


_outs = outputs_numpy


@pytest.mark.parametrize("fusion", [None, "gemini", "token"])
def test_ratio_zero_is_the_unpatched_model_and_shapes_never_change(fusion):
    x = _inputs(fusion)
    plain = _outs(_unpatched(fusion), x)
    seg = _seg(fusion, ratio=0.0)
    for a, b in zip(_outs(seg, x), plain):
        np.testing.assert_array_equal(a, b)
    for ratio in (0.3, MAX_RATIO, [0.75, 0.5, 0.25, 0.0]):
        seg.ratio = ratio
        got = _outs(seg, x)
        assert [g.shape for g in got] == [p.shape for p in plain]
        assert all(np.isfinite(g).all() for g in got)
    assert not np.allclose(got[0], plain[0])        # merging changed something


def _unpatched(fusion):
    paddle.seed(0)
    seg = build_model({"name": "Segmentor", "architecture": {"name": "mit_b0"},
                       "head": {"name": "SegFormerHead", "num_classes": 5, "embed_dim": 32}})
    if fusion == "gemini":
        geminifusion.apply_patch(seg, num_modalities=2)
    elif fusion == "token":
        tokenfusion.apply_patch(seg, num_modalities=2)
    seg.eval()
    return seg


@pytest.mark.parametrize("fusion", ["gemini", "token"])
def test_either_order_with_the_fusion_patches_gives_one_model_and_remove_restores_it(fusion):
    x = _inputs(fusion)
    a, b = _seg(fusion, tome_first=False), _seg(fusion, tome_first=True)
    for u, v in zip(_outs(a, x), _outs(b, x)):
        np.testing.assert_array_equal(u, v)
    plain = _outs(_unpatched(fusion), x)
    for seg in (a, b):
        tome.remove_patch(seg)
        assert not tome.is_patched(seg)
        assert not any("ToMe" in type(m).__name__ for m in seg.sublayers(include_self=True))
        for u, v in zip(_outs(seg, x), plain):
            np.testing.assert_array_equal(u, v)


def test_modalities_share_one_map_and_a_constant_map_survives_merge_and_unmerge():
    paddle.seed(2)
    B, H, W, C = 3, 7, 9, 8
    rgb, depth = paddle.randn([B, H * W, C]), paddle.randn([B, H * W, C])
    merge = DenseMerge(paddle.concat([rgb, depth]), H, W, r=20, num_modalities=2)
    inv = merge.inverse.numpy()
    np.testing.assert_array_equal(inv[:B], inv[B:])               # token i of RGB and of depth: same row
    assert merge.num_rows == H * W - 20
    for row in inv:                                                # 20 tokens went into another token's row
        assert len(np.unique(row)) == H * W - 20
    const = paddle.ones([2 * B, H * W, C]) * paddle.arange(C, dtype="float32")
    back = merge.unmerge(merge.merge(const))
    np.testing.assert_array_equal(back.numpy(), const.numpy())
    # merging averages: a merged row is the mean of its tokens, and merge(unmerge(y)) == y
    y = paddle.randn([2 * B, merge.num_rows, C])
    np.testing.assert_allclose(merge.merge(merge.unmerge(y)).numpy(), y.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("H, W", [(6, 8), (7, 9), (1, 5)])
def test_the_maximum_ratio_pools_each_cell_as_the_matched_map_does(H, W):
    """r covering every source needs no match: dense_merge then pools 2x2 cells (CellMerge), with the
    rows, order, sizes and means of DenseMerge at that r, odd grids included."""
    paddle.seed(8)
    x = paddle.randn([4, H * W, 6])
    sources = H * W - ((H + 1) // 2) * ((W + 1) // 2)
    cell, dense = dense_merge(x, H, W, sources, num_modalities=2), DenseMerge(x, H, W, sources, num_modalities=2)
    assert isinstance(cell, CellMerge) and cell.num_rows == dense.num_rows
    np.testing.assert_array_equal(cell.inverse.numpy(), dense.inverse.numpy())
    np.testing.assert_array_equal(cell.sizes.numpy(), dense.sizes.numpy())
    np.testing.assert_allclose(cell.merge(x).numpy(), dense.merge(x).numpy(), rtol=1e-6, atol=1e-6)
    y = paddle.randn([4, cell.num_rows, 6])
    np.testing.assert_array_equal(cell.unmerge(y).numpy(), dense.unmerge(y).numpy())
    assert isinstance(dense_merge(x, H, W, sources - 1), DenseMerge) or sources == 0


def test_tokens_merge_only_inside_their_2x2_cell():
    paddle.seed(3)
    H, W = 6, 8
    merge = DenseMerge(paddle.randn([2, H * W, 4]), H, W, r=int(MAX_RATIO * H * W))
    inv = merge.inverse.numpy()
    cells = (np.arange(H)[:, None] // 2 * (W // 2) + np.arange(W)[None, :] // 2).reshape(-1)
    for row in inv:     # at the maximum ratio each cell is one token
        for c in range(cells.max() + 1):
            assert len(np.unique(row[cells == c])) == 1
        assert len(np.unique(row)) == (H // 2) * (W // 2)


def test_every_ratio_removes_the_tokens_it_says_and_costs_fewer_macs():
    seg = _seg("gemini", ratio=0.0)
    x = _inputs("gemini", batch=1)
    seen = {}

    def spy(layer, inputs, output):
        merge = getattr(layer, "_tome_merge", None)
        seen.setdefault(id(layer), []).append((inputs[1], inputs[2], merge.num_rows if merge else inputs[0].shape[1]))
    attns = [blk.attn for i in range(4) for blk in seg.backbone.stage_layers(i)[1]]
    hooks = [a.register_forward_post_hook(spy) for a in attns]
    macs = []
    for ratio in (0.0, 0.25, 0.5, MAX_RATIO):
        seg.ratio = ratio
        seen.clear()
        _outs(seg, x)
        for a in attns:
            h, w, rows = seen[id(a)][0]
            n, sources = h * w, h * w - ((h + 1) // 2) * ((w + 1) // 2)    # one token of each 2x2 cell stays
            assert rows == n - min(int(ratio * n), sources), (h, w, ratio)
        macs.append(count_flops(seg, [list(t.shape) for t in x]))
    for h in hooks:
        h.remove()
    assert macs == sorted(macs, reverse=True) and macs[-1] < 0.9 * macs[0]


def test_merged_keys_weigh_as_the_tokens_they_hold():
    """MiT's keys/values merge on their own (reduced) grid, and a merged key's logits get log(its size):
    tokens equal inside each 2x2 cell then give exactly the unmerged attention, on an odd grid whose
    cells hold 4, 2 and 1 tokens. Without the weighting the same merge is not exact."""
    seg = _seg(None, ratio=MAX_RATIO)
    blk = seg.backbone.block4[0]             # sr_ratio 1: keys/values on the query grid
    H, W = 5, 7
    C = blk.norm1.weight.shape[0]
    paddle.seed(4)
    cells = paddle.randn([1, C, 3, 4])
    x = paddle.nn.functional.interpolate(cells, scale_factor=2, mode="nearest")[:, :, :H, :W]
    x = x.flatten(2).transpose([0, 2, 1])
    want = type(blk)._tome_orig_class.attn_branch(blk, x, H, W).numpy()
    kv_tokens = []
    hook = blk.attn.kv.register_forward_post_hook(lambda layer, inputs, out: kv_tokens.append(inputs[0].shape[1]))
    np.testing.assert_allclose(blk.attn_branch(x, H, W).numpy(), want, rtol=1e-5, atol=1e-5)
    assert kv_tokens[-1] == 3 * 4 < H * W              # one key per cell
    seg._tome_info["prop_attn"] = False
    assert not np.allclose(blk.attn_branch(x, H, W).numpy(), want, rtol=1e-3, atol=1e-3)
    seg._tome_info["prop_attn"], seg._tome_info["merge_kv"] = True, False
    np.testing.assert_allclose(blk.attn_branch(x, H, W).numpy(), want, rtol=1e-5, atol=1e-5)
    assert kv_tokens[-1] == H * W                       # merge_kv=False: every key stays
    hook.remove()


def test_backward_and_a_traced_program_work_with_merging_on():
    seg = _seg("gemini", ratio=0.5)
    x = _inputs("gemini")
    seg.train()
    loss = sum(o.mean() for o in seg(x))
    loss.backward()
    grads = [p.grad for p in seg.parameters() if p.grad is not None]
    assert grads and all(np.isfinite(g.numpy()).all() for g in grads)
    assert seg.backbone.block1[0].attn.q.weight.grad is not None
    seg.eval()
    want = _outs(seg, x)

    class Two(paddle.nn.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a, b):
            return self.inner([a, b])[-1]
    spec = [paddle.static.InputSpec([2, 3, *SIZE], "float32")] * 2
    static = paddle.jit.to_static(Two(seg), input_spec=spec, full_graph=True)
    np.testing.assert_allclose(static(*x).numpy(), want[-1], rtol=1e-4, atol=1e-4)


def test_default_ratio_is_the_2x2_cell_on_mit_and_per_stage_on_swin():
    seg = _unpatched(None)
    tome.apply_patch(seg)
    assert seg.ratio == MIT_DEFAULT_RATIO == MAX_RATIO
    swin = create_model("swin_tiny_patch4_window7_224", num_classes=0, out_indices=(0, 1, 2, 3), depths=(1, 1, 1, 1),
                        num_heads=(1, 1, 1, 1), embed_dim=8)
    tome.apply_patch(swin)
    assert swin.ratio == DEFAULT_RATIO


def test_errors_name_the_setting():
    seg = _seg(None, ratio=0.0)
    with pytest.raises(ValueError, match=r"model.ratio .*a number in \[0, 0.75\]"):
        seg.ratio = 0.9
    with pytest.raises(ValueError, match="one merge ratio per stage \\(4\\)"):
        seg.ratio = [0.5, 0.5]
    with pytest.raises(ValueError, match="r \\(tokens per layer\\) is for ViT-family models"):
        tome.apply_patch(_unpatched(None), r=8)
    with pytest.raises(ValueError, match="ratio is for MiT, Swin and MViTv2 models"):
        tome.apply_patch(create_model("vit_tiny_patch16_224"), ratio=0.5)


def test_eval_tome_ratio_table_on_a_trained_fusion_run(tmp_path, capsys):
    import json
    import os

    from plfusion.engine.cli import eval_main, train_main
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = os.path.join(root, "configs", "quickstart", "geminifusion_mit_b0_synthetic.yaml")
    out = str(tmp_path / "run")
    shrink = ["-o", "dataloader.train.dataset.num_samples=8", "-o", "dataloader.train.dataset.image_size=[32,48]",
              "-o", "dataloader.val.dataset.num_samples=6", "-o", "dataloader.val.dataset.image_size=[32,48]",
              "-o", "dataloader.train.sampler.batch_size=2", "-o", "dataloader.val.sampler.batch_size=3",
              "-o", "eval.save_predictions=0", "-o", f"output_dir={out}", "--threads", "1"]
    assert train_main(["-c", cfg, *shrink, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert eval_main(["-c", cfg, *shrink, "--resume", out, "--tome-ratio", "0", "0.5", "0.75,0.5,0.25,0"]) == 0
    table = capsys.readouterr().out
    assert "ToMe (dense) on 6 val samples" in table and "mIoU" in table and "GFLOPs" in table
    rows = json.load(open(os.path.join(out, "eval_results.json")))["tome"]
    assert [r["ratio"] for r in rows] == ["0.0", "0.5", "[0.75, 0.5, 0.25, 0.0]"]
    assert rows[0]["gflops"] > rows[1]["gflops"] and rows[0]["gflops"] > rows[2]["gflops"]
    assert all(0 <= r["miou"] <= 100 and r["samples"] == 6 for r in rows)
    assert eval_main(["-c", cfg, *shrink, "--resume", out, "--tome-ratio", "0.9"]) == 2
    assert "a number in [0, 0.75]" in capsys.readouterr().err


def test_dense_merge_picture_tool_draws_rgb_and_depth_per_ratio(tmp_path):
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("vis_dense", os.path.join(root, "tools", "visualize_tome_dense.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "m.png"
    sheet = tool.main(["-c", os.path.join(root, "configs", "quickstart", "geminifusion_mit_b0_synthetic.yaml"),
                       "-o", "dataloader.val.dataset.image_size=[48,64]", "--ratio", "0", "0.5", "--out", str(out)])
    assert out.is_file() and sheet.dtype == np.uint8
    assert sheet.shape[1] >= 2 * 64 and sheet.shape[0] >= 3 * 48      # 2 modalities x (inputs + 2 ratios)


def test_dense_groups_follow_the_merge_map():
    from plfusion.patches.tome.vis import dense_groups
    seg = _unpatched("gemini")
    tome.apply_patch(seg, ratio=0.5, trace_source=True)
    _outs(seg, _inputs("gemini"))
    groups = dense_groups(seg, stage=0, block=0)
    assert groups.shape == (12, 16) and len(np.unique(groups)) == 12 * 16 - int(0.5 * 12 * 16)
    seg.ratio = [0.0, 0.5, 0.5, 0.5]
    _outs(seg, _inputs("gemini"))
    assert dense_groups(seg, stage=0, block=0) is None and dense_groups(seg, stage=1, block=1).shape == (6, 8)


@pytest.mark.parametrize("ratio", [0.5, MAX_RATIO])    # matched maps; MiT's default, constant CellMerge maps
def test_export_fixes_the_ratio_and_matches_dygraph(tmp_path, ratio):
    from plfusion.export import export_model
    seg = _seg("gemini", ratio=ratio)
    info = export_model(seg, str(tmp_path / "exp"), img_size=SIZE, check_batch=2, batch_size=2)
    assert info["tome_ratio"] == ratio
    assert max(info["check"]["max_abs_diff"].values()) < 1e-3


def test_training_throughput_times_train_steps_at_each_ratio(tmp_path):
    import os

    from plfusion.config import get_config
    from plfusion.engine.throughput import training_throughput
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = get_config(os.path.join(root, "configs", "quickstart", "geminifusion_mit_b0_synthetic.yaml"),
                     ["dataloader.train.dataset.num_samples=8", "dataloader.train.dataset.image_size=[32,48]",
                      "dataloader.train.sampler.batch_size=2", f"output_dir={tmp_path}"])
    res = training_throughput(cfg, steps=2, warmup=0, loader_batches=2, tome_ratios=[0.0, 0.5])
    assert [r["ratio"] for r in res["tome"]] == ["0.0", "0.5"]
    assert res["tome"][0]["speedup"] == 1.0 and all(r["train_ips"] > 0 for r in res["tome"])


def test_grids_too_small_for_the_ratio_merge_nothing():
    seg = _seg("gemini", ratio=0.25)
    x = [paddle.randn([1, 3, 32, 48]) for _ in range(2)]     # stage grids 8x12, 4x6, 2x3, 1x2
    outs = _outs(seg, x)
    assert all(o.shape == (1, 5, 8, 12) and np.isfinite(o).all() for o in outs)
