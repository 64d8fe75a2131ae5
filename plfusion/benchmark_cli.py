"""plfusion-benchmark: images/s, latency and peak memory of a model, with engines and settings side by side.

    plfusion-benchmark --model vit_base_patch16_224 --engine dygraph inference --tome-r 0 16 \\
        --batch-size 8 --threads 2 [--iters 10] [--warmup 2] [--json out.json]
    plfusion-benchmark -c configs/geminifusion/nyudv2_mit_b3.yaml -o model.architecture.name=mit_b0 \\
        --engine dygraph inference --batch-size 1            (480x640 from the config's val Resize)
    plfusion-benchmark -c configs/quickstart/geminifusion_mit_b0_synthetic.yaml --train --threads 2

(also `python tools/benchmark.py`). Engines: `dygraph` runs the model eagerly; `inference`
exports it (plfusion.export, checked against dygraph) and runs it with Paddle Inference, as
plfusion.inference.Predictor serves it (oneDNN on; `--onednn on off` measures both);
`onnxruntime` (not in the default; needs the .[onnx] extra) runs the same export's model.onnx
with onnxruntime, its batch fixed at --batch-size (GeminiFusion's dynamic batch does not
convert), as Predictor(engine="onnxruntime") serves it. With
`--tome-r` the model is ToMe-patched and every r is measured (r=0 always, as the baseline of
the `vs r=0` column); each r is exported on its own, since r is fixed in the graph.

Every timed round runs each setting once in a rotating order, so a noisy shared machine slows
all settings alike; the table reports medians: images/s, the speed-up over the first setting and
over the same engine's r=0 (medians of the per-round time ratios), latency percentiles of one
batch, GFLOPs and final token count per image, and the memory of one batch (paddle's allocator
peak and the process's resident high-water mark). Threads, batch, input size, MKL's kernel
choice and the machine's load average are printed with the table.
"""
import argparse
import json
import os
import platform
import tempfile

from .export import parse_img_size, add_model_args

__all__ = ["parse_args", "main", "ENGINES"]

