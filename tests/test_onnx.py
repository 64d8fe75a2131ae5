"""ONNX export (paddle2onnx) and the onnxruntime engine: a tiny classifier and a tiny GeminiFusion MiT segmentor
match dygraph through onnxruntime, the Predictor and tools/infer.py give the paddle engine's predictions, the
benchmark measures the onnxruntime row, and failures (a mismatch, an unconvertible graph, a missing package) are
one clear message."""
import json
import os
import shutil
import sys

import numpy as np
import paddle
import pytest
import yaml

from conftest import ROOT
from plfusion.config import get_config
from plfusion.data.synthetic_rgbd import SyntheticRGBD
from plfusion.export import ExportMismatchError, export_model, main as export_cli, verify_export
from plfusion.inference import DEPLOY_FILE, DeployError, Predictor, run_in_fixed_batches
from plfusion.models import build_model
from plfusion.onnx_engine import ONNX_FILE, MissingPackageError

sys.path.insert(0, os.path.join(ROOT, "tools"))
import infer as infer_tool  # noqa: E402

from test_inference import CLS_CONFIG, SEG_CONFIG  # noqa: E402  (the same tiny models)



def _dygraph(model, xs):
    model.eval()
    with paddle.no_grad():
        out = model([paddle.to_tensor(x) for x in xs] if len(xs) > 1 else paddle.to_tensor(xs[0]))
    return [t.numpy() for t in (out if isinstance(out, list) else [out])]


