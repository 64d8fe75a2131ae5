"""Issue #7, data: bad dataset roots, list files, images and labels fail with the file (and line)
named, at construction when that is cheap (paths, list format, label ids in a list) and otherwise at
the first bad sample, for the segmentation (NYUDv2, SUN RGB-D) and classification (ImageNet list,
ImageFolder) readers. Samples before the bad one still read correctly.

test_data_rgbd.py and test_data_cls.py hold the per-reader details; this is the end-to-end sweep,
built through DATASETS as a config does, so the errors also carry the config key path.
"""
import logging
import os

import cv2
import numpy as np
import pytest

import plfusion.data  # noqa: F401  (registers the datasets)
from plfusion.data.image_io import DataError
from plfusion.registry import DATASETS, ConfigError

WHERE = "dataloader.train.dataset"
H, W = 8, 10

# per layout: dataset name, list file, (rgb, label, depth) folders and extensions, a valid stored label value
LAYOUTS = {
    "NYUDv2": ("train.txt", ("rgb", "masks", "depth"), (".png", ".png", ".png"), 39, 40),
    "SUNRGBD": ("train.txt", ("RGB", "labels", "Depth"), (".jpg", ".png", ".png"), 37, 38),
}


def _imwrite(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img)


def make_rgbd(root, name, n=3):
    """n valid samples in the dataset's layout; returns the list lines."""
    list_file, folders, exts, top, _ = LAYOUTS[name]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        rels = [f"{folder}/{i:04d}{ext}" for folder, ext in zip(folders, exts)]
        _imwrite(root / rels[0], rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        _imwrite(root / rels[1], rng.integers(0, top + 1, (H, W), dtype=np.uint8))
        _imwrite(root / rels[2], rng.integers(0, 256, (H, W), dtype=np.uint8))
        lines.append("\t".join(rels))
    (root / list_file).write_text("\n".join(lines) + "\n")
    return lines


def build(cfg):
    return DATASETS.build(cfg, where=WHERE)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_rgbd_root_list_and_line_errors_at_construction(tmp_path, name):
    list_file = LAYOUTS[name][0]
    with pytest.raises(FileNotFoundError, match=rf"^{WHERE}: {name}: dataset root '.*nowhere' is not a directory"):
        build({"name": name, "root": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match=rf"^{WHERE}: {name}: list file .*{list_file} not found"):
        build({"name": name, "root": str(tmp_path)})
    lines = make_rgbd(tmp_path, name)
    assert len(build({"name": name, "root": str(tmp_path)})) == 3          # the valid layout reads

    list_path = tmp_path / list_file
    bad_lines = {
        "two fields": (lines[:1] + ["\t".join(lines[1].split("\t")[:2])] + lines[2:],
                       DataError, rf"{list_file}:2: expected 3 TAB-separated fields rgb<TAB>label<TAB>depth, got 2"),
        "four fields": (lines[:2] + [lines[2] + "\textra.png"],
                        DataError, rf"{list_file}:3: expected 3 TAB-separated fields .* got 4"),
        "spaces": ([lines[0].replace("\t", " ")] + lines[1:], DataError, rf"{list_file}:1: .*not spaces"),
        "missing file": (lines[:1] + [lines[1].replace("0001", "0009")] + lines[2:],
                         FileNotFoundError, rf"{list_file}:2: rgb file .*0009\.\w+ not found"),
        "empty": ([""], DataError, rf"list file .*{list_file} has no samples"),
    }
    for label, (content, error, match) in bad_lines.items():
        list_path.write_text("\n".join(content) + "\n")
        with pytest.raises(error, match=rf"^{WHERE}: .*{match}"):
            build({"name": name, "root": str(tmp_path)})


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:40])          # a truncated image file


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("which", [0, 1, 2])
def test_unreadable_rgbd_image_fails_at_its_sample_naming_the_file(tmp_path, name, which):
    lines = make_rgbd(tmp_path, name)
    bad = tmp_path / lines[1].split("\t")[which]
    _corrupt(bad)
    ds = build({"name": name, "root": str(tmp_path)})     # existence is checked here; decoding is per sample
    inputs, label = ds[0]
    assert len(inputs) == 2 and label.shape == (H, W)
    with pytest.raises(DataError, match=rf"cannot decode image file \(corrupt or not an image\): {bad}$"):
        ds[1]
    ds[2]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_label_values_out_of_range_name_the_value_and_file(tmp_path, name):
    lines = make_rgbd(tmp_path, name)
    first_bad = LAYOUTS[name][4] + (0 if name == "NYUDv2" else 1)    # 40 for NYUDv2; 39 (1-based) for SUN
    label_path = tmp_path / lines[2].split("\t")[1]
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[0, :3] = [first_bad, first_bad + 5, 200]
    _imwrite(label_path, label)
    ds = build({"name": name, "root": str(tmp_path)})
    ds[0], ds[1]
    with pytest.raises(DataError) as info:
        ds[2]
    message = str(info.value)
    assert f"[{first_bad}, {first_bad + 5}, 200]" in message and str(label_path) in message, message
    # a smaller num_classes moves the bound: the same files fail sooner
    small = build({"name": name, "root": str(tmp_path), "num_classes": 5})
    with pytest.raises(DataError, match=str(tmp_path / lines[0].split("\t")[1])):
        small[0]


