import importlib
import importlib.util
import logging
import os

import cv2
import numpy as np
import paddle
import pytest

from plfusion.data.image_io import DataError
from plfusion.data.rgbd import NYUDv2, SUNRGBD, make_palette, read_depth
from plfusion.data.seg_transforms import (IMAGENET_MEAN, IMAGENET_STD, SEG_TRANSFORMS, ColorJitter, Compose,
                                          Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToCHW)
from plfusion.data.synthetic_rgbd import BLUE, BOX, POSTER, RED, WALL, SyntheticRGBD
from plfusion.registry import DATASETS, TRANSFORMS, ConfigError

H, W = 12, 16


# ----------------------------------------------------------------------------- folder builders
def _write(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), img)


def make_nyu(root, n=3, depth_dtype=np.uint16, seed=0, lists=("train", "val")):
    """TokenFusion NYUDv2 layout; returns the arrays written, per split."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in lists:
        lines, arrays = [], []
        for i in range(n):
            name = f"{split}{i:06d}.png"
            rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            top = 255 if depth_dtype == np.uint8 else 65535
            depth = rng.integers(0, top + 1, (H, W), dtype=depth_dtype)
            mask = rng.integers(0, 40, (H, W), dtype=np.uint8)
            mask[0, :4] = 255
            _write(root / "rgb" / name, rgb)
            _write(root / "depth" / name, depth)
            _write(root / "masks" / name, mask)
            lines.append(f"rgb/{name}\tmasks/{name}\tdepth/{name}")
            arrays.append((rgb, depth, mask))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        written[split] = arrays
    return written


def make_sun(root, n=2, seed=0):
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        lines, arrays = [], []
        for i in range(n):
            rgb = np.full((H, W, 3), 120, np.uint8)
            depth = rng.integers(0, 256, (H, W), dtype=np.uint8)
            label = rng.integers(0, 38, (H, W), dtype=np.uint8)  # 1-based, 0 = unlabelled
            label[0, 0], label[0, 1], label[0, 2] = 0, 1, 37
            _write(root / "RGB" / f"{split}_{i}.jpg", rgb)
            _write(root / "Depth" / f"{split}_{i}.png", depth)
            _write(root / "labels" / f"{split}_{i}.png", label)
            lines.append(f"RGB/{split}_{i}.jpg\tlabels/{split}_{i}.png\tDepth/{split}_{i}.png")
            arrays.append((rgb, depth, label))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        written[split] = arrays
    return written


# ----------------------------------------------------------------------------- readers
def test_nyudv2_reads_tokenfusion_layout(tmp_path):
    data = make_nyu(tmp_path)
    ds = NYUDv2(str(tmp_path), split="train")
    assert len(ds) == 3 and ds.num_classes == 40 and len(ds.class_names) == 40
    assert ds.class_names[0] == "wall" and ds.class_names[-1] == "otherprop"
    assert ds.palette.shape == (40, 3) and ds.palette.dtype == np.uint8
    inputs, label = ds[1]
    rgb, depth16, mask = data["train"][1]
    assert isinstance(inputs, list) and len(inputs) == 2
    assert all(x.dtype == np.float32 for x in inputs) and label.dtype == np.int64
    # default pipeline: RGB /255 then ImageNet mean/std; depth /65535 tiled to 3 channels
    expect_rgb = (rgb / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(inputs[0], expect_rgb.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_allclose(inputs[1], np.repeat((depth16 / 65535.0)[None], 3, 0), atol=1e-6)
    np.testing.assert_array_equal(label, mask)  # 0-based classes, 255 stays ignore
    assert (label[0, :4] == 255).all()


def test_nyudv2_splits_modality_order_and_8bit_depth(tmp_path):
    data = make_nyu(tmp_path, depth_dtype=np.uint8)
    ds = NYUDv2(str(tmp_path), split="test", modalities=("depth", "rgb"),
                transforms=[{"name": "Normalize", "stats": {"depth": {"channels": 1}}}])
    assert ds.split == "test" and len(ds) == 3
    inputs, label = ds[0]
    _, depth8, mask = data["val"][0]  # test = val.txt, as in TokenFusion
    assert inputs[0].shape == (1, H, W) and inputs[1].shape == (3, H, W)
    np.testing.assert_allclose(inputs[0][0], depth8 / 255.0, atol=1e-6)
    np.testing.assert_array_equal(label, mask)
    only_depth = NYUDv2(str(tmp_path), modalities=("depth",))
    assert len(only_depth[0][0]) == 1


def test_sunrgbd_labels_are_shifted_and_zero_ignored(tmp_path):
    data = make_sun(tmp_path)
    ds = SUNRGBD(str(tmp_path), split="test")
    assert ds.num_classes == 37 and ds.class_names[23] == "refrigerator" and len(ds) == 2
    inputs, label = ds[1]
    stored = data["test"][1][2].astype(np.int64)
    np.testing.assert_array_equal(label, np.where(stored == 0, 255, stored - 1))
    assert label[0, 0] == 255 and label[0, 1] == 0 and label[0, 2] == 36
    np.testing.assert_allclose(inputs[1][0], data["test"][1][1] / 255.0, atol=1e-6)
    assert abs(float(inputs[0].mean()) - float(((120 / 255 - np.array(IMAGENET_MEAN)) / IMAGENET_STD).mean())) < 0.05


def test_datasets_build_from_registry_and_batch_in_a_dataloader(tmp_path):
    make_nyu(tmp_path, n=4)
    ds = DATASETS.build({"name": "NYUDv2", "root": str(tmp_path), "split": "train", "aug_seed": 0,
                         "transforms": [{"name": "RandomResizedCrop", "crop_size": [8, 8]},
                                        {"name": "RandomHorizontalFlip"}, {"name": "Normalize"}]},
                        where="dataloader.train.dataset")
    loader = paddle.io.DataLoader(ds, batch_size=2, shuffle=False, num_workers=0)
    inputs, label = next(iter(loader))
    assert [tuple(x.shape) for x in inputs] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    assert tuple(label.shape) == (2, 8, 8) and label.dtype == paddle.int64


def test_custom_ignore_index_remaps_stored_255(tmp_path):
    data = make_nyu(tmp_path)
    stored = data["train"][0][2].astype(np.int64)
    _, label = NYUDv2(str(tmp_path), ignore_index=-1)[0]
    np.testing.assert_array_equal(label, np.where(stored == 255, -1, stored))
    # padding added by a crop is ignored too, not left as 255
    crop = [{"name": "RandomResizedCrop", "crop_size": [2 * H, 2 * W], "scale": [1.0, 1.0]}, {"name": "Normalize"}]
    _, label = NYUDv2(str(tmp_path), ignore_index=-1, transforms=crop)[0]
    assert (label[H:] == -1).all() and label.max() < 40


# ----------------------------------------------------------------------------- reader errors
def test_missing_root_and_list_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        NYUDv2(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="train.txt"):
        NYUDv2(str(tmp_path))
    make_sun(tmp_path)
    os.remove(tmp_path / "test.txt")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        SUNRGBD(str(tmp_path), split="test")
    with pytest.raises(ConfigError, match="split"):
        SUNRGBD(str(tmp_path), split="validation")


def test_bad_list_line_names_file_and_line(tmp_path):
    make_nyu(tmp_path)
    lines = (tmp_path / "train.txt").read_text().splitlines()
    lines[1] = "\t".join(lines[1].split("\t")[:2])
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.txt:2: expected 3 TAB-separated fields.* got 2"):
        NYUDv2(str(tmp_path))
    lines[1] = lines[0].replace("\t", " ")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="not spaces"):
        NYUDv2(str(tmp_path))


def test_missing_referenced_file_fails_at_construction(tmp_path):
    make_nyu(tmp_path)
    os.remove(tmp_path / "depth" / "train000002.png")
    with pytest.raises(FileNotFoundError, match=r"train.txt:3: depth file .*train000002.png"):
        NYUDv2(str(tmp_path))
    # a dataset that does not read depth does not need the file
    assert len(NYUDv2(str(tmp_path), modalities=("rgb",))) == 3


def test_size_mismatch_names_files_and_sizes(tmp_path):
    make_nyu(tmp_path)
    _write(tmp_path / "depth" / "train000001.png", np.zeros((H + 2, W), np.uint16))
    ds = NYUDv2(str(tmp_path))
    ds[0]
    with pytest.raises(DataError, match=rf"depth/train000001.png: {H + 2}x{W}.*masks/train000001.png: {H}x{W}"):
        ds[1]


def test_label_out_of_range_names_value_and_file(tmp_path):
    make_nyu(tmp_path)
    bad = np.zeros((H, W), np.uint8)
    bad[3, 3] = 40
    _write(tmp_path / "masks" / "train000000.png", bad)
    with pytest.raises(DataError, match=r"\[40\] in .*masks/train000000.png"):
        NYUDv2(str(tmp_path))[0]
    make_sun(tmp_path / "sun")
    bad[3, 3] = 38  # 1-based: 37 is the last class
    _write(tmp_path / "sun" / "labels" / "train_1.png", bad)
    with pytest.raises(DataError, match=r"\[38\] in .*labels/train_1.png"):
        SUNRGBD(str(tmp_path / "sun"))[1]


def test_read_depth_channels_and_dtypes(tmp_path):
    same = np.repeat(np.arange(H * W, dtype=np.uint8).reshape(H, W)[..., None], 3, 2)
    _write(tmp_path / "d3.png", same)
    np.testing.assert_allclose(read_depth(str(tmp_path / "d3.png"))[..., 0], same[..., 0] / 255.0, atol=1e-7)
    diff = same.copy()
    diff[0, 0, 1] += 1
    _write(tmp_path / "d3bad.png", diff)
    with pytest.raises(DataError, match="d3bad.png"):
        read_depth(str(tmp_path / "d3bad.png"))
    _write(tmp_path / "d16.png", np.full((H, W), 5000, np.uint16))
    np.testing.assert_allclose(read_depth(str(tmp_path / "d16.png"), depth_scale=1e-4), 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------- transforms
def _block_sample(seed=0, h=48, w=64, block=8):
    """Label of random 8x8 blocks; rgb and depth encode the label, so alignment is checkable."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, 10, (h // block, w // block)), np.ones((block, block), int)).astype(np.uint8)
    rgb = np.repeat((label.astype(np.uint8) * 20 + 20)[..., None], 3, 2)
    depth = ((label.astype(np.float32) + 1) / 20.0)[..., None]
    return {"inputs": [rgb, depth], "modalities": ["rgb", "depth"], "label": label}


