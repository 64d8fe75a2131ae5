"""The RGB-D quickstart: the demo config trains (shrunk) and leaves a checkpoint, VisualDL logs and
prediction pictures whose tiles are the sample's own RGB and labels (single-modality runs: the last
output blended into grey depth); evaluation writes them too; the quickstart table tool reads
finished runs; the notebook runs headless."""
import json
import os

import cv2
import numpy as np
import paddle
import pytest

from plfusion.config import get_config
from plfusion.data.loader import build_dataloader, build_dataset
from plfusion.engine.cli import train_main
from plfusion.engine.predictions import display_inputs, save_predictions
from plfusion.engine.trainer import validate_eval_options
from plfusion.registry import ConfigError
from plfusion.utils.visualize import colorize, overlay
from conftest import run_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "quickstart", "geminifusion_mit_b0_synthetic.yaml")
H, W = 32, 48
TINY = [f"dataloader.train.dataset.image_size=[{H},{W}]", f"dataloader.val.dataset.image_size=[{H},{W}]",
        "dataloader.train.dataset.num_samples=16", "dataloader.val.dataset.num_samples=6",
        "dataloader.val.sampler.batch_size=4", "model.head.embed_dim=32", "eval.save_predictions=5"]


def overrides(output_dir, extra=()):
    return [x for item in TINY + [f"output_dir={output_dir}"] + list(extra) for x in ("-o", item)]


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "run")
    assert train_main(["-c", DEMO, "--max-steps", "2", "--threads", "2"] + overrides(out)) == 0
    return out


