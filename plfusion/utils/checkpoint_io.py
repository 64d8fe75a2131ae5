"""Read PyTorch, Paddle and safetensors checkpoints into numpy without running pickled code.

Checkpoint files are untrusted input: a pickle can call any importable function while it
loads. Every pickle here goes through `_RestrictedUnpickler`. It resolves globals only from an
allowlist of tensor-rebuild functions, storage types, plain containers and numpy array
reconstruction. Each resolves to a fresh local stand-in (or an immutable builtin type such as
set), never to the real torch or numpy function: torch does not have to be installed, and a
pickle cannot alter anything that outlives the load. Any other global raises `CheckpointError`.

Formats are told apart by their first bytes, not by the file name:
- PyTorch zip (torch >= 1.6): `<prefix>/data.pkl` plus raw little-endian storages.
- legacy PyTorch (torch < 1.6): magic/version/sys-info pickles, the object pickle, the storage
  key list, then `<int64 numel><raw bytes>` per storage.
- plain pickle: Paddle `.pdparams`/`.pdopt` from `paddle.save` (numpy arrays), and other
  pickles of numpy arrays.
- safetensors.
"""
import collections
import errno
import io
import json
import logging
import math
import os
import pickle
import struct
import zipfile

import numpy as np

__all__ = ["CheckpointError", "read_checkpoint", "read_state_dict", "detect_format",
           "STATE_DICT_KEYS"]

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the weights, in the order they are tried.
# 'segmenter' is what the official TokenFusion / GeminiFusion training code saves.
STATE_DICT_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "module",
                   "state_dict_ema", "segmenter")

# torch.serialization.MAGIC_NUMBER / PROTOCOL_VERSION of the legacy format.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001
# paddle.save metadata: the parameter-name table, and the table of arrays it split into
# slices to stay under the 4 GiB limit of pickle protocols 2 and 3.
_PADDLE_NAME_TABLE = "StructuredToParameterName@@"
_PADDLE_SPLIT_INFO = "UnpackBigParamInfor@@"
# Limit for tensors that hold more elements than their storage (saved `expand()` views, stride
# 0). They are rare in real checkpoints, and a hostile file could use them to ask for petabytes.
_MAX_EXPANDED_BYTES = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, unsupported or unsafe. The message names the file."""

    def __init__(self, message, path):
        path = os.fspath(path)
        if path not in message:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------- stand-ins
# What allowlisted globals resolve to. They build inert data and never import torch.
# find_class hands out a new object per lookup, and the objects refuse BUILD, so a pickle
# cannot change them for later lookups or later files.

_BFLOAT16 = "bfloat16"  # marker: numpy has no bfloat16; read as uint16, widen to float32

# Storage class -> element type. UntypedStorage holds bytes.
_STORAGE_TYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": _BFLOAT16, "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
    "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16", "UntypedStorage": "u1",
}

# torch dtype name (pickled as the global `torch.<name>`) -> element type; None = numpy has none.
_TORCH_DTYPES = {
    "float32": "<f4", "float": "<f4", "float64": "<f8", "double": "<f8", "float16": "<f2",
    "half": "<f2", "bfloat16": _BFLOAT16, "int64": "<i8", "long": "<i8", "int32": "<i4",
    "int": "<i4", "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "cfloat": "<c8",
    "complex128": "<c16", "cdouble": "<c16", "float8_e4m3fn": None, "float8_e5m2": None,
    "float8_e4m3fnuz": None, "float8_e5m2fnuz": None, "qint8": None, "quint8": None,
    "qint32": None,
}


class _Inert:
    """Base of the stand-in objects: attributes are fixed at construction; BUILD is refused."""

    __slots__ = ()

    def __init__(self, **fields):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise TypeError(f"{type(self).__name__} is read-only")

    def __setstate__(self, state):
        raise TypeError(f"{type(self).__name__} does not accept pickled state")


class _Function(_Inert):
    """An allowlisted function; a fresh wrapper per lookup."""

    __slots__ = ("function",)

    def __call__(self, *args):
        return self.function(*args)

    def __repr__(self):
        return f"stand-in for {self.function.__name__}"


class _StorageType(_Inert):
    """Stands in for torch.FloatStorage & co.; `dtype` is a numpy type string or _BFLOAT16."""

    __slots__ = ("name", "dtype")

    def __repr__(self):
        return f"torch.{self.name}"


class _TensorType(_Inert):
    """Stands in for torch.Tensor / torch.nn.Parameter as the type argument of a rebuild."""

    __slots__ = ()


class _NdarrayType(_Inert):
    """Stands in for numpy.ndarray as the subtype argument of _reconstruct. It is not callable,
    so a pickle cannot call ndarray(shape) to allocate arbitrary memory."""

    __slots__ = ()


class _TorchDtype(str):
    """A torch dtype read from a pickle; it is the string 'torch.<name>'."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TypeError("torch dtypes do not accept pickled state")

    @property
    def short_name(self):
        return self[len("torch."):]