def test_crop_and_flip_keep_inputs_and_label_aligned():
    for seed in range(6):
        s = _block_sample()
        s["rng"] = np.random.default_rng(seed)
        out = Compose([RandomResizedCrop((24, 32), scale=(0.5, 2.0)), RandomHorizontalFlip(0.5)])(s)
        rgb, depth = out["inputs"]
        label = out["label"]
        assert rgb.shape == (24, 32, 3) and depth.shape == (24, 32, 1) and label.shape == (24, 32)
        assert rgb.dtype == np.uint8 and label.dtype == np.uint8
        padded = label == 255
        assert (rgb[padded] == 0).all() and (depth[padded] == 0).all()
        # Where the label is constant over a 3x3 window, the bilinear inputs sample only that
        # class, so they must decode to it exactly; a shifted or unflipped input would not.
        win = np.lib.stride_tricks.sliding_window_view(label, (3, 3))
        interior = np.zeros_like(padded)
        interior[1:-1, 1:-1] = (win == win[..., 1:2, 1:2]).all(axis=(-1, -2)) & (win[..., 1, 1] != 255)
        assert interior.mean() > 0.3
        np.testing.assert_array_equal(rgb[..., 0][interior], label[interior] * 20 + 20)
        np.testing.assert_allclose(depth[..., 0][interior], (label[interior] + 1) / 20.0, atol=1e-6)
        valid = ~padded
        assert (np.rint(rgb[..., 0].astype(float) / 20 - 1)[valid] == label[valid]).mean() > 0.75


