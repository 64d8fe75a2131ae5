"""What tools/reference/interleave_models.py compares: models, jobs, shapes, inputs (dev tool).

Imported by both sides (plfusion venv and the scratch torch venv), so they build the same
models with the same hyper-parameters and feed the same numpy arrays; needs only numpy.
"""
import numpy as np

NUM_CLASSES = 40            # NYUDv2, as the fusion configs
HEAD_DIM = 256              # the official WeTr's SegFormer head width, for every MiT
DROP_PATH = 0.1             # the official TokenFusion MiT's fixed rate; used for every model here
LR, WEIGHT_DECAY = 6e-5, 0.01
SPARSITY = 1e-6             # TokenFusion's lambda on the L1 of its masks (its README)
IGNORE = 255
JOBS = ("train", "infer")

# key -> (kind, what to build, {job: (batch, (H, W))}); "rgbd" models take [rgb, depth]
CLS_SHAPES = {"train": (8, (224, 224)), "infer": (8, (224, 224))}
SEG_SHAPES = {"train": (2, (240, 320)), "infer": (2, (480, 640))}
MODELS = {
    "vit_b": ("classifier", "vit_base_patch16_224", CLS_SHAPES),
    "swin_t": ("classifier", "swin_tiny_patch4_window7_224", CLS_SHAPES),
    "gemini_b0": ("rgbd", ("geminifusion", "mit_b0"), SEG_SHAPES),
    "gemini_b3": ("rgbd", ("geminifusion", "mit_b3"), SEG_SHAPES),
    "token_b0": ("rgbd", ("tokenfusion", "mit_b0"), SEG_SHAPES),
    "token_b3": ("rgbd", ("tokenfusion", "mit_b3"), SEG_SHAPES),
}


def shape(key, job, batch=None):
    """(batch, (H, W)) of `job` for model `key`; `batch` overrides the default."""
    default, size = MODELS[key][2][job]
    return (batch or default), size


def make_inputs(key, job, batch, seed=0):
    """(list of float32 NCHW arrays, int64 labels or None for inference). Classifiers: one image
    in [0, 1) and ImageNet class labels; RGB-D: rgb and depth (standard normal, as normalised
    inputs are) and a label map at 1/4 resolution, the size of the segmentors' logits."""
    kind, _, _ = MODELS[key]
    batch, (h, w) = shape(key, job, batch)
    rng = np.random.default_rng(seed)
    if kind == "classifier":
        images = [rng.random([batch, 3, h, w], dtype=np.float32)]
        labels = rng.integers(0, 1000, [batch])
    else:
        images = [rng.standard_normal([batch, 3, h, w], dtype=np.float32) for _ in range(2)]
        labels = rng.integers(0, NUM_CLASSES, [batch, h // 4, w // 4])
    return images, (labels.astype(np.int64) if job == "train" else None)
