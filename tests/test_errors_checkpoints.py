"""Issue #7, checkpoints: bad files through the user-facing paths fail clearly and change nothing.

Paths: model.load_pretrained, create_model(pretrained=), build_model with model.pretrained and
model.architecture.pretrained, and tools/convert_weights.py. The reader itself (every pickle
form, allowlist details) is covered in test_checkpoint_io.py; here each path gets hostile,
corrupt and mismatched files end to end.
"""
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import zipfile

import json

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from plfusion.models import build_model, create_model
from plfusion.models.pretrained import CheckpointMismatchError
from plfusion.registry import ConfigError
from plfusion.utils.checkpoint_io import CheckpointError

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, depth=1, num_classes=5)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw):
    return create_model(ARCH, **{**TINY, **kw})


def snapshot(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


# --------------------------------------------------------------------------- hostile pickles

class _System:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _Eval:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return eval, (f"open({self.target!r}, 'w').close()",)


class _Exec:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').close()",)


PAYLOADS = {"os.system": (_System, f"{os.system.__module__}.system"),
            "eval": (_Eval, "builtins.eval"), "exec": (_Exec, "builtins.exec")}
SUFFIXES = (".pth", ".pth.tar", ".pyth", ".pdparams")


def write_hostile(path, payload):
    """Real weights, then the payload: a torch-style zip for .pth/.pyth, a plain pickle (as
    paddle.save and legacy torch.save write) for .pdparams/.pth.tar."""
    weights = {k: v.numpy() for k, v in tiny().state_dict().items()}
    obj = {"state_dict": weights, "args": payload}
    data = pickle.dumps(obj, protocol=2)
    if str(path).endswith((".pth", ".pyth")):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", data)
            archive.writestr("archive/version", "3\n")
    else:
        with open(path, "wb") as f:
            f.write(data)


def test_the_payloads_are_real(tmp_path):
    # unpickled naively, each payload creates its file: the refusals below are not vacuous
    for name, (make, _) in PAYLOADS.items():
        target = tmp_path / f"control_{name}"
        pickle.loads(pickle.dumps(make(str(target)), protocol=2))
        assert target.exists(), name


def _check_refusal(exc, path, global_name, pwned):
    message = str(exc)
    assert isinstance(exc, CheckpointError), type(exc)
    assert str(path) in message and "refusing to load global" in message and global_name in message
    assert not pwned.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_hostile_checkpoint_via_load_pretrained(tmp_path, suffix, payload):
    make, global_name = PAYLOADS[payload]
    pwned = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    write_hostile(path, make(str(pwned)))
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        model.load_pretrained(str(path))
    _check_refusal(info.value, path, global_name, pwned)
    assert_unchanged(model, before)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_hostile_checkpoint_via_create_and_build_model(tmp_path, suffix):
    make, global_name = PAYLOADS["os.system"]
    pwned = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    write_hostile(path, make(str(pwned)))
    with pytest.raises(CheckpointError) as info:
        create_model(ARCH, pretrained=str(path), **TINY)
    _check_refusal(info.value, path, global_name, pwned)

    arch = {"name": ARCH, **TINY}
    for cfg, key in (({"architecture": arch, "pretrained": str(path)}, "model.pretrained"),
                     ({"architecture": {**arch, "pretrained": str(path)}}, "model.architecture.pretrained")):
        with pytest.raises(CheckpointError) as info:
            build_model(cfg)
        _check_refusal(info.value, path, global_name, pwned)
        assert str(info.value).startswith(f"{key}: "), str(info.value)


def _convert(tmp_path, src, kwargs='{"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 5}'):
    """tools/convert_weights.py main() in-process: (exit status, stderr, dst path)."""
    spec = importlib.util.spec_from_file_location("convert_weights", os.path.join(ROOT, "tools", "convert_weights.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dst = tmp_path / "out.pdparams"
    err = io.StringIO()
    saved, sys.stderr = sys.stderr, err
    try:
        status = tool.main(["--src", str(src), "--arch", ARCH, "--dst", str(dst), "--kwargs", kwargs])
    finally:
        sys.stderr = saved
    return status, err.getvalue(), dst


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_hostile_checkpoint_via_convert_weights(tmp_path, suffix, payload):
    make, global_name = PAYLOADS[payload]
    pwned = tmp_path / "pwned"
    src = tmp_path / f"evil{suffix}"
    write_hostile(src, make(str(pwned)))
    status, err, dst = _convert(tmp_path, src)
    assert status == 1
    assert str(src) in err and "refusing to load global" in err and global_name in err
    assert not pwned.exists() and not dst.exists() and not os.path.exists(f"{dst}.tmp")


def test_hostile_pth_through_the_convert_weights_command(tmp_path):
    pwned = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    write_hostile(src, _System(str(pwned)))
    dst = tmp_path / "out.pdparams"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--src", str(src),
                        "--arch", ARCH, "--dst", str(dst), "--kwargs", '{"img_size": 32, "patch_size": 8}'],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert str(src) in r.stderr and f"'{os.system.__module__}.system'" in r.stderr
    assert not pwned.exists() and not dst.exists()


# --------------------------------------------------------------------------- corrupt files

def _good_files(tmp_path):
    model = tiny()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    pdparams = tmp_path / "good.pdparams"
    paddle.save(model.state_dict(), str(pdparams))
    zipped = tmp_path / "good.pth"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"state_dict": sd}, protocol=2))
    st = tmp_path / "good.safetensors"
    save_file(sd, str(st))
    return {"pdparams": pdparams.read_bytes(), "pth": zipped.read_bytes(), "safetensors": st.read_bytes()}