def test_unit_scale_crop_and_flip_are_exact():
    s = _block_sample()
    ref_rgb, ref_label = s["inputs"][0].copy(), s["label"].copy()
    s["rng"] = np.random.default_rng(3)
    out = RandomResizedCrop((24, 32), scale=(1.0, 1.0))(s)
    lab = out["label"]
    # locate the crop window in the original and check every modality against it
    hits = [(t, l) for t in range(25) for l in range(33) if np.array_equal(ref_label[t:t + 24, l:l + 32], lab)
            and np.array_equal(ref_rgb[t:t + 24, l:l + 32], out["inputs"][0])]
    assert hits
    flipped = RandomHorizontalFlip(prob=1.0)(dict(out, inputs=list(out["inputs"])))
    np.testing.assert_array_equal(flipped["label"], lab[:, ::-1])
    np.testing.assert_array_equal(flipped["inputs"][1], out["inputs"][1][:, ::-1])
    kept = RandomHorizontalFlip(prob=0.0)(dict(out, inputs=list(out["inputs"])))
    np.testing.assert_array_equal(kept["label"], lab)


def test_crop_pads_small_images_and_relative_to_crop():
    s = _block_sample(h=16, w=16)
    s["rng"] = np.random.default_rng(0)
    out = RandomResizedCrop((32, 40), scale=(1.0, 1.0), pad_value={"rgb": [1, 2, 3]})(s)
    assert (out["label"][16:] == 255).all() and (out["label"][:, 16:] == 255).all()
    np.testing.assert_array_equal(out["inputs"][0][20, 30], [1, 2, 3])
    assert (out["inputs"][1][20:, :, 0] == 0).all()
    # relative_to="crop": short side first fitted to the crop's short side (16 -> 32)
    s = _block_sample(h=16, w=16)
    s["rng"] = np.random.default_rng(0)
    out = RandomResizedCrop((32, 40), scale=(1.0, 1.0), relative_to="crop")(s)
    assert (out["label"][:32, :32] != 255).all() and (out["label"][:, 32:] == 255).all()


