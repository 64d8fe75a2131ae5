"""Command lines `plfusion-train` / `plfusion-eval` (also `tools/train.py` / `tools/eval.py`).

    plfusion-train -c CONFIG [-o key=value ...] [--resume auto|RUN_DIR|CKPT] [--max-steps N] [--threads N]
                   [--device cpu|gpu]
    plfusion-train -c CONFIG --eval (--resume CKPT | --pretrained WEIGHTS) [--ema]
    plfusion-eval  -c CONFIG (--resume CKPT | --pretrained WEIGHTS) [--ema] [--tome-r 0 8 16]

`--tome-r` evaluates the model at each ToMe r in one pass over the val data and prints
r | top-1 | top-5 | images/s | speed-up | GFLOPs (the ToMe paper's accuracy/speed table);
`-o model.patches='[{name: tome, r: 16}]'` instead evaluates at one fixed r.

Several processes (CPU over gloo, or GPUs over NCCL):

    python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py -c CONFIG

Threads: Paddle computes with one CPU thread unless told otherwise. `--threads N` sets its
intra-op thread count (`paddle.base.core.set_num_threads`, which sizes the MKL/OpenMP pools
that matmul and convolution use); the default divides this machine's usable cores among the
processes the launcher started on it.

Device: `--device gpu` (the default where this Paddle is a CUDA build that sees a GPU) or `--device
cpu`; under the launcher each process takes its own GPU. Asking for a GPU that this Paddle cannot
use is one `error: ...` line and exit status 2.
"""
import argparse
import logging
import os
import sys

from ..paddle_check import DeviceError, check_device
from ..registry import ConfigError

__all__ = ["train_main", "eval_main", "build_parser", "configure_threads", "default_threads", "select_device"]

logger = logging.getLogger(__name__)


def build_parser(prog, eval_only=False):
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a plfusion model." if eval_only else
                                "Train (or with --eval, evaluate) a plfusion model from a YAML config.")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -o optimizer.weight_decay=0.05 (repeatable; '+key=value' adds "
                        "a new key)")
    p.add_argument("--resume", metavar="CKPT", default=None,
                   help="'auto' (newest complete checkpoint in output_dir), a run directory, or a checkpoint "
                        "(prefix or any of its files)")
    p.add_argument("--pretrained", metavar="WEIGHTS", default=None,
                   help="weights to evaluate (.pdparams, .safetensors, .pth); with --eval")
    if not eval_only:
        p.add_argument("--eval", action="store_true", help="evaluate instead of training (needs --resume or "
                                                           "--pretrained)")
        p.add_argument("--max-steps", type=int, default=None, metavar="N",
                       help="stop after N updates (a smoke run); the schedule keeps the configured length")
    p.add_argument("--ema", action="store_true", help="with --eval --resume: evaluate the checkpoint's EMA weights")
    p.add_argument("--tome-r", nargs="+", default=None, metavar="R",
                   help="with evaluation: evaluate at each ToMe r (16, '16,-1' for (r, inflection), '[8,8,4]') in one "
                        "pass and print accuracy, images/s and GFLOPs per r; the first r is the speed-up baseline")
    p.add_argument("--tome-ratio", nargs="+", default=None, metavar="RATIO",
                   help="with evaluation of a MiT, Swin or MViTv2 model: evaluate at each ToMe merge ratio (0.5, or one per "
                        "stage: '0.5,0.5,0.25,0') and print mIoU, images/s and GFLOPs per setting")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per process (default: usable cores / processes on this machine)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="compute on the CPU or the GPU (default: gpu when this Paddle is a CUDA build that sees a GPU, "
                        "else cpu); under the launcher each process takes its own GPU")
    return p


def select_device(device=None):
    """Check `--device` (None: the default) and make it Paddle's device; returns 'cpu' or 'gpu'.
    Must run before the model is built, so parameters are created there."""
    import paddle
    device = check_device(device, where="--device")
    paddle.set_device(device)   # 'gpu' is the launcher's GPU for this rank (FLAGS_selected_gpus)
    logger.info("device: %s", paddle.device.get_device())
    return device