class _Storage:
    """One storage record: `numel` elements of `dtype` under `key`, or a slice of a root storage."""

    def __init__(self, key, dtype, numel, root=None, offset=0):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.root, self.offset = root, offset


class _LazyTensor:
    """A tensor whose storage bytes have not been read yet (legacy files store them last)."""

    def __init__(self, storage, offset, size, stride, dtype=None, metadata=None):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype = dtype  # torch dtype name (_rebuild_tensor_v3); None = the storage's type
        self.metadata = metadata if isinstance(metadata, dict) else {}


class _PendingDtype(_Inert):
    """numpy.dtype(spec, align, copy) before its BUILD sets the byte order."""

    __slots__ = ("dtype",)

    def __setstate__(self, state):
        # numpy's state: (version, byteorder, subarray, names, fields, elsize, alignment, flags
        # [, metadata]). Only the byte order matters for the plain dtypes accepted here.
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise TypeError(f"malformed numpy dtype state {state!r}")
        if any(part is not None for part in state[2:5]):
            raise TypeError("structured numpy dtypes are not supported in checkpoints")
        object.__setattr__(self, "dtype", self.dtype.newbyteorder(state[1]))


class _PendingArray(_Inert):
    """What numpy's _reconstruct returns; BUILD then fills it from checked state."""

    __slots__ = ("array",)

    def __setstate__(self, state):
        object.__setattr__(self, "array", _array_from_state(state))


def _as_dtype(value):
    if isinstance(value, _PendingDtype):
        return value.dtype
    raise TypeError(f"expected a numpy dtype, got {type(value).__name__}")


def _np_dtype(spec, align=False, copy=False):
    if isinstance(spec, bytes):
        spec = spec.decode("ascii")
    if not isinstance(spec, str):
        raise TypeError(f"numpy dtype spec must be a string, got {type(spec).__name__}")
    dtype = np.dtype(spec)
    # plain numbers, bool, strings and object; no void/structured/datetime types
    if dtype.kind not in "biufcOSU" or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"numpy dtype {spec!r} is not supported in checkpoints")
    return _PendingDtype(dtype=dtype)


def _array_from_state(state):
    # ndarray.__setstate__ is not safe on hostile input (an object array whose list is shorter
    # than its shape crashes numpy 2.4), so the state is checked and the array built here.
    if isinstance(state, tuple) and len(state) == 5:
        state = state[1:]
    if not isinstance(state, tuple) or len(state) != 4:
        raise TypeError("malformed numpy array state")
    shape, dtype, fortran, data = state
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise TypeError(f"malformed numpy array shape {shape!r}")
    dtype, order = _as_dtype(dtype), ("F" if fortran else "C")
    count = math.prod(shape)
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != count:
            raise TypeError(f"object array of shape {shape} needs a list of {count} items")
        flat = np.empty(count, dtype=object)
        for i, item in enumerate(data):
            flat[i] = item
        return flat.reshape(shape, order=order)
    if isinstance(data, str):  # Python 2 pickles carry the bytes as latin-1 text
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
        raise TypeError(f"numpy array of shape {shape} and dtype {dtype} needs "
                        f"{count * dtype.itemsize} bytes of data")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order=order)
    return np.array(array, dtype=dtype.newbyteorder("="), order="C")


def _np_reconstruct(subtype, shape, typecode):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by BUILD(state).
    if not isinstance(subtype, _NdarrayType):
        raise TypeError(f"numpy _reconstruct of unsupported subtype {subtype!r}")
    return _PendingArray(array=None)


def _np_scalar(dtype, data=None):
    dtype = _as_dtype(dtype)
    if isinstance(data, str):
        data = data.encode("latin-1")
    if dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise TypeError(f"malformed numpy scalar of dtype {dtype}")
    return np.frombuffer(data, dtype=dtype)[0]


