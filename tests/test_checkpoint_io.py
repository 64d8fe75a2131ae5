"""plfusion.utils.checkpoint_io: PyTorch zip / legacy, Paddle, safetensors; refusal of unsafe pickles.

PyTorch files are written here byte for byte the way torch.save writes them, through a fake
`torch` module that exists only while the bytes are produced (torch is not a dependency).
"""
import argparse
import collections
import contextlib
import io
import itertools
import logging
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from plfusion.utils.checkpoint_io import (CheckpointError, detect_format, read_checkpoint,
                                          read_state_dict)

# --------------------------------------------------------------------------- a torch.save twin

_STORAGE_NAMES = ["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
                  "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
                  "UntypedStorage"]
_DTYPE_NAMES = ["float32", "float16", "bfloat16", "uint16", "int64"]
_FAKE_MODULES = ["torch", "torch._utils", "torch.storage", "torch.nn", "torch.nn.modules",
                 "torch.nn.modules.linear"]


class FakeStorage:
    def __init__(self, kind, raw, key):
        self.kind, self.raw, self.key = kind, raw, key  # raw: 1-D array as the file stores it


class FakeTensor:
    def __init__(self, storage, offset, size, stride, dtype=None, parameter=False):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype, self.parameter = dtype, parameter

    def __reduce_ex__(self, protocol):
        torch = sys.modules["torch"]
        args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
                collections.OrderedDict())
        if self.dtype is not None:
            rebuilt = (torch._utils._rebuild_tensor_v3, args + (getattr(torch, self.dtype),))
        else:
            rebuilt = (torch._utils._rebuild_tensor_v2, args)
        if self.parameter:
            inner = FakeTensor(self.storage, self.offset, self.size, self.stride, self.dtype)
            return torch._utils._rebuild_parameter, (inner, True, collections.OrderedDict())
        return rebuilt


class FakeDtype:
    __module__ = "torch"

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return self.name


@contextlib.contextmanager
def fake_torch():
    """A stand-in `torch` in sys.modules, so pickle can name torch globals; removed on exit."""
    saved = {name: sys.modules.get(name) for name in _FAKE_MODULES}
    modules = {name: types.ModuleType(name) for name in _FAKE_MODULES}

    def make_function(module, name):
        def function(*args):
            raise AssertionError("only named in pickles, never called")
        function.__module__, function.__name__, function.__qualname__ = module, name, name
        setattr(modules[module], name, function)

    for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"):
        make_function("torch._utils", name)
    for name in _STORAGE_NAMES:
        module = "torch.storage" if name == "UntypedStorage" else "torch"
        setattr(modules[module], name, type(name, (), {"__module__": module}))
    for name in _DTYPE_NAMES:
        setattr(modules["torch"], name, FakeDtype(name))
    modules["torch.nn.modules.linear"].Linear = type(
        "Linear", (), {"__module__": "torch.nn.modules.linear"})
    for name, module in modules.items():
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(modules[parent], child, module)
    sys.modules.update(modules)
    try:
        yield modules["torch"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _storage_class(torch, kind):
    return torch.storage.UntypedStorage if kind == "UntypedStorage" else getattr(torch, kind)


def _contiguous_stride(shape):
    return tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))


_STORAGE_KEYS = itertools.count()


def make_tensor(array, kind="FloatStorage", key=None):
    """A FakeTensor over a fresh storage holding `array` (C order)."""
    raw = np.ascontiguousarray(array).reshape(-1)
    storage = FakeStorage(kind, raw, key or str(next(_STORAGE_KEYS)))
    return FakeTensor(storage, 0, array.shape, _contiguous_stride(array.shape))


