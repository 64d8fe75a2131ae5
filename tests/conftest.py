import contextlib
import os
import sys

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def param_count(model, trainable_only=False):
    """Parameter count from shapes (works under paddle.LazyGuard, no memory allocated)."""
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not (trainable_only and p.stop_gradient))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, where this Paddle cannot compute on a GPU."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    from plfusion.paddle_check import gpu_status
    usable, info = gpu_status()
    if not usable:
        skip = pytest.mark.skip(reason=f"needs a GPU: {info}")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def root_dir():
    return ROOT


@contextlib.contextmanager
def shape_only_linears():
    """MAC counts depend on shapes only: Linear layers return zeros of their output shape
    (the counting hook still sees them), so a 480x640 count runs in seconds on a CPU."""
    import paddle.nn as nn
    forward = nn.Linear.forward
    nn.Linear.forward = lambda self, x: paddle.zeros(list(x.shape[:-1]) + [self.weight.shape[1]], x.dtype)
    try:
        yield
    finally:
        nn.Linear.forward = forward


def assert_norms_split(before, after, num_modalities=2):
    """Every tensor of `before` is unchanged in `after`, or was split into per-modality copies
    `<stem>.ln_<i>.<leaf>` equal to it; returns how many tensors were split."""
    split = 0
    for k, v in before.items():
        if k in after:
            np.testing.assert_array_equal(after[k].numpy(), v, err_msg=k)
        else:
            stem, leaf = k.rsplit(".", 1)
            for i in range(num_modalities):
                np.testing.assert_array_equal(after[f"{stem}.ln_{i}.{leaf}"].numpy(), v, err_msg=k)
            split += 1
    return split


def run_notebook(name, env, timeout=120):
    """Execute notebooks/<name> headless with extra environment variables; returns (notebook,
    all text output, image outputs)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    return nb, text, images


def segmentor_inputs(fusion, size, batch=2):
    """Seeded random input of a segmentor: one [batch, 3, *size] tensor, or two (RGB-D) when `fusion`."""
    import paddle
    paddle.seed(1)
    x = [paddle.randn([batch, 3, *size]) for _ in range(2 if fusion else 1)]
    return x if fusion else x[0]


def outputs_numpy(model, x):
    """Every output of model(x) as numpy, in a list (a fused segmentor returns several)."""
    import paddle
    with paddle.no_grad():
        y = model(x)
    return [t.numpy() for t in (y if isinstance(y, (list, tuple)) else [y])]


def tome_macs_and_maps(model, ratios, shape=(1, 3, 224, 224)):
    """For a model dense-ToMe-patched with trace_source: GFLOPs at its current ratio and then at each of
    `ratios`, and the merge maps ({(stage, block): (groups, H, W)}) of one pass at each ratio."""
    import paddle

    from plfusion.utils.flops import count_flops
    macs, maps = [count_flops(model, shape)], []
    for ratio in ratios:
        model.ratio = ratio
        macs.append(count_flops(model, shape))
        with paddle.no_grad():
            model(paddle.randn(list(shape)))
        maps.append(dict(model._tome_info["maps"]))
    return macs, maps
