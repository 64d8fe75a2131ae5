"""plfusion: vision-transformer backbones for PaddlePaddle, with ToMe and multimodal fusion patches."""
import warnings

# paddle warns about a missing ccache whenever its C++-extension helper is imported (also lazily,
# by paddle.jit); it only matters for compiling custom ops, which plfusion never does.
warnings.filterwarnings("ignore", message="No ccache found")

import paddle  # noqa: E402,F401

__version__ = "0.1.0"
