"""The training loop: one code path for one CPU process and for fleet data parallelism.

`Trainer(cfg).train()` builds everything from the config (model, loaders, loss, optimizer,
LR schedule, AMP, EMA), optionally resumes, and trains for `epochs` or `iters` updates.
`Trainer(cfg, mode="eval").evaluate(...)` evaluates a checkpoint or pretrained weights.

Engine config sections (besides model / dataloader / loss / optimizer / lr_scheduler):

    epochs: 10                  # or iters: N (updates); not both
    output_dir: output/run
    seed: 42
    amp: {enable: false, level: O1, dtype: float16}     # GPU only; on CPU one warning, then float32
    ema: {enable: false, decay: 0.9999}
    train: {accum_steps: 1, log_interval: 10, eval_interval: 1, save_interval: 1, keep_last: 3,
            best_metric: null, topk: [1, 5]}
    mixup: {mixup_alpha: 0.8, cutmix_alpha: 1.0, ...}   # optional, classification only
    teacher: {name: Classifier, ..., pretrained: PATH}   # optional model section, for DistillationLoss
    lr_scheduler: {..., scale_by_batch: 512}             # optional: rates are given for a global batch of 512
    eval: {save_predictions: 0}  # segmentation: pictures of the first N val samples after the final evaluation

Linear LR scaling (DeiT, Swin, MViT): with `lr_scheduler.scale_by_batch: N` the schedule's
`learning_rate`, `warmup_start_lr` and `eta_min` are the values for a global batch of N images,
and the trainer multiplies them by (batch_size x processes x accum_steps) / N. The teacher of
a DistillationLoss is built from the `teacher` section with build_model, must load weights
(`pretrained` or `architecture.pretrained`), runs in eval mode and is never optimised.

`eval_interval` and `save_interval` count epochs in an `epochs` run and updates in an `iters`
run; 0 means only at the end. `best_metric` defaults to top1 (classification) or miou
(segmentation). One update consumes `accum_steps` batches of `sampler.batch_size` per
process; the loss is divided by `accum_steps`, and gradients are synchronised across ranks
only on the last of them.

Extra loss terms (the model-side loss protocol): after each forward pass the trainer calls
`extra_losses()` on the model inside any fleet / paddle.DataParallel wrappers (followed
through `._layers`) when it defines one. It returns {name: scalar Tensor}; every term is added
to the task loss, and logged under its name. TokenFusion's mask sparsity term
(lambda * sum |m|) arrives this way, so a config that lists the patch trains with it.

Failure behaviour: a non-finite loss (on any rank) stops the run before the update with an
error naming the step, and nothing is saved, so the last checkpoint stays the last good one.
A fresh run refuses an output_dir that already holds checkpoints; `resume="auto"` continues
the newest complete checkpoint there.
Under `paddle.distributed.launch`, a rank that dies makes the launcher stop the others and
exit non-zero, naming the rank ("Container rank N status failed ... code C"); checkpoints are
written whole or not at all, so `--resume auto` continues from the last complete one. Ranks
wait for rank 0's checkpoint writes on the launcher's store rather than in a gloo collective,
which would give up after 30 s.
"""
import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import random
import time
import uuid

import numpy as np
import paddle
import yaml

from ..config import dump_config
from ..registry import ConfigError, did_you_mean
from . import distributed as D
from .checkpoint import (CheckpointManager, CheckpointNotFound, atomic_write_text,
                         capture_rng_state, load_checkpoint, load_optimizer_state, optimizer_state,
                         resolve_checkpoint, restore_rng_state)
from .ema import ModelEMA
from .evaluator import Evaluator
from .logger import ScalarWriter, StepTimer, setup_logging
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer, clip_grad_norm

__all__ = ["Trainer", "TrainingDiverged", "OutputDirInUse", "extra_losses", "validate_engine_config",
           "validate_eval_options", "scale_lr_by_batch"]

logger = logging.getLogger(__name__)

AMP_KEYS = ("enable", "level", "dtype")
EMA_KEYS = ("enable", "decay")
TRAIN_KEYS = ("accum_steps", "log_interval", "eval_interval", "save_interval", "keep_last", "best_metric", "topk")
TRAIN_DEFAULTS = {"accum_steps": 1, "log_interval": 10, "eval_interval": 1, "save_interval": 1, "keep_last": 3,
                  "best_metric": None, "topk": [1, 5]}
BEST_METRICS = ("top1", "top5", "miou", "pixel_acc", "mean_acc")
# Sections nothing in the engine reads: worth a warning, since settings there have no effect.
UNUSED_HERE = ("log", "checkpoint", "metric", "distributed")
EVAL_KEYS = ("save_predictions",)
# "RANK:STEP": that rank exits at once with status 3 just before update STEP, like a process the
# OOM killer takes; the distributed failure tests set it to check that the other ranks stop too.
DIE_ENV = "PLFUSION_DIE_AT"
# "RANK:STEP": that rank nudges one parameter after update STEP, so the tests can check that the
# weight check at save stops a run whose replicas diverged.
DIVERGE_ENV = "PLFUSION_DIVERGE_AT"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


class OutputDirInUse(RuntimeError):
    """output_dir holds another run's checkpoints and no resume was asked for."""


# ------------------------------------------------------------------ config checks

def _section(cfg, key, allowed):
    value = cfg.get(key)
    if value is None:
        return {}
    if not hasattr(value, "items"):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key.{did_you_mean(k, allowed)} Accepted keys: {', '.join(allowed)}")
    return dict(value)