def _randn(seed, shape, n=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """A tiny ViT classifier exported with --onnx through the command line (its dynamic batch converts)."""
    tmp = tmp_path_factory.mktemp("onnx_cls")
    cfg_path = tmp / "cls.yaml"
    cfg_path.write_text(CLS_CONFIG)
    paddle.seed(3)
    model = build_model(get_config(str(cfg_path)).model)
    ckpt = str(tmp / "cls.pdparams")
    paddle.save(model.state_dict(), ckpt)
    export_cli(["-c", str(cfg_path), "--pretrained", ckpt, "--out", str(tmp / "export"), "--onnx", "--threads", "1"])
    return {"model": model, "cfg": str(cfg_path), "ckpt": ckpt, "dir": str(tmp / "export"), "tmp": tmp}


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """A tiny GeminiFusion MiT-B0 exported with onnx=True: its dynamic batch does not convert."""
    tmp = tmp_path_factory.mktemp("onnx_seg")
    cfg_path = tmp / "gf.yaml"
    cfg_path.write_text(SEG_CONFIG)
    cfg = get_config(str(cfg_path))
    paddle.seed(1)
    model = build_model(cfg.model)
    info = export_model(model, str(tmp / "export"), cfg, threads=1, onnx=True)
    SyntheticRGBD(num_samples=1, image_size=(60, 80), split="val").export(str(tmp / "data"))
    data = tmp / "data"
    return {"model": model, "dir": str(tmp / "export"), "info": info, "tmp": tmp,
            "rgb": str(data / "rgb" / "val_000000.png"), "depth": str(data / "depth" / "val_000000.png")}


def test_classifier_onnx_matches_dygraph_and_the_paddle_engine(cls):
    deploy = yaml.safe_load(open(os.path.join(cls["dir"], DEPLOY_FILE)))
    onnx = deploy["onnx"]
    assert onnx["model_file"] == ONNX_FILE and os.path.isfile(os.path.join(cls["dir"], ONNX_FILE))
    assert onnx["batch"] == -1 and onnx["inputs"] == [{"name": "image", "shape": [-1, 3, 32, 32]}]
    assert onnx["opset"] == 17 and "dynamic_batch_error" not in onnx
    assert deploy["check"]["max_abs_diff"]["onnxruntime"] < 1e-4
    x = _randn(5, [3, 3, 32, 32])
    expected = _dygraph(cls["model"], x)[0]
    ort = Predictor(cls["dir"], threads=1, engine="onnxruntime")
    assert ort.settings["engine"] == "onnxruntime" and ort.settings["threads"] == 1
    got = ort.run(x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0.05
    # end to end on an image: the same top-5 as Paddle Inference
    img = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    a = Predictor(cls["dir"], threads=1).predict(img)
    b = ort.predict(img)
    assert [t[0] for t in a["topk"]] == [t[0] for t in b["topk"]]
    np.testing.assert_allclose(b["probs"], a["probs"], atol=1e-5)


def test_segmentor_falls_back_to_a_fixed_onnx_batch_and_matches_dygraph(seg):
    onnx = seg["info"]["onnx"]
    assert "split" in onnx["dynamic_batch_error"]
    assert onnx["batch"] == 1 and [i["name"] for i in onnx["inputs"]] == ["rgb", "depth"]
    assert all(i["shape"] == [1, 3, 64, 64] for i in onnx["inputs"])
    assert seg["info"]["inputs"][0]["shape"] == [-1, 3, 64, 64]       # the Paddle model keeps its dynamic batch
    written = yaml.safe_load(open(os.path.join(seg["dir"], DEPLOY_FILE)))
    assert written["onnx"] == onnx and written["check"]["max_abs_diff"]["onnxruntime"] < 1e-4
    # a batch of 3 on a batch-1 graph: run in chunks, every output as dygraph's
    xs = _randn(7, [3, 3, 64, 64], 2)
    expected = _dygraph(seg["model"], xs)
    got = Predictor(seg["dir"], threads=1, engine="onnxruntime").run(xs)
    assert len(got) == 3
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected[2][0], expected[2][1], atol=1e-3)    # the samples differ: order is checked


def test_infer_tool_onnxruntime_gives_the_paddle_engines_label_map(seg, capsys):
    common = ["--model-dir", seg["dir"], "--rgb", seg["rgb"], "--depth", seg["depth"], "--threads", "1"]
    paddle_out = infer_tool.main(["--engine", "inference", "--out", str(seg["tmp"] / "p.png")] + common)
    ort_out = infer_tool.main(["--engine", "onnxruntime", "--out", str(seg["tmp"] / "o.png")] + common)
    assert "(60x80, onnxruntime)" in capsys.readouterr().out
    np.testing.assert_allclose(ort_out["logits"], paddle_out["logits"], rtol=1e-4, atol=1e-4)
    label_p, label_o = paddle_out["label"], ort_out["label"]
    assert label_o.shape == (60, 80) and len(np.unique(label_p)) > 1
    assert (label_o == label_p).mean() > 0.99     # pixels where two classes tie within float noise may differ


def test_an_onnx_mismatch_fails_the_export(cls, tmp_path, monkeypatch):
    from plfusion import onnx_export
    model = cls["model"]
    xs = _randn(4, [2, 3, 32, 32])
    expected = _dygraph(model, xs)
    prefix = os.path.join(cls["dir"], "inference")
    assert verify_export(expected, prefix, xs, engines=("onnxruntime",))["onnxruntime"] < 1e-4
    wrong = [expected[0].copy()]
    wrong[0][1, 3] += 1e-2
    with pytest.raises(ExportMismatchError, match="output 0 of the onnxruntime run differs from dygraph"):
        verify_export(wrong, prefix, xs, engines=("onnxruntime",))
    # a converted model that computes something else: the export stops before deploy.yaml
    real = onnx_export.run_onnx_session
    monkeypatch.setattr(onnx_export, "run_onnx_session", lambda s, inputs: [o + 1e-2 for o in real(s, inputs)])
    out = tmp_path / "bad"
    with pytest.raises(ExportMismatchError, match="onnxruntime"):
        export_model(model, str(out), get_config(cls["cfg"]), threads=1, onnx=True)
    assert (out / ONNX_FILE).exists() and not (out / DEPLOY_FILE).exists()


def test_a_fixed_onnx_batch_serves_any_batch(cls, tmp_path):
    model = cls["model"]
    info = export_model(model, str(tmp_path / "b2"), get_config(cls["cfg"]), threads=1, onnx=True, onnx_batch_size=2)
    assert info["onnx"]["batch"] == 2 and info["onnx"]["inputs"][0]["shape"] == [2, 3, 32, 32]
    assert info["inputs"][0]["shape"] == [-1, 3, 32, 32]
    pred = Predictor(str(tmp_path / "b2"), threads=1, engine="onnxruntime")
    for n in (1, 2, 5):    # padded, exact, two chunks and a padded one
        x = _randn(n, [n, 3, 32, 32])
        np.testing.assert_allclose(pred.run(x)[0], _dygraph(model, x)[0], rtol=1e-4, atol=1e-4)


def test_run_in_fixed_batches_chunks_pads_and_cuts_back():
    seen = []

    def run(inputs):
        seen.append(inputs[0].shape[0])
        return [inputs[0] * 2 + inputs[1], inputs[0].sum(axis=1)]

    a = np.arange(10, dtype=np.float32).reshape(5, 2)
    b = np.ones((5, 2), np.float32)
    out = run_in_fixed_batches(run, [a, b], 2)
    assert seen == [2, 2, 2]
    np.testing.assert_array_equal(out[0], a * 2 + 1)
    np.testing.assert_array_equal(out[1], a.sum(axis=1))
    seen.clear()
    assert run_in_fixed_batches(run, [a, b], -1)[0].shape == (5, 2) and seen == [5]


class IndexAdd(paddle.nn.Layer):
    """A tiny model with index_add, which paddle2onnx 2.1 has no converter for (ToMe's merge uses it)."""

    def __init__(self):
        super().__init__()
        self.proj = paddle.nn.Linear(3, 4)

    def forward(self, x):
        t = self.proj(x.flatten(2).transpose([0, 2, 1]))
        return paddle.index_add(paddle.zeros_like(t), paddle.to_tensor([0, 0, 1, 1]), 2, t)


def test_an_unconvertible_graph_is_one_error_naming_the_operator(tmp_path, monkeypatch, capsys):
    from plfusion import export as export_module
    from plfusion.cli import export_main
    from plfusion.onnx_export import OnnxExportError
    out = tmp_path / "index_add"
    with pytest.raises(OnnxExportError, match=r"cannot convert this model \(dynamic batch, opset 17\).*"
                                              r"\['index_add'\].*Serve it with the paddle engine"):
        export_model(IndexAdd(), str(out), img_size=4, threads=1, onnx=True)
    assert (out / "inference.json").exists() and not (out / ONNX_FILE).exists() and not (out / DEPLOY_FILE).exists()
    # the console script: that message on one line, exit status 1
    def fail(argv):
        raise OnnxExportError("paddle2onnx 2.1.0 cannot convert this model")
    monkeypatch.setattr(export_module, "main", fail)
    assert export_main([]) == 1
    assert capsys.readouterr().err == "error: ONNX export failed: paddle2onnx 2.1.0 cannot convert this model\n"


def test_a_missing_package_is_one_clear_message(cls, tmp_path, monkeypatch, capsys):
    from plfusion.cli import export_main
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingPackageError, match=r"needs the onnxruntime package, which is not installed; .*"
                                                  r"pip install -e '\.\[onnx\]'"):
        Predictor(cls["dir"], threads=1, engine="onnxruntime")
    assert infer_tool.run(["--engine", "onnxruntime", "--model-dir", cls["dir"], "--image", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the onnxruntime engine needs the onnxruntime package")
    # the export says so before it saves anything
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)
    out = tmp_path / "none"
    assert export_main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the ONNX export (--onnx) needs the paddle2onnx package, which is not installed; install "
                   "the ONNX extra: pip install -e '.[onnx]'"]
    assert not out.exists()