def bf16_bits(values):
    """bfloat16 bit patterns of float32 values that bfloat16 represents exactly."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)
    return (bits >> 16).astype(np.uint16)


def save_zip(obj, path, prefix="archive", byteorder="little", corrupt_storage=None):
    """What torch.save writes (torch >= 1.6): a stored zip of data.pkl and raw storages."""
    storages = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, item):
            if isinstance(item, FakeStorage):
                storages[item.key] = item
                numel = item.raw.nbytes if item.kind == "UntypedStorage" else item.raw.size
                return ("storage", _storage_class(sys.modules["torch"], item.kind), item.key,
                        "cpu", numel)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", buffer.getvalue())
        archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, storage in sorted(storages.items()):
            raw = storage.raw.astype(storage.raw.dtype.newbyteorder(">")) if byteorder == "big" \
                else storage.raw
            data = raw.tobytes()
            if key == corrupt_storage:
                data = data[:len(data) // 2]
            archive.writestr(f"{prefix}/data/{key}", data)
        archive.writestr(f"{prefix}/version", "3\n")


class StorageView:
    """A legacy-format storage view: `numel` elements of `root` from element `offset`."""

    def __init__(self, root, offset, numel, key):
        self.root, self.offset, self.numel, self.key = root, offset, numel, key


def save_legacy(obj, path, protocol_version=1001):
    """What torch.save(..., _use_new_zipfile_serialization=False) writes."""
    storages = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, item):
            view = None
            if isinstance(item, StorageView):
                view = (item.key, item.offset, item.numel)
                item = item.root
            if isinstance(item, FakeStorage):
                storages[item.key] = item
                return ("storage", _storage_class(sys.modules["torch"], item.kind), item.key,
                        "cpu", item.raw.size, view)
            return None

    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(protocol_version, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            raw = storages[key].raw
            f.write(struct.pack("<q", raw.size))
            f.write(raw.tobytes())


# --------------------------------------------------------------------------- shared fixtures

BASE = np.arange(30, dtype=np.float32).reshape(5, 6) / 4 - 3  # exact in fp16 and bf16


def _sample_tensors():
    """Tensors covering the layouts torch writes, and the arrays they must read back as."""
    base = make_tensor(BASE)
    transposed = FakeTensor(base.storage, 0, (6, 5), (1, 6))
    window = FakeTensor(base.storage, 8, (3, 2), (6, 1))      # BASE[1:4, 2:4]
    stepped = FakeTensor(base.storage, 1, (3, 2), (12, 3))    # BASE[::2, 1::3]
    bf16 = make_tensor(bf16_bits(BASE), "BFloat16Storage")
    bf16_t = FakeTensor(bf16.storage, 0, (6, 5), (1, 6))
    tensors = {
        "w": base, "w_t": transposed, "window": window, "stepped": stepped,
        "half": make_tensor(BASE.astype(np.float16), "HalfStorage"),
        "bf16": bf16, "bf16_t": bf16_t,
        "double": make_tensor(BASE.astype(np.float64), "DoubleStorage"),
        "long": make_tensor(np.arange(-3, 4, dtype=np.int64), "LongStorage"),
        "int8": make_tensor(np.arange(-3, 4, dtype=np.int8), "CharStorage"),
        "mask": make_tensor(np.array([True, False, True]), "BoolStorage"),
        "num_batches_tracked": make_tensor(np.array(7, dtype=np.int64), "LongStorage"),
        "empty": make_tensor(np.zeros((0, 4), np.float32)),
    }
    param = make_tensor(np.array([[1.5, -2.0]], np.float32))
    param.parameter = True
    tensors["param"] = param
    expected = {
        "w": BASE, "w_t": BASE.T, "window": BASE[1:4, 2:4], "stepped": BASE[::2, 1::3],
        "half": BASE.astype(np.float16), "bf16": BASE, "bf16_t": BASE.T,
        "double": BASE.astype(np.float64), "long": np.arange(-3, 4, dtype=np.int64),
        "int8": np.arange(-3, 4, dtype=np.int8), "mask": np.array([True, False, True]),
        "num_batches_tracked": np.array(7, dtype=np.int64), "empty": np.zeros((0, 4), np.float32),
        "param": np.array([[1.5, -2.0]], np.float32),
    }
    return tensors, expected


def _assert_arrays_equal(got, expected):
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert isinstance(got[name], np.ndarray), name
        assert got[name].dtype == want.dtype, (name, got[name].dtype, want.dtype)
        assert got[name].shape == want.shape, (name, got[name].shape, want.shape)
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def _training_checkpoint(tensors):
    return {"model": collections.OrderedDict(tensors), "epoch": 3,
            "args": argparse.Namespace(lr=5e-4, model="deit_small_patch16_224", drop=[0.1, 0.2]),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}


# --------------------------------------------------------------------------- PyTorch zip format

def test_zip_checkpoint_reads_every_layout_and_dtype(tmp_path):
    path = tmp_path / "deit.pth"
    tensors, expected = _sample_tensors()
    torch_before = sys.modules.get("torch")
    with fake_torch():
        save_zip(_training_checkpoint(tensors), path)
    assert sys.modules.get("torch") is torch_before  # the fake is gone before reading

    ckpt = read_checkpoint(path)
    _assert_arrays_equal(ckpt["model"], expected)
    assert ckpt["model"]["bf16"].dtype == np.float32  # bfloat16 widens exactly to float32
    assert ckpt["model"]["num_batches_tracked"].shape == ()
    assert ckpt["epoch"] == 3
    # argparse.Namespace comes back as a plain dict of its attributes, not the class
    assert type(ckpt["args"]) is dict
    assert ckpt["args"] == {"lr": 5e-4, "model": "deit_small_patch16_224", "drop": [0.1, 0.2]}
    assert ckpt["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0, 1]}]

    state = read_state_dict(path)
    assert isinstance(state, collections.OrderedDict)
    _assert_arrays_equal(state, expected)
    assert all(a.flags.c_contiguous for a in state.values())


def test_tensors_sharing_a_storage_do_not_alias(tmp_path):
    path = tmp_path / "tied.pth"
    shared = make_tensor(np.arange(4, dtype=np.float32))
    tied = FakeTensor(shared.storage, 0, (4,), (1,))
    with fake_torch():
        save_zip({"a": shared, "b": tied}, path)
    state = read_state_dict(path)
    np.testing.assert_array_equal(state["a"], state["b"])
    state["a"][0] = 100.0
    assert state["b"][0] == 0.0


def test_zip_big_endian_byteorder_record(tmp_path):
    path = tmp_path / "be.pth"
    with fake_torch():
        save_zip({"w": make_tensor(BASE), "i": make_tensor(np.arange(3, dtype=np.int64), "LongStorage")},
                 path, byteorder="big")
    state = read_state_dict(path)
    np.testing.assert_array_equal(state["w"], BASE)
    np.testing.assert_array_equal(state["i"], [0, 1, 2])
    assert state["w"].dtype.isnative


def test_rebuild_tensor_v3_on_untyped_storage(tmp_path):
    # newer torch: dtypes without a legacy storage class (uint16...) are saved as an
    # UntypedStorage of bytes plus the dtype given as e.g. `torch.uint16`
    path = tmp_path / "v3.pth"
    values = np.array([[1, 65535], [300, 7]], dtype=np.uint16)
    untyped = make_tensor(values.view(np.uint8).reshape(-1), "UntypedStorage")
    tensor = FakeTensor(untyped.storage, 0, (2, 2), (2, 1), dtype="uint16")
    with fake_torch():
        save_zip({"u16": tensor}, path)
    state = read_state_dict(path)
    assert state["u16"].dtype == np.uint16
    np.testing.assert_array_equal(state["u16"], values)


def test_module_prefix_and_preferred_keys(tmp_path):
    path = tmp_path / "ddp.pth.tar"
    weights = {"module.blocks.0.weight": make_tensor(BASE), "module.head.bias": make_tensor(BASE[0])}
    ema = {"module.blocks.0.weight": make_tensor(BASE * 2)}
    with fake_torch():
        save_zip({"state_dict": weights, "state_dict_ema": ema, "epoch": 9, "arch": "t2t_vit_14"}, path)

    state = read_state_dict(path)  # 'state_dict' is preferred over 'state_dict_ema'
    assert list(state) == ["blocks.0.weight", "head.bias"]
    np.testing.assert_array_equal(state["head.bias"], BASE[0])
    np.testing.assert_array_equal(read_state_dict(path, key="state_dict_ema")["blocks.0.weight"], BASE * 2)

    with pytest.raises(CheckpointError) as info:
        read_state_dict(path, key="segmenter")
    message = str(info.value)
    assert str(path) in message and "'segmenter'" in message
    assert "state_dict_ema" in message and "arch" in message  # lists what is available
    with pytest.raises(CheckpointError, match=r"\['arch'\] is a str"):
        read_state_dict(path, key="arch")


def test_state_dict_flattens_nested_and_leaves_out_non_arrays(tmp_path, caplog):
    path = tmp_path / "nested.pth"
    with fake_torch():
        save_zip({"segmenter": {"encoder": {"w": make_tensor(BASE)}, "note": "rgb-d",
                                "head.b": make_tensor(BASE[1])}, "epoch_start": 4}, path)
    with caplog.at_level(logging.WARNING, logger="plfusion.utils.checkpoint_io"):
        state = read_state_dict(path)
    assert list(state) == ["encoder.w", "head.b"]
    assert "note" in caplog.text


def test_no_state_dict_found_names_the_keys(tmp_path):
    path = tmp_path / "meta.pth"
    with fake_torch():
        save_zip({"epoch": 1, "best_val": 0.5}, path)
    with pytest.raises(CheckpointError, match=r"holds no state dict.*best_val.*epoch"):
        read_state_dict(path)


def test_format_is_chosen_by_content_not_extension(tmp_path):
    zip_named_pdparams = tmp_path / "actually_torch.pdparams"
    with fake_torch():
        save_zip({"w": make_tensor(BASE)}, zip_named_pdparams)
    pickle_named_pth = tmp_path / "actually_paddle.pth"
    with open(pickle_named_pth, "wb") as f:
        pickle.dump({"w": BASE}, f, protocol=4)
    assert detect_format(zip_named_pdparams) == "torch-zip"
    assert detect_format(pickle_named_pth) == "pickle"
    np.testing.assert_array_equal(read_state_dict(zip_named_pdparams)["w"], BASE)
    np.testing.assert_array_equal(read_state_dict(pickle_named_pth)["w"], BASE)


# --------------------------------------------------------------------------- legacy format

def test_legacy_format_with_storage_view(tmp_path):
    path = tmp_path / "tokenfusion_2021.pth"
    tensors, expected = _sample_tensors()
    root = make_tensor(np.arange(10, dtype=np.float32)).storage
    view = StorageView(root, 4, 5, key="view-of-root")
    tensors["from_view"] = FakeTensor(view, 1, (2, 2), (2, 1))   # root[5:9] as 2x2
    expected["from_view"] = np.arange(5, 9, dtype=np.float32).reshape(2, 2)
    with fake_torch():
        save_legacy({"segmenter": {"module." + k: v for k, v in tensors.items()},
                     "epoch_start": 12}, path)
    assert detect_format(path) == "pickle"
    ckpt = read_checkpoint(path)
    assert ckpt["epoch_start"] == 12
    _assert_arrays_equal(read_state_dict(path), expected)


def test_legacy_format_errors(tmp_path):
    wrong_version = tmp_path / "v1000.pth"
    with fake_torch():
        save_legacy({"w": make_tensor(BASE)}, wrong_version, protocol_version=1000)
    with pytest.raises(CheckpointError, match="protocol version 1000") as info:
        read_checkpoint(wrong_version)
    assert str(wrong_version) in str(info.value)

    good = tmp_path / "good.pth"
    with fake_torch():
        save_legacy({"w": make_tensor(BASE)}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:-20])  # the last storage loses its tail
    with pytest.raises(CheckpointError, match="truncated") as info:
        read_checkpoint(cut)
    assert str(cut) in str(info.value)


# --------------------------------------------------------------------------- Paddle

def test_paddle_pdparams_of_a_layer(tmp_path):
    paddle = pytest.importorskip("paddle")
    paddle.seed(3)
    layer = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4))
    layer(paddle.randn([5, 3]))  # training step updates the BN running statistics
    expected = {k: v.numpy() for k, v in layer.state_dict().items()}
    for protocol in (2, 4):  # 2 writes bytes through _codecs.encode
        path = tmp_path / f"layer_p{protocol}.pdparams"
        paddle.save(layer.state_dict(), str(path), protocol=protocol)
        assert "StructuredToParameterName@@" in read_checkpoint(path)
        state = read_state_dict(path)
        _assert_arrays_equal(state, expected)


def test_paddle_pdopt_with_lr_scheduler(tmp_path):
    paddle = pytest.importorskip("paddle")
    paddle.seed(4)
    layer = paddle.nn.Linear(3, 2)
    scheduler = paddle.optimizer.lr.StepDecay(learning_rate=0.1, step_size=2)
    optimizer = paddle.optimizer.AdamW(learning_rate=scheduler, parameters=layer.parameters())
    layer(paddle.randn([4, 3])).sum().backward()
    optimizer.step()
    scheduler.step()
    path = tmp_path / "model.pdopt"
    paddle.save(optimizer.state_dict(), str(path))

    got = read_checkpoint(path)
    with open(path, "rb") as f:
        trusted = pickle.load(f, encoding="latin1")  # our own file, written just above
    assert sorted(got) == sorted(trusted)
    assert got["LR_Scheduler"] == trusted["LR_Scheduler"]
    assert got["LR_Scheduler"]["last_epoch"] == 1
    assert got["LR_Scheduler"]["last_lr"] == pytest.approx(0.1)
    moments = [k for k in trusted if isinstance(trusted[k], np.ndarray)]
    assert any("moment1" in k for k in moments)
    for key in moments:
        assert got[key].dtype == trusted[key].dtype
        np.testing.assert_array_equal(got[key], trusted[key])


def test_paddle_nested_checkpoint(tmp_path):
    paddle = pytest.importorskip("paddle")
    layer = paddle.nn.Linear(2, 3)
    path = tmp_path / "train.pdparams"
    # tensors nested in containers are pickled as tuple((name, ndarray)) by paddle.save
    paddle.save({"model": layer.state_dict(), "epoch": 3, "extra": [layer.bias]}, str(path))
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 3
    np.testing.assert_array_equal(ckpt["extra"][0], layer.bias.numpy())
    state = read_state_dict(path)
    _assert_arrays_equal(state, {k: v.numpy() for k, v in layer.state_dict().items()})


def test_paddle_split_big_arrays_are_joined(tmp_path):
    # paddle.save (protocol 2/3) splits arrays over 1 GiB into 'name@@.i' slices; same layout, small
    whole = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    flat = whole.reshape(-1)
    saved = {"big@@.0": flat[:10], "big@@.1": flat[10:20], "big@@.2": flat[20:], "small": flat[:2],
             "UnpackBigParamInfor@@": {"big": {"OriginShape": (2, 3, 4),
                                              "slices": ["big@@.0", "big@@.1", "big@@.2"]}}}
    path = tmp_path / "split.pdparams"
    with open(path, "wb") as f:
        pickle.dump(saved, f, protocol=2)
    state = read_state_dict(path)
    assert sorted(state) == ["big", "small"]
    np.testing.assert_array_equal(state["big"], whole)


def test_numpy_pickle_forms(tmp_path):
    class DenseTensor:
        # how paddle.save pickles a bare DenseTensor: eval('data', {'data': array}), which the
        # reader resolves by lookup without evaluating anything
        def __reduce__(self):
            return eval, ("data", {"data": np.arange(3.0)})

    saved = {"dense": DenseTensor(), "fortran": np.asfortranarray(BASE),
             "big_endian": np.arange(3, dtype=">i4"), "scalar": np.float64(81.5),
             "objects": np.array([1, "a", None], dtype=object), "text": np.array(["xy", "z"])}
    for protocol in (2, 4, 5):
        path = tmp_path / f"forms_{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump(saved, f, protocol=protocol)
        got = read_checkpoint(path)
        np.testing.assert_array_equal(got["dense"], np.arange(3.0))
        np.testing.assert_array_equal(got["fortran"], BASE)
        assert got["fortran"].flags.c_contiguous
        np.testing.assert_array_equal(got["big_endian"], [0, 1, 2])
        assert got["big_endian"].dtype == np.dtype("<i4")
        assert got["scalar"] == 81.5 and isinstance(got["scalar"], np.float64)
        assert got["objects"].tolist() == [1, "a", None]
        assert got["text"].tolist() == ["xy", "z"]


# --------------------------------------------------------------------------- safetensors

def test_safetensors_including_bfloat16(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "vit.safetensors"
    save_file({"w": BASE, "i": np.arange(3, dtype=np.int64)}, str(path))
    state = read_state_dict(path)
    np.testing.assert_array_equal(state["w"], BASE)
    np.testing.assert_array_equal(state["i"], [0, 1, 2])

    # safetensors.numpy cannot return bfloat16; write the documented layout by hand
    import json
    header = json.dumps({"w": {"dtype": "BF16", "shape": [5, 6], "data_offsets": [0, 60]},
                         "__metadata__": {"format": "pt"}}).encode()
    header += b" " * (-len(header) % 8)
    bf16_path = tmp_path / "bf16.safetensors"
    bf16_path.write_bytes(struct.pack("<Q", len(header)) + header + bf16_bits(BASE).tobytes())
    got = read_state_dict(bf16_path)["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, BASE)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(cut)
    assert str(cut) in str(info.value)


# --------------------------------------------------------------------------- hostile files

class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return eval, (f"__import__('os').system({self.command!r})",)


class _Exec:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return exec, (f"import os; os.system({self.command!r})",)


_PAYLOADS = {"os.system": (_System, f"{os.system.__module__}.system"), "eval": (_Eval, "builtins.eval"),
             "exec": (_Exec, "builtins.exec")}


def _write_hostile(container, payload, path):
    if container == "pdparams":
        with open(path, "wb") as f:
            pickle.dump({"linear.weight": BASE, "x": payload}, f, protocol=4)
    elif container == "pdparams-protocol2":
        with open(path, "wb") as f:
            pickle.dump({"linear.weight": BASE, "x": payload}, f, protocol=2)
    elif container == "zip":
        with fake_torch():
            save_zip({"model": {"w": make_tensor(BASE)}, "args": payload}, path)
    else:
        with fake_torch():
            save_legacy({"model": {"w": make_tensor(BASE)}, "args": payload}, path)


@pytest.mark.parametrize("payload_name", sorted(_PAYLOADS))
@pytest.mark.parametrize("container", ["pdparams", "pdparams-protocol2", "zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container, payload_name):
    make_payload, global_name = _PAYLOADS[payload_name]
    # the payload is real: plain pickle runs it (on a separate control file)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(make_payload(f"touch {control}"), protocol=2))
    assert control.exists()

    pwned = tmp_path / "pwned"
    path = tmp_path / ("evil.pth" if container in ("zip", "legacy") else "evil.pdparams")
    _write_hostile(container, make_payload(f"touch {pwned}"), path)
    for read in (read_checkpoint, read_state_dict):
        with pytest.raises(CheckpointError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message
        assert "refusing to load global" in message and global_name in message
    assert not pwned.exists()


def test_pickled_torch_module_is_refused_with_state_dict_hint(tmp_path):
    path = tmp_path / "whole_model.pth"
    with fake_torch():
        save_zip({"model": sys.modules["torch.nn.modules.linear"].Linear()}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "torch.nn.modules.linear.Linear" in message and "state_dict()" in message
    assert str(path) in message


def test_pickle_cannot_modify_allowlisted_globals(tmp_path):
    # GLOBAL torch.FloatStorage, then BUILD with {'dtype': '<f8'} as dict state or slot state:
    # attempts to change what FloatStorage means for every later file
    state = b"}X\x05\x00\x00\x00dtypeX\x03\x00\x00\x00<f8s"
    for build in (state, b"N" + state + b"\x86"):
        path = tmp_path / "build.pdparams"
        path.write_bytes(b"\x80\x02ctorch\nFloatStorage\n" + build + b"b.")
        with pytest.raises(CheckpointError, match="cannot unpickle") as info:
            read_checkpoint(path)
        assert str(path) in str(info.value)
    later = tmp_path / "later.pth"
    with fake_torch():
        save_zip({"w": make_tensor(BASE)}, later)
    np.testing.assert_array_equal(read_state_dict(later)["w"], BASE)


def test_object_array_shorter_than_its_shape_is_an_error_not_a_crash(tmp_path):
    # ndarray.__setstate__ on this state crashes numpy 2.4 (segfault); the reader checks first
    class Short:
        def __reduce__(self):
            reconstruct, args = np.ndarray((0,), object).__reduce__()[:2]
            return reconstruct, args, (1, (10 ** 6,), np.dtype(object), False, [1, 2])

    path = tmp_path / "short.pdparams"
    with open(path, "wb") as f:
        pickle.dump({"x": Short()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="needs a list of 1000000 items"):
        read_checkpoint(path)


def test_tensor_outside_its_storage_is_refused(tmp_path):
    path = tmp_path / "overrun.pth"
    tensor = make_tensor(np.arange(6, dtype=np.float32))
    tensor.size, tensor.stride = (4, 4), (4, 1)  # asks for 16 elements of a 6-element storage
    with fake_torch():
        save_zip({"w": tensor}, path)
    with pytest.raises(CheckpointError, match="too short.*needs 16 elements.*has 6") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- corrupt files

def _good_zip(path):
    with fake_torch():
        save_zip({"model": {"w": make_tensor(BASE)}}, path)
    return path.read_bytes()


def test_truncated_and_corrupt_zip(tmp_path):
    data = _good_zip(tmp_path / "good.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated zip") as info:
        read_checkpoint(cut)
    assert str(cut) in str(info.value)

    short = tmp_path / "short_storage.pth"
    with fake_torch():
        w = make_tensor(BASE, key="w0")
        save_zip({"w": w}, short, corrupt_storage="w0")
    with pytest.raises(CheckpointError, match=r"data/w0' holds 60 bytes, 120 are needed") as info:
        read_checkpoint(short)
    assert str(short) in str(info.value)

    not_torch = tmp_path / "arrays.npz"
    np.savez(not_torch, w=BASE)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        read_checkpoint(not_torch)
    assert str(not_torch) in str(info.value)


def test_truncated_pickle(tmp_path):
    path = tmp_path / "cut.pdparams"
    data = pickle.dumps({"a": BASE, "b": BASE * 2}, protocol=4)
    path.write_bytes(data[:len(data) - 40])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and ("truncated" in message or "corrupt" in message)


def test_empty_random_and_missing_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as info:
        read_checkpoint(empty)
    assert str(empty) in str(info.value)

    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    unknown = tmp_path / "noise.pdparams"
    unknown.write_bytes(b"\x13" + noise)
    with pytest.raises(CheckpointError, match="not a recognised checkpoint") as info:
        read_state_dict(unknown)
    assert str(unknown) in str(info.value)
    pickle_noise = tmp_path / "noise.pth"  # a pickle header, then garbage
    pickle_noise.write_bytes(b"\x80\x04" + noise)
    with pytest.raises(CheckpointError, match="corrupt|truncated") as info:
        read_state_dict(pickle_noise)
    assert str(pickle_noise) in str(info.value)

    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_checkpoint(missing)


def test_non_dict_top_level(tmp_path):
    path = tmp_path / "list.pdparams"
    with open(path, "wb") as f:
        pickle.dump([BASE], f, protocol=4)
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        read_checkpoint(path)


# --------------------------------------------------------------------------- real torch, if present

@pytest.mark.parametrize("zipfile_format", [True, False])
def test_real_torch_save_round_trip(tmp_path, zipfile_format):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=generator)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    tensors = {"w_t": base.t(), "window": base[1:4, 2:5], "half": base.half(),
               "bf16": base.bfloat16(), "scalar": torch.tensor(2.5), "long": torch.arange(4)}
    path = tmp_path / "real.pth"
    torch.save({"model": layer.state_dict(), "extra": tensors, "epoch": 2,
                "args": argparse.Namespace(lr=0.1)}, path,
               _use_new_zipfile_serialization=zipfile_format)
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 2 and ckpt["args"] == {"lr": 0.1}
    for name, tensor in tensors.items():
        want = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert ckpt["extra"][name].dtype == want.dtype
        np.testing.assert_array_equal(ckpt["extra"][name], want)
    state = read_state_dict(path)
    assert list(state) == list(layer.state_dict())
    for name, tensor in layer.state_dict().items():
        np.testing.assert_array_equal(state[name], tensor.numpy())
