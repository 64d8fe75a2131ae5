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


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def root_dir():
    return ROOT