def test_engine_and_deploy_errors(cls, tmp_path):
    with pytest.raises(ValueError, match="engine must be one of"):
        Predictor(cls["dir"], engine="tensorflow")
    with pytest.raises(ValueError, match="runs fp32 on the CPU here"):
        Predictor(cls["dir"], engine="onnxruntime", device="gpu")
    plain = tmp_path / "plain"
    shutil.copytree(cls["dir"], plain)
    deploy = yaml.safe_load((plain / DEPLOY_FILE).read_text())
    del deploy["onnx"]
    (plain / DEPLOY_FILE).write_text(yaml.safe_dump(deploy))
    with pytest.raises(DeployError, match="exported without ONNX; export again with --onnx"):
        Predictor(str(plain), engine="onnxruntime")


def test_benchmark_measures_onnxruntime_beside_paddle_inference(tmp_path, capsys):
    from plfusion.benchmark_cli import main as bench
    out = tmp_path / "bench.json"
    result = bench(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--engine", "inference", "onnxruntime",
                    "--batch-size", "2", "--threads", "1", "--iters", "2", "--warmup", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "batch 2 | threads 1" in printed and "intra_op_num_threads 1, ONNX batch fixed at 2" in printed
    assert any(line.strip().startswith("onnxruntime ") for line in printed.splitlines())    # its table row
    rows = {row["setting"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["inference", "onnxruntime"]
    assert rows["onnxruntime"]["engine"] == "onnxruntime" and rows["onnxruntime"]["ips"] > 0
    assert rows["onnxruntime"]["p50"] <= rows["onnxruntime"]["p99"]
    assert result["onnxruntime"] and len(result["times_s"]["onnxruntime"]) == 2
