"""plfusion: vision-transformer backbones for PaddlePaddle, with ToMe and multimodal fusion patches."""
import warnings

# paddle warns about a missing ccache whenever its C++-extension helper is imported (also lazily,
# by paddle.jit); it only matters for compiling custom ops, which plfusion never does.
warnings.filterwarnings("ignore", message="No ccache found")

from .paddle_check import require_paddle  # noqa: E402

# Paddle < 3.0 (or none) is one error naming the version found, the one needed and the install
# command, before any Paddle 3 API fails deep inside a model.
require_paddle()

from .utils.cpu import prefer_dense_transpose, prefer_mkl_avx2  # noqa: E402

# MKL inside Paddle's CPU wheel picks slow generic kernels on AMD CPUs unless asked for AVX2
# (about 3x on a ViT GEMM); it must be set before the first matmul, so do it at import.
prefer_mkl_avx2()
# Paddle's strided copies (reshape after a view-transpose) are up to 25x slower than a transpose
# kernel; plfusion's attention and window code reshapes transposes everywhere.
prefer_dense_transpose()

__version__ = "0.1.0"
