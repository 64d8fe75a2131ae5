"""plfusion against the PyTorch references, train steps and inference, in lockstep on a shared machine.

Runs in plfusion's venv; for each model it drives tools/reference/serve_torch_models.py in the
scratch torch venv (timm ViT-B/16 and Swin-T; the official TokenFusion / GeminiFusion WeTr with
MiT-B0 and MiT-B3):

    python tools/reference/interleave_models.py --models vit_b swin_t gemini_b0 gemini_b3 token_b0 token_b3 \
        --jobs train infer --threads 2 --rounds 3 --torch-python /tmp/torchenv/bin/python \
        --tokenfusion-repo /tmp/TokenFusion --geminifusion-repo /tmp/GeminiFusion

Models, shapes, hyper-parameters and inputs are shared with the torch side (tools/reference/zoo.py):
train = forward, loss, backward, AdamW step (segmentors: batch 2 RGB-D at 240x320, cross entropy on
the three outputs against a label map at 1/4 resolution; classifiers: batch 8 at 224); infer = eval,
no grad (segmentors batch 2 at 480x640, classifiers batch 8 at 224), in plfusion's dygraph and its
exported Paddle Inference model (batch fixed in the graph; made and timed after the dygraph rounds,
against torch rounds of its own: a predictor in the process slows dygraph afterwards). Both sides keep the model loaded; each
round times one batch of every setting in rotating order, the two sides of a job back to back, one
process at a time after an idle gap (tools/reference/lockstep.py).
Reports medians and the median per-round speed ratio ours/theirs (> 1: plfusion is faster).
A dev script: the PyTorch side is never a plfusion dependency.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tools", "reference")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import zoo  # noqa: E402
from lockstep import Worker, lockstep, speed_ratio  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(zoo.MODELS), default=list(zoo.MODELS))
    p.add_argument("--jobs", nargs="+", choices=zoo.JOBS, default=list(zoo.JOBS))
    p.add_argument("--torch-python", default=os.environ.get("PLFUSION_REF_PYTHON", "/tmp/torchenv/bin/python"))
    p.add_argument("--tokenfusion-repo", default="/tmp/TokenFusion", help="yikaiw/TokenFusion checkout")
    p.add_argument("--geminifusion-repo", default="/tmp/GeminiFusion", help="JiaDingCN/GeminiFusion checkout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-batch", type=int, default=None, help="override the per-model default (zoo.py)")
    p.add_argument("--infer-batch", type=int, default=None, help="override the per-model default (zoo.py)")
    p.add_argument("--gap", type=float, default=0.5, help="idle seconds before each timed batch")
    p.add_argument("--no-export", action="store_true", help="skip plfusion's exported (Paddle Inference) model")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in ("threads", "rounds", "train_batch", "infer_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not os.path.isfile(args.torch_python):
        p.error(f"--torch-python {args.torch_python} not found (see README, 'Checking against the references')")
    for key in args.models:
        kind, what, _ = zoo.MODELS[key]
        if kind == "rgbd":
            repo = getattr(args, f"{what[0]}_repo")
            if not os.path.isdir(repo):
                p.error(f"--{what[0]}-repo {repo}: not a directory (needed by {key})")
    return args


def build_ours(key, seed):
    import paddle
    from plfusion.models import build_model, create_model
    from plfusion.patches import geminifusion, tokenfusion
    paddle.seed(seed)
    kind, what, _ = zoo.MODELS[key]
    if kind == "classifier":
        return create_model(what, drop_path_rate=zoo.DROP_PATH), what
    fusion, backbone = what
    # ensemble_trainable: the official alpha gets gradients from the ensemble's loss
    seg = build_model({"name": "Segmentor", "ensemble_trainable": True,
                       "architecture": {"name": backbone, "drop_path_rate": zoo.DROP_PATH},
                       "head": {"name": "SegFormerHead", "num_classes": zoo.NUM_CLASSES, "embed_dim": zoo.HEAD_DIM,
                                "dropout": 0.1}})
    if fusion == "geminifusion":
        geminifusion.apply_patch(seg, num_modalities=2)
    else:
        tokenfusion.apply_patch(seg, num_modalities=2, sparsity_weight=zoo.SPARSITY)
    return seg, f"Segmentor {backbone} + {fusion}"


def train_step(model, kind, images, labels):
    import paddle
    from plfusion.losses import CrossEntropyLoss
    x = [paddle.to_tensor(a) for a in images]
    y = paddle.to_tensor(labels)
    loss_fn = CrossEntropyLoss(ignore_index=None if kind == "classifier" else zoo.IGNORE)
    opt = paddle.optimizer.AdamW(learning_rate=zoo.LR, weight_decay=zoo.WEIGHT_DECAY,
                                 parameters=[p for p in model.parameters() if not p.stop_gradient])

    def step():
        model.train()
        loss = loss_fn(model(x[0] if kind == "classifier" else x), y)    # a list of outputs: their sum
        for term in getattr(model, "extra_losses", dict)().values():    # TokenFusion's sparsity term
            loss = loss + term
        loss.backward()
        opt.step()
        opt.clear_grad()
    return step


def dygraph_infer(model, kind, images):
    import paddle
    x = [paddle.to_tensor(a) for a in images]

    def run():
        model.eval()
        with paddle.no_grad():
            model(x[0] if kind == "classifier" else x)
    return run


def exported_infer(model, images, folder, threads):
    """The exported model, its batch fixed in the graph (Swin needs that; the batch is fixed here anyway;
    a fixed-batch retry after a failed dynamic-batch trace aborts paddle, so there is no fallback)."""
    from plfusion.export import export_model
    from plfusion.inference import create_paddle_predictor, run_paddle_predictor
    prefix = export_model(model, folder, img_size=images[0].shape[2:], batch_size=images[0].shape[0],
                          threads=threads)["prefix"]
    predictor, settings = create_paddle_predictor(prefix, threads=threads)
    return (lambda: run_paddle_predictor(predictor, images)), settings


def bench_model(key, args, threads, tmp):
    """Lockstep rounds for one model; returns its result rows."""
    kind, _, _ = zoo.MODELS[key]
    model, ours_what = build_ours(key, args.seed)
    ours, shapes, onednn = {}, {}, None
    for job in args.jobs:
        batch = args.train_batch if job == "train" else args.infer_batch
        images, labels = zoo.make_inputs(key, job, batch, args.seed)
        shapes[job] = images[0].shape
        if job == "train":
            ours["plfusion dygraph train"] = train_step(model, kind, images, labels)
            continue
        ours["plfusion dygraph infer"] = dygraph_infer(model, kind, images)
        infer_images = images
    cmd = [args.torch_python, os.path.join(HERE, "serve_torch_models.py"), "--model", key, "--jobs", *args.jobs,
           "--threads", str(args.threads), "--seed", str(args.seed), "--warmup", str(args.warmup),
           "--tokenfusion-repo", args.tokenfusion_repo, "--geminifusion-repo", args.geminifusion_repo]
    for job in args.jobs:
        batch = args.train_batch if job == "train" else args.infer_batch
        if batch:
            cmd += [f"--{job}-batch", str(batch)]
    with Worker(cmd) as worker:
        times, (load_before, load_after) = lockstep(ours, worker, args.rounds, args.warmup, args.gap,
                                                    group=lambda label: label.split()[-1])   # by job
        if "infer" in args.jobs and not args.no_export:
            # a Paddle Inference predictor in the process slows dygraph ~1.6x afterwards (ViT-B), so the
            # exported model is made and timed only after the dygraph rounds, against fresh torch rounds
            fn, settings = exported_infer(model, infer_images, os.path.join(tmp, key), threads)
            onednn = settings.get("onednn")
            more, _ = lockstep({"plfusion exported infer": fn}, worker, args.rounds, args.warmup, args.gap,
                               theirs=["torch infer"])
            times["plfusion exported infer"] = more["plfusion exported infer"]
            times["torch infer (exported rounds)"] = more["torch infer"]
    info = worker.info

    print(f"\n{key}: plfusion {ours_what} vs {info['what']} (torch {info['torch']}) | threads {threads} / "
          f"{info['threads']} (ours / theirs) | {args.rounds} lockstep rounds after {args.warmup} warm-up | "
          f"load average {load_before:.2f} -> {load_after:.2f}")
    if onednn is False:
        print("  (the exported model runs without oneDNN: its passes failed on this graph, see the warning above)")
    for label, ts in times.items():
        print(f"  {label:>24s}  {statistics.median(ts):7.2f} s/batch  (rounds {' '.join(f'{t:.2f}' for t in ts)})")
    rows = []
    for job in args.jobs:
        b, _, h, w = shapes[job]
        assert info["shapes"][job] == [b, 3, h, w], (info["shapes"], shapes)   # same batch on both sides
        row = {"model": key, "job": job, "batch": b, "input": f"{'RGB-D ' if kind == 'rgbd' else ''}{h}x{w}",
               "threads": threads, "torch_s": statistics.median(times[f"torch {job}"]),
               "load": [load_before, load_after]}
        for engine in ("dygraph", "exported"):
            label = f"plfusion {engine} {job}"
            if label in times:
                row[f"{engine}_s"] = statistics.median(times[label])
                theirs = "torch infer (exported rounds)" if engine == "exported" else f"torch {job}"
                row[f"{engine}_speed"] = speed_ratio(times, label, theirs)
                print(f"  speed {label} / torch {job}: {row[f'{engine}_speed']:.2f}x (median of per-round ratios)")
        if job == "infer" and onednn is not None:
            row["onednn"] = onednn
        rows.append(row)
    return rows


def table(rows):
    lines = ["| model | job | batch, input | threads | plfusion dygraph s | exported s | PyTorch s "
             "| speed dygraph / PyTorch | exported / PyTorch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(key, fmt):
            return format(r[key], fmt) if key in r else "—"
        lines.append(f"| {r['model']} | {r['job']} | {r['batch']}, {r['input']} | {r['threads']} "
                     f"| {cell('dygraph_s', '.2f')} | {cell('exported_s', '.2f')} | {r['torch_s']:.2f} "
                     f"| {cell('dygraph_speed', '.2f')}× | {cell('exported_speed', '.2f')}× |")
    return "\n".join(lines).replace("—×", "—")


def main(argv=None):
    args = parse_args(argv)
    from plfusion.utils.cpu import configure_cpu
    cpu = configure_cpu(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="plfusion_interleave_models_") as tmp:
        for key in args.models:
            rows += bench_model(key, args, cpu["threads"], tmp)
            gc.collect()    # one model's two copies at a time
    print(f"\nmedian seconds per batch; speed = median over rounds of PyTorch time / plfusion time "
          f"(> 1: plfusion faster); MKL AVX2 kernels {'on' if cpu['mkl_avx2'] else 'off'}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rounds": args.rounds, "warmup": args.warmup, "cpu": cpu}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
