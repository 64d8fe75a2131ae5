"""CPU runtime settings that decide inference speed: intra-op threads and MKL's kernels on AMD.

Two defaults cost most of Paddle's CPU speed:

- Paddle's import sets OMP_NUM_THREADS=1 when it is unset, so its kernels use one thread
  unless told otherwise; `set_cpu_threads` sizes the MKL/OpenMP pools at run time.
- The MKL that Paddle's CPU wheels ship (mklml) picks its generic kernels on non-Intel CPUs.
  On an AMD EPYC (Zen 4) a float32 GEMM then runs about 3x slower than with MKL's AVX2
  kernels, and the GEMMs are most of a transformer's time. This MKL still honours
  MKL_DEBUG_CPU_TYPE=5, which selects the AVX2 kernels; it is read at MKL's first call, so
  `prefer_mkl_avx2` must run before the process's first matmul (the tools call
  `configure_cpu` first thing).

- Paddle 3's dygraph makes `transpose`, slices and `unbind` views ("stride kernels"); the
  `reshape` after a transpose then copies through a generic strided-copy kernel that runs one
  element at a time: a Swin window partition of [8, 56, 56, 96] takes 46 ms, against 3 ms with
  the transposing kernel and 1.8 ms in numpy. `prefer_dense_transpose` turns the views off
  (FLAGS_use_stride_kernel=0, Paddle 2's behaviour), which makes Swin-T inference ~2x and ViT-B
  ~1.4x faster here (`tools/reference/interleave_models.py`). plfusion never writes through a view.

oneDNN, which Paddle Inference uses by default (`plfusion.inference.Predictor`), picks its
kernels from the CPU's features and needs neither.
"""
import logging
import os

__all__ = ["available_cpus", "cpu_vendor", "cpu_model", "set_cpu_threads", "restore_cpu_threads", "prefer_mkl_avx2",
           "configure_cpu",
           "prefer_dense_transpose", "stride_kernels_on", "STRIDE_FLAG"]

STRIDE_FLAG = "FLAGS_use_stride_kernel"

logger = logging.getLogger(__name__)

MKL_CPU_TYPE_VAR = "MKL_DEBUG_CPU_TYPE"


def prefer_dense_transpose():
    """Turn Paddle's stride kernels off (see the module docstring), unless FLAGS_use_stride_kernel is
    set in the environment, where the user's choice stands. Returns the flag's value now."""
    import paddle
    if STRIDE_FLAG not in os.environ:
        paddle.set_flags({STRIDE_FLAG: False})
    return stride_kernels_on()


def stride_kernels_on():
    """Whether Paddle's stride kernels (view transposes and slices) are on in this process."""
    import paddle
    return bool(paddle.get_flags([STRIDE_FLAG])[STRIDE_FLAG])


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpuinfo(field):
    """The first `field` value in /proc/cpuinfo, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cpu_vendor():
    """'AuthenticAMD', 'GenuineIntel', ... from /proc/cpuinfo, or None where it cannot be read."""
    return _cpuinfo("vendor_id")


def cpu_model():
    """The CPU's name ('AMD EPYC 9B14', ...) from /proc/cpuinfo, else platform.processor(), else None."""
    import platform
    return _cpuinfo("model name") or platform.processor() or None


_THREADS = [None]   # the count set_cpu_threads last set, for restore_cpu_threads


def set_cpu_threads(n):
    """Use n intra-op CPU threads for paddle's kernels; returns n.

    paddle.base.core.set_num_threads (MKL + OpenMP) changes the count at run time; the
    environment variables are set too, for child processes."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    import paddle
    paddle.base.core.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    _THREADS[0] = n
    return n


def restore_cpu_threads():
    """Put back the count of set_cpu_threads. A Paddle Inference predictor's run() leaves the process's
    math library on one thread, which made every dygraph pass after it ~1.8x slower (ViT-B)."""
    if _THREADS[0] is not None:
        import paddle
        paddle.base.core.set_num_threads(_THREADS[0])


def prefer_mkl_avx2():
    """On an AMD CPU, ask MKL for its AVX2 kernels (MKL_DEBUG_CPU_TYPE=5) unless the user set the
    variable; returns True when the variable is 5. Has no effect after MKL's first call."""
    if MKL_CPU_TYPE_VAR not in os.environ and cpu_vendor() == "AuthenticAMD":
        os.environ[MKL_CPU_TYPE_VAR] = "5"
        logger.debug("AMD CPU: %s=5 so MKL uses its AVX2 kernels", MKL_CPU_TYPE_VAR)
    return os.environ.get(MKL_CPU_TYPE_VAR) == "5"


def configure_cpu(threads=None):
    """The fast CPU defaults for this process: MKL's AVX2 kernels on AMD, and `threads` intra-op
    threads (default: every usable core). Call it before the first matmul. Returns what it set."""
    mkl_avx2 = prefer_mkl_avx2()
    n = set_cpu_threads(available_cpus() if threads is None else threads)
    return {"threads": n, "mkl_avx2": mkl_avx2, "vendor": cpu_vendor()}