def _np_frombuffer(buffer, dtype, shape, order):
    # pickle protocol 5 form of a contiguous array
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = buffer.raw().tobytes()
    return _array_from_state((shape, dtype, order == "F", buffer))


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store bytes as encode(text, 'latin1'); nothing else is needed.
    if not isinstance(text, str) or not isinstance(encoding, str) \
            or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise TypeError(f"_codecs.encode is only accepted for latin-1 text, got {encoding!r}")
    return text.encode("latin-1")


def _bytearray(data=b""):
    # bytearray(n) would allocate n bytes; only accept real data.
    if not isinstance(data, (bytes, bytearray, list)):
        raise TypeError("bytearray() of anything but bytes is not accepted in a checkpoint")
    return bytearray(data)


def _is_array(value):
    return isinstance(value, (np.ndarray, _PendingArray))


def _tuple(items=()):
    # paddle.save writes a paddle.Tensor nested in a container as tuple((name, ndarray)); return
    # the array, as paddle.load does. Plain tuples never use this global (they have opcodes).
    items = tuple(items)
    if len(items) == 2 and isinstance(items[0], str) and _is_array(items[1]):
        return items[1]
    return items


class _RefusedEval(Exception):
    pass


def _paddle_dense_tensor(expression, namespace=None):
    # paddle.save writes a bare DenseTensor as eval('data', {'data': ndarray}). Only that exact
    # form is honoured, by looking the value up; nothing is ever evaluated.
    if (expression == "data" and isinstance(namespace, dict) and set(namespace) == {"data"}
            and _is_array(namespace["data"])):
        return namespace["data"]
    raise _RefusedEval()


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage):
        raise TypeError(f"tensor storage must be a storage record, got {type(storage).__name__}")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    tensor.metadata = metadata if isinstance(metadata, dict) else {}
    return tensor


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, _TorchDtype):
        raise TypeError(f"_rebuild_tensor_v3 expects a torch dtype, got {dtype!r}")
    tensor = _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                backward_hooks, metadata)
    tensor.dtype = dtype
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _LazyTensor):
        raise TypeError(f"parameter data must be a tensor, got {type(data).__name__}")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not isinstance(new_type, _TensorType) or not isinstance(func, _Function) \
            or not isinstance(args, tuple):
        raise TypeError(f"_rebuild_from_type_v2 of unsupported type {new_type!r}")
    return func(*args)


def _torch_size(dims=()):
    return tuple(dims)


def _torch_device(kind, index=None):
    return str(kind) if index is None else f"{kind}:{index}"


class _NamespaceDict(dict):
    """argparse.Namespace (timm/DeiT `args`) read as a plain dict of its attributes."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise TypeError(f"argparse.Namespace state must be a dict, got {type(state).__name__}")
        self.update(state)


class _ConfigDict(dict):
    """yacs CfgNode (Swin/MViT training `config`): a dict; its internal flags are dropped."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise TypeError(f"yacs CfgNode state must be a dict, got {type(state).__name__}")


def _function(fn):
    return lambda: _Function(function=fn)