def corrupt_files(tmp_path):
    good = _good_files(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    files = {
        "empty.pth": b"",
        "truncated.pth": good["pth"][:len(good["pth"]) // 2],
        "truncated.pdparams": good["pdparams"][:len(good["pdparams"]) - 100],
        "truncated.safetensors": good["safetensors"][:len(good["safetensors"]) // 2],
        "noise.pyth": b"\x13" + noise,
        "pickle_noise.pth.tar": b"\x80\x02" + noise,
        "text.pdparams": b"this is not a checkpoint\n",
        "list.pdparams": pickle.dumps([np.zeros(3, np.float32)], protocol=2),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    return paths


def test_corrupt_files_name_the_file_on_every_path(tmp_path):
    for path in corrupt_files(tmp_path):
        model = tiny()
        before = snapshot(model)
        with pytest.raises(CheckpointError) as info:
            model.load_pretrained(str(path))
        assert str(path) in str(info.value), path
        assert_unchanged(model, before)
        with pytest.raises(CheckpointError, match="^model.architecture.pretrained: .*" + path.name):
            build_model({"architecture": {"name": ARCH, **TINY, "pretrained": str(path)}})
        status, err, dst = _convert(tmp_path, path)
        assert status == 1 and str(path) in err and err.count("\n") == 1 and not dst.exists(), err


def test_missing_file_directory_and_non_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        tiny().load_pretrained(str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="^model.pretrained: checkpoint not found: .*nowhere.pth"):
        build_model({"architecture": {"name": ARCH, **TINY}, "pretrained": str(tmp_path / "nowhere.pth")})
    with pytest.raises(CheckpointError, match="is a directory"):
        tiny().load_pretrained(str(tmp_path))
    # timm users write pretrained=True; there is nothing to download
    with pytest.raises(TypeError, match="never downloads"):
        create_model(ARCH, pretrained=True, **TINY)
    with pytest.raises(ConfigError, match="^model.architecture.pretrained: expected the path .* got True"):
        build_model({"architecture": {"name": ARCH, **TINY, "pretrained": True}})
    with pytest.raises(ConfigError, match="^model.pretrained: expected the path .* got 3"):
        build_model({"architecture": {"name": ARCH, **TINY}, "pretrained": 3})


# --------------------------------------------------------------------------- other architectures

def test_other_architecture_is_one_error_listing_first_keys_and_a_count(tmp_path):
    path = tmp_path / "small.pdparams"
    small = create_model("vit_small_patch16_224", **TINY)
    paddle.save(small.state_dict(), str(path))
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointMismatchError) as info:
        model.load_pretrained(str(path))
    message = str(info.value)
    # every tensor but the classifier head (dropped, as for a num_classes change) has another shape
    n_bad = sum(list(v.shape) != list(before[k].shape) for k, v in small.state_dict().items()
                if not k.startswith("head."))
    assert n_bad > 10
    assert str(path) in message and f"{n_bad} tensors have other shapes" in message
    listed = [line for line in message.splitlines() if "checkpoint [" in line]
    assert len(listed) == 10                                         # the first N ...
    assert "cls_token: checkpoint [1, 1, 384] vs model [1, 1, 192]" in message
    assert f"... and {n_bad - 10} more" in message                   # ... then a count
    assert_unchanged(model, before)


def test_checkpoints_of_other_families_name_the_file(tmp_path):
    swin = create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(1, 2), embed_dim=16,
                        num_classes=0)
    cases = [(swin, tiny()),                                           # Swin weights into a ViT
             (tiny(), create_model("t2t_vit_14", img_size=32, depth=1, num_classes=5)),
             (create_model("mit_b1"), create_model("mit_b0"))]
    for i, (src, dst) in enumerate(cases):
        path = tmp_path / f"other{i}.pdparams"
        paddle.save(src.state_dict(), str(path))
        before = snapshot(dst)
        with pytest.raises(CheckpointMismatchError) as info:
            dst.load_pretrained(str(path))
        assert str(path) in str(info.value) and type(dst).__name__ in str(info.value)
        assert_unchanged(dst, before)
    # a checkpoint of a deeper MViTv2 (official flat block numbering)
    mvit = create_model("mvitv2_tiny", img_size=64, depths=(1, 1, 1, 1), num_classes=0)
    path = tmp_path / "deeper.pdparams"
    paddle.save({f"blocks.{i}.norm1.weight": np.ones(96, np.float32) for i in range(6)}, str(path))
    before = snapshot(mvit)
    with pytest.raises(CheckpointMismatchError, match=r"deeper.pdparams does not fit MultiScaleVit: .*block 4"):
        mvit.load_pretrained(str(path))
    assert_unchanged(mvit, before)


def test_nothing_is_half_loaded(tmp_path):
    """A checkpoint whose every tensor but the last fits: the model must not change at all."""
    src = tiny()
    sd = {k: v.numpy() + 1.0 for k, v in src.state_dict().items()}
    last = list(sd)[-3]
    sd[last] = np.zeros([s + 1 for s in sd[last].shape], np.float32)
    path = tmp_path / "almost.pdparams"
    paddle.save(sd, str(path))
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointMismatchError, match=last):
        model.load_pretrained(str(path))
    assert_unchanged(model, before)

    # strict: every tensor fits, but one is missing from the file
    del sd[last]
    path = tmp_path / "missing_one.pdparams"
    paddle.save(sd, str(path))
    strict_failed = f"(?s)strict load of .*missing_one.pdparams failed.*missing \\(1\\): {last}"
    with pytest.raises(CheckpointMismatchError, match=strict_failed):
        model.load_pretrained(str(path), strict=True)
    assert_unchanged(model, before)
    # the model still loads a good checkpoint afterwards
    good = tmp_path / "good.pdparams"
    paddle.save(src.state_dict(), str(good))
    model.load_pretrained(str(good))
    x = paddle.randn([1, 3, 32, 32])
    src.eval(), model.eval()
    np.testing.assert_allclose(model(x).numpy(), src(x).numpy(), atol=1e-6)


def test_patched_segmentor_is_unchanged_after_a_mismatched_load(tmp_path):
    cfg = {"name": "Segmentor", "architecture": {"name": "mit_b0"},
           "head": {"name": "SegFormerHead", "num_classes": 4, "embed_dim": 32}, "patches": [{"name": "geminifusion"}]}
    seg = build_model(cfg)
    path = tmp_path / "b1.pdparams"
    paddle.save(create_model("mit_b1").state_dict(), str(path))       # an ImageNet MiT-b1 backbone
    before = snapshot(seg)
    with pytest.raises(CheckpointMismatchError, match="b1.pdparams does not fit Segmentor"):
        seg.load_pretrained(str(path))
    assert_unchanged(seg, before)


@pytest.mark.parametrize("damage", ["being_written", "latest_points_at_missing"])
def test_eval_of_a_partly_written_run_takes_the_newest_complete_checkpoint(tmp_path, damage, capsys):
    from plfusion.engine import Trainer
    from plfusion.engine.cli import eval_main
    from test_engine_train import make_cfg
    cfg, path = make_cfg(tmp_path, "partial", iters=4, train={"eval_interval": 0, "save_interval": 2, "keep_last": 0})
    Trainer(cfg).train()
    ckpt = os.path.join(cfg.output_dir, "checkpoints")
    if damage == "being_written":     # a save of step 4 killed half-way: weights on disk, JSON not yet
        os.remove(os.path.join(ckpt, "iter_0000004.json"))
        os.rename(os.path.join(ckpt, "iter_0000004.pdopt"), os.path.join(ckpt, "iter_0000004.pdopt.tmp-999999"))
    else:
        with open(os.path.join(ckpt, "latest.json"), "w") as f:
            json.dump({"name": "iter_0000009", "global_step": 9}, f)
    capsys.readouterr()
    assert eval_main(["-c", path, "--resume", cfg.output_dir, "--threads", "1"]) == 0
    text = capsys.readouterr().out
    newest = "iter_0000002" if damage == "being_written" else "iter_0000004"
    pointed = "iter_0000004" if damage == "being_written" else "iter_0000009"
    assert f"points at an incomplete or missing checkpoint ({pointed}); the newest complete one is {newest}" in text
    assert f"evaluating checkpoint {os.path.join(ckpt, newest)} (step {newest[-1]})" in text
    result = json.load(open(os.path.join(cfg.output_dir, "eval_results.json")))
    assert result["weights"] == os.path.join(ckpt, newest)
