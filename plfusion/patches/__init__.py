"""In-place model patches. Each module registers its apply_patch in PATCHES under a short name."""