def _build_allowlist():
    """(module, name) -> factory of the stand-in for that global."""
    allowed = {
        # immutable builtin types: safe to hand out as they are
        ("collections", "OrderedDict"): lambda: collections.OrderedDict,
        ("builtins", "set"): lambda: set,
        ("builtins", "frozenset"): lambda: frozenset,
        ("builtins", "slice"): lambda: slice,
        ("builtins", "complex"): lambda: complex,
        ("builtins", "bytearray"): _function(_bytearray),
        ("builtins", "tuple"): _function(_tuple),
        ("builtins", "eval"): _function(_paddle_dense_tensor),
        ("_codecs", "encode"): _function(_codecs_encode),
        ("numpy", "ndarray"): _NdarrayType,
        ("numpy", "dtype"): _function(_np_dtype),
        # classes NEWOBJ instantiates; a fresh subclass per lookup keeps BUILD contained
        ("argparse", "Namespace"): lambda: type("Namespace", (_NamespaceDict,), {}),
        ("yacs.config", "CfgNode"): lambda: type("CfgNode", (_ConfigDict,), {}),
        ("torch._utils", "_rebuild_tensor"): _function(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _function(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _function(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _function(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _function(_rebuild_parameter),
        ("torch._tensor", "_rebuild_from_type_v2"): _function(_rebuild_from_type_v2),
        ("torch", "Tensor"): _TensorType,
        ("torch._tensor", "Tensor"): _TensorType,
        ("torch.nn.parameter", "Parameter"): _TensorType,
        ("torch", "Size"): _function(_torch_size),
        ("torch", "device"): _function(_torch_device),
    }
    for core in ("numpy.core", "numpy._core"):
        for sub in ("multiarray", "_multiarray_umath"):
            allowed[(f"{core}.{sub}", "_reconstruct")] = _function(_np_reconstruct)
            allowed[(f"{core}.{sub}", "scalar")] = _function(_np_scalar)
        allowed[(f"{core}.numeric", "_frombuffer")] = _function(_np_frombuffer)
    for name, dtype in _STORAGE_TYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            allowed[(module, name)] = (lambda n=name, d=dtype: _StorageType(name=n, dtype=d))
    for name in _TORCH_DTYPES:
        allowed[("torch", name)] = lambda n=name: _TorchDtype(f"torch.{n}")
    return allowed


_ALLOWED_GLOBALS = _build_allowlist()
# Python 2 module names, which protocol-2 pickles written by Python 2 still use.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _refusal(path, module, name):
    message = (f"refusing to load global '{module}.{name}' from {path}: checkpoints may only "
               f"contain tensors and plain containers")
    if module == "torch.nn" or module.startswith("torch.nn."):
        message += (". The file holds a pickled torch.nn.Module (a whole model); load it in "
                    "PyTorch and save model.state_dict() instead")
    elif module.startswith("__torch__"):
        message += (". This is a TorchScript archive (torch.jit.save); export the weights with "
                    "torch.save(model.state_dict(), path)")
    elif name[:1].isupper():
        message += (". If this is a pickled model or training object, re-save only its weights, "
                    "e.g. torch.save(model.state_dict(), path)")
    return CheckpointError(message, path)


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves globals only from _ALLOWED_GLOBALS."""

    def __init__(self, file, path, encoding, persistent_load=None):
        super().__init__(file, encoding=encoding)
        self._path = path
        self._load_persistent = persistent_load

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise _refusal(self._path, module, name)
        return factory()

    def persistent_load(self, pid):
        if self._load_persistent is None:
            raise CheckpointError(f"{self._path} holds a persistent id but is not a PyTorch "
                                  f"checkpoint", self._path)
        return self._load_persistent(pid)


def _unpickle(stream, path, encoding, persistent_load=None):
    """Load one pickle from `stream`, turning every failure into a CheckpointError."""
    try:
        return _RestrictedUnpickler(stream, path, encoding, persistent_load).load()
    except CheckpointError:
        raise
    except _RefusedEval:
        raise _refusal(path, "builtins", "eval") from None
    except EOFError as exc:
        raise CheckpointError(f"{path} is truncated: the pickle ends early", path) from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path}: the pickle is nested too deeply to read", path) from exc
    except MemoryError as exc:
        raise CheckpointError(f"{path}: the pickle asks for more memory than is available", path) from exc
    except Exception as exc:  # any other failure here means the pickle stream is malformed
        raise CheckpointError(f"{path} is corrupt: cannot unpickle it "
                              f"({type(exc).__name__}: {exc})", path) from exc


# --------------------------------------------------------------------------- tensors

def _element_type(dtype, path):
    """numpy dtype in which the file stores elements of `dtype` (a storage type or torch dtype)."""
    if isinstance(dtype, _TorchDtype):
        element = _TORCH_DTYPES.get(dtype.short_name)
        if element is None:
            raise CheckpointError(f"{path} holds a tensor of type {dtype}, which numpy cannot "
                                  f"represent", path)
        dtype = element
    return np.dtype("<u2") if dtype == _BFLOAT16 else np.dtype(dtype)


def _persistent_storage(pid, path, storages):
    """The _Storage for a torch storage persistent id (zip or legacy form)."""
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
        if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
            raise CheckpointError(f"{path} holds a pickled torch.nn.Module (a whole model); load "
                                  f"it in PyTorch and save model.state_dict() instead", path)
        raise CheckpointError(f"{path}: unknown persistent id {pid!r}", path)
    if len(pid) == 5:
        _, storage_type, key, _location, numel = pid
        view = None
    elif len(pid) == 6:
        _, storage_type, key, _location, numel, view = pid
    else:
        raise CheckpointError(f"{path}: malformed storage id {pid!r}", path)
    if isinstance(storage_type, _StorageType):
        dtype = storage_type.dtype
    elif isinstance(storage_type, _TorchDtype):
        dtype = storage_type
    else:
        raise CheckpointError(f"{path}: storage id {pid!r} has no storage type", path)
    key = key.decode("ascii") if isinstance(key, bytes) else key
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise CheckpointError(f"{path}: malformed storage id {pid!r}", path)
    storage = storages.get(key)
    if storage is None:
        storage = storages[key] = _Storage(key, dtype, numel)
    elif storage.dtype != dtype or storage.numel != numel:
        raise CheckpointError(f"{path}: storage {key!r} is recorded with two different types "
                              f"or sizes", path)
    if view is None:
        return storage
    if (not isinstance(view, tuple) or len(view) != 3
            or not all(type(v) is int for v in view[1:])):
        raise CheckpointError(f"{path}: malformed storage view {view!r}", path)
    _view_key, view_offset, view_numel = view
    if view_offset < 0 or view_numel < 0 or view_offset + view_numel > numel:
        raise CheckpointError(f"{path}: storage view {view!r} lies outside storage {key!r} "
                              f"of {numel} elements", path)
    return _Storage(key, dtype, view_numel, root=storage, offset=view_offset)


def _check_dims(values, what, path):
    if not isinstance(values, tuple) or not all(type(v) is int and v >= 0 for v in values):
        raise CheckpointError(f"{path}: tensor {what} must be non-negative integers, got {values!r}", path)


def _widen_bfloat16(array):
    # bfloat16 is the top half of a float32
    return (array.astype(np.uint32) << 16).view(np.float32)


class _ArrayBuilder:
    """Turns _LazyTensor records into numpy arrays, given the raw bytes of each root storage."""

    def __init__(self, path, read_storage, big_endian=False):
        self.path = path
        self._read_storage = read_storage  # (_Storage root) -> bytes-like of root.numel elements
        self._big_endian = big_endian
        self._buffers = {}        # storage key -> bytes-like
        self._handed_out = set()  # storage keys whose buffer an output array already uses

    def _elements(self, storage, element_type):
        """The storage as a flat array of `element_type`, in the file's byte order."""
        root = storage.root or storage
        if root.key not in self._buffers:
            self._buffers[root.key] = self._read_storage(root)
        buffer = self._buffers[root.key]
        root_size = _element_type(root.dtype, self.path).itemsize
        start = storage.offset * root_size
        nbytes = storage.numel * root_size
        if self._big_endian:
            element_type = element_type.newbyteorder(">")
        flat = np.frombuffer(buffer, dtype=element_type, count=nbytes // element_type.itemsize,
                             offset=start)
        return root, flat

    def storage_array(self, storage):
        """A storage saved on its own, as a 1-D array."""
        _, flat = self._elements(storage, _element_type(storage.dtype, self.path))
        return self._finish(flat.copy(), storage.dtype)

    def tensor_array(self, tensor):
        dtype = tensor.dtype if tensor.dtype is not None else tensor.storage.dtype
        size, stride, offset = tensor.size, tensor.stride, tensor.offset
        _check_dims(size, "sizes", self.path)
        _check_dims(stride, "strides", self.path)
        if len(size) != len(stride) or type(offset) is not int or offset < 0:
            raise CheckpointError(f"{self.path}: malformed tensor: size {size!r}, stride "
                                  f"{stride!r}, offset {offset!r}", self.path)
        root, flat = self._elements(tensor.storage, _element_type(dtype, self.path))
        numel = math.prod(size)
        if numel == 0:
            return self._finish(np.zeros(size, dtype=flat.dtype), dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(flat):
            raise CheckpointError(
                f"{self.path}: storage {root.key!r} is too short: a tensor of size {list(size)}, "
                f"stride {list(stride)} at offset {offset} needs {last + 1} elements, the storage "
                f"has {len(flat)}", self.path)
        if numel > len(flat) and numel * flat.itemsize > _MAX_EXPANDED_BYTES:
            raise CheckpointError(f"{self.path}: a tensor of size {list(size)} expands a storage "
                                  f"of {len(flat)} elements beyond {_MAX_EXPANDED_BYTES} bytes",
                                  self.path)
        contiguous = stride == tuple(math.prod(size[i + 1:]) for i in range(len(size)))
        if (contiguous and offset == 0 and numel == len(flat) and flat.flags.writeable
                and root.key not in self._handed_out):
            # the whole storage in order: the buffer itself becomes the array, no copy
            self._handed_out.add(root.key)
            array = flat.reshape(size)
        else:
            array = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride],
                writeable=False).copy()
        array = self._finish(array, dtype)
        if tensor.metadata.get("neg"):
            array = np.negative(array)
        if tensor.metadata.get("conj"):
            array = np.conj(array)
        return array

    @staticmethod
    def _finish(array, dtype):
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("="))
        if dtype in (_BFLOAT16, "torch.bfloat16"):
            array = _widen_bfloat16(array)
        return array


def _materialize(obj, builder, path):
    """Replace tensors, storages and pending numpy objects in `obj` by arrays and dtypes, and
    the Namespace/CfgNode stand-ins by plain dicts."""
    done = {}

    def convert(item):
        known = done.get(id(item))
        if known is not None:
            return known[1]
        if isinstance(item, _LazyTensor):
            result = builder.tensor_array(item)
        elif isinstance(item, _Storage):
            result = builder.storage_array(item)
        elif isinstance(item, _PendingArray):
            if item.array is None:
                raise CheckpointError(f"{path} is corrupt: a numpy array has no data", path)
            result = item.array
            if result.dtype.hasobject:
                result = convert(result)
        elif isinstance(item, _PendingDtype):
            result = item.dtype
        elif isinstance(item, np.ndarray) and item.dtype.hasobject:
            done[id(item)] = (item, item)
            for index, value in enumerate(item.flat):
                item.flat[index] = convert(value)
            result = item
        elif isinstance(item, (_NamespaceDict, _ConfigDict)):
            result = {}
            done[id(item)] = (item, result)
            result.update((key, convert(value)) for key, value in item.items())
        elif isinstance(item, dict):
            done[id(item)] = (item, item)
            for key, value in item.items():
                item[key] = convert(value)
            result = item
        elif isinstance(item, list):
            done[id(item)] = (item, item)
            item[:] = [convert(value) for value in item]
            result = item
        elif isinstance(item, tuple):
            converted = tuple(convert(value) for value in item)
            result = converted if any(a is not b for a, b in zip(converted, item)) else item
        elif isinstance(item, (set, frozenset)):
            if any(isinstance(value, (_LazyTensor, _Storage, _PendingArray)) for value in item):
                raise CheckpointError(f"{path}: arrays inside a set are not supported", path)
            return item
        elif isinstance(item, _Inert):
            raise CheckpointError(f"{path}: the checkpoint holds a bare {item!r}, which is not "
                                  f"data", path)
        else:
            return item
        done[id(item)] = (item, result)  # holds `item` so that its id is not reused
        return result

    try:
        return convert(obj)
    except RecursionError as exc:
        raise CheckpointError(f"{path}: the checkpoint is nested too deeply to read", path) from exc


# --------------------------------------------------------------------------- formats

def _read_exact(stream, nbytes):
    """Up to `nbytes` from `stream` into a fresh (writable) bytearray, and how many arrived."""
    buffer = bytearray(nbytes)
    view, filled = memoryview(buffer), 0
    while filled < nbytes:
        got = stream.readinto(view[filled:])
        if not got:
            break
        filled += got
    return buffer, filled


def _read_torch_zip(path, file):
    try:
        archive = zipfile.ZipFile(file)
        names = archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is a corrupt or truncated zip archive ({exc})", path) from exc
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        found = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint: expected one "
                              f"'<name>/data.pkl' record, found [{found}]", path)
    prefix = pickles[0][:-len("data.pkl")]

    def read_record(name, nbytes=None):
        """The first `nbytes` (default: all) of a record; never allocates more than it declares."""
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{path}: record '{name}' is missing from the archive", path) from None
        if nbytes is None:
            nbytes = info.file_size
        elif info.file_size < nbytes:
            raise CheckpointError(f"{path}: record '{name}' holds {info.file_size} bytes, {nbytes} "
                                  f"are needed", path)
        try:
            with archive.open(info) as record:
                buffer, got = _read_exact(record, nbytes)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"{path}: record '{name}' is corrupt or truncated ({exc})", path) from exc
        if got < nbytes:
            raise CheckpointError(f"{path}: record '{name}' is truncated: {got} of {nbytes} bytes "
                                  f"are present", path)
        return buffer

    big_endian = False
    if prefix + "byteorder" in names:
        declared = archive.getinfo(prefix + "byteorder").file_size
        order = bytes(read_record(prefix + "byteorder", min(declared, 16))).strip()
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{path}: unknown byte order {order[:16]!r} in {prefix}byteorder", path)
        big_endian = order == b"big"

    storages = {}
    obj = _unpickle(io.BytesIO(read_record(prefix + "data.pkl")), path, "utf-8",
                    lambda pid: _persistent_storage(pid, path, storages))

    def read_storage(storage):
        nbytes = storage.numel * _element_type(storage.dtype, path).itemsize
        return read_record(f"{prefix}data/{storage.key}", nbytes)

    try:
        return _materialize(obj, _ArrayBuilder(path, read_storage, big_endian), path)
    finally:
        archive.close()


