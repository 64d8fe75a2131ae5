"""`plfusion-env` / `python -m plfusion.env`: the environment report to paste into a bug report.

    plfusion-env              # a text block: versions, Paddle's build, devices, CPU threads, extras,
                              # problems found, and a self-check
    plfusion-env --json       # the same as JSON, for tools
    plfusion-env --no-self-check

The self-check runs one forward and backward pass of a tiny ViT on the CPU and on every GPU this
Paddle can use, and once more with AMP (O1, float16) on each GPU; each is pass or fail with the
error. Exit status 1 when a self-check fails, else 0. It takes a few seconds.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import paddle

from . import __version__
from .paddle_check import gpu_status, installed_paddle_dists, install_command, wheel_index
from .utils.cpu import available_cpus, cpu_model, cpu_vendor, stride_kernels_on

__all__ = ["collect", "format_text", "self_check", "nvidia_driver", "main"]

OPTIONAL = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "paddle2onnx": ("paddle2onnx",),
            "visualdl": ("visualdl",), "nvidia-ml-py": ("nvidia-ml-py",)}


def _dist_version(*names):
    """'1.2.3' (or '1.2.3 (other-name)') of the first installed distribution, else None."""
    from importlib import metadata
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return version if name == names[0] else f"{version} ({name})"
    return None


def _probe(fn, *args):
    """fn(*args), or None where this Paddle lacks or fails it: the report must never stop."""
    try:
        return fn(*args) if callable(fn) else None
    except Exception:   # noqa: BLE001
        return None


def _version_attr(name):
    """paddle.version.<name>: a function in some releases, a plain value in others."""
    value = getattr(paddle.version, name, None)
    return _probe(value) if callable(value) else value


def _off(value):
    """Paddle's version probes say False / 0 / None / '' for 'not built with it'."""
    return None if value in (False, 0, None, "", "False", "0", "None") else str(value)


