"""ToMe tools: static export round trip, the benchmark's table/JSON, the merge-map picture and the notebook."""
import json
import os
import sys

import cv2
import numpy as np
import paddle
import pytest

from conftest import ROOT, run_notebook
from plfusion.models import create_model
from plfusion.patches import tome
from plfusion.patches.tome.vis import demo_image, make_visualization

sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark as bench_tool  # noqa: E402
import export as export_tool  # noqa: E402
import visualize_tome as vis_tool  # noqa: E402

TINY = dict(img_size=32)


def _tiny_checkpoint(tmp_path):
    model = create_model("vit_tiny_patch16_224", **TINY)
    path = str(tmp_path / "tiny.pdparams")
    paddle.save(model.state_dict(), path)
    return model, path


def test_export_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    other = create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    path = str(tmp_path / "depth2.pdparams")
    paddle.save(other.state_dict(), path)
    with pytest.raises(ValueError, match="missing"):
        export_tool.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--pretrained", path,
                          "--out", str(tmp_path / "x")])


def test_export_round_trip_with_fixed_r(tmp_path):
    model, ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "export"
    prefix = export_tool.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--pretrained", ckpt,
                               "--tome-r", "2", "--out", str(out)])
    assert os.path.exists(prefix + ".pdiparams")
    # the saved graph merges tokens: it matches the patched dygraph model, not the unpatched one
    model.eval()
    x = paddle.rand([3, 3, 32, 32])     # a batch size the export never saw
    with paddle.no_grad():
        plain = model(x).numpy()
        tome.apply_patch(model)
        model.r = 2
        patched = model(x).numpy()
    loaded = paddle.jit.load(prefix)
    got = loaded(x).numpy()
    np.testing.assert_allclose(got, patched, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-3)


def test_export_from_config_and_mismatch_is_an_error(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  architecture:\n    name: vit_tiny_patch16_224\n    img_size: 32\n    depth: 2\n"
                   "  head: null\n  patches:\n    - name: tome\n      r: 2\n")
    prefix = export_tool.main(["-c", str(cfg), "--out", str(tmp_path / "cfg")])
    x = paddle.rand([2, 3, 32, 32])
    other = create_model("vit_tiny_patch16_224", img_size=32, depth=2)   # different weights
    other.eval()
    with paddle.no_grad():
        wrong = [other(x).numpy()]
    with pytest.raises(export_tool.ExportMismatchError, match="differs from dygraph"):
        export_tool.verify_export(wrong, prefix, [x])


def test_benchmark_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_tool.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--tome-r", "2", "2,-1",
                              "--engine", "dygraph", "--batch-size", "2", "--threads", "1", "--iters", "1",
                              "--warmup", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "batch 2 | threads 1" in printed and "input 3x64x64" in printed and "images/s" in printed
    saved = json.loads(out.read_text())
    assert saved["threads"] == 1 and saved["batch_size"] == 2 and saved["img_size"] == [64, 64]
    rows = {row["r"]: row for row in saved["results"]}
    assert list(rows) == ["0", "2", "2,-1"]                     # r=0 added as the baseline
    assert rows["0"]["speedup"] == 1.0
    # tokens and FLOPs follow the schedule: 17 tokens, 12 blocks
    assert [rows[k]["tokens"] for k in rows] == [17, tome.token_counts(17, [2] * 12)[-1],
                                                 tome.token_counts(17, tome.parse_r(12, (2, -1)))[-1]]
    assert rows["0"]["gflops"] > rows["2"]["gflops"] > 0
    assert all(row["ips"] > 0 and row["tensor_peak_mb"] > 0 for row in rows.values())
    assert result["results"] == saved["results"]


def test_make_visualization_colours_groups_and_outlines_them():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:16] = (200, 0, 0)
    img[16:, :16] = (0, 100, 0)
    img[16:, 16:] = (0, 0, 50)
    # cls + 4 patches; patches 0 and 1 (the top row) merged into one group
    source = np.array([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], np.float32)
    vis = make_visualization(img, source[None], patch_size=16, class_token=True)
    assert vis.shape == img.shape and vis.dtype == np.uint8
    assert tuple(vis[8, 16]) == (200, 0, 0)            # inside the merged top group: no border between 0 and 1
    assert tuple(vis[24, 8]) == (0, 100, 0) and tuple(vis[24, 24]) == (0, 0, 50)
    palette = {tuple(vis[0, 5]), tuple(vis[15, 20])}
    assert len(palette) == 1 and palette != {(200, 0, 0)}   # the top group's outline: one colour, not the fill
    assert tuple(vis[16, 5]) != (0, 100, 0)            # the bottom-left group's top edge is outlined
    with pytest.raises(ValueError, match="prefix"):
        make_visualization(img, source, patch_size=8)


def test_make_visualization_identity_source_is_a_mosaic():
    img = demo_image(64)
    vis = make_visualization(img, np.eye(17, dtype=np.float32), patch_size=16)
    inner = vis[1:15, 1:15].reshape(-1, 3)
    np.testing.assert_allclose(inner.mean(0), img[:16, :16].reshape(-1, 3).mean(0), atol=0.6)
    assert (inner == inner[0]).all()


def test_visualize_tool_writes_one_sheet(tmp_path, capsys):
    out = tmp_path / "merged.png"
    vis_tool.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "0", "2", "--out", str(out)])
    assert "synthetic" in capsys.readouterr().out
    sheet = cv2.imread(str(out))
    assert sheet.shape == (64 + 24, 3 * 64 + 2 * 4, 3)
    # with --image the given file is used, resized to the model's input
    img_path = tmp_path / "in.png"
    cv2.imwrite(str(img_path), cv2.cvtColor(demo_image(100), cv2.COLOR_RGB2BGR))
    vis_tool.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--image", str(img_path),
                   "--r", "4", "--out", str(out)])
    assert cv2.imread(str(out)).shape == (64 + 24, 2 * 64 + 4, 3)


def test_notebook_runs(tmp_path):
    _, text, images = run_notebook("tome_vit.ipynb", {"PLFUSION_NB_MODEL": "vit_tiny_patch16_224",
                                                      "PLFUSION_NB_FAST": "1"})
    assert "RANDOM weights" in text and "images/s" in text and "grace_hopper.jpg" in text   # matplotlib's photo
    assert len(images) == 2   # the speed chart and the merge maps