def _read_torch_legacy(path, stream, size):
    """The rest of a legacy torch file, after its magic-number pickle was read from `stream`."""
    version = _unpickle(stream, path, "utf-8")
    if version != _TORCH_LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy PyTorch protocol version {version!r} "
                              f"(expected {_TORCH_LEGACY_PROTOCOL})", path)
    sys_info = _unpickle(stream, path, "utf-8")
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    storages = {}
    obj = _unpickle(stream, path, "utf-8", lambda pid: _persistent_storage(pid, path, storages))
    keys = _unpickle(stream, path, "utf-8")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{path}: malformed storage key list after the object pickle", path)
    # The storages follow in key order: <int64 element count><raw bytes>.
    buffers = {}
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise CheckpointError(f"{path}: storage {key!r} is listed but no tensor uses it", path)
        header = stream.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{path} is truncated: storage {key!r} is missing", path)
        (count,) = struct.unpack(">q" if big_endian else "<q", header)
        if count != storage.numel:
            raise CheckpointError(f"{path}: storage {key!r} holds {count} elements, the pickle "
                                  f"expects {storage.numel}", path)
        nbytes = count * _element_type(storage.dtype, path).itemsize
        remaining = size - stream.tell()
        if nbytes > remaining:
            raise CheckpointError(f"{path} is truncated: storage {key!r} needs {nbytes} bytes, "
                                  f"{remaining} remain", path)
        buffers[key], got = _read_exact(stream, nbytes)
        if got < nbytes:
            raise CheckpointError(f"{path} is truncated: storage {key!r} ends early", path)
    missing = sorted(set(storages) - set(buffers))
    if missing:
        raise CheckpointError(f"{path}: storages {missing} are used but not stored", path)
    builder = _ArrayBuilder(path, lambda storage: buffers[storage.key], big_endian)
    return _materialize(obj, builder, path)