ENGINES = ("dygraph", "inference", "onnxruntime")
DEFAULT_ENGINES = ("dygraph", "inference")
EXPORTED = ("inference", "onnxruntime")    # engines that run the exported model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="plfusion-benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, required=False)
    p.add_argument("--engine", nargs="+", default=list(DEFAULT_ENGINES), choices=ENGINES,
                   help="engines to measure side by side (default: dygraph inference)")
    p.add_argument("--tome-r", nargs="+", default=None, metavar="R",
                   help="ToMe r values: 16, '16,-1' (r, inflection) or '[8,8,4]'; r=0 is added as the baseline")
    p.add_argument("--tome-ratio", nargs="+", default=None, metavar="RATIO",
                   help="MiT, Swin and MViTv2 models: ToMe merge ratios, 0.5 or one per stage '0.5,0.5,0.25,0'; 0 is added "
                        "as the baseline")
    p.add_argument("--onednn", nargs="+", default=["on"], choices=("on", "off"),
                   help="oneDNN settings of the inference engine (default: on)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every usable core)")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (each runs every setting once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--train", action="store_true",
                   help="with -c: training throughput instead: the train loader's samples/s against full "
                        "training updates' samples/s (is the loader fast enough?)")
    args = p.parse_args(argv)
    if args.train and not args.config:
        p.error("--train needs -c/--config (its dataloader.train, optimizer and loss are used)")
    if args.tome_r is not None and args.tome_ratio is not None:
        p.error("--tome-r (ViT-family models) and --tome-ratio (MiT, Swin and MViTv2 models) do not go together")
    if args.override and not args.config:
        p.error("-o/--override needs -c/--config")
    if not args.config and not args.model:
        args.model = "vit_base_patch16_224"
    args.img_size = parse_img_size(args.img_size, p)
    for name in ("batch_size", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    args.engine = list(dict.fromkeys(args.engine))
    args.onednn = list(dict.fromkeys(args.onednn))
    return args


def _final_tokens(model):
    info = model._tome_info
    if info.get("dense"):      # dense merging keeps every output token
        return "-"
    return info["size"].shape[1] if info["size"] is not None else info["num_tokens"]



def _settings(args, r_values):
    """[(label, engine, r label or None, oneDNN 'on'/'off' or None)] in measuring order."""
    out = []
    for engine in args.engine:
        for onednn in (args.onednn if engine == "inference" else [None]):
            for r in r_values:
                label = engine
                if onednn is not None and (len(args.onednn) > 1 or onednn == "off"):
                    label += f" oneDNN {onednn}"
                if r is not None:
                    label += f" {'ratio' if args.tome_ratio is not None else 'r'}={r}"
                out.append((label, engine, r, onednn))
    return out


def train_main(args, threads):
    """--train: the config's train loader against its training updates, side by side."""
    from .config import get_config
    from .engine.throughput import training_throughput
    from .patches.tome import parse_ratio_text
    cfg = get_config(args.config, args.override)
    with tempfile.TemporaryDirectory(prefix="plfusion_bench_train_") as tmp:
        cfg.output_dir = tmp                # the engine logs there; nothing of it is kept
        ratios = None
        if args.tome_ratio is not None:
            ratios = [parse_ratio_text(v) for v in args.tome_ratio]
            if 0 not in ratios:
                ratios = [0.0] + ratios
        res = training_throughput(cfg, steps=args.iters, warmup=args.warmup, tome_ratios=ratios)
    print(f"training throughput of {args.config}: per-process batch {res['batch_size']}, threads {threads}, "
          f"{res['steps']} timed updates (median)")
    print(f"  data loader   {res['loader_ips']:9.1f} samples/s  ({res['loader_samples']} samples, its own workers)")
    print(f"  training      {res['train_ips']:9.1f} samples/s  (forward + loss + backward + optimizer step)")
    verdict = "the loader keeps up" if res["ratio"] >= 1 else "the LOADER is the bottleneck"
    print(f"  loader/train  {res['ratio']:9.2f}x  -> {verdict}")
    for row in res.get("tome", []):
        print(f"  ToMe ratio {row['ratio']:>22}: {row['train_ips']:7.2f} samples/s, {row['speedup']:.2f}x over ratio "
              f"{res['tome'][0]['ratio']} (updates in rotating order)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "threads": threads, "config": args.config}, f, indent=2)
    return 0


def main(argv=None):
    args = parse_args(argv)
    from .utils.cpu import configure_cpu
    cpu = configure_cpu(args.threads)   # first: MKL reads its kernel choice at its first call
    if args.train:
        return train_main(args, cpu["threads"])
    import numpy as np
    import paddle
    from .export import DynamicBatchError, build_model_from_args, export_model, input_layout, input_specs
    from .inference import create_paddle_predictor, run_paddle_predictor
    from .onnx_engine import ONNX_FILE, create_onnx_session, run_onnx_session
    from .patches import tome
    from .utils.benchmark import available_cpus, compare_throughput, latency_percentiles, peak_memory, print_table
    from .utils.flops import count_flops

    use_onnx = "onnxruntime" in args.engine
    if use_onnx:
        from .onnx_export import require_onnx_export
        require_onnx_export()     # one clear message before the model is built
        import onnxruntime

    model, cfg = build_model_from_args(args)
    model.eval()
    r_values, parsed = [None], {}
    if args.tome_r is not None:
        parsed = {label: tome.parse_r_text(label) for label in args.tome_r}
        if 0 not in parsed.values():
            print("note: adding r=0, the baseline of the `vs r=0` column")
            parsed = {"0": 0, **parsed}
        if not tome.is_patched(model):
            tome.apply_patch(model)
        r_values = list(parsed)
    elif args.tome_ratio is not None:
        parsed = {label: tome.parse_ratio_text(label) for label in args.tome_ratio}
        if 0 not in parsed.values():
            print("note: adding ratio 0, the baseline of the `vs r=0` column")
            parsed = {"0": 0.0, **parsed}
        if not tome.is_patched(model):
            tome.apply_patch(model, ratio=0.0)
        for value in parsed.values():
            model.ratio = value     # every setting checked before the long measurement
        r_values = list(parsed)
    _, _, size, names = input_layout(model, cfg, args.img_size)
    shapes = [[args.batch_size] + list(s.shape[1:]) for s in input_specs(model, size, names)]
    h, w = shapes[0][2:]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tensors = [paddle.to_tensor(a) for a in arrays]
    model_input = tensors if len(tensors) > 1 else tensors[0]

    def set_r(r):
        if r is not None:
            if args.tome_ratio is not None:
                model.ratio = parsed[r]
            else:
                model.r = parsed[r]

    settings = _settings(args, r_values)
    fns, rows, flops = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="plfusion_bench_") as tmp:
        exported = {}
        for label, engine, r, onednn in settings:
            if engine == "dygraph":
                def fn(r=r):
                    set_r(r)
                    with paddle.no_grad():
                        model(model_input)
            else:
                if r not in exported:
                    set_r(r)
                    out_dir = os.path.join(tmp, f"r_{len(exported)}")
                    # one export serves both engines; the ONNX batch is the one measured
                    onnx = {"onnx": use_onnx, "onnx_batch_size": args.batch_size if use_onnx else None}
                    try:
                        exported[r] = export_model(model, out_dir, cfg, (h, w), check_batch=1,
                                                   threads=cpu["threads"], **onnx)["prefix"]
                    except DynamicBatchError:   # e.g. Swin: the batch measured here, fixed in the graph
                        exported[r] = export_model(model, out_dir, cfg, (h, w), threads=cpu["threads"],
                                                   batch_size=args.batch_size, **onnx)["prefix"]
                if engine == "onnxruntime":
                    session = create_onnx_session(os.path.join(os.path.dirname(exported[r]), ONNX_FILE),
                                                  cpu["threads"])

                    def fn(session=session):
                        run_onnx_session(session, arrays)
                else:
                    predictor, _ = create_paddle_predictor(exported[r], threads=cpu["threads"],
                                                           onednn=onednn == "on")

                    def fn(predictor=predictor):
                        run_paddle_predictor(predictor, arrays)
            fns[label] = fn
            row = {"setting": label, "engine": engine, "r": r if r is not None else "-",
                   "onednn": onednn if engine == "inference" else "-"}
            if r not in flops:
                set_r(r)
                flops[r] = (count_flops(model, [t[:1] for t in tensors] if len(tensors) > 1 else tensors[0][:1]),
                            _final_tokens(model) if r is not None else None)
            row["gflops"], row["tokens"] = flops[r]
            rows[label] = row

        load_before = os.getloadavg()
        name = args.config or args.model
        inputs = f"{shapes[0][1]}x{h}x{w}" + (f" x {len(shapes)} modalities" if len(shapes) > 1 else "")
        print(f"model {name} | engines {' '.join(args.engine)} | batch {args.batch_size} | threads {cpu['threads']} "
              f"(paddle.base.core.set_num_threads; {available_cpus()} usable cores) | input {inputs}"
              + (f" | onnxruntime {onnxruntime.__version__} (intra_op_num_threads {cpu['threads']}, ONNX batch "
                 f"fixed at {args.batch_size})" if use_onnx else "")
              + f" | MKL AVX2 kernels {'on' if cpu['mkl_avx2'] else 'off'} ({cpu['vendor']}) | {args.iters} timed "
              f"rounds after {args.warmup} warm-up, medians | load average {load_before[0]:.2f}", flush=True)
        base = settings[0][0]
        timing = compare_throughput(fns, args.batch_size, args.iters, args.warmup, baseline=base)
        load_after = os.getloadavg()
        for label, engine, r, onednn in settings:
            row = rows[label]
            row.update(ips=timing[label]["ips"], speedup=timing[label]["speedup"], median_s=timing[label]["median_s"])
            row.update({k: v * 1e3 for k, v in latency_percentiles(timing[label]["times"]).items()})
            # the same engine and oneDNN setting at r=0
            zero = [lab for lab, e, rr, od in settings if (e, od) == (engine, onednn) and rr is not None
                    and parsed[rr] == 0]
            if r is not None and zero:
                zero = zero[0]
                row["vs_r0"] = float(np.median([a / b for a, b in zip(timing[zero]["times"], timing[label]["times"])]))
            row.update(peak_memory(fns[label]))
    columns = [("setting", "setting", "{}"), ("ips", "images/s", "{:.2f}"), ("speedup", "speed-up", "{:.2f}x"),
               ("vs_r0", "vs r=0", "{:.2f}x"), ("p50", "p50 ms", "{:.0f}"), ("p90", "p90 ms", "{:.0f}"),
               ("p99", "p99 ms", "{:.0f}"), ("gflops", "GFLOPs", "{:.2f}"), ("tokens", "tokens", "{}"),
               ("tensor_peak_mb", "peak tensor MB", "{:.0f}"), ("rss_peak_mb", "peak RSS MB", "{:.0f}")]
    if args.tome_r is None:
        columns = [c for c in columns if c[0] not in (("tokens",) if args.tome_ratio is not None else ("vs_r0", "tokens"))]
    print_table(list(rows.values()), columns)
    print(f"speed-up: over `{base}`, median of per-round time ratios; load average after {load_after[0]:.2f}")
    result = {"model": args.model, "config": args.config, "engines": args.engine, "batch_size": args.batch_size,
              "threads": cpu["threads"], "mkl_avx2": cpu["mkl_avx2"], "cpu_vendor": cpu["vendor"],
              "img_size": [h, w], "inputs": names, "iters": args.iters,
              "warmup": args.warmup, "paddle": paddle.__version__, "python": platform.python_version(),
              "onnxruntime": onnxruntime.__version__ if use_onnx else None,
              "cpus_available": available_cpus(), "load_average": [load_before[0], load_after[0]],
              "results": list(rows.values()), "times_s": {label: timing[label]["times"] for label in fns}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result
