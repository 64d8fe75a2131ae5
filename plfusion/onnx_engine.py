"""The onnxruntime engine: run the model.onnx that `plfusion-export --onnx` writes, on the CPU.

    from plfusion.onnx_engine import create_onnx_session, run_onnx_session
    session = create_onnx_session("out/gf_b0/model.onnx", threads=2)
    outputs = run_onnx_session(session, [rgb_batch, depth_batch])

paddle2onnx and onnxruntime are the optional extra `.[onnx]`; `require` turns a missing one into
one MissingPackageError that names the install command (the CLIs print it as one line).
"""
import importlib

import numpy as np

__all__ = ["ONNX_FILE", "INSTALL_HINT", "MissingPackageError", "require", "create_onnx_session",
           "run_onnx_session", "session_shapes"]

ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install -e '.[onnx]'"


class MissingPackageError(ImportError):
    """An optional package that a requested feature needs is not installed."""


def require(package, purpose):
    """Import and return `package`, or raise MissingPackageError saying that `purpose` needs it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == package:
            why = "is not installed"
        else:   # installed but broken (e.g. a missing shared library): keep the reason
            why = f"cannot be imported ({e})"
        raise MissingPackageError(f"{purpose} needs the {package} package, which {why}; install the ONNX "
                                  f"extra: {INSTALL_HINT}") from e


def create_onnx_session(path, threads):
    """An onnxruntime CPU session for `path` with `threads` intra-op threads (one inter-op thread:
    the graphs are one chain, and a second pool would only compete for the cores)."""
    ort = require("onnxruntime", "the onnxruntime engine")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"onnxruntime: threads must be a positive int, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3   # paddle2onnx leaves unused constants; onnxruntime warns about each
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def session_shapes(session):
    """({input name: shape}, {output name: shape}) with -1 for a dynamic dimension."""
    def shape(node):
        return [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
    return ({i.name: shape(i) for i in session.get_inputs()}, {o.name: shape(o) for o in session.get_outputs()})


def run_onnx_session(session, inputs):
    """Feed `inputs` (numpy arrays, in the session's input order), run, return every output as numpy."""
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"onnxruntime: the model takes {len(names)} inputs {names}, got {len(inputs)}")
    feed = {n: np.ascontiguousarray(x, dtype=np.float32) for n, x in zip(names, inputs)}
    return session.run(None, feed)