def _join_paddle_slices(obj, path):
    """Undo paddle.save's splitting of arrays larger than 1 GiB (pickle protocols 2 and 3)."""
    info = obj.pop(_PADDLE_SPLIT_INFO)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: malformed '{_PADDLE_SPLIT_INFO}' entry", path)
    for name, entry in info.items():
        try:
            parts = [obj.pop(part) for part in entry["slices"]]
            obj[name] = np.concatenate(parts).reshape(entry["OriginShape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot reassemble split array {name!r} ({exc})", path) from exc
    return obj


def _read_pickle(path, stream, size):
    first = _unpickle(stream, path, "latin1")
    if type(first) is int and first == _TORCH_LEGACY_MAGIC:
        return _read_torch_legacy(path, stream, size)
    if stream.tell() != size:
        logger.warning("%s: ignoring %d bytes after the end of the pickle", path, size - stream.tell())
    obj = _materialize(first, _ArrayBuilder(path, None), path)
    if isinstance(obj, dict) and _PADDLE_SPLIT_INFO in obj:
        obj = _join_paddle_slices(obj, path)
    return obj


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})", path) from exc
    except TypeError as exc:
        if "bfloat16" not in str(exc):
            raise CheckpointError(f"{path}: cannot read it with safetensors ({exc})", path) from exc
    return _read_safetensors_raw(path)


