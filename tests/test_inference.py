"""plfusion.inference and tools/infer.py: the Predictor serves an export with the same pre- and post-processing as
the dygraph path, on a synthetic RGB-D sample and a classifier; GPU and deploy-file errors; visualisation numbers."""
import os
import sys

import cv2
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from conftest import ROOT
from plfusion.config import get_config
from plfusion.data.cls_transforms import Normalize, ResizeCenterCrop, ToCHW
from plfusion.data.synthetic_rgbd import SyntheticRGBD
from plfusion.export import deploy_info, export_model
from plfusion.inference import DeployError, DygraphPredictor, Predictor, load_deploy, upsample_argmax
from plfusion.models import build_model
from plfusion.utils.visualize import colorize, depth_to_rgb, overlay, panel

sys.path.insert(0, os.path.join(ROOT, "tools"))
import infer as infer_tool  # noqa: E402

SEG_CONFIG = """
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
      image_size: [60, 80]
      split: val
      transforms:
        - {name: Resize, size: [64, 64]}
        - {name: Normalize}
        - {name: ToCHW}
infer: {cpu_threads: 1}
"""

CLS_CONFIG = """
model:
  name: Classifier
  architecture: {name: vit_tiny_patch16_224, img_size: 32, patch_size: 8, depth: 2, num_classes: 0}
  head: {name: LinearClsHead, in_channels: 192, num_classes: 10}
dataloader:
  val:
    dataset: {name: SyntheticImageNet, num_samples: 4, image_size: 32, num_classes: 10}
"""


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """A GeminiFusion MiT-B0 with a checkpoint, its export, and one synthetic RGB-D sample on disk."""
    tmp = tmp_path_factory.mktemp("seg")
    cfg_path = tmp / "gf.yaml"
    cfg_path.write_text(SEG_CONFIG)
    cfg = get_config(str(cfg_path))
    paddle.seed(1)
    model = build_model(cfg.model)
    ckpt = str(tmp / "gf.pdparams")
    paddle.save(model.state_dict(), ckpt)
    export_model(model, str(tmp / "export"), cfg)
    SyntheticRGBD(num_samples=1, image_size=(60, 80), split="val").export(str(tmp / "data"))
    data = tmp / "data"
    return {"cfg": str(cfg_path), "ckpt": ckpt, "model_dir": str(tmp / "export"), "tmp": tmp,
            "rgb": str(data / "rgb" / "val_000000.png"), "depth": str(data / "depth" / "val_000000.png")}


def test_preprocess_is_the_datasets_val_pipeline(seg):
    predictor = Predictor(seg["model_dir"])
    assert predictor.settings["threads"] == 1          # infer.cpu_threads of the config, kept in deploy.yaml
    ds = SyntheticRGBD(num_samples=1, image_size=(60, 80), split="val",
                       transforms=get_config(seg["cfg"]).dataloader.val.dataset.transforms)
    rgb, depth, _ = ds.generate(0)
    inputs = predictor.preprocess({"depth": depth, "rgb": rgb})
    expected, _ = ds[0]
    assert [x.shape for x in inputs] == [(1, 3, 64, 64)] * 2
    for got, want in zip(inputs, expected):
        np.testing.assert_array_equal(got[0], want)


