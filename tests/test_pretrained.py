import os
import subprocess
import sys

import cv2
import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from plfusion.models import create_model
from plfusion.models.pretrained import CheckpointMismatchError, resize_pos_embed

TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def tiny(**kw):
    m = create_model("vit_tiny_patch16_224", **{**TINY, **kw})
    m.eval()
    return m


def torch_layout(model):
    """State dict as timm would save it: Linear weights transposed to [out, in]."""
    import paddle.nn as nn
    linear = {f"{n}.weight" for n, l in model.named_sublayers() if isinstance(l, nn.Linear)}
    return {k: np.ascontiguousarray(v.numpy().T if k in linear else v.numpy()) for k, v in model.state_dict().items()}


def same_outputs(a, b, x):
    np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), atol=1e-5)


def test_pdparams_roundtrip_including_nested_and_module_prefix(tmp_path):
    src, x = tiny(), paddle.randn([2, 3, 32, 32])
    flat = str(tmp_path / "flat.pdparams")
    paddle.save(src.state_dict(), flat)
    dst = tiny()
    rep = dst.load_pretrained(flat)
    assert not rep.missing and not rep.unexpected and len(rep.loaded) == len(src.state_dict())
    same_outputs(src, dst, x)

    nested = str(tmp_path / "nested.pdparams")
    paddle.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, nested)
    dst2 = tiny()
    dst2.load_pretrained(nested)
    same_outputs(src, dst2, x)


def test_safetensors_torch_layout_is_transposed(tmp_path):
    src = tiny()
    path = str(tmp_path / "w.safetensors")
    save_file(torch_layout(src), path)
    dst = tiny()
    dst.load_pretrained(path)
    same_outputs(src, dst, paddle.randn([2, 3, 32, 32]))


def test_head_dropped_on_num_classes_mismatch(tmp_path, caplog):
    src = tiny()
    path = str(tmp_path / "w.safetensors")
    save_file(torch_layout(src), path)
    dst = tiny(num_classes=3)
    head_before = dst.head.weight.numpy().copy()
    with caplog.at_level("INFO"):
        rep = dst.load_pretrained(path)
    assert sorted(rep.dropped) == ["head.bias", "head.weight"]
    np.testing.assert_array_equal(dst.head.weight.numpy(), head_before)
    np.testing.assert_array_equal(dst.blocks[0].attn.qkv.weight.numpy(), src.blocks[0].attn.qkv.weight.numpy())
    assert "num_classes differs" in caplog.text


def test_feature_extractor_ignores_head(tmp_path):
    src = tiny()
    path = str(tmp_path / "w.pdparams")
    paddle.save(src.state_dict(), path)
    rep = tiny(num_classes=0).load_pretrained(path)
    assert not rep.unexpected and not rep.missing


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    sd = tiny().state_dict()
    sd = {k: v.numpy() for k, v in sd.items()}
    sd["blocks.0.mlp.fc1.weight"] = np.zeros((192, 100), "float32")
    path = str(tmp_path / "bad.pdparams")
    paddle.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as e:
        tiny().load_pretrained(path)
    msg = str(e.value)
    assert "blocks.0.mlp.fc1.weight" in msg and "[192, 100]" in msg and "[192, 768]" in msg and "bad.pdparams" in msg