def default_threads():
    """(threads, usable cores, processes on this machine): the default --threads divides the cores
    among the processes the launcher started here."""
    from .distributed import get_local_world_size
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    procs = get_local_world_size()
    return max(cores // procs, 1), cores, procs


def configure_threads(threads=None):
    """Set Paddle's intra-op CPU threads; returns the number used."""
    from ..utils.cpu import set_cpu_threads

    default, cores, procs = default_threads()
    if threads is None:
        threads = default
    elif threads < 1:
        raise ConfigError(f"--threads: expected a positive integer, got {threads}")
    set_cpu_threads(int(threads))
    logger.info("CPU threads per process: %d (%d usable cores, %d process(es) on this machine)", threads, cores, procs)
    return threads


def _parse_tome_r(values):
    if values is None:
        return None
    from ..patches.tome import parse_r_text
    try:
        r_values = [parse_r_text(v, where="--tome-r") for v in values]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len({repr(r) for r in r_values}) != len(r_values):
        raise ConfigError(f"--tome-r: each r once, got {' '.join(values)}")
    return r_values


def _parse_tome_ratio(values):
    if values is None:
        return None
    from ..patches.tome import parse_ratio_text
    try:
        return [parse_ratio_text(v) for v in values]
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _print_tome_ratio_table(rows, trainer, threads):
    from ..utils.benchmark import format_table
    quality = ([("miou", "mIoU", "{:.2f}"), ("pixel_acc", "pixel acc", "{:.2f}")] if "miou" in rows[0] else
               [(k, k, "{:.2f}") for k in rows[0] if k.startswith("top")])
    columns = ([("ratio", "ratio", "{}")] + quality +
               [("ips", "images/s", "{:.2f}"), ("speedup", "speed-up", "{:.2f}x"), ("gflops", "GFLOPs", "{:.3f}")])
    title = (f"ToMe (dense) on {rows[0]['samples']} val samples | batch {trainer.val_loader.batch_size} x "
             f"{trainer.world_size} process(es) | {threads} CPU thread(s) | images/s: forward passes, every batch "
             f"at every ratio in rotating order")
    print(format_table(rows, columns, title=title), flush=True)


def _print_tome_table(rows, trainer, threads):
    from ..utils.benchmark import format_table
    loader = trainer.val_loader
    columns = [("r", "r", "{}"), ("top1", "top-1", "{:.2f}"), ("top5", "top-5", "{:.2f}"),
               ("ips", "images/s", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"), ("gflops", "GFLOPs", "{:.3f}")]
    title = (f"ToMe on {rows[0]['samples']} val images | batch {loader.batch_size} x {trainer.world_size} process(es) "
             f"| {threads} CPU thread(s) per process | images/s: model forward passes only, every batch run at each "
             f"r in rotating order, first batch untimed")
    print(format_table(rows, columns, title=title), flush=True)


def _run(args, eval_mode):
    from ..config import get_config
    from ..data.image_io import DataError
    from ..models.pretrained import CheckpointMismatchError
    from .checkpoint import CheckpointNotFound
    from .trainer import OutputDirInUse, Trainer, TrainingDiverged

    from .logger import setup_logging
    setup_logging(None, rank=int(os.environ.get("PADDLE_TRAINER_ID", "0")))
    try:
        if eval_mode and (args.resume is None) == (args.pretrained is None):
            raise ConfigError("evaluation needs exactly one of --resume CKPT or --pretrained WEIGHTS")
        if not eval_mode and args.pretrained is not None:
            raise ConfigError("--pretrained is for --eval; to start training from weights set "
                              "-o model.pretrained=PATH (or model.architecture.pretrained for the backbone)")
        if args.ema and not (eval_mode and args.resume):
            raise ConfigError("--ema evaluates a checkpoint's EMA weights: use it with --eval --resume CKPT")
        if args.tome_r is not None and not eval_mode:
            raise ConfigError("--tome-r is an evaluation option: use it with --eval (or plfusion-eval)")
        r_values = _parse_tome_r(args.tome_r)
        ratios = _parse_tome_ratio(args.tome_ratio)
        if ratios is not None and (not eval_mode or r_values is not None):
            raise ConfigError("--tome-ratio is an evaluation option for dense models: use it with --eval (or "
                              "plfusion-eval), and without --tome-r")
        select_device(args.device)
        cfg = get_config(args.config, args.override)
        threads = configure_threads(args.threads)
        if ratios is not None:
            trainer = Trainer(cfg, mode="eval")
            rows = trainer.evaluate_tome_dense(ratios, resume=args.resume, pretrained=args.pretrained,
                                               use_ema=args.ema)
            if trainer.is_main:
                _print_tome_ratio_table(rows, trainer, threads)
        elif eval_mode and r_values is not None:
            trainer = Trainer(cfg, mode="eval")
            rows = trainer.evaluate_tome(r_values, resume=args.resume, pretrained=args.pretrained, use_ema=args.ema)
            if trainer.is_main:
                _print_tome_table(rows, trainer, threads)
        elif eval_mode:
            trainer = Trainer(cfg, mode="eval")
            trainer.evaluate(resume=args.resume, pretrained=args.pretrained, use_ema=args.ema)
        else:
            trainer = Trainer(cfg, mode="train")
            trainer.train(resume=args.resume, max_steps=getattr(args, "max_steps", None))
    except (ConfigError, OutputDirInUse, CheckpointNotFound, CheckpointMismatchError, TrainingDiverged,
            FileNotFoundError, DataError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2
    return 0


def train_main(argv=None):
    args = build_parser("plfusion-train").parse_args(argv)
    return _run(args, eval_mode=args.eval)


def eval_main(argv=None):
    args = build_parser("plfusion-eval", eval_only=True).parse_args(argv)
    return _run(args, eval_mode=True)
