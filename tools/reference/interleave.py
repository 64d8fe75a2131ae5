"""plfusion against PyTorch (timm, official ToMe) in lockstep, batch by batch, on a noisy shared machine.

Runs in plfusion's venv and drives tools/reference/bench_torch.py --serve in the scratch torch venv:

    python tools/reference/interleave.py --torch-python /tmp/torchenv/bin/python --tome-repo /tmp/tome_official \
        --batch-size 8 --threads 2 --rounds 6 --tome-r 16

Both sides keep their models loaded; every round times one batch of every setting (plfusion
dygraph and exported at r=0 and r, timm and timm + ToMe at r) in a rotating order, one process
at a time after a short idle gap, so each pair of settings sees the same machine load. Reports medians, and the
median over rounds of each per-round ratio (ours / theirs, ToMe / no ToMe). A dev script: the
PyTorch side is never a plfusion dependency.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "reference"))
from lockstep import Worker, lockstep, speed_ratio  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", required=True, help="python of the scratch venv with torch and timm")
    p.add_argument("--tome-repo", required=True, help="checkout of facebookresearch/ToMe")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tome-r", type=int, default=16)
    p.add_argument("--gap", type=float, default=0.5,
                   help="seconds of idle before each timed batch: OpenMP threads of the side that ran last spin "
                        "for up to 200 ms after their work and would slow the other side")
    p.add_argument("--no-dygraph", action="store_true", help="measure only plfusion's exported model")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in ("batch_size", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from plfusion.utils.cpu import configure_cpu
    cpu = configure_cpu(args.threads)
    import numpy as np
    import paddle
    from plfusion.export import export_model
    from plfusion.inference import create_paddle_predictor, run_paddle_predictor
    from plfusion.models import create_model
    from plfusion.patches import tome

    model = create_model(args.model)
    model.eval()
    tome.apply_patch(model)
    x = np.random.default_rng(0).random([args.batch_size, 3, 224, 224], dtype=np.float32)
    xt = paddle.to_tensor(x)
    ours = {}
    with tempfile.TemporaryDirectory(prefix="plfusion_interleave_") as tmp:
        for r in (0, args.tome_r):
            model.r = r
            prefix = export_model(model, os.path.join(tmp, f"r{r}"), check_batch=1, threads=cpu["threads"])["prefix"]
            predictor, _ = create_paddle_predictor(prefix, threads=cpu["threads"])
            ours[f"plfusion inference r={r}"] = (lambda p=predictor: run_paddle_predictor(p, [x]))
            if not args.no_dygraph:
                def dygraph(r=r):
                    model.r = r
                    with paddle.no_grad():
                        model(xt)
                ours[f"plfusion dygraph r={r}"] = dygraph

        cmd = [args.torch_python, os.path.join(ROOT, "tools", "reference", "bench_torch.py"), "--serve",
               "--model", args.model, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--tome-repo", args.tome_repo, "--tome-r", str(args.tome_r), "--warmup", str(args.warmup)]
        with Worker(cmd) as worker:
            times, (load_before, load_after) = lockstep(ours, worker, args.rounds, args.warmup, args.gap)

    r = args.tome_r
    mkl = "on" if cpu["mkl_avx2"] else "off"
    print(f"model {args.model} | batch {args.batch_size} | threads {args.threads} (both sides) | {args.rounds} "
          f"lockstep rounds after {args.warmup} warm-up, medians | MKL AVX2 kernels {mkl} "
          f"| load average {load_before:.2f} -> {load_after:.2f}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:>28s}  {args.batch_size / med:7.2f} images/s  ({med * 1e3:6.0f} ms/batch; "
              f"rounds {' '.join(f'{t:.2f}' for t in ts)} s)")

    pairs = [("plfusion inference r=0", "timm"), (f"plfusion inference r={r}", f"timm+ToMe r={r}"),
             (f"plfusion inference r={r}", "plfusion inference r=0"), (f"timm+ToMe r={r}", "timm")]
    if not args.no_dygraph:
        pairs += [("plfusion dygraph r=0", "timm"), (f"plfusion dygraph r={r}", f"timm+ToMe r={r}")]
    ratios = {f"{a} / {b}": speed_ratio(times, a, b) for a, b in pairs}
    for name, value in ratios.items():
        print(f"  speed {name}: {value:.2f}x (median of per-round ratios)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times_s": times, "ratios": ratios, "batch_size": args.batch_size, "threads": args.threads,
                       "load_average": [load_before, load_after]}, f, indent=2)
    return ratios


if __name__ == "__main__":
    main()
