"""plfusion.export: round trips (classifier, ToMe ViT, 2-modality GeminiFusion segmentor), deploy.yaml, the
check that fails on a mismatch, and the benchmark's inference engine."""
import json
import os

import numpy as np
import paddle
import pytest
import yaml

from plfusion.config import get_config
from plfusion.data.synthetic_imagenet import SYNTHETIC_CLASSES
from plfusion.export import (DynamicBatchError, ExportMismatchError, deploy_info, export_model, inference_transforms,
                             main, verify_export)
from plfusion.inference import DEPLOY_FILE, Predictor, create_paddle_predictor, run_paddle_predictor
from plfusion.models import build_model, create_model
from plfusion.patches import tome
from plfusion.registry import ConfigError

GF_CONFIG = """
model:
  name: Segmentor
  architecture: {name: mit_b0}
  head: {name: SegFormerHead, num_classes: 6, embed_dim: 32}
  patches:
    - {name: geminifusion, num_modalities: 2, num_heads: 8}
dataloader:
  val:
    dataset:
      name: SyntheticRGBD
      num_samples: 2
      image_size: [48, 64]
      split: val
      transforms:
        - {name: Resize, size: [64, 64]}
        - {name: Normalize, stats: {depth: {mean: [0.5], std: [0.25]}}}
        - {name: ToCHW}
"""