def test_infer_tool_dygraph_and_inference_predict_the_same_labels(seg, capsys):
    common = ["--rgb", seg["rgb"], "--depth", seg["depth"]]
    out_dy, out_inf = str(seg["tmp"] / "dy.png"), str(seg["tmp"] / "inf.png")
    dy = infer_tool.main(["-c", seg["cfg"], "--checkpoint", seg["ckpt"], "--out", out_dy,
                          "--panel", str(seg["tmp"] / "panel.png")] + common)
    inf = infer_tool.main(["--engine", "inference", "--model-dir", seg["model_dir"], "--out", out_inf] + common)
    printed = capsys.readouterr().out
    assert "(60x80, dygraph)" in printed and "(60x80, inference)" in printed
    np.testing.assert_allclose(inf["logits"], dy["logits"], rtol=1e-4, atol=1e-4)
    # identical labels wherever the two best classes are not tied within float noise
    up = F.interpolate(paddle.to_tensor(dy["logits"][None]), size=[60, 80], mode="bilinear").numpy()[0]
    top2 = np.sort(up, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3
    assert dy["label"].shape == (60, 80) and clear.mean() > 0.95
    np.testing.assert_array_equal(inf["label"][clear], dy["label"][clear])
    assert len(np.unique(dy["label"])) > 1
    # the overlay: half image, half palette colour, at the input size
    rgb = cv2.cvtColor(cv2.imread(seg["rgb"]), cv2.COLOR_BGR2RGB)
    written = cv2.cvtColor(cv2.imread(out_dy), cv2.COLOR_BGR2RGB)
    palette = load_deploy(seg["model_dir"])["palette"]
    want = np.rint(0.5 * rgb.astype(np.float32) + 0.5 * np.asarray(palette, np.float32)[dy["label"]])
    np.testing.assert_array_equal(written, want.astype(np.uint8))
    assert cv2.imread(str(seg["tmp"] / "panel.png")).shape == (60 + 24, 4 * 80 + 3 * 4, 3)


def test_dygraph_predictor_needs_the_same_deploy_info_as_the_export(seg):
    cfg = get_config(seg["cfg"])
    model = build_model(cfg.model)
    model.load_pretrained(seg["ckpt"], strict=True)
    info = deploy_info(model, cfg)
    exported = load_deploy(seg["model_dir"])
    for key in ("task", "preprocess", "num_classes", "class_names", "palette", "prediction_output"):
        assert info[key] == exported[key], key
    assert [i["name"] for i in info["inputs"]] == [i["name"] for i in exported["inputs"]]
    pred = DygraphPredictor(model, info)
    assert pred.modalities == ["rgb", "depth"]


def test_classifier_top5_is_the_same_for_both_engines(tmp_path, capsys):
    cfg_path = tmp_path / "cls.yaml"
    cfg_path.write_text(CLS_CONFIG)
    cfg = get_config(str(cfg_path))
    model = build_model(cfg.model)
    ckpt = str(tmp_path / "cls.pdparams")
    paddle.save(model.state_dict(), ckpt)
    export_model(model, str(tmp_path / "export"), cfg, threads=1)
    img = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    dy = infer_tool.main(["-c", str(cfg_path), "--checkpoint", ckpt, "--image", path])
    inf = infer_tool.main(["--model-dir", str(tmp_path / "export"), "--image", path, "--threads", "1"])
    printed = capsys.readouterr().out
    assert [t[0] for t in dy["topk"]] == [t[0] for t in inf["topk"]] and len(dy["topk"]) == 5
    assert "  1. " in printed and "(class " in printed
    np.testing.assert_allclose(inf["probs"], dy["probs"], atol=1e-5)
    # the input is the image resized (short side) and centre-cropped to 32, then ImageNet-normalised
    x = ToCHW()(Normalize()(ResizeCenterCrop(32, crop_ratio=1.0)(img)))
    model.eval()
    with paddle.no_grad():
        logits = model(paddle.to_tensor(x[None])).numpy()[0]
    np.testing.assert_allclose(dy["logits"], logits, rtol=1e-6, atol=1e-6)
    assert [t[0] for t in dy["topk"]] == np.argsort(-logits)[:5].tolist()


def test_gpu_requests_fail_clearly_without_cuda(seg):
    if paddle.is_compiled_with_cuda():
        pytest.skip("this paddle has CUDA; the GPU path is checked by test_gpu_tensorrt_fp16")
    with pytest.raises(RuntimeError, match="no CUDA support"):
        Predictor(seg["model_dir"], device="gpu", tensorrt=True, precision="fp16")
    with pytest.raises(ValueError, match="precision 'fp16' is for the GPU"):
        Predictor(seg["model_dir"], precision="fp16")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu'"):
        Predictor(seg["model_dir"], device="tpu")


@pytest.mark.gpu
def test_gpu_tensorrt_fp16(seg):
    cpu = Predictor(seg["model_dir"])
    gpu = Predictor(seg["model_dir"], device="gpu", tensorrt=True, precision="fp16", max_batch_size=2)
    xs = [np.random.default_rng(5).standard_normal([1, 3, 64, 64]).astype(np.float32) for _ in range(2)]
    np.testing.assert_allclose(gpu.run(xs)[-1], cpu.run(xs)[-1], atol=5e-2, rtol=5e-2)


def test_a_directory_without_deploy_file_is_refused(tmp_path):
    with pytest.raises(DeployError, match="no deploy.yaml; export the model with plfusion-export"):
        Predictor(str(tmp_path))
    (tmp_path / "deploy.yaml").write_text("format: something-else\n")
    with pytest.raises(DeployError, match="not a plfusion deploy file"):
        load_deploy(str(tmp_path))


def test_upsample_argmax_is_bilinear_with_half_pixel_centres():
    # class 1 grows linearly left to right; class 0 is flat at 0.5: the boundary sits where 1 crosses 0.5
    logits = np.zeros([1, 2, 1, 2], np.float32)
    logits[0, 0] = 0.5
    logits[0, 1, 0] = [0.0, 1.0]
    label = upsample_argmax(logits, (1, 8))
    # align_corners=False: x_src = (x + 0.5) / 4 - 0.5 -> values 0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1
    np.testing.assert_array_equal(label[0, 0], [0, 0, 0, 0, 1, 1, 1, 1])


def test_visualisation_numbers():
    palette = [[255, 0, 0], [0, 0, 255]]
    label = np.array([[0, 1], [255, 7]])
    np.testing.assert_array_equal(colorize(label, palette), [[[255, 0, 0], [0, 0, 255]], [[0, 0, 0], [0, 0, 0]]])
    img = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(img, label, palette, alpha=0.25)
    np.testing.assert_array_equal(out[0, 0], [139, 75, 75])     # 0.75 * 100 + 0.25 * 255 = 138.75
    np.testing.assert_array_equal(out[1], img[1])               # ignored / unknown classes keep the image
    depth = np.array([[0.0, 0.2], [0.6, 1.0]], np.float32)
    vis = depth_to_rgb(depth)
    assert tuple(vis[0, 0]) == (0, 0, 0) and tuple(vis[0, 1]) != tuple(vis[1, 1])   # a hole is black
    sheet = panel([img, np.zeros((3, 4, 3), np.uint8)], ["a", "b"], gap=2, caption_height=10)
    assert sheet.shape == (13, 2 + 2 + 4, 3)
    np.testing.assert_array_equal(sheet[10:12, :2], img)
    with pytest.raises(ValueError, match="label is 1x2 but the image is 2x2"):
        overlay(img, label[:1], palette)


def test_cpu_defaults_ask_mkl_for_avx2_kernels_only_on_amd(monkeypatch):
    from plfusion.utils import cpu
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu.prefer_mkl_avx2() is False and "MKL_DEBUG_CPU_TYPE" not in os.environ
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu.prefer_mkl_avx2() is True and os.environ["MKL_DEBUG_CPU_TYPE"] == "5"
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "4")          # the user's own choice stays
    assert cpu.prefer_mkl_avx2() is False and os.environ["MKL_DEBUG_CPU_TYPE"] == "4"
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        cpu.configure_cpu(0)


def test_a_paddle_inference_run_gives_dygraph_its_threads_back(seg, monkeypatch):
    # Paddle Inference's run() leaves the math library on one thread; dygraph afterwards ran ~1.8x slower
    import glob

    from plfusion.inference import create_paddle_predictor, run_paddle_predictor
    prefix = glob.glob(os.path.join(seg["model_dir"], "*.json"))[0][:-len(".json")]
    predictor, _ = create_paddle_predictor(prefix, threads=2)     # also the process's count (configure_cpu)
    calls = []
    monkeypatch.setattr(paddle.base.core, "set_num_threads", lambda n: calls.append(n))
    run_paddle_predictor(predictor, [np.zeros([1, 3, 64, 64], np.float32) for _ in predictor.get_input_names()])
    assert calls == [2]
