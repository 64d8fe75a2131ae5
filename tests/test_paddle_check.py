"""The Paddle version check at `import plfusion` (against fake `paddle` packages, never another real
install), the shared GPU check and `--device`, and the `gpu` tests being collected and skipped,
with the reason, where Paddle cannot use a GPU."""
import os
import re
import subprocess
import sys

import paddle
import pytest

from conftest import ROOT
from plfusion.engine.cli import eval_main, select_device
from plfusion.paddle_check import DeviceError, check_device, gpu_status, parse_version, require_gpu, wheel_index

CPU_ONLY = pytest.mark.skipif(gpu_status()[0], reason="checks what happens where Paddle cannot use a GPU")
INDEX = "https://www.paddlepaddle.org.cn/packages/stable/cu126/"


def import_plfusion_with(tmp_path, paddle_init=None):
    """`import plfusion` in a Python without site-packages (-S), so the only paddle is a fake one
    written to tmp_path (or none); returns the finished process."""
    if paddle_init is not None:
        (tmp_path / "paddle").mkdir()
        (tmp_path / "paddle" / "__init__.py").write_text(paddle_init)
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {ROOT!r}]; import plfusion; print('imported')"
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)


def last_line(res):
    return [line for line in res.stderr.splitlines() if line.strip()][-1]


def test_paddle_2_6_is_one_error_naming_found_needed_and_the_install_command(tmp_path):
    res = import_plfusion_with(tmp_path, '__version__ = "2.6.2"\n')
    assert res.returncode == 1 and "imported" not in res.stdout
    line = last_line(res)
    assert line.startswith("plfusion.paddle_check.PaddleVersionError: plfusion needs PaddlePaddle >= 3.0, "
                           "but found paddle 2.6.2 (")
    assert '-m pip install "paddlepaddle>=3.0"' in line and f'-m pip install "paddlepaddle-gpu>=3.0" -i {INDEX}' in line
    assert "pip uninstall -y paddlepaddle" in line and "cu118/cu126/cu129" in line
    assert "During handling" not in res.stderr      # one error, not a chain


def test_no_paddle_at_all_is_the_same_kind_of_error(tmp_path):
    res = import_plfusion_with(tmp_path)
    assert res.returncode == 1
    line = last_line(res)
    assert "PaddleVersionError: plfusion needs PaddlePaddle >= 3.0, and no paddle is installed" in line
    assert f'"paddlepaddle-gpu>=3.0" -i {INDEX}' in line and "During handling" not in res.stderr


def test_a_paddle_that_fails_to_import_says_so(tmp_path):
    res = import_plfusion_with(tmp_path, 'raise ImportError("libcudnn.so.9: cannot open shared object file")\n')
    assert res.returncode == 1
    assert "paddle is installed but importing it failed: libcudnn.so.9: cannot open" in last_line(res)


@pytest.mark.parametrize("version", ["3.0.0", "3.3.1", "0.0.0"])   # 0.0.0: a develop build from source
def test_paddle_3_and_develop_builds_pass_the_check(tmp_path, version):
    flags = "FLAGS = {}\ndef set_flags(d): FLAGS.update(d)\ndef get_flags(names): return {n: FLAGS.get(n, True) for n in names}\n"
    res = import_plfusion_with(tmp_path, f'__version__ = "{version}"\n' + flags)
    assert res.returncode == 0 and res.stdout.strip() == "imported", res.stderr[-2000:]


def test_version_parsing_and_the_wheel_for_a_driver():
    assert parse_version("3.0.0rc1") == (3, 0, 0) and parse_version("2.6.2") == (2, 6, 2)
    assert parse_version("unknown") == ()
    # nvidia-smi's "CUDA Version" is the newest CUDA the driver runs: the newest wheel not above it
    assert [wheel_index(v) for v in ("13.0", "12.9", "12.8", "12.6", "12.4", "11.8", "11.4")] == \
        ["cu129", "cu129", "cu126", "cu126", "cu118", "cu118", None]
    assert wheel_index(None) == "cu126"


@CPU_ONLY
def test_this_cpu_build_has_no_gpu_and_defaults_to_the_cpu():
    usable, why = gpu_status()
    assert not usable and why == f"this Paddle {paddle.__version__} is a CPU build (no CUDA support)"
    assert check_device(None) == "cpu" and select_device(None) == "cpu"
    assert paddle.device.get_device() == "cpu"
    with pytest.raises(DeviceError, match=r"^Predictor\(device='gpu'\): this Paddle .* CPU build .*, or use "
                                          r"device='cpu'$"):
        require_gpu("Predictor(device='gpu')", "device='cpu'")
    with pytest.raises(ValueError, match="--device: expected 'cpu' or 'gpu', got 'tpu'"):
        check_device("tpu")


def test_a_cuda_build_that_sees_no_gpu_says_so(monkeypatch):
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(paddle.version, "cuda", lambda: "12.6")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    usable, why = gpu_status()
    assert not usable and why.startswith(f"this Paddle {paddle.__version__} is a CUDA 12.6 build but sees no GPU "
                                         f"(CUDA_VISIBLE_DEVICES='';")
    with pytest.raises(DeviceError, match=r"^--device gpu: .* sees no GPU .*check the driver and "
                                          r"CUDA_VISIBLE_DEVICES, or use --device cpu$"):
        check_device("gpu")


@CPU_ONLY
def test_device_gpu_on_this_machine_is_one_error_line_and_exit_2(tmp_path, capsys):
    cfg = os.path.join(ROOT, "configs", "quickstart", "vit_tiny_synthetic.yaml")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", cfg, "--device", "gpu",
                          "-o", f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and res.stdout.strip() == "", res.stdout[-2000:] + res.stderr[-2000:]
    assert len(lines) == 1 and re.match(r"error: --device gpu: this Paddle \S+ is a CPU build \(no CUDA support\); "
                                        r"install Paddle's GPU build \(.*\), or use --device cpu$", lines[0])
    assert not (tmp_path / "run").exists()
    assert eval_main(["-c", cfg, "--pretrained", "w.pdparams", "--device", "gpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --device gpu: this Paddle")


@CPU_ONLY
def test_the_gpu_tests_are_collected_and_skipped_with_the_reason():
    n_tests = len(re.findall(r"^def test_", open(os.path.join(ROOT, "tests", "test_gpu.py")).read(), re.M))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                          os.path.join("tests", "test_gpu.py")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    skipped = int(re.match(r"(\d+) skipped in ", summary).group(1))      # nothing passed, failed or deselected
    assert skipped >= n_tests >= 6
    reasons = re.findall(r"^SKIPPED \[(\d+)\] tests/test_gpu.py(?::\d+)?: (.*)$", res.stdout, re.M)
    assert sum(int(n) for n, _ in reasons) == skipped
    assert {r for _, r in reasons} == {f"needs a GPU: this Paddle {paddle.__version__} is a CPU build (no CUDA support)"}