def nvidia_driver():
    """{'version', 'cuda' (newest CUDA it runs), 'source'} of the NVIDIA driver, or None.
    nvidia-ml-py (the `gpu` extra) first, else nvidia-smi's header."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            version, cuda = pynvml.nvmlSystemGetDriverVersion(), pynvml.nvmlSystemGetCudaDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        version = version.decode() if isinstance(version, bytes) else str(version)
        return {"version": version, "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}", "source": "nvidia-ml-py"}
    except Exception:   # noqa: BLE001 - not installed, or no driver library: try nvidia-smi
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    version, cuda = re.search(r"Driver Version:\s*([\d.]+)", out), re.search(r"CUDA Version:\s*([\d.]+)", out)
    if version is None:
        return None
    return {"version": version.group(1), "cuda": cuda.group(1) if cuda else None, "source": "nvidia-smi"}


def _opencv_version():
    try:
        import cv2
        return cv2.__version__
    except Exception as e:   # noqa: BLE001 - a broken cv2 is worth reporting, not a crash
        return f"not importable ({type(e).__name__}: {e})"


def _paddle_build():
    core = paddle.base.core
    onednn = getattr(core, "is_compiled_with_onednn", None) or getattr(core, "is_compiled_with_mkldnn", None)
    v = paddle.version
    return {
        "cuda": _off(_probe(v.cuda)), "cudnn": _off(_probe(v.cudnn)), "nccl": _off(_probe(v.nccl)),
        "tensorrt": _off(_version_attr("tensorrt")), "cuda_archs": _version_attr("cuda_archs") or [],
        "onednn": bool(_probe(onednn)), "mkl": str(_version_attr("with_mkl")).upper() == "ON",
        "cinn": bool(_probe(paddle.is_compiled_with_cinn)),
        "distributed": bool(_probe(paddle.is_compiled_with_distribute)),
        "rocm": bool(_probe(paddle.is_compiled_with_rocm)), "xpu": bool(_probe(paddle.is_compiled_with_xpu)),
    }


def _gpus(count):
    out = []
    for i in range(count):
        props = _probe(paddle.device.cuda.get_device_properties, i)
        out.append({"index": i, "name": getattr(props, "name", None) or _probe(paddle.device.cuda.get_device_name, i),
                    "memory_gib": round(props.total_memory / 2 ** 30, 1) if props is not None else None,
                    "capability": f"{props.major}.{props.minor}" if props is not None else None})
    return out


def _devices():
    usable, info = gpu_status()
    driver = nvidia_driver()
    runtime_trt = None
    if paddle.is_compiled_with_cuda():
        from .inference import tensorrt_available
        runtime_trt = bool(_probe(tensorrt_available))
    return {
        "paddle_device": paddle.device.get_device(), "gpu_usable": usable,
        "gpu_problem": None if usable else info, "gpus": _gpus(info) if usable else [],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "driver": driver,
        "wheel_for_driver": wheel_index(driver["cuda"]) if driver and driver.get("cuda") else None,
        "tensorrt_loadable": runtime_trt,
    }


def _cpu():
    from .engine.cli import default_threads
    threads, cores, procs = default_threads()
    return {"model": cpu_model(), "vendor": cpu_vendor(), "usable_cores": available_cpus(),
            "logical_cpus": os.cpu_count(), "default_threads": threads, "processes_here": procs,
            "stride_kernels": stride_kernels_on(),
            **{var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")}}


# ----------------------------------------------------------------------------- self-check

def _tiny_step(device, amp):
    """One forward + backward of a tiny ViT on `device`; raises when a value is not finite."""
    import numpy as np
    import paddle.nn.functional as F

    from .models import create_model
    previous = paddle.device.get_device()
    paddle.set_device(device)
    try:
        model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=4)
        x, label = paddle.randn([2, 3, 16, 16]), paddle.to_tensor([0, 3])
        with paddle.amp.auto_cast(enable=amp is not None, level=amp or "O1", dtype="float16"):
            logits = model(x)
        loss = F.cross_entropy(logits.astype("float32"), label)
        loss.backward()
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"loss is {float(loss)}")
        missing = [p.name for p in model.parameters() if p.grad is None]
        if missing:
            raise RuntimeError(f"no gradient for {len(missing)} parameter(s), e.g. {missing[0]}")
        bad = [p.name for p in model.parameters() if not np.isfinite(p.grad.numpy()).all()]
        if bad:
            raise FloatingPointError(f"non-finite gradient in {len(bad)} parameter(s), e.g. {bad[0]}")
    finally:
        paddle.set_device(previous)


def self_check(gpu_count):
    """[{name, device, amp, ok, seconds, error}] for the CPU, each GPU, and AMP on each GPU."""
    runs = [("cpu", "cpu", None)]
    for i in range(gpu_count):
        runs += [(f"gpu:{i}", f"gpu:{i}", None), (f"gpu:{i} AMP O1 float16", f"gpu:{i}", "O1")]
    results = []
    for name, device, amp in runs:
        t0 = time.perf_counter()
        try:
            _tiny_step(device, amp)
            error = None
        except Exception as e:   # noqa: BLE001 - every failure is a result to report
            error = f"{type(e).__name__}: {e}"
        results.append({"name": name, "device": device, "amp": amp, "ok": error is None,
                        "seconds": round(time.perf_counter() - t0, 3), "error": error})
    return results


# ----------------------------------------------------------------------------- report

def _problems(report):
    out = []
    dists, dev, build = report["paddle"]["wheels"], report["devices"], report["paddle_build"]
    if len(dists) > 1:
        out.append(f"both {' and '.join(dists)} are installed; they overwrite each other's files: uninstall both "
                   f"(pip uninstall -y {' '.join(dists)}), then install one")
    driver = dev["driver"]
    if driver and not build["cuda"]:
        cmd = install_command(True, driver.get("cuda")) if dev["wheel_for_driver"] else None
        out.append(f"an NVIDIA driver {driver['version']} is here but this Paddle is a CPU build" +
                   (f"; for GPUs: {cmd}" if cmd else f"; the driver (CUDA {driver.get('cuda')}) is older than "
                                                    f"every Paddle 3 GPU wheel (CUDA >= 11.8): update it"))
    if build["cuda"] and not dev["gpu_usable"]:
        out.append(dev["gpu_problem"])
    out += [f"self-check {r['name']} failed" for r in report["self_check"] or [] if not r["ok"]]
    return out


def collect(run_self_check=True):
    """The whole report as a JSON-ready dict."""
    devices = _devices()
    report = {
        "plfusion": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "paddle": {"version": paddle.__version__, "commit": _version_attr("commit"),
                   "path": os.path.dirname(paddle.__file__), "wheels": installed_paddle_dists()},
        "numpy": _dist_version("numpy"), "opencv": _opencv_version(),
        "paddle_build": _paddle_build(),
        "devices": devices,
        "cpu": _cpu(),
        "optional": {key: _dist_version(*names) for key, names in OPTIONAL.items()},
        "self_check": self_check(len(devices["gpus"])) if run_self_check else None,
    }
    report["problems"] = _problems(report)
    return report


def _yes(flag):
    return "yes" if flag else "no"


def _short_error(error):
    """Paddle's C++ errors put the summary last; Python's put it first."""
    text = error.split("Error Message Summary:", 1)[-1].strip(" -\n")
    return " ".join(text.split())[:300]


def format_text(report):
    """The report as an aligned text block in a code fence, ready to paste into an issue."""
    lines = []

    def row(key, value, indent=0):
        lines.append(f"{' ' * indent}{key:<{22 - indent}} {value}")

    pd, build, dev, cpu = report["paddle"], report["paddle_build"], report["devices"], report["cpu"]
    lines.append("```text")
    lines.append("plfusion environment (plfusion-env)")
    row("plfusion", f"{report['plfusion']['version']}  {report['plfusion']['path']}")
    row("Python", f"{report['python']['version']} ({report['python']['implementation']})  "
                  f"{report['python']['executable']}")
    row("platform", report["platform"])
    wheels = ", ".join(f"{k} {v}" for k, v in pd["wheels"].items()) or "no pip metadata"
    row("Paddle", f"{pd['version']} (commit {(pd['commit'] or '?')[:12]}; {wheels})  {pd['path']}")
    row("numpy", report["numpy"])
    row("OpenCV", report["opencv"])
    lines.append("Paddle build")
    row("CUDA", build["cuda"] or "no (CPU build)", 2)
    row("cuDNN", build["cudnn"] or "-", 2)
    row("NCCL", build["nccl"] or "-", 2)
    row("TensorRT", (build["tensorrt"] or "-") + ("" if dev["tensorrt_loadable"] is None else
                                                  f" (runtime loadable: {_yes(dev['tensorrt_loadable'])})"), 2)
    if build["cuda_archs"]:
        row("CUDA archs", " ".join(map(str, build["cuda_archs"])), 2)
    row("oneDNN (MKLDNN)", _yes(build["onednn"]), 2)
    row("MKL", _yes(build["mkl"]), 2)
    row("CINN", _yes(build["cinn"]), 2)
    row("distributed", _yes(build["distributed"]), 2)
    if build["rocm"] or build["xpu"]:
        row("ROCm / XPU", f"{_yes(build['rocm'])} / {_yes(build['xpu'])}", 2)
    lines.append("Devices")
    row("Paddle's device", dev["paddle_device"], 2)
    if dev["gpus"]:
        for g in dev["gpus"]:
            row(f"gpu:{g['index']}", f"{g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}", 2)
    else:
        row("GPU", f"none usable: {dev['gpu_problem']}", 2)
    row("CUDA_VISIBLE_DEVICES", "unset" if dev["cuda_visible_devices"] is None else dev["cuda_visible_devices"], 2)
    driver = dev["driver"]
    row("NVIDIA driver", f"{driver['version']} (runs CUDA <= {driver['cuda']}; from {driver['source']}); "
                         f"Paddle GPU wheel for it: {dev['wheel_for_driver'] or 'none (driver too old)'}"
        if driver else "not found", 2)
    lines.append("CPU")
    row("model", f"{cpu['model']} ({cpu['vendor']})", 2)
    row("cores", f"{cpu['usable_cores']} usable of {cpu['logical_cpus']}", 2)
    row("plfusion threads", f"{cpu['default_threads']} per process by default (usable cores / {cpu['processes_here']} "
                            f"process(es) here; --threads N overrides)", 2)
    row("strided views", "on (FLAGS_use_stride_kernel=1 in the environment: transposes and reshapes are slower)"
        if cpu["stride_kernels"] else "off (plfusion's default: see plfusion/utils/cpu.py)", 2)
    row("env", ", ".join(f"{k}={cpu[k] if cpu[k] is not None else 'unset'}"
                         for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")), 2)
    lines.append("Optional packages")
    for key, version in report["optional"].items():
        row(key, version or "not installed", 2)
    lines.append("Self-check (tiny ViT, one forward + backward)")
    if report["self_check"] is None:
        row("-", "skipped (--no-self-check)", 2)
    for r in report["self_check"] or []:
        row(r["name"], f"pass ({r['seconds']:.2f} s)" if r["ok"] else f"FAIL: {_short_error(r['error'])}", 2)
    lines.append("Problems")
    for p in report["problems"] or ["none found"]:
        lines.append(f"  - {p}")
    lines.append("```")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="plfusion-env", description="Print plfusion's environment report (paste it "
                                "into a bug report) after a short self-check on every device.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-self-check", action="store_true", help="skip the tiny forward/backward runs")
    args = p.parse_args(argv)
    report = collect(run_self_check=not args.no_self_check)
    print(json.dumps(report, indent=2) if args.json else format_text(report), flush=True)
    return 1 if any(not r["ok"] for r in report["self_check"] or []) else 0


if __name__ == "__main__":
    sys.exit(main())