def test_pipeline_is_deterministic_given_a_seed():
    pipe = Compose([{"name": "RandomResizedCrop", "crop_size": 20}, {"name": "RandomHorizontalFlip"},
                    {"name": "ColorJitter", "prob": 1.0}, {"name": "Normalize"}, {"name": "ToCHW"}])

    def run(seed):
        s = _block_sample(seed=1)
        s["inputs"][0] = np.random.default_rng(9).integers(0, 256, s["inputs"][0].shape, dtype=np.uint8)
        s["rng"] = np.random.default_rng(seed)
        return pipe(s)

    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a["inputs"] + [a["label"]], b["inputs"] + [b["label"]]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["inputs"][0], c["inputs"][0])
    # without a sample rng, a transform's own seed makes it reproducible
    t1, t2 = RandomResizedCrop(20, seed=3), RandomResizedCrop(20, seed=3)
    np.testing.assert_array_equal(t1(_block_sample())["label"], t2(_block_sample())["label"])


def test_dataset_augmentation_is_seeded_per_index_and_epoch():
    cfg = [{"name": "RandomResizedCrop", "crop_size": [32, 32]}, {"name": "ColorJitter", "prob": 1.0},
           {"name": "Normalize"}]
    a = SyntheticRGBD(num_samples=4, image_size=(48, 64), transforms=cfg, aug_seed=7)
    b = SyntheticRGBD(num_samples=4, image_size=(48, 64), transforms=cfg, aug_seed=7)
    np.testing.assert_array_equal(a[2][0][0], b[2][0][0])
    np.testing.assert_array_equal(a[2][1], b[2][1])
    b.set_epoch(1)
    assert not np.array_equal(a[2][0][0], b[2][0][0])


