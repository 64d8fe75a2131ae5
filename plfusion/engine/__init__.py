"""Training engine: trainer, evaluator, checkpoints, optimizers, LR schedules, logging, distribution."""
from .checkpoint import CheckpointManager, load_checkpoint, resolve_checkpoint
from .evaluator import Evaluator
from .lr_scheduler import CosineWarmup, PolyWarmup, Step, build_lr_scheduler
from .optimizer import build_optimizer, build_param_groups, clip_grad_norm
from .trainer import OutputDirInUse, Trainer, TrainingDiverged, extra_losses

__all__ = ["Trainer", "TrainingDiverged", "OutputDirInUse", "extra_losses", "Evaluator", "CheckpointManager",
           "load_checkpoint", "resolve_checkpoint", "build_optimizer", "build_param_groups", "clip_grad_norm",
           "build_lr_scheduler", "PolyWarmup", "CosineWarmup", "Step"]
