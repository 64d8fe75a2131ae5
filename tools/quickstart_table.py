"""Train the four RGB-D quickstart configs with one budget and print their results as a markdown table.

    python tools/quickstart_table.py                      # train all four, then print the table
    python tools/quickstart_table.py --reuse              # tabulate runs that already finished
    python tools/quickstart_table.py -o iters=100 -o lr_scheduler.max_iters=100 --output-root output/qs100

Each config trains in its own process (`tools/train.py -c CONFIG --threads N`), one after the
other, so the runs never compete for the CPU. The table reads the metrics of each run's final
checkpoint: mIoU, pixel accuracy and the IoU of the four classes that need one modality or the
other (box vs poster: depth; red vs blue object: colour). Wall time is per run, including
start-up and the final evaluation; it is left blank for reused runs.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plfusion.config import get_config  # noqa: E402
from plfusion.data.synthetic_rgbd import SYNTHETIC_CLASSES  # noqa: E402
from plfusion.engine.checkpoint import CheckpointNotFound, checkpoint_state, resolve_checkpoint  # noqa: E402

RUNS = [  # (label, inputs, config)
    ("GeminiFusion", "RGB + depth", "configs/quickstart/geminifusion_mit_b0_synthetic.yaml"),
    ("TokenFusion", "RGB + depth", "configs/quickstart/tokenfusion_mit_b0_synthetic.yaml"),
    ("MiT-B0", "RGB", "configs/quickstart/rgb_only_mit_b0_synthetic.yaml"),
    ("MiT-B0", "depth", "configs/quickstart/depth_only_mit_b0_synthetic.yaml"),
]
CLASSES = ("box", "poster", "red_object", "blue_object")


def run_output_dir(config, overrides, output_root):
    if output_root:
        return os.path.join(output_root, os.path.splitext(os.path.basename(config))[0])
    return get_config(os.path.join(ROOT, config), overrides).output_dir


def train(config, overrides, output_dir, threads):
    """Run tools/train.py for one config; returns its wall time in seconds."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", os.path.join(ROOT, config),
           "--threads", str(threads), "-o", f"output_dir={output_dir}"]
    for item in overrides:
        cmd += ["-o", item]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    code = subprocess.call(cmd, cwd=ROOT)
    if code != 0:
        raise SystemExit(f"quickstart_table: training {config} failed with exit code {code} (see "
                         f"{os.path.join(output_dir, 'train.log')}); if the run directory holds an earlier run, "
                         f"pass --reuse to tabulate it or choose another --output-root")
    return time.time() - start


def final_metrics(output_dir):
    """Evaluation metrics stored with the newest checkpoint of the run in `output_dir`."""
    path = output_dir if os.path.isabs(output_dir) else os.path.join(ROOT, output_dir)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise SystemExit(f"quickstart_table: no finished run in {path} (no checkpoints/ folder); train it first "
                         f"(drop --reuse)")
    try:
        prefix = resolve_checkpoint(path, path)
    except CheckpointNotFound as e:
        raise SystemExit(f"quickstart_table: {e}") from None
    state = checkpoint_state(prefix)
    metrics = (state or {}).get("metrics") or {}
    if "miou" not in metrics:
        raise SystemExit(f"quickstart_table: checkpoint {prefix} has no evaluation metrics; the run needs a "
                         f"dataloader.val section and must have reached its final evaluation")
    return metrics, state.get("global_step")


def markdown_table(rows):
    head = ["model", "inputs", "mIoU", "pixel acc"] + [f"IoU {c}" for c in CLASSES] + ["updates", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        iou = row["metrics"]["per_class_iou"]
        cells = [row["label"], row["inputs"], f"{row['metrics']['miou']:.1f}", f"{row['metrics']['pixel_acc']:.1f}"]
        cells += [f"{iou[SYNTHETIC_CLASSES.index(c)]:.1f}" for c in CLASSES]
        cells += [str(row["steps"]), f"{row['seconds']:.0f} s" if row["seconds"] is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run (repeatable), e.g. -o iters=100")
    p.add_argument("--output-root", default=None, metavar="DIR",
                   help="put the runs in DIR/<config name> instead of each config's output_dir")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run (default 2)")
    p.add_argument("--reuse", action="store_true", help="do not train; tabulate the runs already in the output dirs")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads}")
    rows = []
    for label, inputs, config in RUNS:
        output_dir = run_output_dir(config, args.override, args.output_root)
        seconds = None if args.reuse else train(config, args.override, output_dir, args.threads)
        metrics, steps = final_metrics(output_dir)
        rows.append({"label": label, "inputs": inputs, "metrics": metrics, "steps": steps, "seconds": seconds})
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
