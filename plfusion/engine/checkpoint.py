"""Training checkpoints that survive a kill at any moment, and the state needed to resume exactly.

Layout under `<output_dir>/checkpoints/`:

    iter_000120.pdparams       model weights (paddle.save of the state dict)
    iter_000120.pdopt          optimizer state, keyed by structured parameter names
    iter_000120.ema.pdparams   EMA weights, when EMA is on
    iter_000120.json           small JSON state, written last: step, epoch, LR scheduler, AMP
                               scaler, best metric, RNG states of every rank, file sizes
    latest.json                {"name": "iter_000120"}, rewritten last (atomically)
    best.pdparams, best.json   weights with the best `train.best_metric` so far

Every file is written to a temporary name, fsynced and renamed, so a file under its final name
is always whole. A checkpoint counts as complete only when its JSON exists and the files it
lists have the recorded sizes; the JSON of a name is deleted before that name is rewritten.
So a kill between files leaves the previous complete checkpoint as the one to resume from.

Optimizer state is stored by structured parameter name (`backbone.head.weight@moment1`)
rather than Paddle's per-process tensor names (`linear_7.w_0_moment1_0`), which depend on the
order layers were created in. Checkpoints are read back with the safe reader
`plfusion.utils.checkpoint_io.read_checkpoint`, which never runs code from the file.
"""
import glob
import json
import logging
import os
import random
import re
import time

import numpy as np
import paddle

from ..utils.checkpoint_io import read_checkpoint
from .distributed import unwrap_model, unwrap_optimizer

