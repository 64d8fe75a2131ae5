"""Draw which pixels ToMe merged in a dense (MiT or Swin) segmentor: RGB and depth side by side, one row per ratio.

    python tools/visualize_tome_dense.py -c configs/quickstart/geminifusion_mit_b0_synthetic.yaml \
        --checkpoint output/quickstart_geminifusion_mit_b0 --index 0 --ratio 0 0.5 0.75 --stage 1 --out merged_rgbd.png

The sample is item --index of the config's val dataset (any size with -o dataloader.val.dataset.image_size=...).
Each group of merged tokens is painted with its mean colour and outlined; the modalities share one
map, so the RGB and depth pictures show the same groups. Without --checkpoint the weights are
random and the groups show the mechanics only.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True, help="YAML config of a MiT segmentor (fused or not)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", help="training checkpoint or run directory (default: random weights)")
    p.add_argument("--index", type=int, default=0, help="val sample to draw")
    p.add_argument("--ratio", nargs="+", default=["0.25", "0.5", "0.75"], metavar="RATIO",
                   help="merge ratios (one per row)")
    p.add_argument("--stage", type=int, default=1, help="MiT stage whose first block is drawn (1-4)")
    p.add_argument("--out", default="merged_rgbd.png", help="output PNG")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import paddle

    from plfusion.config import get_config
    from plfusion.data.loader import build_dataset
    from plfusion.engine.checkpoint import load_checkpoint, resolve_checkpoint
    from plfusion.engine.trainer import load_model_state
    from plfusion.models import build_model
    from plfusion.patches import tome
    from plfusion.patches.tome.vis import dense_groups, paint_groups
    from plfusion.utils.visualize import depth_to_rgb, panel, save_image

    cfg = get_config(args.config, args.override)
    model = build_model(cfg.model)
    if args.checkpoint:
        prefix = resolve_checkpoint(args.checkpoint, cfg.get("output_dir", "output"))
        load_model_state(model, load_checkpoint(prefix, with_optimizer=False)["model"], prefix)
    else:
        print("note: no --checkpoint; random weights, so the merges show the mechanics only")
    tome.apply_patch(model, ratio=0.0, trace_source=True)
    model.eval()
    dataset = build_dataset(cfg.dataloader.val.dataset, seed=0, where="dataloader.val.dataset", verbose=False)
    if not 0 <= args.index < len(dataset):
        raise SystemExit(f"error: --index {args.index} is outside the val dataset's {len(dataset)} samples")
    inputs = dataset[args.index][0]
    arrays = dataset.load(args.index)[0]
    shown = [(m, arrays[m] if m == "rgb" else depth_to_rgb(arrays[m])) for m in getattr(dataset, "modalities", ["rgb"])]
    x = [paddle.to_tensor(a[None]) for a in inputs] if isinstance(inputs, (list, tuple)) else \
        paddle.to_tensor(inputs[None])
    rows = [panel([img for _, img in shown], [f"{m} (input)" for m, _ in shown])]
    for text in args.ratio:
        model.ratio = float(text)
        with paddle.no_grad():
            model(x)
        groups = dense_groups(model, stage=args.stage - 1, block=0)
        if groups is None:
            rows.append(panel([img for _, img in shown], [f"ratio {text}: nothing merged"] * len(shown)))
            continue
        caption = f"ratio {text}: {groups.size} -> {len(np.unique(groups))} tokens (stage {args.stage})"
        rows.append(panel([paint_groups(img, groups) for _, img in shown], [caption] + [""] * (len(shown) - 1)))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(args.out, sheet)
    print(f"wrote {args.out}: {', '.join(m for m, _ in shown)} with merge maps at ratio {', '.join(args.ratio)}")
    return sheet


if __name__ == "__main__":
    main()