# safetensors dtype -> numpy type the bytes are read as (BF16 is widened to float32 afterwards)
_SAFETENSORS_TYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def _read_safetensors_raw(path):
    """safetensors.numpy cannot return bfloat16; read such files by their documented layout.
    Only reached after safetensors itself has parsed and validated the header."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        (header_len,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(data[8:8 + header_len])
        body = memoryview(data)[8 + header_len:]
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            kind = entry["dtype"]
            if kind not in _SAFETENSORS_TYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {kind}, which numpy "
                                      f"cannot represent", path)
            begin, end = entry["data_offsets"]
            array = np.frombuffer(body[begin:end], dtype=_SAFETENSORS_TYPES[kind])
            array = array.reshape(entry["shape"]).astype(array.dtype.newbyteorder("="))
            out[name] = _widen_bfloat16(array) if kind == "BF16" else array
        return out
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})", path) from exc


def detect_format(path):
    """'torch-zip', 'pickle' (Paddle, legacy torch, ...), 'safetensors' or 'torch-tar', by content.

    Raises FileNotFoundError if `path` does not exist and CheckpointError if it is none of these.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, expected a checkpoint file", path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes)", path)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack_from("<Q", head)[0] <= size - 8:
        return "safetensors"
    if head[257:262] == b"ustar":
        return "torch-tar"
    raise CheckpointError(
        f"{path} is not a recognised checkpoint: its first bytes are {head[:16].hex(' ')}; expected "
        f"a PyTorch zip (PK..), a pickle (0x80 0x02-0x05) or a safetensors file", path)


