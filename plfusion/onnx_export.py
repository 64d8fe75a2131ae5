"""ONNX export: OUT/model.onnx beside the Paddle inference model, converted by paddle2onnx and
checked against dygraph through onnxruntime (`plfusion-export --onnx`, `export_model(onnx=True)`).

The saved Paddle program (inference.json + .pdiparams) is converted with paddle2onnx's Python API
in a child process: paddle2onnx aborts the whole process on an operator it cannot convert, and
the export has to survive that to say why. Batch:

- the Paddle export's fixed batch (`--batch-size N`), when it has one;
- else `--onnx-batch-size N`: the model is traced once more with that batch and converted;
- else dynamic, and when the dynamic batch does not convert (GeminiFusion's split of the
  stacked modalities: "Cannot convert split op, due to target dimension is dynamic") a fixed
  batch of 1, with the reason logged and kept in deploy.yaml.

Predictor(engine="onnxruntime") runs a fixed-batch model on any batch (chunks, the last one
padded). deploy.yaml's `onnx` section records the file, the input and output shapes, the opset
and the versions; the check's largest difference goes to `check.max_abs_diff.onnxruntime`.
"""
import logging
import os
import re
import subprocess
import sys
import tempfile

from .export import _compare, save_model
from .inference import run_in_fixed_batches
from .onnx_engine import ONNX_FILE, create_onnx_session, require, run_onnx_session, session_shapes

__all__ = ["OnnxExportError", "ONNX_OPSET", "FALLBACK_BATCH", "require_onnx_export", "convert_to_onnx",
           "export_onnx", "verify_onnx"]

logger = logging.getLogger(__name__)

# 17 is the first opset with LayerNormalization, which every model here is full of
ONNX_OPSET = 17
FALLBACK_BATCH = 1
# paddle2onnx lists its converters under the old operator names; PIR names the same ops so
_P2O_NAMES = {"add": "elementwise_add", "subtract": "elementwise_sub", "multiply": "elementwise_mul",
              "divide": "elementwise_div", "maximum": "elementwise_max", "minimum": "elementwise_min",
              "matmul": "matmul_v2", "max": "reduce_max", "min": "reduce_min", "mean": "reduce_mean",
              "sum": "reduce_sum", "prod": "reduce_prod", "argmax": "arg_max", "argmin": "arg_min",
              "expand": "expand_v2", "flatten": "flatten_contiguous_range", "unsqueeze": "unsqueeze2",
              "arange": "range", "combine": "builtin_combine", "topk": "top_k_v2"}
_IO_OPS = {"data", "fetch", "feed", "parameter", "shadow_output"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class OnnxExportError(RuntimeError):
    """paddle2onnx cannot convert the saved model; `reason` is paddle2onnx's own account."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


def require_onnx_export():
    """Both packages of the ONNX export (conversion and check), or one MissingPackageError."""
    require("paddle2onnx", "the ONNX export (--onnx)")
    require("onnxruntime", "the ONNX export's check (--onnx)")


def _unconvertible_ops(model_file):
    """Operators of the saved program that paddle2onnx does not list as convertible (best effort)."""
    from paddle2onnx.paddle2onnx_cpp2py_export import get_all_supported_operators_pir
    from .inference import program_ops
    known = set(get_all_supported_operators_pir())
    out = []
    for op in sorted(program_ops(model_file) - _IO_OPS):
        names = {op, op.rstrip("_"), _P2O_NAMES.get(op, op), _P2O_NAMES.get(op.rstrip("_"), op)}
        if not names & known:
            out.append(op)
    return out


def _error_lines(text):
    """paddle2onnx's error lines from its console output, without colours, times and tags."""
    lines = []
    for line in _ANSI.sub("", text).splitlines():
        if "[ERROR]" not in line:
            continue
        line = re.sub(r"^.*\[ERROR\](\[Paddle2ONNX\])?\s*", "", line).strip()
        if line and line not in lines:
            lines.append(line)
    return lines


def convert_to_onnx(prefix, onnx_file, opset=ONNX_OPSET):
    """Convert PREFIX.json + PREFIX.pdiparams to `onnx_file` with paddle2onnx in a child process;
    raise OnnxExportError with paddle2onnx's reason when it cannot."""
    require("paddle2onnx", "the ONNX export (--onnx)")
    model_file, params_file = prefix + ".json", prefix + ".pdiparams"
    tmp = onnx_file + ".part"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "plfusion.onnx_export", model_file, params_file, tmp, str(opset)],
                          capture_output=True, text=True, env=env)
    if proc.returncode == 0 and os.path.isfile(tmp):
        os.replace(tmp, onnx_file)
        return onnx_file
    if os.path.exists(tmp):
        os.remove(tmp)
    reasons = _error_lines(proc.stdout + "\n" + proc.stderr)
    if any("unsupported operators" in r for r in reasons):
        ops = _unconvertible_ops(model_file)
        if ops:
            reasons.append(f"Operators paddle2onnx does not list as convertible: {ops}.")
    if not reasons:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        reasons = tail[-1:] or [f"exit status {proc.returncode}"]
    reason = " ".join(reasons)
    raise OnnxExportError(f"paddle2onnx cannot convert {model_file}: {reason}", reason)


