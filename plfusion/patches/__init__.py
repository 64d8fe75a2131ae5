"""In-place model patches. Each module registers its apply_patch in PATCHES under a short name."""
from . import tokenfusion, geminifusion  # noqa: F401
from . import tome  # noqa: F401
