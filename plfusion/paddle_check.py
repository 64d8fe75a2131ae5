"""Is the installed Paddle one plfusion can use, and can it compute on a GPU?

`require_paddle()` runs at `import plfusion`: Paddle older than 3.0, or none at all, is one
PaddleVersionError naming the version found, the version needed and the install command, instead
of whatever the first Paddle 3 API would raise deep inside a model.

`gpu_status()` / `require_gpu()` are the one device check that the command lines (`--device`),
the Predictor, the environment report and the GPU tests share: a GPU is usable when this Paddle
is a CUDA build and sees at least one device.

Nothing here imports paddle at module level: the version check must be able to report a
missing or broken Paddle.
"""
import os
import re
import sys

__all__ = ["MIN_PADDLE", "PaddleVersionError", "DeviceError", "require_paddle", "parse_version",
           "install_command", "wheel_index", "installed_paddle_dists", "CUDA_WHEELS", "gpu_status", "gpu_available", "default_device",
           "require_gpu", "check_device"]

MIN_PADDLE = (3, 0)
# Paddle 3.x GPU wheels are not on PyPI (it stops at paddlepaddle-gpu 2.6.2): Paddle's own index has
# one per CUDA version. A driver runs CUDA up to the "CUDA Version" nvidia-smi prints, so the newest
# wheel at or below it fits; newest first.
CUDA_WHEELS = (((12, 9), "cu129"), ((12, 6), "cu126"), ((11, 8), "cu118"))
WHEEL_INDEX = "https://www.paddlepaddle.org.cn/packages/stable/{}/"
DEFAULT_WHEEL = "cu126"


class PaddleVersionError(ImportError):
    """No Paddle, a broken one, or one older than plfusion needs."""


class DeviceError(RuntimeError):
    """A GPU was asked for where this Paddle cannot use one."""


def parse_version(text):
    """'3.0.0rc1' -> (3, 0, 0): the leading numbers of a version string ('' -> ())."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(text))
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def wheel_index(cuda_version=None):
    """The wheel tag (cu118 / cu126 / cu129) for a driver that supports CUDA up to `cuda_version`
    ('12.4' or (12, 4)); the default tag when unknown; None when the driver is older than every wheel."""
    if cuda_version is None:
        return DEFAULT_WHEEL
    have = parse_version(cuda_version) if isinstance(cuda_version, str) else tuple(cuda_version)
    for need, tag in CUDA_WHEELS:
        if have[:2] >= need:
            return tag
    return None


def install_command(gpu, cuda_version=None, python=None):
    """The pip command that installs a supported Paddle into this Python."""
    py = python or sys.executable or "python"
    need = ".".join(map(str, MIN_PADDLE))
    if not gpu:
        return f'{py} -m pip install "paddlepaddle>={need}"'
    tag = wheel_index(cuda_version) or DEFAULT_WHEEL
    return f'{py} -m pip install "paddlepaddle-gpu>={need}" -i {WHEEL_INDEX.format(tag)}'


def _install_hint(gpu_first):
    cpu, gpu = install_command(False), install_command(True)
    tags = "/".join(tag for _, tag in reversed(CUDA_WHEELS))
    gpu_text = f"GPU: {gpu} (pick {tags} by the 'CUDA Version' that nvidia-smi prints; README, section GPU)"
    return f"{gpu_text}; CPU: {cpu}" if gpu_first else f"CPU: {cpu}; {gpu_text}"


def require_paddle():
    """Import paddle and check its version; returns the module or raises PaddleVersionError."""
    need = ".".join(map(str, MIN_PADDLE))
    try:
        import paddle
    except ModuleNotFoundError as e:
        if e.name != "paddle":
            raise PaddleVersionError(f"plfusion needs PaddlePaddle >= {need}; importing paddle failed: {e}. "
                                     f"Reinstall it: {_install_hint(False)}") from e
        raise PaddleVersionError(f"plfusion needs PaddlePaddle >= {need}, and no paddle is installed in this Python "
                                 f"({sys.executable}). Install it: {_install_hint(False)}") from None
    except ImportError as e:   # installed but broken, e.g. a CUDA library it links against is missing
        raise PaddleVersionError(f"plfusion needs PaddlePaddle >= {need}; paddle is installed but importing it "
                                 f"failed: {e}. Reinstall it: {_install_hint(False)}") from e
    found = str(getattr(paddle, "__version__", "unknown"))
    release = parse_version(found)
    # develop builds from source call themselves 0.0.0 (Paddle's own require_version lets them pass)
    if release and any(release) and release[:2] < MIN_PADDLE:
        where = os.path.dirname(getattr(paddle, "__file__", "") or "") or "?"
        cuda = _called(getattr(paddle, "is_compiled_with_cuda", None), False)
        # both wheels install the same `paddle` package: the old one must go first
        dists = " ".join(installed_paddle_dists()) or ("paddlepaddle-gpu" if cuda else "paddlepaddle")
        raise PaddleVersionError(
            f"plfusion needs PaddlePaddle >= {need}, but found paddle {found} ({where}). Remove it "
            f"({sys.executable or 'python'} -m pip uninstall -y {dists}) and install Paddle 3.x: {_install_hint(cuda)}")
    return paddle


def installed_paddle_dists():
    """{distribution name: version} of the Paddle wheels pip installed here (CPU and GPU builds)."""
    from importlib import metadata
    found = {}
    for name in ("paddlepaddle", "paddlepaddle-gpu"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _called(fn, default):
    try:
        return fn() if callable(fn) else default
    except Exception:   # noqa: BLE001 - a probe of an unknown Paddle must not raise
        return default


def gpu_status():
    """(True, n_gpus) when this Paddle can compute on a GPU, else (False, the reason as one sentence)."""
    import paddle
    version = paddle.__version__
    if not paddle.is_compiled_with_cuda():
        return False, f"this Paddle {version} is a CPU build (no CUDA support)"
    try:
        count = int(paddle.device.cuda.device_count())
        problem = ""
    except Exception as e:   # noqa: BLE001 - a driver problem surfaces here; report it instead
        count, problem = 0, f": {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
        return False, (f"this Paddle {version} is a CUDA {paddle.version.cuda()} build but sees no GPU{problem} "
                       f"({env}; nvidia-smi lists what the driver sees)")
    return True, count


def gpu_available():
    return gpu_status()[0]


def default_device():
    """'gpu' where this Paddle can compute on one, else 'cpu'."""
    return "gpu" if gpu_available() else "cpu"


def require_gpu(where, instead, index=None):
    """Raise DeviceError naming why `where` cannot have a GPU (and device `index`, if given);
    `instead` is what the caller can use instead, e.g. '--device cpu'. Returns the GPU count."""
    ok, info = gpu_status()
    if not ok:
        fix = f"install Paddle's GPU build ({install_command(True)}; README, section GPU)" \
            if "CPU build" in info else "check the driver and CUDA_VISIBLE_DEVICES"
        raise DeviceError(f"{where}: {info}; {fix}, or use {instead}")
    if index is not None and not 0 <= index < info:
        raise DeviceError(f"{where}: GPU {index} does not exist; this Paddle sees {info} GPU(s) (0..{info - 1})")
    return info


def check_device(device, where="--device"):
    """'cpu' or 'gpu' (None: the default device), checked; raises ValueError / DeviceError."""
    device = default_device() if device is None else device
    if device not in ("cpu", "gpu"):
        raise ValueError(f"{where}: expected 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        require_gpu(f"{where} gpu", f"{where} cpu")
    return device