CLS_CONFIG = """
model:
  name: Classifier
  architecture: {name: vit_tiny_patch16_224, img_size: 32, patch_size: 8, depth: 2, num_classes: 0}
  head: {name: LinearClsHead, in_channels: 192, num_classes: 10}
dataloader:
  val:
    dataset:
      name: SyntheticImageNet
      num_samples: 4
      image_size: 32
      num_classes: 10
      transforms:
        - {name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}
        - {name: ToCHW}
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _dygraph(model, xs):
    with paddle.no_grad():
        out = model([paddle.to_tensor(x) for x in xs] if len(xs) > 1 else paddle.to_tensor(xs[0]))
    return [t.numpy() for t in (out if isinstance(out, list) else [out])]


def test_classifier_round_trip_and_deploy_file(tmp_path):
    cfg_path = _write(tmp_path, "cls.yaml", CLS_CONFIG)
    model = build_model(get_config(cfg_path).model)
    ckpt = str(tmp_path / "cls.pdparams")
    paddle.save(model.state_dict(), ckpt)
    out = tmp_path / "cls"
    prefix = main(["-c", cfg_path, "--pretrained", ckpt, "--out", str(out)])
    assert prefix == str(out / "inference")
    deploy = yaml.safe_load((out / DEPLOY_FILE).read_text())
    assert deploy["task"] == "classification" and deploy["num_classes"] == 10
    assert deploy["inputs"] == [{"name": "image", "modality": "image", "shape": [-1, 3, 32, 32], "dtype": "float32"}]
    # the config's normalisation, and a resize to the exported size added in front
    assert deploy["preprocess"][0] == {"name": "ResizeCenterCrop", "size": [32, 32], "crop_ratio": 1.0,
                                       "interpolation": "bicubic", "antialias": True}
    assert deploy["preprocess"][1] == {"name": "Normalize", "mean": [0.5] * 3, "std": [0.2] * 3,
                                       "scale": 1.0 / 255.0}
    assert deploy["class_names"] == list(SYNTHETIC_CLASSES[:10])
    assert deploy["source"]["pretrained"] == ckpt
    # a batch size the export never saw, through the Predictor (Paddle Inference, oneDNN)
    x = np.random.default_rng(1).standard_normal([3, 3, 32, 32]).astype(np.float32)
    model.eval()
    expected = _dygraph(model, [x])[0]
    got = Predictor(str(out), threads=1).run([x])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0.05    # not a degenerate all-zero output


def test_tome_export_merges_in_the_graph_and_serves_without_nan(tmp_path):
    model = create_model("vit_tiny_patch16_224", img_size=64)
    ckpt = str(tmp_path / "vit.pdparams")
    paddle.save(model.state_dict(), ckpt)
    prefix = main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--pretrained", ckpt, "--tome-r", "3",
                   "--out", str(tmp_path / "tome"), "--threads", "1"])
    model.eval()
    x = np.random.default_rng(2).standard_normal([3, 3, 64, 64]).astype(np.float32)
    plain = _dygraph(model, [x])[0]
    tome.apply_patch(model)
    model.r = 3
    patched = _dygraph(model, [x])[0]
    assert model._tome_info["size"].shape[1] == tome.token_counts(17, [3] * 12)[-1] < 17   # tokens were merged
    # proportional attention under oneDNN: the in-place pass would turn these into NaN
    predictor, settings = create_paddle_predictor(prefix, threads=1)
    assert settings["onednn"] is True
    got = run_paddle_predictor(predictor, [x])[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, patched, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, plain, atol=1e-3)        # the graph merges: it is not the unpatched model
    deploy = yaml.safe_load(open(os.path.join(os.path.dirname(prefix), DEPLOY_FILE)))
    assert deploy["tome_r"] == 3 and deploy["check"]["max_abs_diff"]["inference"] < 1e-4


@pytest.fixture(scope="module")
def gf_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gf")
    cfg = get_config(_write(tmp, "gf.yaml", GF_CONFIG))
    model = build_model(cfg.model)
    info = export_model(model, str(tmp / "gf"), cfg, threads=1)
    return model, cfg, info, tmp


def test_geminifusion_export_has_one_input_per_modality(gf_export):
    model, cfg, info, tmp = gf_export
    deploy = yaml.safe_load((tmp / "gf" / DEPLOY_FILE).read_text())
    assert [i["name"] for i in deploy["inputs"]] == ["rgb", "depth"]
    assert all(i["shape"] == [-1, 3, 64, 64] for i in deploy["inputs"])     # the val Resize
    assert [o["name"] for o in deploy["outputs"]] == ["logits_rgb", "logits_depth", "ensemble"]
    assert deploy["outputs"][2]["shape"] == [-1, 6, 16, 16] and deploy["prediction_output"] == 2
    norm = deploy["preprocess"][1]
    assert norm["stats"]["depth"] == {"mean": [0.5], "std": [0.25], "channels": 3}
    assert norm["stats"]["rgb"]["mean"] == [0.485, 0.456, 0.406]
    assert deploy["class_names"] == ["wall", "floor", "box", "poster", "red_object", "blue_object"]
    assert deploy["palette"][0] == [128, 0, 0] and len(deploy["palette"]) == 6
    # every output of a new batch size matches dygraph through the Predictor
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal([1, 3, 64, 64]).astype(np.float32) for _ in range(2)]
    expected = _dygraph(model, xs)
    got = Predictor(str(tmp / "gf"), threads=1).run(xs)
    assert len(got) == 3
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)   # the two modality heads really differ


def test_a_mismatch_is_an_error_for_both_engines(gf_export):
    model, cfg, info, tmp = gf_export
    xs = [np.random.default_rng(4).standard_normal([1, 3, 64, 64]).astype(np.float32) for _ in range(2)]
    expected = _dygraph(model, xs)
    worst = verify_export(expected, info["prefix"], xs)
    assert set(worst) == {"jit", "inference"} and max(worst.values()) < 1e-4
    wrong = [e.copy() for e in expected]
    wrong[2][0, 0, 0, 0] += 1e-2
    for engine in ("jit", "inference"):
        with pytest.raises(ExportMismatchError, match=r"output 2 .*differs from dygraph"):
            verify_export(wrong, info["prefix"], xs, engines=(engine,))
    with pytest.raises(ExportMismatchError, match="returns 3 outputs, dygraph 2"):
        verify_export(expected[:2], info["prefix"], xs, engines=("jit",))


def test_val_pipeline_checks_name_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"transforms\[0\]: RandomHorizontalFlip is not an inference step"):
        inference_transforms("segmentation", [{"name": "RandomHorizontalFlip"}, {"name": "ToCHW"}], (64, 64),
                             ["rgb", "depth"])
    bad = GF_CONFIG.replace("split: val", "split: val\n      modalities: [rgb]")
    cfg = get_config(_write(tmp_path, "bad.yaml", bad))
    model = build_model(cfg.model)
    with pytest.raises(ConfigError, match=r"dataloader.val.dataset.modalities: \['rgb'\] lists 1 modalities"):
        deploy_info(model, cfg)


def test_benchmark_measures_the_exported_model_side_by_side(tmp_path, capsys):
    from plfusion.benchmark_cli import main as bench
    out = tmp_path / "bench.json"
    result = bench(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--engine", "dygraph", "inference",
                    "--tome-r", "2", "--batch-size", "2", "--threads", "1", "--iters", "2", "--warmup", "0",
                    "--json", str(out)])
    printed = capsys.readouterr().out
    assert "batch 2 | threads 1" in printed and "p90 ms" in printed and "vs r=0" in printed
    rows = {row["setting"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["dygraph r=0", "dygraph r=2", "inference r=0", "inference r=2"]
    assert rows["dygraph r=0"]["speedup"] == 1.0
    assert rows["inference r=0"]["vs_r0"] == 1.0 and rows["dygraph r=0"]["vs_r0"] == 1.0
    for row in rows.values():
        assert row["ips"] > 0 and row["p50"] <= row["p90"] <= row["p99"]
    # GFLOPs and tokens follow the r of each row (the export fixes the same schedule in the graph)
    assert rows["inference r=2"]["tokens"] == rows["dygraph r=2"]["tokens"] == tome.token_counts(17, [2] * 12)[-1]
    assert rows["inference r=2"]["gflops"] < rows["inference r=0"]["gflops"]
    assert result["threads"] == 1 and result["engines"] == ["dygraph", "inference"]


def test_console_script_fails_with_the_reason_and_writes_no_deploy_file(tmp_path, capsys):
    from plfusion.cli import export_main
    out = tmp_path / "strict"
    # oneDNN sums in another order than dygraph: with zero tolerance the inference-engine check must fail
    status = export_main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--out", str(out),
                          "--atol", "0", "--rtol", "0", "--threads", "1"])
    assert status == 1
    assert "export check failed" in capsys.readouterr().err
    assert (out / "inference.json").exists() and not (out / DEPLOY_FILE).exists()
    ok = export_main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--out", str(out), "--threads", "1"])
    assert ok == 0
    assert (out / DEPLOY_FILE).exists()


def test_a_model_that_reshapes_with_the_batch_exports_with_a_fixed_batch(tmp_path):
    model = create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2, embed_dim=16,
                         depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], num_classes=5)
    with pytest.raises(DynamicBatchError, match="fix the batch with --batch-size N"):
        export_model(model, str(tmp_path / "dynamic"), threads=1)
    info = export_model(model, str(tmp_path / "fixed"), batch_size=2, threads=1)
    assert info["inputs"][0]["shape"] == [2, 3, 64, 64] and info["outputs"][0]["shape"] == [2, 5]
    assert info["check"]["batch"] == 2
    x = np.random.default_rng(6).standard_normal([2, 3, 64, 64]).astype(np.float32)
    model.eval()
    np.testing.assert_allclose(Predictor(str(tmp_path / "fixed"), threads=1).run([x])[0], _dygraph(model, [x])[0],
                               rtol=1e-4, atol=1e-4)


def test_latency_percentiles_interpolate_between_batches():
    from plfusion.utils.benchmark import latency_percentiles
    got = latency_percentiles([0.4, 0.1, 0.3, 0.2])
    assert got == pytest.approx({"p50": 0.25, "p90": 0.37, "p99": 0.397})


def test_an_exported_swin_runs_on_onednn_without_the_fc_pass_and_matches_dygraph(tmp_path):
    # paddle's oneDNN fc pass mis-flattens Swin's window batch; the predictor retries without that one pass
    paddle.seed(0)
    model = create_model("swin_tiny_patch4_window7_224", num_classes=10, embed_dim=24, depths=(2, 2, 2, 2),
                         num_heads=(2, 2, 4, 4))
    model.eval()
    prefix = export_model(model, str(tmp_path / "swin"), img_size=(224, 224), batch_size=2, threads=1)["prefix"]
    predictor, settings = create_paddle_predictor(prefix, threads=1)
    assert settings["onednn"] is True and settings["onednn_fc"] is False
    x = np.random.default_rng(3).standard_normal([2, 3, 224, 224]).astype(np.float32)
    np.testing.assert_allclose(run_paddle_predictor(predictor, [x])[0], _dygraph(model, [x])[0], rtol=1e-4, atol=1e-4)