def _int(value, where, minimum):
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _bool(value, where):
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def validate_engine_config(cfg):
    """Check the engine's own sections; returns (train, amp, ema) dicts with defaults filled in."""
    for key in UNUSED_HERE:
        if key in cfg:
            logger.warning("config section '%s' is not read by the training engine; its settings have no effect "
                           "(training options live in 'train')", key)
    train = dict(TRAIN_DEFAULTS, **_section(cfg, "train", TRAIN_KEYS))
    train["accum_steps"] = _int(train["accum_steps"], "train.accum_steps", 1)
    train["log_interval"] = _int(train["log_interval"], "train.log_interval", 1)
    for key in ("eval_interval", "save_interval", "keep_last"):
        train[key] = _int(train[key], f"train.{key}", 0)
    best = train["best_metric"]
    if best is not None and not (isinstance(best, str) and (best in BEST_METRICS or best.startswith(("miou_", "ema_"))
                                                            or (best.startswith("top") and best[3:].isdigit()))):
        raise ConfigError(f"train.best_metric: expected an evaluation metric ({', '.join(BEST_METRICS)}, miou_<output>, "
                          f"ema_<metric>), got {best!r}.{did_you_mean(best, BEST_METRICS)}")
    topk = train["topk"]
    if not (isinstance(topk, (list, tuple)) and topk and all(isinstance(k, int) and not isinstance(k, bool)
                                                             and k >= 1 for k in topk)):
        raise ConfigError(f"train.topk: expected a list of positive integers such as [1, 5], got {topk!r}")

    amp = dict({"enable": False, "level": "O1", "dtype": "float16"}, **_section(cfg, "amp", AMP_KEYS))
    _bool(amp["enable"], "amp.enable")
    if amp["level"] not in ("O1", "O2"):
        raise ConfigError(f"amp.level: expected O1 or O2, got {amp['level']!r}")
    if amp["dtype"] not in ("float16", "bfloat16"):
        raise ConfigError(f"amp.dtype: expected float16 or bfloat16, got {amp['dtype']!r}")

    ema = dict({"enable": False, "decay": 0.9999}, **_section(cfg, "ema", EMA_KEYS))
    _bool(ema["enable"], "ema.enable")

    has_epochs, has_iters = cfg.get("epochs") is not None, cfg.get("iters") is not None
    if has_epochs == has_iters:
        raise ConfigError("give the training length as exactly one of 'epochs' or 'iters' (updates); "
                          f"got {'both' if has_epochs else 'neither'}")
    if has_epochs:
        _int(cfg["epochs"], "epochs", 1)
    else:
        _int(cfg["iters"], "iters", 1)
    _int(cfg.get("seed", 0), "seed", 0)
    if not isinstance(cfg.get("output_dir", "output"), str) or not cfg.get("output_dir", "output"):
        raise ConfigError(f"output_dir: expected a directory path, got {cfg.get('output_dir')!r}")
    for key in ("dataloader", "optimizer", "lr_scheduler", "loss", "model"):
        if key not in cfg:
            raise ConfigError(f"'{key}' section is missing; training needs model, dataloader, loss, optimizer "
                              f"and lr_scheduler")
    return train, amp, ema


def validate_eval_options(cfg):
    """The `eval` section with defaults: {save_predictions: N pictures (rank 0, segmentation)}."""
    opts = dict({"save_predictions": 0}, **_section(cfg, "eval", EVAL_KEYS))
    opts["save_predictions"] = _int(opts["save_predictions"], "eval.save_predictions", 0)
    return opts


# ------------------------------------------------------------------ helpers

SCALED_LR_KEYS = ("learning_rate", "warmup_start_lr", "eta_min")


def scale_lr_by_batch(sched_cfg, global_batch, where="lr_scheduler"):
    """(schedule config without `scale_by_batch`, factor): rates given for a batch of N, scaled to `global_batch`."""
    sched = dict(sched_cfg) if hasattr(sched_cfg, "items") else sched_cfg
    if not isinstance(sched, dict) or sched.get("scale_by_batch") is None:
        if isinstance(sched, dict):
            sched.pop("scale_by_batch", None)
        return sched, 1.0
    ref = sched.pop("scale_by_batch")
    _int(ref, f"{where}.scale_by_batch", 1)
    factor = global_batch / float(ref)
    for key in SCALED_LR_KEYS:
        value = sched.get(key)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            sched[key] = float(value) * factor
    return sched, factor


def _maybe_die(rank, step):
    spec = os.environ.get(DIE_ENV)
    if spec and spec == f"{rank}:{step}":
        logging.shutdown()
        os._exit(3)


def _maybe_diverge(rank, step, params):
    if os.environ.get(DIVERGE_ENV) == f"{rank}:{step}" and params:
        with paddle.no_grad():
            params[0].set_value(params[0] + 1e-3)


def extra_losses(model):
    """{name: scalar Tensor} from the innermost model's `extra_losses()`, or {}."""
    inner = D.unwrap_model(model)
    fn = getattr(inner, "extra_losses", None)
    if fn is None:
        return {}
    terms = fn()
    if not isinstance(terms, dict):
        raise TypeError(f"{type(inner).__name__}.extra_losses() must return a dict of scalar tensors, got "
                        f"{type(terms).__name__}")
    for name, value in terms.items():
        if not isinstance(value, paddle.Tensor) or value.size != 1:
            raise TypeError(f"{type(inner).__name__}.extra_losses()['{name}'] must be a scalar tensor, got "
                            f"{getattr(value, 'shape', type(value).__name__)}")
    return terms


def _r_label(r):
    """A ToMe r as typed on the command line: 16, '16,-1', '[8,8,4]'."""
    if isinstance(r, tuple):
        return f"{r[0]},{r[1]:g}"
    if isinstance(r, list):
        return "[" + ",".join(str(v) for v in r) + "]"
    return str(r)


