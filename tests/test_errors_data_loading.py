"""A sample that cannot be loaded during training ends the run with one clear last line (the loader
section, the dataset, the list line, the file), with and without loader workers, keeps the last
checkpoint, and `loader.skip_corrupt` instead skips a bounded number of such samples."""
import json
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from plfusion.data.image_io import DataError
from plfusion.data.loader import build_dataloader
from test_data_rgbd import make_nyu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_folder(root):
    for c in range(2):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(8):
            assert cv2.imwrite(str(d / f"{i}.jpg"), np.full((16, 16, 3), 40 + 100 * c, np.uint8))
    (root / "train" / "c1" / "5.jpg").write_text("this is text, not a JPEG")


def _cls_cfg(root, workers):
    return {"model": {"name": "Classifier",
                      "architecture": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4,
                                       "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0},
                      "head": {"name": "LinearClsHead", "in_channels": 16, "num_classes": 2}},
            "dataloader": {"train": {"dataset": {"name": "ImageFolder", "root": str(root), "split": "train"},
                                     "sampler": {"batch_size": 4}, "loader": {"num_workers": workers}}},
            "loss": {"name": "CrossEntropyLoss"}, "optimizer": {"name": "AdamW"},
            "lr_scheduler": {"name": "CosineWarmup", "learning_rate": 0.001},
            "iters": 8, "seed": 1, "output_dir": str(root / "out"), "train": {"log_interval": 1, "save_interval": 2}}


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_ends_training_with_one_line_and_keeps_the_checkpoint(tmp_path, workers):
    _image_folder(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_cls_cfg(tmp_path, workers)))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", str(cfg), "--threads", "1"],
                         capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    bad = str(tmp_path / "train" / "c1" / "5.jpg")
    assert last.startswith("error: dataloader.train.dataset: sample 13 of ImageFolder"), last
    assert bad in last and "cannot decode image file" in last, last
    assert "Blocking queue" not in res.stderr and "Traceback" not in res.stderr
    # sample 13 comes in the second epoch's data order: a checkpoint was written before it
    ckpt = tmp_path / "out" / "checkpoints"
    latest = json.loads((ckpt / "latest.json").read_text())["name"]
    assert latest.startswith("iter_") and (ckpt / f"{latest}.pdparams").is_file()


def _nyu_loader(root, workers, skip=0, batch_size=3):
    section = {"dataset": {"name": "NYUDv2", "root": str(root), "split": "train"},
               "sampler": {"batch_size": batch_size, "shuffle": False, "drop_last": False},
               "loader": {"num_workers": workers, "skip_corrupt": skip}}
    loader = build_dataloader(section, "train", seed=0)
    loader.set_epoch(0)
    return loader


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fault, expect", [
    ("corrupt_depth", "cannot decode image file (corrupt or not an image): {root}/depth/train000001.png"),
    ("missing_depth", "image file not found: {root}/depth/train000001.png"),
    ("wrong_label_size", "spatial sizes differ within one sample ({root}/train.txt:2)"),
])
def test_rgbd_faults_name_the_list_line_and_the_file(tmp_path, workers, fault, expect):
    make_nyu(tmp_path, n=3, lists=("train",))
    if fault == "corrupt_depth":
        (tmp_path / "depth" / "train000001.png").write_bytes(b"\x89PNG but truncated")
    elif fault == "missing_depth":
        loader = _nyu_loader(tmp_path, workers)        # the file vanishes after the list was checked
        os.remove(tmp_path / "depth" / "train000001.png")
    else:
        cv2.imwrite(str(tmp_path / "masks" / "train000001.png"), np.zeros((5, 7), np.uint8))
    if fault != "missing_depth":
        loader = _nyu_loader(tmp_path, workers)
    with pytest.raises(DataError) as info:
        list(loader)
    msg = str(info.value)
    assert msg.startswith(f"dataloader.train.dataset: sample 1 of NYUDv2 ({tmp_path}/train.txt:2 "), msg
    assert expect.format(root=tmp_path) in msg, msg


def test_skip_corrupt_replaces_bad_samples_logs_them_and_stops_past_the_limit(tmp_path, caplog):
    make_nyu(tmp_path, n=4, lists=("train",))
    (tmp_path / "rgb" / "train000002.png").write_text("not a png")
    with caplog.at_level(logging.WARNING, logger="plfusion"):
        batches = list(_nyu_loader(tmp_path, workers=0, skip=1, batch_size=2))
    assert [b[1].shape[0] for b in batches] == [2, 2]          # the batch keeps its size
    warnings = [r.getMessage() for r in caplog.records if "skipped a sample" in r.getMessage()]
    assert len(warnings) == 1 and "1 skipped so far" in warnings[0] and "train000002.png" in warnings[0]
    # sample 2 was replaced by sample 3, the next loadable one
    np.testing.assert_array_equal(batches[1][1][0].numpy(), batches[1][1][1].numpy())

    (tmp_path / "rgb" / "train000000.png").write_text("not a png either")
    with pytest.raises(DataError, match=r"dataloader.train.loader.skip_corrupt: 2 samples could not be loaded, "
                                        r"more than the 1 allowed; the last: .*train000002.png"):
        list(_nyu_loader(tmp_path, workers=2, skip=1, batch_size=2))