def verify_onnx(expected, onnx_file, inputs, atol=1e-4, rtol=1e-4, threads=1, session=None):
    """Run `onnx_file` (or its open `session`) with onnxruntime on `inputs` (any batch; a fixed-batch
    model runs in chunks) and compare with `expected`; raise ExportMismatchError on a mismatch.
    Returns the largest absolute difference."""
    session = session or create_onnx_session(onnx_file, threads)
    batch = next(iter(session_shapes(session)[0].values()))[0]
    got = run_in_fixed_batches(lambda xs: run_onnx_session(session, xs), list(inputs), batch)
    return _compare(expected, got, onnx_file, "onnxruntime", atol, rtol)


def _fixed(specs, batch):
    import paddle
    return [paddle.static.InputSpec([batch] + list(s.shape[1:]), s.dtype, s.name) for s in specs]


def _convert_fixed(model, specs, batch, onnx_file, opset):
    """Trace `model` once more with a fixed batch (in a scratch directory) and convert that."""
    with tempfile.TemporaryDirectory(prefix="plfusion_onnx_") as tmp:
        convert_to_onnx(save_model(model, _fixed(specs, batch), tmp), onnx_file, opset)


def export_onnx(model, specs, prefix, expected, inputs, atol=1e-4, rtol=1e-4, threads=1, batch_size=None,
                opset=ONNX_OPSET):
    """Write model.onnx beside the Paddle model at PREFIX (saved from `model` with `specs`) and check
    it on `inputs` against the dygraph outputs `expected`. `batch_size` fixes the ONNX batch
    (default: the Paddle model's; dynamic when that is, else FALLBACK_BATCH when the dynamic batch
    does not convert). Returns (deploy.yaml's `onnx` section, largest absolute difference)."""
    import onnxruntime
    import paddle2onnx
    onnx_file = os.path.join(os.path.dirname(prefix), ONNX_FILE)
    paddle_batch = specs[0].shape[0]
    paddle_batch = paddle_batch if paddle_batch not in (None, -1) else None
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"export: the ONNX batch size must be a positive int, got {batch_size!r}")
    if paddle_batch is not None and batch_size not in (None, paddle_batch):
        raise ValueError(f"export: the Paddle model's batch is fixed at {paddle_batch}; the ONNX model is converted "
                         f"from it, so its batch cannot be {batch_size}")

    def attempt(batch):
        """None when `batch` (None: the Paddle model's own) converts, else paddle2onnx's reason."""
        try:
            if batch is None or batch == paddle_batch:
                convert_to_onnx(prefix, onnx_file, opset)
            else:
                _convert_fixed(model, specs, batch, onnx_file, opset)
        except OnnxExportError as e:
            return e.reason
        return None

    batch, note = paddle_batch or batch_size, None
    reason = attempt(batch)
    if reason is not None and batch is None and "dynamic" in reason.lower():
        note = reason
        logger.warning("export: the dynamic batch does not convert to ONNX (%s); model.onnx takes a fixed batch of %d "
                       "(--onnx-batch-size N for another)", note, FALLBACK_BATCH)
        batch = FALLBACK_BATCH
        reason = attempt(batch)
    if reason is not None:
        shape = "dynamic batch" if batch is None else f"batch fixed at {batch}"
        raise OnnxExportError(f"paddle2onnx {paddle2onnx.__version__} cannot convert this model ({shape}, opset "
                              f"{opset}): {reason.rstrip('.')}. Serve it with the paddle engine, or export without "
                              f"--onnx.", reason)
    session = create_onnx_session(onnx_file, threads)
    ins, outs = session_shapes(session)
    names = [s.name for s in specs]
    if list(ins) != names:
        raise OnnxExportError(f"{onnx_file}: inputs {list(ins)}, expected {names}")
    worst = verify_onnx(expected, onnx_file, inputs, atol, rtol, threads, session)
    info = {"model_file": ONNX_FILE, "batch": next(iter(ins.values()))[0],
            "inputs": [{"name": n, "shape": s} for n, s in ins.items()],
            "outputs": [{"name": n, "shape": s} for n, s in outs.items()],
            "opset": opset, "paddle2onnx": paddle2onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if note is not None:
        info["dynamic_batch_error"] = note
    return info, worst


def _child(argv):
    """python -m plfusion.onnx_export MODEL PARAMS OUT OPSET: the conversion, alone in its process."""
    model_file, params_file, out_file, opset = argv
    import paddle2onnx
    try:
        data = paddle2onnx.export(model_file, params_file, save_file=None, opset_version=int(opset),
                                  auto_upgrade_opset=True, enable_onnx_checker=True, enable_optimize=True)
    except Exception as e:   # noqa: BLE001 - paddle2onnx logs its error, then fails on its unset result
        print(f"[ERROR] {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not isinstance(data, (bytes, bytearray)) or not data:
        print("[ERROR] paddle2onnx returned no model", file=sys.stderr)
        return 1
    with open(out_file, "wb") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
