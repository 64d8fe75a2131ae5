"""PyTorch side of the speed comparison: timm eager, and timm with the official ToMe patch.

Runs only in a scratch torch venv (never in CI), with the same batch, threads, warm-up and timed
rounds as `tools/benchmark.py`, so the two tables can be read side by side:

    /tmp/torchenv/bin/python tools/reference/bench_torch.py --tome-repo /tmp/tome_official \
        --model vit_base_patch16_224 --batch-size 8 --threads 2 --iters 5 --warmup 1 --tome-r 16

`--tome-repo` is a checkout of facebookresearch/ToMe (not part of plfusion); without it only the
unpatched timm model is measured. Settings are timed in interleaved rounds (each round runs every
setting once, in a rotating order) and medians are reported, as tools/benchmark.py does.

`--serve` keeps the models loaded and times one batch per stdin line naming a setting (the protocol
of tools/reference/lockstep.py): tools/reference/interleave.py drives it in lockstep with plfusion,
so both sides run under the same machine load.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_timm  # noqa: E402
from lockstep import claim_stdout, serve  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--iters", type=int, default=5, help="timed rounds (each runs every setting once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--tome-r", type=int, nargs="*", default=[16], help="r values for the official ToMe patch")
    p.add_argument("--tome-repo", default=None, help="checkout of facebookresearch/ToMe (adds the ToMe rows)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--serve", action="store_true", help="time one batch per setting named on stdin (see above)")
    args = p.parse_args(argv)
    for name in ("batch_size", "iters", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tome_repo and not os.path.isdir(os.path.join(args.tome_repo, "tome")):
        p.error(f"--tome-repo {args.tome_repo}: no tome/ package there; expected a facebookresearch/ToMe checkout")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    timm = import_timm()
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    size = base.default_cfg["input_size"][1:]
    x = torch.rand(args.batch_size, 3, *size)
    models = {"timm": base}
    if args.tome_repo:
        sys.path.insert(0, args.tome_repo)
        import tome
        for r in args.tome_r:
            m = copy.deepcopy(base)
            tome.patch.timm(m)
            m.r = r
            models[f"timm+ToMe r={r}"] = m

    def run(m):
        with torch.inference_mode():
            m(x)

    labels = list(models)
    if args.serve:
        out = claim_stdout()
        return serve({label: (lambda m=m: run(m)) for label, m in models.items()},
                     {"torch": torch.__version__, "threads": torch.get_num_threads()}, args.warmup, out)
    for _ in range(args.warmup):
        for label in labels:
            run(models[label])
    times = {label: [] for label in labels}
    for i in range(args.iters):
        shift = i % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            run(models[label])
            times[label].append(time.perf_counter() - start)

    print(f"torch {torch.__version__} | timm {timm.__version__} | model {args.model} | batch {args.batch_size} | "
          f"threads {torch.get_num_threads()} | input 3x{size[0]}x{size[1]} | {args.iters} timed rounds after "
          f"{args.warmup} warm-up, medians")
    rows = []
    for label in labels:
        med = statistics.median(times[label])
        rows.append({"setting": label, "ips": args.batch_size / med, "median_s": med, "times": times[label]})
        print(f"{label:>22s}  {args.batch_size / med:8.2f} images/s  ({med * 1e3:.0f} ms/batch)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "timm": timm.__version__, "model": args.model,
                       "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                       "python": platform.python_version(), "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