def test_rgbd_config_values(tmp_path, caplog):
    make_rgbd(tmp_path, "NYUDv2")
    cases = [({"num_classes": "ten"}, f"{WHERE}.num_classes: expected an int, got 'ten'"),
             ({"num_classes": 0}, f"{WHERE}: NYUDv2: num_classes must be a positive int, got 0"),
             ({"ignore_index": 3}, f"{WHERE}: NYUDv2: ignore_index=3 collides with a class id"),
             ({"aug_seed": -1}, f"{WHERE}: NYUDv2: aug_seed must be an int >= 0 or null, got -1"),
             ({"depth_scale": 0}, f"{WHERE}: NYUDv2: depth_scale must be positive or None, got 0"),
             ({"root": 5}, f"{WHERE}: NYUDv2: root must be a directory path, got 5"),
             ({"modalities": ["rgb", "hha"]}, f"{WHERE}: NYUDv2: unknown modality 'hha'"),
             ({"split": "tarin"}, f"{WHERE}: NYUDv2: split must be one of")]
    for extra, expected in cases:
        with pytest.raises(ConfigError) as info:
            build({"name": "NYUDv2", "root": str(tmp_path), **extra})
        assert str(info.value).startswith(expected), str(info.value)
    # a num_classes that does not match the 40 class names is allowed, but not silently
    with caplog.at_level(logging.WARNING):
        ds = build({"name": "NYUDv2", "root": str(tmp_path), "num_classes": 41, "modalities": "rgb"})
    assert ds.class_names[0] == "class_0" and "num_classes=41 but there are 40 class names" in caplog.text


# --------------------------------------------------------------------------- classification

def _write_cls_images(root, rels):
    for i, rel in enumerate(rels):
        _imwrite(root / rel, np.full((H, W, 3), 20 * i, np.uint8))


def test_imagenet_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^{WHERE}: ImageNet.root: dataset directory not found"):
        build({"name": "ImageNet", "root": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match=rf"^{WHERE}: ImageNet: list file for split 'train' not found"):
        build({"name": "ImageNet", "root": str(tmp_path)})
    rels = ["train/a/0.png", "train/a/1.png", "train/b/2.png"]
    _write_cls_images(tmp_path, rels)
    good = [f"{rels[0]} 0", f"{rels[1]} 0", f"{rels[2]} 1"]
    cases = [(good[:1] + [rels[1]] + good[2:], r"train_list.txt:2: expected 'relative/path label'"),
             (good[:1] + [f"{rels[1]} 0 extra"] + good[2:], r"train_list.txt:2: expected 'relative/path label'"),
             (good[:2] + [f"{rels[2]} one"], r"train_list.txt:3: label 'one' is not an integer"),
             (good[:2] + [f"{rels[2]} -1"], r"train_list.txt:3: label -1 is outside \[0, 1\)")]
    for lines, match in cases:
        (tmp_path / "train_list.txt").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=rf"^{WHERE}: .*{match}"):
            build({"name": "ImageNet", "root": str(tmp_path)})
    (tmp_path / "train_list.txt").write_text("\n".join(good) + "\n")
    with pytest.raises(DataError, match=r"train_list.txt:3: label 1 is outside \[0, 1\)"):
        build({"name": "ImageNet", "root": str(tmp_path), "num_classes": 1})
    with pytest.raises(ConfigError, match=rf"^{WHERE}: ImageNet.num_classes: expected a positive int, got .2."):
        build({"name": "ImageNet", "root": str(tmp_path), "num_classes": "2"})
    _corrupt(tmp_path / rels[1])
    ds = build({"name": "ImageNet", "root": str(tmp_path)})
    image, label = ds[0]
    assert image.shape == (3, H, W) and label == 0
    with pytest.raises(DataError, match=rf"{tmp_path / rels[1]}$"):
        ds[1]
    assert ds[2][1] == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^{WHERE}: ImageFolder.root: image folder not found"):
        build({"name": "ImageFolder", "root": str(tmp_path / "nowhere")})
    rels = ["cat/0.png", "cat/1.png", "dog/2.png"]
    _write_cls_images(tmp_path, rels)
    with pytest.raises(ConfigError, match=rf"^{WHERE}: ImageFolder.extensions: expected a file extension"):
        build({"name": "ImageFolder", "root": str(tmp_path), "extensions": [".png", 3]})
    _corrupt(tmp_path / rels[1])
    ds = build({"name": "ImageFolder", "root": str(tmp_path), "extensions": ".png"})
    assert ds.class_names == ["cat", "dog"] and ds[0][1] == 0
    with pytest.raises(DataError, match=rf"{tmp_path / rels[1]}$"):
        ds[1]
    assert ds[2][1] == 1
    (tmp_path / "bird").mkdir()
    with pytest.raises(DataError, match=r"no images with extensions \['.png'\] in class folder\(s\) \['bird'\]"):
        build({"name": "ImageFolder", "root": str(tmp_path), "extensions": ".png"})