def test_demo_trains_and_writes_checkpoint_logs_and_predictions(demo_run):
    out = demo_run
    ckpts = os.listdir(os.path.join(out, "checkpoints"))
    assert "iter_0000002.pdparams" in ckpts and "best.pdparams" in ckpts
    assert any(name.startswith("vdlrecords") for name in os.listdir(os.path.join(out, "vdl")))
    rows = [json.loads(line) for line in open(os.path.join(out, "scalars.jsonl"))]
    evals = [r for r in rows if "eval/miou" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert {"eval/miou_rgb", "eval/miou_depth", "eval/miou_ensemble"} <= set(evals[0])
    # 5 asked for, from 2 val batches of 4: the first 5 samples, in order
    assert sorted(os.listdir(os.path.join(out, "predictions"))) == [f"val_{i:04d}.png" for i in range(5)]


def test_prediction_picture_tiles_are_the_sample(demo_run):
    """RGB | depth | ground truth | prediction, each enlarged to >= 180 px wide, under a 24 px caption strip."""
    cfg = get_config(DEMO, [f"output_dir={demo_run}"] + TINY)
    dataset = build_dataset(cfg.dataloader.val.dataset)
    inputs, label = dataset[1]
    sheet = read_rgb(os.path.join(demo_run, "predictions", "val_0001.png"))
    f = -(-180 // W)   # whole enlargement factor
    th, tw, gap, strip = H * f, W * f, 4, 24
    assert sheet.shape[1] == 4 * tw + 3 * gap and sheet.shape[0] > strip + th   # + the legend below

    def tile(i):
        return sheet[strip:strip + th, i * (tw + gap):i * (tw + gap) + tw]

    def big(img):
        return cv2.resize(img, (tw, th), interpolation=cv2.INTER_NEAREST)

    shown = display_inputs(dataset, inputs)
    np.testing.assert_array_equal(tile(0), big(shown["rgb"]))
    np.testing.assert_array_equal(tile(1), big(shown["depth"]))
    np.testing.assert_array_equal(tile(2), big(colorize(label, dataset.palette)))
    # un-normalising gives back the generated RGB (to rounding)
    rgb_u8, _, _ = dataset.generate(1)
    assert np.abs(shown["rgb"].astype(int) - rgb_u8.astype(int)).max() <= 1
    # the prediction tile is the RGB with class colours blended in: it differs from the RGB tile
    assert not np.array_equal(tile(3), tile(0))


class _FixedLogits(paddle.nn.Layer):
    """A stand-in fused model: [class 1 everywhere, class 0 everywhere] at 1/4 resolution."""

    def forward(self, inputs):
        x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        b, _, h, w = x.shape
        one = paddle.zeros([b, 6, h // 4, w // 4]).index_fill(paddle.to_tensor([1]), 1, 5.0)
        zero = paddle.zeros([b, 6, h // 4, w // 4]).index_fill(paddle.to_tensor([0]), 1, 5.0)
        return [one, zero]


def test_depth_only_pictures_blend_the_last_output_into_grey_depth(tmp_path):
    loader = build_dataloader({"dataset": {"name": "SyntheticRGBD", "num_samples": 3, "image_size": [H, W],
                                           "split": "val", "modalities": ["depth"]},
                               "sampler": {"batch_size": 2}}, "val", seed=0)
    model = _FixedLogits()
    model.train()
    paths = save_predictions(model, loader, 3, str(tmp_path / "pics"))
    assert [os.path.basename(p) for p in paths] == ["val_0000.png", "val_0001.png", "val_0002.png"]
    assert model.training                        # put back the way it was found
    sheet = read_rgb(paths[2])
    f = -(-180 // W)
    th, tw, gap, strip = H * f, W * f, 4, 24
    assert sheet.shape[1] == 3 * tw + 2 * gap    # depth | ground truth | prediction
    inputs, label = loader.dataset[2]
    depth = display_inputs(loader.dataset, inputs)["depth"]
    grey = cv2.cvtColor(cv2.cvtColor(depth, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    expected = overlay(grey, np.zeros((H, W), np.int64), loader.dataset.palette, 0.6)   # all "wall"
    tile = sheet[strip:strip + th, 2 * (tw + gap):2 * (tw + gap) + tw]
    np.testing.assert_array_equal(tile, cv2.resize(expected, (tw, th), interpolation=cv2.INTER_NEAREST))
    assert save_predictions(model, loader, 0, str(tmp_path / "none")) == []


def test_evaluation_writes_predictions_too(demo_run, tmp_path):
    out = str(tmp_path / "eval")
    args = ["-c", DEMO, "--eval", "--resume", demo_run, "--threads", "2"] + overrides(out, ["eval.save_predictions=2"])
    assert train_main(args) == 0
    assert sorted(os.listdir(os.path.join(out, "predictions"))) == ["val_0000.png", "val_0001.png"]
    results = json.load(open(os.path.join(out, "eval_results.json")))
    train_eval = [json.loads(line) for line in open(os.path.join(demo_run, "scalars.jsonl"))
                  if "eval/miou" in line][-1]
    assert results["metrics"]["miou"] == pytest.approx(train_eval["eval/miou"])   # same weights, same data


def test_save_predictions_option_is_checked():
    assert validate_eval_options({}) == {"save_predictions": 0}
    assert validate_eval_options({"eval": {"save_predictions": 3}}) == {"save_predictions": 3}
    with pytest.raises(ConfigError, match=r"eval\.save_predictions: expected an integer >= 0, got -1"):
        validate_eval_options({"eval": {"save_predictions": -1}})
    with pytest.raises(ConfigError, match=r"eval\.save_prediction: unknown key.*save_predictions"):
        validate_eval_options({"eval": {"save_prediction": 3}})


def test_quickstart_table_reads_finished_runs(demo_run, tmp_path, capsys):
    import tools.quickstart_table as table
    root = tmp_path / "runs"
    root.mkdir()
    for _, _, config in table.RUNS:   # the demo run stands in for all four
        os.symlink(demo_run, root / os.path.splitext(os.path.basename(config))[0])
    rows = table.main(["--reuse", "--output-root", str(root)])
    text = capsys.readouterr().out.strip().splitlines()
    assert text[0].startswith("| model | inputs | mIoU | pixel acc | IoU box | IoU poster | IoU red_object |")
    assert len(text) == 2 + 4 and text[2].startswith("| GeminiFusion | RGB + depth |")
    metrics = rows[0]["metrics"]
    box = metrics["per_class_iou"][2]
    assert text[2].split("|")[3].strip() == f"{metrics['miou']:.1f}" and text[2].split("|")[5].strip() == f"{box:.1f}"
    assert rows[0]["steps"] == 2
    with pytest.raises(SystemExit, match="no finished run"):
        table.main(["--reuse", "--output-root", str(tmp_path / "empty")])


def test_notebook_runs(tmp_path):
    _, text, images = run_notebook("rgbd_fusion.ipynb",
                                   {"PLFUSION_NB_FAST": "1", "PLFUSION_NB_OUTPUT": str(tmp_path / "nb")})
    assert "fast=True" in text and "after 3 updates: mIoU" in text and "mIoU per output: rgb" in text
    assert "resolved config" not in text
    for name in ("wall", "floor", "box", "poster", "red_object", "blue_object"):
        assert f"  {name}" in text
    assert len(images) == 3   # a training scene, one prediction picture, the ToMe merge groups
    assert "ToMe ratio 0.0: mIoU" in text and "ToMe ratio 0.75: mIoU" in text
    assert os.listdir(tmp_path / "nb" / "notebook_predictions") == ["val_0000.png"]
    assert "iter_0000003.pdparams" in os.listdir(tmp_path / "nb" / "checkpoints")