def _state_numpy(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def load_model_state(model, state, source):
    """Strict set_state_dict: every key present with the right shape, nothing extra."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, v in own.items():
        if list(np.shape(state[k])) != list(v.shape):
            raise ValueError(f"{source}: '{k}' has shape {list(np.shape(state[k]))}, the model needs {list(v.shape)}")
    model.set_state_dict({k: np.asarray(state[k]).astype(np.dtype(str(own[k].numpy().dtype)), copy=False)
                          for k in own})


def weights_digest(tensor_digests):
    """One sha256 over the per-tensor digests of `distributed.tensor_digests` (equal <=> identical weights)."""
    h = hashlib.sha256()
    for name, digest in sorted(tensor_digests.items()):
        h.update(name.encode())
        h.update(digest.encode())
    return h.hexdigest()


def check_ranks_agree(per_rank, step):
    """Raise naming the tensors that differ when the ranks' {name: digest} maps are not identical."""
    ref = per_rank[0]
    differ = sorted(k for k in ref if any(d.get(k) != ref[k] for d in per_rank[1:]))
    if differ:
        ranks = [r for r, d in enumerate(per_rank) if any(d.get(k) != ref[k] for k in differ)]
        raise RuntimeError(f"ranks hold different weights at step {step}: {len(differ)} tensor(s) of rank(s) {ranks} "
                           f"differ from rank 0 ({', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); the "
                           f"gradient all-reduce did not keep the replicas in step, so this checkpoint is not written")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, paddle.Tensor):
        obj = obj.numpy()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _setup_amp(amp):
    """(enabled, level, dtype): AMP runs only on a GPU; elsewhere one warning and float32."""
    if not amp["enable"]:
        return False, None, None
    device = paddle.device.get_device()
    if not paddle.is_compiled_with_cuda() or not device.startswith("gpu"):
        logger.warning("amp.enable is true but training runs on %s: AMP (%s, %s) is disabled, training in float32",
                       device, amp["level"], amp["dtype"])
        return False, None, None
    return True, amp["level"], amp["dtype"]


# ------------------------------------------------------------------ trainer