__all__ = ["CheckpointManager", "CheckpointNotFound", "load_checkpoint", "resolve_checkpoint",
           "optimizer_state", "load_optimizer_state", "capture_rng_state", "restore_rng_state",
           "atomic_write_text", "CHECKPOINT_DIR"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FORMAT = "plfusion-checkpoint"
VERSION = 1
LATEST = "latest.json"
BEST = "best"
# Seconds to sleep after each file of a checkpoint is written; the crash tests set it to
# widen the window in which a kill lands between files.
PAUSE_ENV = "PLFUSION_SAVE_PAUSE"


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where the user pointed."""


# ------------------------------------------------------------------ atomic files

def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pause():
    delay = os.environ.get(PAUSE_ENV)
    if delay:
        time.sleep(float(delay))


def _finish(tmp, path):
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _tmp_name(path):
    return f"{path}.tmp-{os.getpid()}"


def atomic_save(obj, path):
    """paddle.save to a temporary file, fsync, rename."""
    tmp = _tmp_name(path)
    paddle.save(obj, tmp)
    _finish(tmp, path)


def atomic_write_text(text, path):
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    _finish(tmp, path)


def _write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=1, sort_keys=True), path)


def _read_json(path):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------ optimizer and RNG state

def _owner_names(model, inner):
    """Paddle tensor name -> structured name, for parameters and their AMP master weights."""
    names = {p.name: n for n, p in model.named_parameters()}
    for pname, master in getattr(inner, "_master_weights", {}).items():
        if pname in names:
            names[master.name] = names[pname]
    return names


def _materialize_accumulators(inner):
    """Create the optimizer's slots now (Paddle makes them lazily at the first step) so they can
    be filled from a checkpoint before training resumes."""
    block = paddle.static.default_main_program().global_block()
    groups = getattr(inner, "_param_groups", None)
    if groups and isinstance(groups[0], dict):
        for g in groups:
            inner._create_accumulators(block, g)
    else:
        inner._create_accumulators(block, [p for p in inner._parameter_list if not p.stop_gradient])


def optimizer_state(optimizer, model):
    """{'<param>@<slot>': ndarray, 'master_weights': {<param>: ndarray}} for a .pdopt file."""
    inner, model = unwrap_optimizer(optimizer), unwrap_model(model)
    # slots of parameters that never had a gradient (e.g. a bias that cancels) exist only from here:
    # a resumed optimizer creates every slot, so every slot is saved
    _materialize_accumulators(inner)
    owner = _owner_names(model, inner)
    out = {}
    for slot, per_param in inner._accumulators.items():
        for pname, var in per_param.items():
            out[f"{owner[pname]}@{slot}"] = var.numpy()
    masters = getattr(inner, "_master_weights", {})
    if masters:
        out["master_weights"] = {owner[p]: v.numpy() for p, v in masters.items()}
    return out


def load_optimizer_state(optimizer, model, state, source):
    """Fill the optimizer's slots from `optimizer_state` output; every slot must be present."""
    inner, model = unwrap_optimizer(optimizer), unwrap_model(model)
    _materialize_accumulators(inner)
    owner = _owner_names(model, inner)
    state = dict(state)
    masters = state.pop("master_weights", {}) or {}
    expected = set()
    for slot, per_param in inner._accumulators.items():
        for pname, var in per_param.items():
            key = f"{owner[pname]}@{slot}"
            expected.add(key)
            if key not in state:
                raise ValueError(f"{source}: no optimizer state for '{key}'; the checkpoint was written for a "
                                 f"different model or optimizer")
            value = np.asarray(state[key])
            if list(value.shape) != list(var.shape):
                raise ValueError(f"{source}: optimizer state '{key}' has shape {list(value.shape)}, the model "
                                 f"needs {list(var.shape)}")
            var.set_value(value.astype(np.dtype(str(var.numpy().dtype)), copy=False))
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{source}: optimizer state for parameters this model/optimizer does not have: "
                         f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for pname, var in getattr(inner, "_master_weights", {}).items():
        key = owner[pname]
        if key not in masters:
            raise ValueError(f"{source}: no AMP master weight for '{key}'")
        var.set_value(np.asarray(masters[key], dtype=np.float32))


def _generator_state(state):
    a, b, c, raw = state.__getstate__()
    return [a, b, c, bytes(raw).decode("latin-1")]


def _make_generator_state(values):
    a, b, c, raw = values
    state = paddle.base.core.GeneratorState.__new__(paddle.base.core.GeneratorState)
    state.__setstate__((int(a), int(b), int(c), list(raw.encode("latin-1"))))
    return state


def capture_rng_state():
    """Python, numpy and Paddle generator states of this process, as JSON-able values."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
           "paddle_cpu": [_generator_state(s) for s in paddle.get_rng_state("cpu")]}
    device = paddle.device.get_device()
    if not device.startswith("cpu"):
        out["paddle_device"] = [_generator_state(s) for s in paddle.get_rng_state(device)]
        out["device"] = device
    return out


def restore_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    paddle.set_rng_state([_make_generator_state(s) for s in state["paddle_cpu"]], "cpu")
    device = paddle.device.get_device()
    if "paddle_device" in state and not device.startswith("cpu"):
        paddle.set_rng_state([_make_generator_state(s) for s in state["paddle_device"]], device)


# ------------------------------------------------------------------ checkpoints on disk

def _files(prefix, has_ema):
    files = {"pdparams": f"{prefix}.pdparams", "pdopt": f"{prefix}.pdopt"}
    if has_ema:
        files["ema"] = f"{prefix}.ema.pdparams"
    return files


def checkpoint_state(prefix):
    """The JSON state of a complete checkpoint at `prefix`, or None when it is incomplete."""
    path = f"{prefix}.json"
    if not os.path.isfile(path):
        return None
    try:
        state = _read_json(path)
    except (OSError, ValueError):
        return None
    if state.get("format") != FORMAT:
        return None
    directory = os.path.dirname(prefix)
    for meta in state.get("files", {}).values():
        full = os.path.join(directory, meta["name"])
        if not os.path.isfile(full) or os.path.getsize(full) != meta["size"]:
            return None
    return state


class CheckpointManager:
    """Writes checkpoints under `<output_dir>/checkpoints` (call on rank 0 only), keeps the last
    `keep_last` periodic ones, the `latest` pointer and the `best` weights."""

    def __init__(self, output_dir, keep_last=3):
        self.directory = os.path.join(output_dir, CHECKPOINT_DIR)
        self.keep_last = keep_last

    def _prefix(self, name):
        return os.path.join(self.directory, name)

    def save(self, name, model_state, optimizer_state_, state, ema_state=None):
        """Write checkpoint `name` (e.g. 'iter_000120'), then point `latest` at it."""
        os.makedirs(self.directory, exist_ok=True)
        prefix = self._prefix(name)
        stale = f"{prefix}.json"
        if os.path.exists(stale):  # this name is being rewritten: it is incomplete until its JSON is back
            os.remove(stale)
            _fsync_dir(self.directory)
        files = _files(prefix, ema_state is not None)
        payloads = {"pdparams": model_state, "pdopt": optimizer_state_, "ema": ema_state}
        record = {}
        for kind, path in files.items():
            atomic_save(payloads[kind], path)
            record[kind] = {"name": os.path.basename(path), "size": os.path.getsize(path)}
            _pause()
        state = dict(state, format=FORMAT, version=VERSION, name=name, files=record,
                     saved_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        _write_json(state, stale)
        _pause()
        _write_json({"name": name, "global_step": state.get("global_step")}, os.path.join(self.directory, LATEST))
        self._prune(keep=name)
        logger.info("saved checkpoint %s", prefix)
        return prefix

    def save_best(self, model_state, state):
        os.makedirs(self.directory, exist_ok=True)
        prefix = self._prefix(BEST)
        if os.path.exists(f"{prefix}.json"):
            os.remove(f"{prefix}.json")
        atomic_save(model_state, f"{prefix}.pdparams")
        record = {"pdparams": {"name": f"{BEST}.pdparams", "size": os.path.getsize(f"{prefix}.pdparams")}}
        _write_json(dict(state, format=FORMAT, version=VERSION, name=BEST, files=record), f"{prefix}.json")
        return prefix

    def complete(self):
        """[(global_step, prefix)] of complete periodic checkpoints, oldest first."""
        out = []
        for path in glob.glob(os.path.join(self.directory, "*.json")):
            base = os.path.basename(path)[:-len(".json")]
            if base in (BEST, LATEST[:-len(".json")]):
                continue
            state = checkpoint_state(path[:-len(".json")])
            if state is not None:
                out.append((int(state.get("global_step", -1)), path[:-len(".json")]))
        return sorted(out)

    def latest(self):
        """Prefix of the newest complete checkpoint: the `latest` pointer when it is valid, else a scan."""
        pointer = os.path.join(self.directory, LATEST)
        if os.path.isfile(pointer):
            try:
                name = _read_json(pointer).get("name")
            except (OSError, ValueError):
                name = None
            if name and checkpoint_state(self._prefix(name)) is not None:
                return self._prefix(name)
            found = self.complete()
            logger.warning("%s points at an incomplete or missing checkpoint (%s); the newest complete one is %s",
                           pointer, name, os.path.basename(found[-1][1]) if found else "none")
            return found[-1][1] if found else None
        found = self.complete()
        return found[-1][1] if found else None

    def has_any(self):
        """Whether the directory holds checkpoint files of some run (complete or not)."""
        return bool(glob.glob(os.path.join(self.directory, "*.pdparams")))

    def _prune(self, keep):
        if not self.keep_last or self.keep_last <= 0:
            return
        found = self.complete()
        old = [p for _, p in found if os.path.basename(p) != keep][:max(len(found) - self.keep_last, 0)]
        for prefix in old:
            # JSON first: a kill mid-way leaves an incomplete checkpoint, never a wrong one
            for path in [f"{prefix}.json", f"{prefix}.pdparams", f"{prefix}.pdopt", f"{prefix}.ema.pdparams"]:
                if os.path.exists(path):
                    os.remove(path)
        # leftovers of saves that were killed
        for path in glob.glob(os.path.join(self.directory, "*.tmp-*")):
            pid = path.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                os.remove(path)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NAME_RE = re.compile(r"^(.*?)(\.ema)?\.(pdparams|pdopt|json)$")


def resolve_checkpoint(spec, output_dir):
    """Prefix of the checkpoint `spec` names: 'auto' (newest in output_dir), a run's output_dir or
    its checkpoints/ folder (newest there), a prefix, or one of its files."""
    if spec == "auto":
        spec = output_dir
    if os.path.isdir(spec):
        directory = spec if os.path.basename(os.path.normpath(spec)) == CHECKPOINT_DIR or \
            not os.path.isdir(os.path.join(spec, CHECKPOINT_DIR)) else os.path.join(spec, CHECKPOINT_DIR)
        manager = CheckpointManager(os.path.dirname(os.path.abspath(directory)))
        manager.directory = directory
        prefix = manager.latest()
        if prefix is None:
            raise CheckpointNotFound(f"--resume {spec}: no complete checkpoint in {directory} "
                                     f"(a complete one has its .pdparams, .pdopt and .json)")
        return prefix
    match = _NAME_RE.match(spec)
    prefix = match.group(1) if match else spec
    if checkpoint_state(prefix) is None:
        if os.path.isfile(f"{prefix}.pdparams") and not os.path.isfile(f"{prefix}.json"):
            raise CheckpointNotFound(f"--resume {spec}: {prefix}.json is missing, so this checkpoint is incomplete "
                                     f"(its save was interrupted); resume from the run directory to pick the "
                                     f"newest complete one")
        raise CheckpointNotFound(f"--resume {spec}: no complete checkpoint at {prefix} "
                                 f"(expected {prefix}.pdparams, .pdopt and .json)")
    return prefix


def _weights(path):
    return {k: v for k, v in read_checkpoint(path).items() if isinstance(v, np.ndarray)}


def load_checkpoint(prefix, with_optimizer=True):
    """{'state': JSON state, 'model': {name: ndarray}, 'optimizer': ..., 'ema': ... or None}."""
    state = checkpoint_state(prefix)
    if state is None:
        raise CheckpointNotFound(f"no complete checkpoint at {prefix}")
    directory = os.path.dirname(prefix)
    files = state["files"]
    out = {"state": state, "model": _weights(os.path.join(directory, files["pdparams"]["name"])),
           "optimizer": None, "ema": None}
    if with_optimizer and "pdopt" in files:
        out["optimizer"] = read_checkpoint(os.path.join(directory, files["pdopt"]["name"]))
    if "ema" in files:
        out["ema"] = _weights(os.path.join(directory, files["ema"]["name"]))
    return out