def read_checkpoint(path):
    """The top-level dict of a checkpoint file, with every tensor as a numpy array.

    PyTorch (zip and legacy) and Paddle files are read through a restricted unpickler that only
    accepts tensors, numpy arrays and plain containers; bfloat16 tensors become float32.
    Raises FileNotFoundError if `path` does not exist and CheckpointError (naming the file) if it
    is corrupt, truncated, of an unknown format, or refers to anything else.
    """
    path = os.fspath(path)
    kind = detect_format(path)
    if kind == "torch-tar":
        raise CheckpointError(f"{path} is a PyTorch tar checkpoint (torch < 0.4), which is not "
                              f"supported; re-save it with a newer torch", path)
    if kind == "safetensors":
        obj = _read_safetensors(path)
    else:
        with open(path, "rb") as f:
            if kind == "torch-zip":
                obj = _read_torch_zip(path, f)
            else:
                obj = _read_pickle(path, f, os.fstat(f.fileno()).st_size)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict "
                              f"(a state dict or a training checkpoint)", path)
    return obj


# --------------------------------------------------------------------------- state dicts

def _is_weight(value):
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


def _looks_like_state_dict(value):
    return (isinstance(value, dict) and len(value) > 0 and all(isinstance(k, str) for k in value)
            and any(_is_weight(v) for v in value.values()))


def _flatten(mapping, prefix, out, dropped):
    for name, value in mapping.items():
        full = f"{prefix}{name}"
        if _is_weight(value):
            # (not np.ascontiguousarray: it turns 0-d arrays into 1-d)
            out[full] = value if value.flags.c_contiguous else value.copy(order="C")
        elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            _flatten(value, full + ".", out, dropped)
        else:
            dropped.append(full)


def read_state_dict(path, key=None):
    """The weights of a checkpoint as an OrderedDict name -> C-contiguous numpy array.

    Without `key`, the weights are the first of STATE_DICT_KEYS whose value is a dict of arrays,
    else the top level; with `key`, they are `checkpoint[key]`. Nested dicts are flattened with
    '.' joins; entries that are not numeric arrays (epochs, names, ...) are left out with a
    warning; a 'module.' prefix (DataParallel) that most keys carry is stripped. Paddle's
    parameter-name table is dropped.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    ckpt.pop(_PADDLE_NAME_TABLE, None)
    if key is not None:
        if key not in ckpt:
            raise CheckpointError(f"key {key!r} not found in {path}; available keys: "
                                  f"{sorted(map(str, ckpt))}", path)
        source, where = ckpt[key], f"{path}[{key!r}]"
        if not _looks_like_state_dict(source):
            raise CheckpointError(f"{where} is a {type(source).__name__} without arrays, expected "
                                  f"a state dict", path)
    else:
        found = next((k for k in STATE_DICT_KEYS if _looks_like_state_dict(ckpt.get(k))), None)
        if found is not None:
            source, where = ckpt[found], f"{path}[{found!r}]"
        elif _looks_like_state_dict(ckpt):
            source, where = ckpt, path
        else:
            raise CheckpointError(f"{path} holds no state dict: neither its top level nor any of "
                                  f"the keys {list(STATE_DICT_KEYS)} is a dict of arrays; available "
                                  f"keys: {sorted(map(str, ckpt))}. Pass key=... to choose one", path)

    state, dropped = collections.OrderedDict(), []
    _flatten(source, "", state, dropped)
    if dropped:
        shown = ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else "")
        logger.warning("%s: leaving out %d entries that are not numeric arrays: %s",
                       where, len(dropped), shown)

    prefixed = sum(name.startswith("module.") for name in state)
    if prefixed * 2 > len(state):
        stripped = collections.OrderedDict()
        for name, value in state.items():
            new = name[len("module."):] if name.startswith("module.") else name
            if new in stripped:
                raise CheckpointError(f"{where}: removing the 'module.' prefix makes two entries "
                                      f"named {new!r}", path)
            stripped[new] = value
        logger.info("%s: removed the 'module.' prefix from %d of %d keys", where, prefixed, len(state))
        state = stripped
    return state
