"""The environment report (`plfusion-env`, `python -m plfusion.env`): text and JSON, the self-check
passing on this machine's devices and reporting a failure, and the NVIDIA driver lines."""
import json
import os
import re
import subprocess
import sys
import types

import paddle
import pytest

from conftest import ROOT
from plfusion import env
from plfusion.paddle_check import gpu_status

SMI_HEADER = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.14              Driver Version: 550.54.14      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_json_report_from_the_command_line():
    res = subprocess.run([sys.executable, "-m", "plfusion.env", "--json"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["paddle"]["version"] == paddle.__version__ and report["plfusion"]["version"] == "0.1.0"
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["numpy"] and report["opencv"][0].isdigit()
    assert report["paddle_build"]["onednn"] is True and report["paddle_build"]["cuda"] == \
        (str(paddle.version.cuda()) if paddle.is_compiled_with_cuda() else None)
    assert report["cpu"]["usable_cores"] >= 1 and report["cpu"]["default_threads"] >= 1
    assert report["cpu"]["stride_kernels"] is False or "FLAGS_use_stride_kernel" in os.environ   # off unless asked
    assert set(report["optional"]) == {"onnxruntime", "paddle2onnx", "visualdl", "nvidia-ml-py"}
    usable, info = gpu_status()
    checks = {r["name"]: r for r in report["self_check"]}
    assert checks["cpu"]["ok"] and checks["cpu"]["error"] is None
    assert len(checks) == 1 + 2 * (info if usable else 0)       # cpu, then each GPU plain and with AMP
    assert all(r["ok"] for r in checks.values()), report["self_check"]


def test_text_report_is_one_pasteable_block(capsys):
    assert env.main([]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert lines[0] == "```text" and lines[-1] == "```" and lines[1] == "plfusion environment (plfusion-env)"
    for heading in ("Paddle build", "Devices", "CPU", "Optional packages",
                    "Self-check (tiny ViT, one forward + backward)", "Problems"):
        assert heading in lines
    assert any(line.startswith("Paddle ") and paddle.__version__ in line for line in lines)
    assert any(re.fullmatch(r"  cpu +pass \(\d+\.\d\d s\)", line) for line in lines)
    assert any(line.strip().startswith("visualdl") for line in lines)
    assert any(line.strip().startswith("strided views") for line in lines)
    assert paddle.device.get_device() == "cpu" or gpu_status()[0]      # the self-check put the device back


def test_a_failing_self_check_is_reported_with_its_error_and_exit_1(monkeypatch, capsys):
    def broken(device, amp):
        raise RuntimeError("boom on " + device)

    monkeypatch.setattr(env, "_tiny_step", broken)
    assert env.main([]) == 1
    text = capsys.readouterr().out
    assert "  cpu                  FAIL: RuntimeError: boom on cpu" in text and "  - self-check cpu failed" in text
    assert env.main(["--no-self-check"]) == 0
    assert "skipped (--no-self-check)" in capsys.readouterr().out


def test_driver_from_nvidia_smi_and_the_wheel_it_takes(monkeypatch):
    if gpu_status()[0]:
        pytest.skip("on a machine with a usable GPU the CPU-build hint does not apply")
    monkeypatch.setitem(sys.modules, "pynvml", None)                # nvidia-ml-py absent: nvidia-smi is read
    monkeypatch.setattr(env.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    monkeypatch.setattr(env.subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=SMI_HEADER))
    assert env.nvidia_driver() == {"version": "550.54.14", "cuda": "12.4", "source": "nvidia-smi"}
    report = env.collect(run_self_check=False)
    assert report["devices"]["wheel_for_driver"] == "cu118"
    text = env.format_text(report)
    assert "  NVIDIA driver        550.54.14 (runs CUDA <= 12.4; from nvidia-smi); Paddle GPU wheel for it: cu118" \
        in text
    # a driver without a CUDA build of Paddle is the common "why is my GPU unused": the fix is named
    hint = [p for p in report["problems"] if "NVIDIA driver 550.54.14 is here but this Paddle is a CPU build" in p]
    assert len(hint) == 1 and hint[0].endswith('"paddlepaddle-gpu>=3.0" -i '
                                               'https://www.paddlepaddle.org.cn/packages/stable/cu118/')


def test_no_driver_and_a_gpu_listing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(env.shutil, "which", lambda name: None)
    assert env.nvidia_driver() is None
    report = env.collect(run_self_check=False)
    report["devices"].update(gpus=[{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "memory_gib": 79.2,
                                    "capability": "8.0"}])
    text = env.format_text(report)
    assert "  gpu:0                NVIDIA A100-SXM4-80GB, 79.2 GiB, compute capability 8.0" in text
    assert "  NVIDIA driver        not found" in text


def test_the_console_script_resolves_to_the_report():
    import importlib
    target = re.search(r'"plfusion-env=([\w.]+):(\w+)"', open(os.path.join(ROOT, "setup.py")).read())
    assert target is not None
    assert getattr(importlib.import_module(target.group(1)), target.group(2)) is env.main
