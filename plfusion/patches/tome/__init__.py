"""ToMe token merging (Bolya et al., ICLR 2023) for plfusion transformers.

    from plfusion.patches import tome
    tome.apply_patch(model)      # in place; model.r = 16 then sets the tokens merged per block
"""
from ...registry import PATCHES
from .merge import bipartite_soft_matching, check_r, merge_source, merge_wavg, parse_r, token_counts
from .dense import parse_ratio_text
from .patch import apply_patch, is_patched, parse_r_text, remove_patch
from .vis import make_visualization

PATCHES.register(apply_patch, name="tome")

__all__ = ["apply_patch", "remove_patch", "is_patched", "bipartite_soft_matching", "merge_wavg", "merge_source",
           "parse_r", "check_r", "parse_r_text", "parse_ratio_text", "token_counts", "make_visualization"]