def test_other_architecture_gives_one_error_listing_first_keys(tmp_path):
    path = str(tmp_path / "small.pdparams")
    paddle.save(create_model("vit_small_patch16_224", **TINY).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as e:
        tiny().load_pretrained(path)
    msg = str(e.value)
    assert "tensors have other shapes" in msg and "... and" in msg and msg.count("checkpoint [") == 10


def test_unrelated_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "other.safetensors")
    save_file({"encoder.weight": np.zeros((3, 3), "float32")}, path)
    with pytest.raises(CheckpointMismatchError, match="no tensor name matches"):
        tiny().load_pretrained(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        tiny().load_pretrained("/nonexistent/nowhere.pth")


def test_pos_embed_resized_bicubically_like_opencv(tmp_path):
    src = tiny()                                         # 4x4 grid + cls
    path = str(tmp_path / "w.safetensors")
    sd = torch_layout(src)
    save_file(sd, path)
    dst = tiny(img_size=48)                              # 6x6 grid
    rep = dst.load_pretrained(path)
    assert rep.resized and "pos_embed" in rep.resized[0]
    got = dst.pos_embed.numpy()
    np.testing.assert_array_equal(got[:, :1], sd["pos_embed"][:, :1])      # cls entry untouched
    grid = sd["pos_embed"][0, 1:].reshape(4, 4, -1)
    ref = np.stack([cv2.resize(grid[..., c], (6, 6), interpolation=cv2.INTER_CUBIC) for c in range(grid.shape[-1])], -1)
    np.testing.assert_allclose(got[0, 1:].reshape(6, 6, -1), ref, atol=1e-4)
    out = dst(paddle.randn([1, 3, 48, 48]))
    assert out.shape == [1, 5]


def test_resize_pos_embed_identity_and_constant():
    pe = np.random.default_rng(0).standard_normal((1, 17, 8)).astype("float32")
    np.testing.assert_array_equal(resize_pos_embed(pe, (4, 4), 1), pe)
    const = np.full((1, 1 + 9, 4), 3.0, "float32")
    np.testing.assert_allclose(resize_pos_embed(const, (5, 5), 1), np.full((1, 26, 4), 3.0), atol=1e-5)


def test_convert_weights_tool(tmp_path, root_dir):
    src = create_model("vit_tiny_patch16_224", **TINY)
    path = str(tmp_path / "w.safetensors")
    save_file(torch_layout(src), path)
    dst = str(tmp_path / "out.pdparams")
    r = subprocess.run([sys.executable, os.path.join(root_dir, "tools", "convert_weights.py"), "--src", path,
                        "--arch", "vit_tiny_patch16_224", "--dst", dst,
                        "--kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 5}'],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = tiny()
    m.set_state_dict(paddle.load(dst))
    src.eval()
    same_outputs(src, m, paddle.randn([2, 3, 32, 32]))


def test_classifier_loads_bare_timm_checkpoint_into_backbone_and_head(tmp_path):
    from plfusion.models import build_model
    src = tiny()
    path = str(tmp_path / "w.safetensors")
    save_file(torch_layout(src), path)
    clf = build_model({"name": "Classifier",
                       "architecture": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                                        "depth": 2, "num_classes": 0},
                       "head": {"name": "LinearClsHead", "in_channels": 192, "num_classes": 5}})
    rep = clf.load_pretrained(path)
    assert not rep.missing and not rep.unexpected
    clf.eval()
    same_outputs(src, clf, paddle.randn([2, 3, 32, 32]))


def test_classifier_takes_the_head_of_timm_swin_and_official_mvit(tmp_path):
    """Backbone filters map their reference head names; the Classifier routes them to head.fc."""
    from plfusion.models import build_model
    cases = [("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1, 1),
                                                   num_heads=(1, 1, 1, 1)), "head.fc."),
             ("mvitv2_tiny", dict(img_size=64, embed_dim=24, depths=(1, 1, 1, 1)), "head.projection.")]
    for name, kw, ref_head in cases:
        src = create_model(name, num_classes=5, **kw)
        src.eval()
        sd = torch_layout(src)
        own_head = [k for k in sd if k.startswith("head.")]
        for k in own_head:
            sd[ref_head + k.rsplit(".", 1)[1]] = sd.pop(k)
        path = str(tmp_path / f"{name}.safetensors")
        save_file(sd, path)
        clf = build_model({"architecture": {"name": name, "num_classes": 0, **kw},
                           "head": {"name": "LinearClsHead", "in_channels": src.num_features, "num_classes": 5}})
        rep = clf.load_pretrained(path)
        assert not rep.missing, (name, rep.missing)
        clf.eval()
        x = paddle.randn([2, 3, 64, 64])
        np.testing.assert_allclose(clf(x).numpy(), src(x).numpy(), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("suffix,writer", [(".pth", "zip"), (".pth.tar", "legacy"), (".pyth", "zip")])
def test_torch_written_checkpoint_loads_without_torch(tmp_path, suffix, writer):
    """A timm-style checkpoint written byte for byte as torch.save writes it (nested, module.)."""
    from test_checkpoint_io import fake_torch, make_tensor, save_legacy, save_zip
    src = tiny()
    sd = torch_layout(src)
    path = str(tmp_path / f"w{suffix}")
    with fake_torch():
        obj = {"model": {f"module.{k}": make_tensor(v) for k, v in sd.items()}, "epoch": 299}
        (save_zip if writer == "zip" else save_legacy)(obj, path)
    dst = tiny()
    rep = dst.load_pretrained(path)
    assert not rep.missing and not rep.unexpected
    same_outputs(src, dst, paddle.randn([2, 3, 32, 32]))
