"""Data-parallel setup under `paddle.distributed.launch` and the few collectives the engine uses.

One process (plain `python tools/train.py`) runs the same code: every helper below is then the
identity or a local operation. Under the launcher (PADDLE_TRAINERS_NUM > 1) `init_distributed`
calls `fleet.init(is_collective=True)`; on a machine without GPUs Paddle then talks over gloo,
so `python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py ...` is CPU
data parallelism.
"""
import logging
import os

import numpy as np
import paddle
import paddle.distributed as dist

__all__ = ["init_distributed", "is_distributed", "get_rank", "get_world_size", "get_local_world_size",
           "is_main_process", "barrier", "wait_for_main", "all_reduce_sum", "all_gather_object", "broadcast_object",
           "wrap_model", "wrap_optimizer", "unwrap_model", "unwrap_optimizer", "batchnorm_buffer_names",
           "average_across_ranks", "convert_sync_batchnorm", "tensor_digests", "READY_ENV"]

logger = logging.getLogger(__name__)

_state = {"initialized": False, "rank": 0, "world_size": 1}
# Set by `plfusion.launch`: a file each process touches once every rank has joined, so the
# launcher wrapper can tell a finished rendezvous from a node that never arrived.
READY_ENV = "PLFUSION_LAUNCH_READY"


def launched_world_size():
    """Number of processes the Paddle launcher started (1 when not launched)."""
    raw = os.environ.get("PADDLE_TRAINERS_NUM", "1")
    try:
        return max(int(raw), 1)
    except ValueError:
        raise RuntimeError(f"environment variable PADDLE_TRAINERS_NUM={raw!r} is not an integer") from None


def init_distributed():
    """Initialise fleet's collective mode when launched with more than one process.

    Returns (rank, world_size). Safe to call more than once."""
    if _state["initialized"]:
        return _state["rank"], _state["world_size"]
    world = launched_world_size()
    if world > 1:
        from paddle.distributed import fleet
        strategy = fleet.DistributedStrategy()
        strategy.hybrid_configs = {"dp_degree": world, "mp_degree": 1, "pp_degree": 1}
        fleet.init(is_collective=True, strategy=strategy)
        _state.update(rank=dist.get_rank(), world_size=dist.get_world_size())
        backend = os.environ.get("PADDLE_DISTRI_BACKEND", "?")
        logger.info("data parallel: rank %d of %d (backend %s, device %s)", _state["rank"],
                    _state["world_size"], backend, paddle.device.get_device())
        ready = os.environ.get(READY_ENV)
        if ready:
            with open(ready, "a", encoding="utf-8") as f:
                f.write(f"{_state['rank']}\n")
    _state["initialized"] = True
    return _state["rank"], _state["world_size"]


def is_distributed():
    return _state["world_size"] > 1


def get_rank():
    return _state["rank"]


def get_world_size():
    return _state["world_size"]


def get_local_world_size():
    """Processes on this machine (what shares its CPU cores)."""
    raw = os.environ.get("PADDLE_LOCAL_SIZE") or os.environ.get("PADDLE_TRAINERS_NUM") or "1"
    try:
        return max(int(raw), 1)
    except ValueError:
        return 1


def is_main_process():
    return _state["rank"] == 0


def barrier():
    if is_distributed():
        dist.barrier()


def wait_for_main(tag):
    """Hold the other ranks until rank 0 reaches the call with the same `tag`; rank 0 goes on at once.

    For after work only rank 0 does (writing checkpoints): it waits on the launcher's TCP store,
    not a gloo collective, because gloo gives up after a fixed 30 s and would abort a healthy
    run whose checkpoint takes longer to write. If rank 0 dies instead, the launcher stops the
    waiting ranks."""
    if not is_distributed():
        return
    from paddle.base import core
    store = core.create_or_get_global_tcp_store()
    key = f"plfusion/{tag}"
    if is_main_process():
        store.set(key, "1")
    else:
        store.wait(key)


def all_reduce_sum(array):
    """Element-wise sum of a numpy array over all ranks (int arrays stay int64)."""
    array = np.asarray(array)
    if not is_distributed():
        return array.copy()
    dtype = np.int64 if np.issubdtype(array.dtype, np.integer) else np.float64
    tensor = paddle.to_tensor(np.ascontiguousarray(array, dtype=dtype))
    dist.all_reduce(tensor)
    return tensor.numpy()


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects made here, not user files)."""
    if not is_distributed():
        return [obj]
    out = []
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def wrap_model(model):
    """fleet.distributed_model under the launcher (it broadcasts rank 0's weights); else the model."""
    if not is_distributed():
        return model
    from paddle.distributed import fleet
    return fleet.distributed_model(model)


def wrap_optimizer(optimizer):
    if not is_distributed():
        return optimizer
    from paddle.distributed import fleet
    return fleet.distributed_optimizer(optimizer)


def unwrap_model(model):
    """The user's Layer inside fleet / paddle.DataParallel wrappers (they keep it in `_layers`)."""
    while hasattr(model, "_layers") and isinstance(model._layers, paddle.nn.Layer):
        model = model._layers
    return model


def unwrap_optimizer(optimizer):
    """The plain paddle optimizer inside fleet's HybridParallelOptimizer (kept in `_inner_opt`)."""
    while hasattr(optimizer, "_inner_opt"):
        optimizer = optimizer._inner_opt
    return optimizer


# ------------------------------------------------------------------ BatchNorm under data parallelism

_BN_TYPES = (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm)


def batchnorm_buffer_names(model):
    """State-dict names of the running statistics of every BatchNorm layer in `model`."""
    names = []
    for prefix, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, _BN_TYPES):
            dot = f"{prefix}." if prefix else ""
            names += [f"{dot}_mean", f"{dot}_variance"]
    return names


@paddle.no_grad()
def average_across_ranks(tensors):
    """Replace each floating tensor by its mean over the ranks, in place, with one collective.

    Used for BatchNorm running statistics where SyncBatchNorm cannot run (CPU / gloo): every rank
    then evaluates and saves the same model. Averaging (rather than taking rank 0's) keeps the
    statistics of all ranks' data, as timm's `distribute_bn(reduce=True)` does."""
    tensors = [t for t in tensors if paddle.is_floating_point(t)]
    if not is_distributed() or not tensors:
        return
    flat = paddle.concat([t.astype("float32").reshape([-1]) for t in tensors])
    dist.all_reduce(flat)
    flat = flat / float(get_world_size())
    offset = 0
    for t in tensors:
        n = int(np.prod(t.shape)) if t.shape else 1
        paddle.assign(flat[offset:offset + n].reshape(t.shape).astype(t.dtype), t)
        offset += n


def convert_sync_batchnorm(model):
    """(model, converted): BatchNorm layers become SyncBatchNorm when several GPU processes train.

    SyncBatchNorm needs NCCL, so on CPU (gloo) the model is returned unchanged and the trainer
    averages the running statistics instead."""
    on_gpu = paddle.is_compiled_with_cuda() and paddle.device.get_device().startswith("gpu")
    if not (is_distributed() and on_gpu) or not batchnorm_buffer_names(model):
        return model, False
    return paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model), True


def tensor_digests(model):
    """{state-dict name: sha256 of its bytes}: comparing them names the tensors that differ."""
    import hashlib
    return {name: hashlib.sha256(np.ascontiguousarray(value.numpy()).tobytes()).hexdigest()
            for name, value in model.state_dict().items()}
