"""plfusion: vision-transformer backbones for PaddlePaddle, with ToMe and multimodal fusion patches."""
import warnings

with warnings.catch_warnings():  # paddle warns about ccache at import; it only matters for C++ extensions
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle  # noqa: F401

__version__ = "0.1.0"
