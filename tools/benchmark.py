"""Throughput of one model at several ToMe settings, measured side by side in one process.

    python tools/benchmark.py --model vit_base_patch16_224 --tome-r 0 8 16 "16,-1" \
        --batch-size 8 --threads 2 [--img-size 224] [--iters 10] [--warmup 2] [--json out.json]
    python tools/benchmark.py -c configs/x.yaml -o model.architecture.drop_path_rate=0 --tome-r 0 16

Every timed round runs each r once in a rotating order; the table reports medians: images/s,
speed-up over r=0 (the median of the per-round time ratios), GFLOPs and the final token count
per image, and the memory of one batch: the peak held by paddle's allocator (weights +
activations) and the process's resident high-water mark.
`--engine` picks how the model runs (dygraph today; keep one function per engine in ENGINES).
"""
import argparse
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="registered model name (default vit_base_patch16_224)")
    src.add_argument("-c", "--config", help="YAML config; its `model` section is built")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. -o model.architecture.depth=6 (with -c)")
    p.add_argument("--pretrained", help="weights file to load (.pdparams/.safetensors/.pth)")
    p.add_argument("--tome-r", nargs="+", default=["0", "8", "16", "16,-1"], metavar="R",
                   help="r values: 16, '16,-1' (r, inflection) or '[8,8,4]'; r=0 is always measured")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (each runs every r once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--engine", default="dygraph", choices=sorted(ENGINES), help="how the model runs")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.override and not args.config:
        p.error("-o/--override needs -c/--config")
    for name in ("batch_size", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def build_model(args):
    from plfusion.models import build_model as build_from_cfg
    from plfusion.models import create_model
    if args.config:
        from plfusion.config import get_config
        overrides = list(args.override)
        if args.img_size:
            overrides.append(f"+model.architecture.img_size={args.img_size}")
        model = build_from_cfg(get_config(args.config, overrides).model)
        if args.pretrained:
            model.load_pretrained(args.pretrained)
        return model
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    return create_model(args.model or "vit_base_patch16_224", pretrained=args.pretrained, **kwargs)


def input_size(model):
    """(H, W) the model was built for, from its patch embedding."""
    for layer in model.sublayers(include_self=True):
        pe = getattr(layer, "patch_embed", None)
        if pe is not None and hasattr(pe, "img_size"):
            return tuple(pe.img_size)
        if hasattr(layer, "img_size") and isinstance(layer.img_size, (tuple, list)):
            return tuple(layer.img_size)
    raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass --img-size")


def dygraph_runner(model, x):
    import paddle
    model.eval()

    def run():
        with paddle.no_grad():
            model(x)
    return run


ENGINES = {"dygraph": dygraph_runner}


def final_tokens(model):
    info = model._tome_info
    return info["size"].shape[1] if info["size"] is not None else info["num_tokens"]


def main(argv=None):
    args = parse_args(argv)
    import paddle
    from plfusion.patches import tome
    from plfusion.utils.benchmark import available_cpus, compare_throughput, peak_memory, print_table, \
        set_cpu_threads
    from plfusion.utils.flops import count_flops
    threads = set_cpu_threads(args.threads or available_cpus())

    labels = [str(v) for v in args.tome_r]
    settings = {label: tome.parse_r_text(label) for label in labels}
    if 0 not in settings.values():
        print("note: adding r=0, the baseline of the speed-up column")
        settings = {"0": 0, **settings}

    model = build_model(args)
    if not tome.is_patched(model):
        tome.apply_patch(model)
    h, w = input_size(model)
    x = paddle.rand([args.batch_size, 3, h, w])

    runner = ENGINES[args.engine](model, x)
    fns = {}
    for label, r in settings.items():
        def fn(r=r):
            model.r = r
            runner()
        fns[label] = fn

    rows = {}
    for label, r in settings.items():
        model.r = r
        rows[label] = {"r": label, "gflops": count_flops(model, (1, 3, h, w)), "tokens": final_tokens(model)}
    name = None if args.config else (args.model or "vit_base_patch16_224")
    print(f"model {name or args.config} | engine {args.engine} | batch "
          f"{args.batch_size} | threads {threads} (paddle.base.core.set_num_threads) | "
          f"input 3x{h}x{w} | {args.iters} timed rounds after {args.warmup} warm-up, medians", flush=True)
    base = next(k for k, v in settings.items() if v == 0)
    timing = compare_throughput(fns, args.batch_size, args.iters, args.warmup, baseline=base)
    for label in settings:
        rows[label].update(ips=timing[label]["ips"], speedup=timing[label]["speedup"],
                           median_s=timing[label]["median_s"], **peak_memory(fns[label]))

    columns = [("r", "r", "{}"), ("ips", "images/s", "{:.2f}"), ("speedup", "speed-up", "{:.2f}x"),
               ("gflops", "GFLOPs", "{:.2f}"), ("tokens", "tokens", "{}"),
               ("tensor_peak_mb", "peak tensor MB", "{:.0f}"), ("rss_peak_mb", "peak RSS MB", "{:.0f}")]
    print_table(list(rows.values()), columns)
    result = {"model": name, "config": args.config, "engine": args.engine,
              "batch_size": args.batch_size, "threads": threads, "img_size": [h, w], "iters": args.iters,
              "warmup": args.warmup, "paddle": paddle.__version__, "python": platform.python_version(),
              "cpus_available": available_cpus(), "results": list(rows.values()),
              "times_s": {label: timing[label]["times"] for label in settings}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