def test_color_jitter_stays_in_range_and_near_the_original():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    depth = rng.random((32, 32, 1)).astype(np.float32)
    jit = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, prob=1.0)
    for seed in range(20):
        for src in (img, img.astype(np.float32) / 255.0):
            s = {"inputs": [src.copy(), depth.copy()], "modalities": ["rgb", "depth"],
                 "label": np.zeros((32, 32), np.uint8), "rng": np.random.default_rng(seed)}
            out = jit(s)
            x = out["inputs"][0]
            assert x.dtype == src.dtype
            top = 255 if src.dtype == np.uint8 else 1.0
            assert x.min() >= 0 and x.max() <= top
            # contrast and saturation keep the mean; brightness moves it by at most 40 %
            ratio = x.mean() / src.mean()
            assert 0.55 < ratio < 1.45, ratio
            assert x.std() > 0.15 * src.std()  # all three factors >= 0.6: not blacked or whited out
            np.testing.assert_array_equal(out["inputs"][1], depth)  # depth untouched


def test_resize_normalize_tochw():
    s = _block_sample(h=16, w=24)
    label_before = s["label"].copy()
    out = Resize((8, 12))(s)
    assert out["inputs"][0].shape == (8, 12, 3) and out["label"].shape == (8, 12)
    # centre-aligned nearest: output pixel j samples input pixel 2j + 1
    np.testing.assert_array_equal(out["label"], label_before[1::2, 1::2])
    depth = out["inputs"][1].copy()
    rgb = out["inputs"][0].copy()
    out = Normalize({"depth": {"mean": 0.5, "std": 0.25}})(out)
    np.testing.assert_allclose(out["inputs"][1], np.repeat((depth - 0.5) / 0.25, 3, 2), atol=1e-6)
    np.testing.assert_allclose(out["inputs"][0], (rgb / 255.0 - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)
    out = ToCHW()(out)
    assert out["inputs"][0].shape == (3, 8, 12) and out["inputs"][0].dtype == np.float32
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], label_before[1::2, 1::2])


def test_normalize_16bit_and_unknown_modality():
    s = {"inputs": [np.full((2, 2), 65535, np.uint16)], "modalities": ["depth"], "label": np.zeros((2, 2))}
    np.testing.assert_allclose(Normalize()(s)["inputs"][0], 1.0)
    s = {"inputs": [np.zeros((2, 2, 3), np.uint8)], "modalities": ["hha"], "label": np.zeros((2, 2))}
    with pytest.raises(ConfigError, match="'hha'"):
        Normalize()(s)
    s["inputs"] = [np.full((2, 2, 3), 255, np.uint8)]
    np.testing.assert_allclose(Normalize({"hha": {"mean": 0.5, "std": 0.5}})(s)["inputs"][0], 1.0)


def test_seg_registry_coexists_with_classification_transforms():
    assert SEG_TRANSFORMS.names() == ["ColorJitter", "Compose", "Normalize", "RandomHorizontalFlip",
                                      "RandomResizedCrop", "Resize", "ToCHW"]
    assert SEG_TRANSFORMS.get("Normalize") is Normalize
    shared = {TRANSFORMS.get(n) for n in TRANSFORMS.names()}
    assert not shared & {SEG_TRANSFORMS.get(n) for n in SEG_TRANSFORMS.names()}
    if importlib.util.find_spec("plfusion.data.cls_transforms") is not None:
        cls_t = importlib.import_module("plfusion.data.cls_transforms")
        assert TRANSFORMS.get("RandomResizedCrop") is cls_t.RandomResizedCrop
        assert Compose([{"name": "RandomResizedCrop", "crop_size": 8}]).transforms[0].__class__ is RandomResizedCrop