class Trainer:
    """mode 'train' builds everything; mode 'eval' builds the model and the val loader only."""

    def __init__(self, cfg, mode="train"):
        if mode not in ("train", "eval"):
            raise ValueError(f"Trainer: mode must be 'train' or 'eval', got {mode!r}")
        self.cfg = cfg
        self.mode = mode
        self.train_opts, amp_cfg, self.ema_cfg = validate_engine_config(cfg) if mode == "train" else \
            self._eval_options(cfg)
        self.eval_opts = validate_eval_options(cfg)
        self.rank, self.world_size = D.init_distributed()
        self.is_main = D.is_main_process()
        self.output_dir = cfg.get("output_dir", "output")
        self.seed = int(cfg.get("seed", 0))
        setup_logging(self.output_dir, self.rank, "train.log" if mode == "train" else "eval.log")
        if self.is_main:
            logger.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict() if hasattr(cfg, "to_dict")
                                                               else dict(cfg), sort_keys=False).rstrip())
        self.amp_enabled, self.amp_level, self.amp_dtype = _setup_amp(amp_cfg)

        # Same seed on every rank while building, so the initial weights agree before fleet syncs them.
        self._seed_all(self.seed)
        from ..models import build_model
        self.model = build_model(cfg.model)
        self.sync_bn = False
        if mode == "train":
            self.model, self.sync_bn = self._setup_batchnorm(_bool(cfg.model.get("sync_bn", False), "model.sync_bn"))
        self.val_loader = self._build_loader("val") if "val" in (cfg.get("dataloader") or {}) else None
        self.evaluator = Evaluator(num_classes=self._num_classes(self.val_loader), ignore_index=self._ignore_index(),
                                   topk=self.train_opts["topk"],
                                   amp=(self.amp_level, self.amp_dtype) if self.amp_enabled else None)
        if mode == "train":
            self._setup_training()
        # From here on every rank draws its own dropout / augmentation randomness.
        self._seed_all(self.seed + self.rank)

    # -------------------------------------------------------------- building

    @staticmethod
    def _eval_options(cfg):
        train = dict(TRAIN_DEFAULTS, **_section(cfg, "train", TRAIN_KEYS))
        amp = dict({"enable": False, "level": "O1", "dtype": "float16"}, **_section(cfg, "amp", AMP_KEYS))
        ema = dict({"enable": False, "decay": 0.9999}, **_section(cfg, "ema", EMA_KEYS))
        return train, amp, ema

    @staticmethod
    def _seed_all(seed):
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        paddle.seed(seed)

    def _build_loader(self, mode):
        from ..data.loader import build_dataloader
        sections = self.cfg.get("dataloader")
        if not hasattr(sections, "get") or mode not in sections:
            raise ConfigError(f"dataloader.{mode}: missing")
        for key in sections:
            if key not in ("train", "val", "test"):
                raise ConfigError(f"dataloader.{key}: unknown loader.{did_you_mean(key, ['train', 'val', 'test'])} "
                                  f"Expected train, val or test")
        return build_dataloader(sections[mode], mode, self.seed, rank=self.rank, world_size=self.world_size)

    @staticmethod
    def _num_classes(loader):
        return getattr(loader.dataset, "num_classes", None) if loader is not None else None

    def _ignore_index(self):
        for loader in (self.val_loader, getattr(self, "train_loader", None)):
            if loader is not None and hasattr(loader.dataset, "ignore_index"):
                return int(loader.dataset.ignore_index)
        loss = self.cfg.get("loss") or {}
        return int(loss.get("ignore_index", 255)) if loss.get("ignore_index") is not None else 255

    def _setup_training(self):
        cfg, opts = self.cfg, self.train_opts
        self.train_loader = self._build_loader("train")
        self.accum = opts["accum_steps"]
        batches = len(self.train_loader)
        self.iters_per_epoch = batches // self.accum
        if self.iters_per_epoch == 0:
            raise ConfigError(f"train.accum_steps: {self.accum} exceeds the {batches} batches of an epoch")
        if batches % self.accum:
            logger.warning("an epoch has %d batches, not a multiple of train.accum_steps=%d: the last %d batches of "
                           "every epoch are skipped", batches, self.accum, batches % self.accum)
        self.by_epoch = cfg.get("epochs") is not None
        self.total_steps = cfg["epochs"] * self.iters_per_epoch if self.by_epoch else int(cfg["iters"])
        self.num_epochs = cfg["epochs"] if self.by_epoch else math.ceil(self.total_steps / self.iters_per_epoch)

        from ..losses import build_loss
        teacher = self._build_teacher()
        self.loss_fn = build_loss(cfg.loss, teacher=teacher) if teacher is not None else build_loss(cfg.loss)
        self.loss_needs_inputs = bool(getattr(self.loss_fn, "needs_inputs", False))
        self.mixup = self._build_mixup()

        global_batch = self.train_loader.batch_size * self.world_size * self.accum
        sched_cfg, factor = scale_lr_by_batch(cfg.lr_scheduler, global_batch)
        self.scheduler = build_lr_scheduler(sched_cfg, self.iters_per_epoch, self.total_steps)
        if factor != 1.0:
            logger.info("lr_scheduler.scale_by_batch: global batch %d = %.4g x %d, so learning_rate %.4g -> %.4g",
                        global_batch, factor, cfg.lr_scheduler["scale_by_batch"], cfg.lr_scheduler["learning_rate"],
                        self.scheduler.base_lr)
        inner = self.model
        self.optimizer, self.max_grad_norm = build_optimizer(cfg.optimizer, inner, self.scheduler,
                                                             multi_precision=self.amp_enabled and self.amp_level == "O2")
        self.scaler = None
        if self.amp_enabled:
            if self.amp_level == "O2":
                inner, self.optimizer = paddle.amp.decorate(models=inner, optimizers=self.optimizer, level="O2",
                                                            dtype=self.amp_dtype, save_dtype="float32")
            if self.amp_dtype == "float16":
                self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 16)
            logger.info("AMP %s with %s", self.amp_level, self.amp_dtype)
        self.ema = ModelEMA(inner, self.ema_cfg["decay"]) if self.ema_cfg["enable"] else None
        self.model = D.wrap_model(inner)
        self.optimizer = D.wrap_optimizer(self.optimizer)
        self.net = D.unwrap_model(self.model)
        self.params = [p for p in self.net.parameters() if not p.stop_gradient]

        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best = {"metric": opts["best_metric"], "value": None, "step": None}
        self.last_metrics = {}
        self.history = []
        self.run_id = uuid.uuid4().hex
        self.ckpt = CheckpointManager(self.output_dir, keep_last=opts["keep_last"])
        if self.val_loader is None:
            logger.warning("no dataloader.val section: training runs without evaluation, so no best checkpoint")

    def _setup_batchnorm(self, want_sync):
        """(model, uses SyncBN). SyncBatchNorm on several GPUs when `model.sync_bn` asks for it;
        otherwise every rank normalises with its own batch, and the running statistics are
        averaged over the ranks before each evaluation and save (`_sync_batchnorm_stats`)."""
        model = self.model
        self.bn_names = D.batchnorm_buffer_names(model)
        if not D.is_distributed() or not self.bn_names:
            return model, False
        if want_sync:
            model, converted = D.convert_sync_batchnorm(model)
            if converted:
                logger.info("model.sync_bn: %d BatchNorm layer(s) use SyncBatchNorm (statistics over all %d ranks)",
                            len(self.bn_names) // 2, self.world_size)
                return model, True
            logger.warning("model.sync_bn: SyncBatchNorm needs GPUs (NCCL) and this run uses %s; each rank normalises "
                           "with its own batch, and BatchNorm running statistics are averaged over the ranks before "
                           "every evaluation and save", paddle.device.get_device())
        else:
            logger.info("%d BatchNorm layer(s): each rank normalises with its own batch (model.sync_bn: false); running "
                        "statistics are averaged over the ranks before every evaluation and save",
                        len(self.bn_names) // 2)
        return model, False

    def _build_teacher(self):
        """The DistillationLoss teacher from the `teacher` section: weights loaded, eval mode, frozen."""
        spec, loss = self.cfg.get("teacher"), self.cfg.get("loss") or {}
        distills = loss.get("name") == "DistillationLoss" and loss.get("distillation_type", "hard") != "none"
        if spec is None:
            if distills:
                raise ConfigError(f"teacher: missing; loss DistillationLoss with distillation_type "
                                  f"'{loss.get('distillation_type', 'hard')}' needs a teacher model section, e.g. "
                                  f"teacher: {{architecture: {{name: ...}}, pretrained: PATH}}")
            return None
        if not distills:
            raise ConfigError(f"teacher: only DistillationLoss (with distillation_type soft or hard) uses a teacher, "
                              f"but loss is {loss.get('name')!r} with distillation_type "
                              f"{loss.get('distillation_type')!r}; remove the teacher section or change the loss")
        if not hasattr(spec, "get"):
            raise ConfigError(f"teacher: expected a model section ({{architecture: ..., pretrained: PATH}}), "
                              f"got {spec!r}")
        arch = spec.get("architecture") or {}
        if not spec.get("pretrained") and not (hasattr(arch, "get") and arch.get("pretrained")):
            raise ConfigError("teacher.pretrained: missing; a teacher with random weights would distil noise. "
                              "Give the path of its trained weights (teacher.pretrained=PATH)")
        from ..models import build_model
        from ..registry import add_context
        try:
            teacher = build_model(spec)
        except (ConfigError, ValueError, TypeError, OSError) as e:
            raise add_context(e, "teacher")
        teacher.eval()
        for p in teacher.parameters():
            p.stop_gradient = True
        logger.info("teacher %s: %.2fM parameters, frozen", type(teacher).__name__,
                    sum(int(np.prod(p.shape)) for p in teacher.parameters()) / 1e6)
        return teacher

    def _build_mixup(self):
        spec = self.cfg.get("mixup")
        if spec is None:
            return None
        from ..data.mixup import Mixup
        from ..registry import check_kwargs
        if not hasattr(spec, "items"):
            raise ConfigError(f"mixup: expected a mapping of Mixup arguments, got {spec!r}")
        spec = dict(spec)
        check_kwargs(Mixup, spec, "mixup")
        if "seed" in spec:
            raise ConfigError("mixup.seed: not configurable; mixing draws from (seed, rank, step) so runs resume exactly")
        if self.cfg.loss.get("name") == "CrossEntropyLoss":
            raise ConfigError("mixup produces soft targets, which CrossEntropyLoss rejects; set loss.name: "
                              "SoftTargetCrossEntropy (or DistillationLoss with that base_loss)")
        spec.setdefault("num_classes", getattr(self.train_loader.dataset, "num_classes", 1000))
        return Mixup(**spec)

    # -------------------------------------------------------------- resume / output dir

    def _claim_output_dir(self, resume):
        """Refuse to train over another run's checkpoints unless resuming; returns the checkpoint prefix."""
        decision = None
        if self.is_main:
            try:
                prefix = resolve_checkpoint(resume, self.output_dir) if resume else None
                if prefix is None and self.ckpt.has_any():
                    latest = self.ckpt.latest()
                    raise OutputDirInUse(
                        f"output_dir {self.output_dir} already holds checkpoints of a run"
                        f"{f' (newest complete: {os.path.basename(latest)})' if latest else ''}. Pass --resume auto "
                        f"to continue it, or choose another directory with -o output_dir=...")
                if prefix is not None and self.ckpt.has_any() and \
                        os.path.abspath(os.path.dirname(prefix)) != os.path.abspath(self.ckpt.directory):
                    raise OutputDirInUse(
                        f"resuming from {prefix} would write into {self.ckpt.directory}, which holds another run's "
                        f"checkpoints; set -o output_dir=... to a fresh directory or to the run being resumed")
                decision = ("ok", prefix)
            except (OutputDirInUse, CheckpointNotFound) as e:
                decision = (type(e).__name__, str(e))
        decision = D.broadcast_object(decision)
        if decision[0] == "OutputDirInUse":
            raise OutputDirInUse(decision[1])
        if decision[0] == "CheckpointNotFound":
            raise CheckpointNotFound(decision[1])
        return decision[1]

    def _restore(self, prefix):
        ck = load_checkpoint(prefix)
        state = ck["state"]
        if ck["optimizer"] is None:
            raise CheckpointNotFound(f"{prefix} holds weights only (no optimizer state) and cannot resume training; "
                                     f"use it with --pretrained / model.pretrained to fine-tune instead")
        load_model_state(self.net, ck["model"], f"{prefix}.pdparams")
        load_optimizer_state(self.optimizer, self.net, ck["optimizer"], f"{prefix}.pdopt")
        self.scheduler.set_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            scaler_state = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in state["scaler"].items()}
            self.scaler.load_state_dict(scaler_state)
        if self.ema is not None:
            if ck["ema"] is None:
                logger.warning("%s has no EMA weights; EMA restarts from the restored weights", prefix)
                self.ema = ModelEMA(self.net, self.ema_cfg["decay"])
            else:
                self.ema.set_state_dict(ck["ema"], f"{prefix}.ema.pdparams")
        self.global_step = int(state["global_step"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        if state.get("iters_per_epoch") != self.iters_per_epoch or state.get("world_size") != self.world_size:
            logger.warning("resuming with %d updates per epoch on %d process(es); the checkpoint was written with %s "
                           "on %s: the data order after resuming differs from the original run",
                           self.iters_per_epoch, self.world_size, state.get("iters_per_epoch"), state.get("world_size"))
            if self.step_in_epoch > self.iters_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.step_in_epoch >= self.iters_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        best = state.get("best") or {}
        if self.best["metric"] in (None, best.get("metric")):
            self.best = {"metric": best.get("metric"), "value": best.get("value"), "step": best.get("step")}
        self.last_metrics = state.get("metrics") or {}
        self.run_id = state.get("run_id", self.run_id)
        rng = state.get("rng") or []
        if rng:
            restore_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        logger.info("resumed from %s: step %d, epoch %d, update %d of the epoch", prefix, self.global_step,
                    self.epoch + 1, self.step_in_epoch)

    def _write_run_config(self):
        if not self.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "config.yaml")
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                old = yaml.safe_load(f)
            new = self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else dict(self.cfg)
            if old != new:
                backup = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(path, backup)
                logger.warning("the config differs from the one this run used before; the old one is kept as %s",
                               backup)
        dump_config(self.cfg, path)

    # -------------------------------------------------------------- training

    def _forward_loss(self, inputs, labels):
        outputs = self.model(inputs)
        loss = self.loss_fn(outputs, labels, inputs) if self.loss_needs_inputs else self.loss_fn(outputs, labels)
        terms = extra_losses(self.model)
        total = loss
        for value in terms.values():
            total = total + value.astype(total.dtype)
        return total, loss, terms

    def _batch_size(self, inputs):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        return int(first.shape[0])

    def _train_step(self, batches):
        """One update from `accum` batches; returns (mean loss over ranks, components, samples)."""
        total_loss = paddle.zeros([1], dtype="float32")
        parts = {}
        samples = 0
        for micro, (inputs, labels) in enumerate(batches):
            if self.mixup is not None:
                self.mixup.rng = np.random.default_rng([self.seed, self.rank, self.global_step, micro])
                inputs, labels = self.mixup(inputs, labels)
            last = micro == len(batches) - 1
            sync = contextlib.nullcontext() if last or not D.is_distributed() else self.model.no_sync()
            with sync:
                if self.amp_enabled:
                    with paddle.amp.auto_cast(enable=True, level=self.amp_level, dtype=self.amp_dtype):
                        total, loss, terms = self._forward_loss(inputs, labels)
                else:
                    total, loss, terms = self._forward_loss(inputs, labels)
                scaled = total.astype("float32") / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total_loss = total_loss + total.detach().astype("float32").reshape([1]) / self.accum
            # with extra terms the task loss is logged on its own as well
            for name, value in ([("task_loss", loss)] + list(terms.items()) if terms else []):
                parts[name] = parts.get(name, 0.0) + value.detach().astype("float32").reshape([1]) / self.accum
            samples += self._batch_size(inputs)
        names = sorted(parts)
        local = paddle.concat([total_loss] + [parts[n] for n in names]).numpy().astype(np.float64)
        reduced = D.all_reduce_sum(np.concatenate([local, [0.0 if np.isfinite(local).all() else 1.0]]))
        world = self.world_size
        mean = reduced[:-1] / world
        if reduced[-1] > 0 or not np.isfinite(mean).all():
            self.optimizer.clear_grad()
            raise TrainingDiverged(
                f"loss is {mean[0]} at step {self.global_step + 1} (epoch {self.epoch + 1}, update "
                f"{self.step_in_epoch + 1} of {self.iters_per_epoch}); stopping without saving. The last good "
                f"checkpoint is {self.ckpt.latest() or 'none'}; lower the learning rate or check the data")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, self.max_grad_norm) if self.max_grad_norm is not None else None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if grad_norm is not None and not math.isfinite(grad_norm):
                self.optimizer.clear_grad()
                raise TrainingDiverged(f"gradient norm is {grad_norm} at step {self.global_step + 1}; stopping "
                                       f"without saving")
            self.optimizer.step()
        self.optimizer.clear_grad()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.net)
        components = {n: float(v) for n, v in zip(names, mean[1:])}
        return float(mean[0]), components, samples * world, grad_norm

    def train(self, resume=None, max_steps=None):
        """Train to the configured length (or `max_steps` updates); returns a summary dict."""
        if self.mode != "train":
            raise RuntimeError("Trainer(mode='eval') cannot train")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps: expected a positive integer, got {max_steps!r}")
        prefix = self._claim_output_dir(resume)
        if prefix is not None:
            self._restore(prefix)
        self._write_run_config()
        stop_at = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        writer = ScalarWriter(self.output_dir, active=self.is_main)
        timer = StepTimer(stop_at, self.global_step)
        opts = self.train_opts
        logger.info("training %d updates (%d per epoch, %d epochs) on %d process(es): batch %d x accum %d x %d = %d "
                    "samples per update", self.total_steps, self.iters_per_epoch, self.num_epochs, self.world_size,
                    self.train_loader.batch_size, self.accum, self.world_size,
                    self.train_loader.batch_size * self.accum * self.world_size)
        self.model.train()
        try:
            while self.global_step < stop_at:
                self.train_loader.set_epoch(self.epoch, start_batch=self.step_in_epoch * self.accum)
                batches = iter(self.train_loader)
                while self.step_in_epoch < self.iters_per_epoch and self.global_step < stop_at:
                    t0 = time.time()
                    group = [next(batches) for _ in range(self.accum)]
                    reader_cost = time.time() - t0
                    lr = self.optimizer.get_lr()
                    _maybe_die(self.rank, self.global_step + 1)
                    loss, parts, samples, grad_norm = self._train_step(group)
                    self.global_step += 1
                    _maybe_diverge(self.rank, self.global_step, self.params)
                    self.step_in_epoch += 1
                    timer.update(reader_cost, time.time() - t0, samples)
                    self.history.append((self.global_step, loss))
                    if self.global_step % opts["log_interval"] == 0 or self.global_step == stop_at:
                        self._log_step(writer, timer, lr, loss, parts, grad_norm)
                    epoch_end = self.step_in_epoch == self.iters_per_epoch
                    self._maybe_eval_and_save(writer, epoch_end, stop_at)
                if self.step_in_epoch >= self.iters_per_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                del batches
        finally:
            writer.close()
        if self.train_loader.guard.skipped:
            logger.warning("%d training sample(s) could not be loaded and were replaced (dataloader.train.loader."
                           "skip_corrupt)", self.train_loader.guard.skipped)
        return {"global_step": self.global_step, "metrics": self.last_metrics, "best": self.best,
                "history": self.history, "output_dir": self.output_dir}

    def _log_step(self, writer, timer, lr, loss, parts, grad_norm):
        s = timer.summary(self.global_step)
        extra = "".join(f" {k} {v:.5f}" for k, v in parts.items())
        norm = f" grad_norm {grad_norm:.4f}" if grad_norm is not None else ""
        logger.info("epoch [%d/%d] iter [%d/%d] step %d/%d lr %.6e loss %.5f%s%s reader_cost %.5f s batch_cost %.5f s "
                    "ips %.2f img/s eta %s", self.epoch + 1, self.num_epochs, self.step_in_epoch, self.iters_per_epoch,
                    self.global_step, self.total_steps, lr, loss, extra, norm, s["reader_cost"], s["batch_cost"],
                    s["ips"], s["eta"])
        scalars = {"train/loss": loss, "train/lr": lr, "train/ips": s["ips"]}
        scalars.update({f"train/{k}": v for k, v in parts.items()})
        writer.add_scalars(scalars, self.global_step)
        timer.reset()

    def _due(self, interval, epoch_end, final):
        if final:
            return True
        if interval == 0:
            return False
        if self.by_epoch:
            return epoch_end and (self.epoch + 1) % interval == 0
        return self.global_step % interval == 0

    def _maybe_eval_and_save(self, writer, epoch_end, stop_at):
        final = self.global_step >= stop_at
        opts = self.train_opts
        do_eval = self.val_loader is not None and self._due(opts["eval_interval"], epoch_end, final)
        do_save = self._due(opts["save_interval"], epoch_end, final)
        if do_eval or do_save:
            self._sync_batchnorm_stats()
        if do_eval:
            self.last_metrics = self.evaluate_now()
            scalars = {f"eval/{k}": v for k, v in self.last_metrics.items() if isinstance(v, (int, float))
                       and k != "samples"}
            writer.add_scalars(scalars, self.global_step)
            self._update_best()
            if final:
                self._save_predictions()
            D.wait_for_main(f"evaluated-{self.global_step}")
        if do_save:
            self._save(final=final, epoch_end=epoch_end)
            D.wait_for_main(f"saved-{self.global_step}")

    def _sync_batchnorm_stats(self):
        """Average BatchNorm running statistics (and their EMA) over the ranks unless SyncBN kept them equal."""
        if not D.is_distributed() or self.sync_bn or not self.bn_names:
            return
        own = self.net.state_dict()
        tensors = [own[n] for n in self.bn_names]
        if self.ema is not None:
            tensors += [self.ema.shadow[n] for n in self.bn_names]
        D.average_across_ranks(tensors)

    def _update_best(self):
        metrics = self.last_metrics
        if self.best["metric"] is None:
            self.best["metric"] = "top1" if "top1" in metrics else "miou" if "miou" in metrics else None
        name = self.best["metric"]
        if name is None:
            return
        if name not in metrics:
            raise ConfigError(f"train.best_metric: '{name}' is not among the evaluation metrics "
                              f"{sorted(k for k in metrics if k != 'per_class_iou')}.{did_you_mean(name, metrics)}")
        value = float(metrics[name])
        if math.isnan(value):
            return
        if self.best["value"] is None or value > self.best["value"]:
            self.best.update(value=value, step=self.global_step)
            if self.is_main:
                self.ckpt.save_best(_state_numpy(self.net), {"global_step": self.global_step, "epoch": self.epoch,
                                                             "best": dict(self.best), "metrics": _jsonable(metrics)})
            logger.info("new best %s %.4f at step %d", name, value, self.global_step)

    def _save(self, final, epoch_end):
        rng = D.all_gather_object(capture_rng_state())
        digests = rank_metrics = None
        if D.is_distributed():   # every save: a checkpoint must be the one model all ranks hold
            gathered = D.all_gather_object((D.tensor_digests(self.net), _jsonable(self.last_metrics)))
            check_ranks_agree([g[0] for g in gathered], self.global_step)
            digests = [weights_digest(g[0]) for g in gathered]
            rank_metrics = [g[1] for g in gathered]
            if any(m != rank_metrics[0] for m in rank_metrics[1:]):
                raise RuntimeError(f"ranks evaluated to different metrics at step {self.global_step}: {rank_metrics}")
        if not self.is_main:
            return
        name = f"epoch_{self.epoch + 1}" if epoch_end and self.by_epoch else f"iter_{self.global_step:07d}"
        state = {"global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                 "iters_per_epoch": self.iters_per_epoch, "total_steps": self.total_steps,
                 "world_size": self.world_size, "accum_steps": self.accum,
                 "lr_scheduler": _jsonable(self.scheduler.state_dict()),
                 "scaler": _jsonable(self.scaler.state_dict()) if self.scaler is not None else None,
                 "best": dict(self.best), "metrics": _jsonable(self.last_metrics), "rng": rng, "run_id": self.run_id}
        if digests is not None:
            state["rank_weight_digests"] = digests
            state["rank_metrics"] = rank_metrics
        self.ckpt.save(name, _state_numpy(self.net), optimizer_state(self.optimizer, self.net), state,
                       ema_state={k: v.numpy() for k, v in self.ema.state_dict().items()} if self.ema else None)

    # -------------------------------------------------------------- evaluation

    def evaluate_now(self, desc="eval"):
        """Evaluate the current weights (and the EMA weights when EMA is on) on the val loader."""
        if self.val_loader is None:
            raise ConfigError("dataloader.val: missing, so there is nothing to evaluate on")
        net = D.unwrap_model(self.model)
        metrics = self.evaluator.run(net, self.val_loader, desc=desc)
        ema = getattr(self, "ema", None)
        if ema is not None:
            with ema.swapped(net):
                ema_metrics = self.evaluator.run(net, self.val_loader, desc=f"{desc} (ema)")
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k not in ("samples", "per_class_iou")})
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                          if k != "per_class_iou")
        logger.info("evaluation at step %d: %s", getattr(self, "global_step", 0), shown)
        return metrics

    def evaluate(self, resume=None, pretrained=None, use_ema=False):
        """Load weights from a training checkpoint (`resume`: path, run dir or 'auto') or a pretrained
        file, evaluate, and write `<output_dir>/eval_results.json` (rank 0)."""
        source = self._load_eval_weights(resume, pretrained, use_ema)
        metrics = self.evaluate_now()
        self._write_eval_results({"weights": source, "metrics": metrics})
        self.last_metrics = metrics
        self._save_predictions()
        return metrics

    def _write_eval_results(self, results):
        """Rank 0 writes <output_dir>/eval_results.json and the config it evaluated with."""
        if not self.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        dump_config(self.cfg, os.path.join(self.output_dir, "eval_config.yaml"))
        atomic_write_text(json.dumps(_jsonable(results), indent=1), os.path.join(self.output_dir, "eval_results.json"))

    def _save_predictions(self):
        """Rank 0 writes `eval.save_predictions` pictures of val samples to <output_dir>/predictions."""
        count = self.eval_opts["save_predictions"]
        if not count or not self.is_main:
            return []
        if "miou" not in (getattr(self, "last_metrics", None) or {}):
            logger.warning("eval.save_predictions: prediction pictures are for segmentation; this run evaluates "
                           "classification, so none are written")
            return []
        from .predictions import PREDICTIONS_DIR, save_predictions
        return save_predictions(D.unwrap_model(self.model), self.val_loader, count,
                                os.path.join(self.output_dir, PREDICTIONS_DIR),
                                amp=(self.amp_level, self.amp_dtype) if self.amp_enabled else None)

    def _load_eval_weights(self, resume, pretrained, use_ema):
        """Load a checkpoint (`resume`) or a weights file (`pretrained`) into the model; returns its name."""
        if (resume is None) == (pretrained is None):
            raise ValueError("evaluate: give exactly one of resume (a checkpoint) or pretrained (a weights file)")
        if resume is not None:
            prefix = D.broadcast_object(resolve_checkpoint(resume, self.output_dir) if self.is_main else None)
            ck = load_checkpoint(prefix, with_optimizer=False)
            weights = ck["model"]
            if use_ema:
                if ck["ema"] is None:
                    raise ValueError(f"{prefix}: has no EMA weights (train with ema.enable: true)")
                weights = ck["ema"]
            load_model_state(self.model, weights, f"{prefix}{'.ema' if use_ema else ''}.pdparams")
            self.global_step = int(ck["state"].get("global_step", 0))
            logger.info("evaluating checkpoint %s%s (step %d)", prefix, " EMA weights" if use_ema else "",
                        self.global_step)
            return prefix
        report = self.model.load_pretrained(pretrained)
        unset = list(report.missing) + list(report.dropped)
        if unset:
            # evaluating freshly initialised tensors would report a meaningless accuracy
            raise ConfigError(f"--pretrained {pretrained}: leaves {len(unset)} model tensor(s) at their random "
                              f"initialisation ({', '.join(unset[:5])}{' ...' if len(unset) > 5 else ''}); the "
                              f"config's model (architecture, num_classes) does not match these weights")
        return pretrained

    def evaluate_tome_dense(self, ratios, resume=None, pretrained=None, use_ema=False):
        """Evaluate a MiT, Swin or MViTv2 model (segmentor, fused or not, or classifier) at each ToMe merge ratio.

        One pass over the val data: every batch runs at every ratio in rotating order
        (Evaluator.compare), so load on a shared machine hits all ratios alike; images/s counts
        the forward passes only. GFLOPs from utils.flops on one sample. Returns one row per ratio
        (mIoU or top-1, images/s, speed-up over the first ratio, GFLOPs) and writes
        <output_dir>/eval_results.json (rank 0)."""
        from ..patches import tome
        from ..patches.tome.dense import find_dense_backbone
        if not ratios:
            raise ValueError("evaluate_tome_dense: no ratios given")
        if self.val_loader is None:
            raise ConfigError("dataloader.val: missing, so there is nothing to evaluate on")
        source = self._load_eval_weights(resume, pretrained, use_ema)
        net = D.unwrap_model(self.model)
        if find_dense_backbone(net) is None:
            raise ConfigError(f"--tome-ratio: merge ratios are for MiT, Swin and MViTv2 models; {type(net).__name__} has "
                              f"neither (use --tome-r for ViT-family models)")
        if not tome.is_patched(net):
            tome.apply_patch(net, ratio=0.0)
        for ratio in ratios:
            try:
                net.ratio = ratio   # validates every setting before the long pass
            except ValueError as e:
                raise ConfigError(f"--tome-ratio: {e}") from None
        x0 = self.val_loader.dataset[0][0]
        shapes = [[1] + list(a.shape) for a in x0] if isinstance(x0, (list, tuple)) else [1] + list(x0.shape)
        rows = self._compare_settings(net, "ratio", ratios, str, shapes)
        for row in rows:
            row.pop("per_class_iou", None)
        key = "miou" if "miou" in rows[0] else "top1"
        logger.info("ToMe evaluation of %s: %s", source, "; ".join(
            f"ratio={row['ratio']} {key} {row[key]:.2f} images/s {row['ips']:.2f}" for row in rows))
        self._write_eval_results({"weights": source, "input_shapes": shapes, "tome": rows})
        return rows

    def _compare_settings(self, net, attr, values, label_of, shapes):
        """Every value of `net.<attr>` (a ToMe r or merge ratio) in one pass over the val data
        (Evaluator.compare): one row per value with its metrics, images/s, `attr` (its label), GFLOPs
        at `shapes` and the speed-up over the first value."""
        from ..utils.flops import count_flops
        settings, gflops = {}, {}
        for value in values:
            label = label_of(value)
            settings[label] = lambda m, value=value: setattr(m, attr, value)
            setattr(net, attr, value)
            gflops[label] = count_flops(net, shapes)
        results = self.evaluator.compare(net, self.val_loader, settings, desc="eval ToMe")
        base = results[label_of(values[0])]["ips"]
        return [dict(res, **{attr: label}, gflops=gflops[label], speedup=res["ips"] / base if base else None)
                for label, res in results.items()]

    def evaluate_tome(self, r_values, resume=None, pretrained=None, use_ema=False):
        """Evaluate the weights at each ToMe r of `r_values` in one pass over the val data.

        Every batch runs once per r (in rotating order, so load on a shared machine hits all r
        alike); returns one row per r with top-k accuracy, images/s of the model's forward passes,
        the speed-up over the first r, and GFLOPs per image (plfusion.utils.flops), and writes
        them to <output_dir>/eval_results.json (rank 0)."""
        from ..patches import tome
        if not r_values:
            raise ValueError("evaluate_tome: r_values is empty")
        if self.val_loader is None:
            raise ConfigError("dataloader.val: missing, so there is nothing to evaluate on")
        source = self._load_eval_weights(resume, pretrained, use_ema)
        net = D.unwrap_model(self.model)
        if not tome.is_patched(net):
            tome.apply_patch(net)
        for r in r_values:
            net.r = r   # validates every r before the long pass
        x0 = self.val_loader.dataset[0][0]
        if not (hasattr(x0, "shape") and len(x0.shape) == 3):
            raise ConfigError("--tome-r: the ToMe table is for single-image classification; the val dataset "
                              f"gives {type(x0).__name__} inputs")
        shape = [1] + [int(v) for v in x0.shape]
        rows = self._compare_settings(net, "r", r_values, _r_label, tuple(shape))
        logger.info("ToMe evaluation of %s: %s", source, "; ".join(
            f"r={row['r']} top1 {row['top1']:.2f} images/s {row['ips']:.1f}" for row in rows))
        self._write_eval_results({"weights": source, "input_shape": shape, "tome": rows})
        return rows