@pytest.mark.parametrize("cfg, match", [
    ({"name": "RandomResizedCrop", "crop_size": 0}, r"transforms\[0\].*crop_size must be positive"),
    ({"name": "RandomResizedCrop", "crop_size": [8, 8], "scale": [2.0, 0.5]}, r"scale must satisfy"),
    ({"name": "RandomResizedCrop", "crop_size": [8, 8], "relative_to": "img"}, "relative_to"),
    ({"name": "Resize", "size": [-1, 4]}, "Resize.size"),
    ({"name": "ColorJitter", "brightness": 2}, "ColorJitter.brightness"),
    ({"name": "RandomHorizontalFlip", "prob": 1.5}, "RandomHorizontalFlip.prob"),
    ({"name": "Normalize", "stats": {"rgb": {"meen": [0, 0, 0]}}}, "Normalize.stats.rgb: unknown key 'meen'"),
    ({"name": "Normalize", "stats": {"rgb": {"std": [0, 1, 1]}}}, "std must be positive"),
    ({"name": "RandomResizedCrops", "crop_size": 8}, "Did you mean: RandomResizedCrop"),
    ({"name": "Resize", "size": 8, "interp": "nearest"}, "unknown key 'interp'"),
])
def test_transform_config_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        Compose([cfg])


def test_dataset_transform_errors_carry_the_dataset_path(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"SyntheticRGBD.transforms\[1\]"):
        SyntheticRGBD(transforms=[{"name": "Normalize"}, {"name": "Flip"}])
    with caplog.at_level(logging.WARNING):
        ds = SyntheticRGBD(num_samples=2, image_size=(16, 16), transforms=[])
    assert "no Normalize" in caplog.text
    x, _ = ds[0]
    assert x[0].max() > 1.0  # raw 0..255 values: the warning was warranted


# ----------------------------------------------------------------------------- synthetic data
def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a = SyntheticRGBD(num_samples=8, image_size=(30, 40))
    b = SyntheticRGBD(num_samples=8, image_size=(30, 40))
    val = SyntheticRGBD(num_samples=8, image_size=(30, 40), split="val")
    for i in range(8):
        for x, y in zip(a.generate(i), b.generate(i)):
            np.testing.assert_array_equal(x, y)
    train_rgbs = [a.generate(i)[0] for i in range(8)]
    assert not any(np.array_equal(train_rgbs[i], train_rgbs[j]) for i in range(8) for j in range(i))
    assert not any(np.array_equal(val.generate(i)[0], t) for i in range(8) for t in train_rgbs)
    assert not np.array_equal(SyntheticRGBD(num_samples=1, image_size=(30, 40), seed=1).generate(0)[0],
                              train_rgbs[0])


def test_synthetic_sample_contract_and_class_coverage():
    ds = SyntheticRGBD(num_samples=20, image_size=(60, 80))
    assert ds.class_names == ["wall", "floor", "box", "poster", "red_object", "blue_object"]
    inputs, label = ds[0]
    assert [x.shape for x in inputs] == [(3, 60, 80), (3, 60, 80)]
    assert all(x.dtype == np.float32 for x in inputs) and label.dtype == np.int64
    counts = np.zeros(256, np.int64)
    for i in range(20):
        rgb, depth, lab = ds.generate(i)
        assert rgb.dtype == np.uint8 and depth.dtype == np.float32 and depth.shape == (60, 80, 1)
        assert 0.0 <= depth.min() and depth.max() <= 1.0
        counts += np.bincount(lab.ravel(), minlength=256)
    assert (counts[:6] > 0).all() and counts[255] > 0 and counts[6:255].sum() == 0
    with pytest.raises(ConfigError, match="num_classes must be 6"):
        SyntheticRGBD(num_classes=40)
    with pytest.raises(ConfigError, match="modality 'hha'"):
        SyntheticRGBD(modalities=("rgb", "hha"))
    assert len(SyntheticRGBD(num_samples=2, modalities=("rgb",))[0][0]) == 1


def _pixel_features(ds, n):
    """Per-pixel depth-only feature (height above the fitted wall plane) and colour-only
    feature ((R - B) / brightness) for the four object classes."""
    hh, ww = ds.image_size
    yy, xx = np.mgrid[0:hh, 0:ww]
    feats = {"depth": [], "colour": [], "label": []}
    for i in range(n):
        rgb, depth, lab = ds.generate(i)
        d = depth[..., 0]
        wall = (lab == WALL) & (d > 0)
        coef, *_ = np.linalg.lstsq(np.stack([np.ones(wall.sum()), xx[wall], yy[wall]], 1), d[wall], rcond=None)
        keep = np.isin(lab, [BOX, POSTER, RED, BLUE]) & (d > 0)
        f = rgb.astype(np.float32)
        feats["depth"].append((coef[0] + coef[1] * xx + coef[2] * yy - d)[keep])
        feats["colour"].append(((f[..., 0] - f[..., 2]) / (f.sum(-1) + 1))[keep])
        feats["label"].append(lab[keep])
    return {k: np.concatenate(v) for k, v in feats.items()}


def _threshold_classifier_accuracy(train, val, feature, a, b):
    """Fit the best 1-D threshold separating class a from b on train; balanced accuracy on val."""
    m = np.isin(train["label"], [a, b])
    x, y = train[feature][m], train["label"][m] == a
    order = np.argsort(x)
    xs, ys = x[order], y[order]
    bal = 0.5 * ((ys.sum() - np.cumsum(ys)) / ys.sum() + np.cumsum(~ys) / (~ys).sum())
    k = int(np.argmax(np.maximum(bal, 1 - bal)))
    above_is_a = bal[k] >= 1 - bal[k]
    m = np.isin(val["label"], [a, b])
    pred_a = (val[feature][m] > xs[k]) == above_is_a
    truth = val["label"][m] == a
    return 0.5 * (pred_a[truth].mean() + (~pred_a)[~truth].mean())


def test_synthetic_depth_only_and_colour_only_classes():
    train = _pixel_features(SyntheticRGBD(num_samples=120, image_size=(60, 80), split="train"), 120)
    val = _pixel_features(SyntheticRGBD(num_samples=120, image_size=(60, 80), split="val"), 120)
    acc = {(f, a, b): _threshold_classifier_accuracy(train, val, f, a, b)
           for f in ("depth", "colour") for a, b in ((BOX, POSTER), (RED, BLUE))}
    # depth separates box from poster, colour cannot; colour separates red from blue, depth cannot
    assert acc["depth", BOX, POSTER] > 0.9, acc
    assert acc["colour", BOX, POSTER] < 0.65, acc
    assert acc["colour", RED, BLUE] > 0.9, acc
    assert acc["depth", RED, BLUE] < 0.65, acc


def test_synthetic_export_roundtrips_through_the_nyudv2_reader(tmp_path):
    ds = SyntheticRGBD(num_samples=3, image_size=(24, 32), transforms=[{"name": "Normalize"}])
    list_path = ds.export(str(tmp_path))
    assert list_path.endswith("train.txt")
    nyu = NYUDv2(str(tmp_path), num_classes=6, transforms=[{"name": "Normalize"}])
    assert len(nyu) == 3
    for i in range(3):
        (x_rgb, x_d), x_lab = ds[i]
        (y_rgb, y_d), y_lab = nyu[i]
        np.testing.assert_array_equal(x_lab, y_lab)
        np.testing.assert_allclose(x_rgb, y_rgb, atol=1e-6)
        np.testing.assert_allclose(x_d, y_d, atol=1.0 / 65535)  # 16-bit depth quantisation


def test_palette_is_distinct():
    p = make_palette(256)
    assert len({tuple(c) for c in p}) == 256 and tuple(p[0]) != (0, 0, 0)
