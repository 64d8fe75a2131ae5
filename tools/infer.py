"""Predict one sample and show it: a segmentation overlay for RGB-D models, the top-5 for classifiers.

    python tools/infer.py -c CONFIG --checkpoint CKPT --rgb a.png --depth b.png --out pred.png
    python tools/infer.py --engine inference --model-dir out/gf_b3 --rgb a.png --depth b.png --out pred.png
    python tools/infer.py --engine onnxruntime --model-dir out/gf_b3 --rgb a.png --depth b.png --out pred.png
    python tools/infer.py -c configs/quickstart/vit_tiny_synthetic.yaml --checkpoint CKPT --image x.png

`--engine dygraph` (the default without --model-dir) builds the model from the config and loads
--checkpoint (a weights file, a training checkpoint or a run directory); `--engine inference`
serves the directory written by tools/export.py with Paddle Inference, `--engine onnxruntime` its
model.onnx (exported with --onnx; needs the .[onnx] extra). All use the config's val
pre-processing (Resize, Normalize, ToCHW per modality) and the same post-processing (the
ensemble logits upsampled to the input size, arg-max, the dataset palette), so they predict the
same labels. Depth is read as the datasets read it (8-bit /255, 16-bit /65535).
--out gets the prediction blended over the RGB image; --panel adds RGB | depth | prediction | overlay.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plfusion.export import parse_img_size, add_model_args  # noqa: E402

MODALITY_ARGS = ("rgb", "depth")
# --engine -> Predictor(engine=...) for the exported model; dygraph builds the model instead
SERVING_ENGINES = {"inference": "paddle", "onnxruntime": "onnxruntime"}
ENGINES = ("dygraph",) + tuple(SERVING_ENGINES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, required=False)
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="dygraph (config + checkpoint), inference (Paddle Inference) or onnxruntime (--model-dir, "
                        "exported with --onnx); default: inference when --model-dir is given")
    p.add_argument("--model-dir", help="directory written by tools/export.py (for --engine inference/onnxruntime)")
    p.add_argument("--rgb", help="RGB image (segmentation)")
    p.add_argument("--depth", help="depth image (segmentation)")
    p.add_argument("--image", help="RGB image (classification)")
    p.add_argument("--out", help="where to write the overlay (segmentation)")
    p.add_argument("--panel", help="also write RGB | depth | prediction | overlay here")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the prediction colours in the overlay")
    p.add_argument("--topk", type=int, default=5, help="classes printed for a classifier")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every usable core)")
    p.add_argument("--no-onednn", action="store_true", help="inference engine: run without oneDNN")
    args = p.parse_args(argv)
    args.engine = args.engine or ("inference" if args.model_dir else "dygraph")
    if args.engine in SERVING_ENGINES:
        if not args.model_dir:
            p.error(f"--engine {args.engine} needs --model-dir (a directory written by tools/export.py)")
        if args.config or args.model or args.pretrained:
            p.error(f"--engine {args.engine} serves --model-dir as exported; -c/--model/--checkpoint are for "
                    f"--engine dygraph")
        if args.no_onednn and args.engine != "inference":
            p.error("--no-onednn is for --engine inference (Paddle Inference)")
    else:
        if args.model_dir:
            p.error("--model-dir is for --engine inference or onnxruntime")
        if not (args.config or args.model):
            p.error("--engine dygraph needs -c CONFIG (or --model NAME)")
    if args.override and not args.config:
        p.error("-o/--override needs -c/--config")
    args.img_size = parse_img_size(args.img_size, p)
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.topk < 1:
        p.error(f"--topk must be >= 1, got {args.topk}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def make_predictor(args):
    """The Predictor (inference, onnxruntime) or DygraphPredictor (dygraph) the arguments ask for."""
    from plfusion.inference import DygraphPredictor, Predictor
    if args.engine in SERVING_ENGINES:
        return Predictor(args.model_dir, threads=args.threads, onednn=not args.no_onednn,
                         engine=SERVING_ENGINES[args.engine])
    from plfusion.export import build_model_from_args, deploy_info
    model, cfg = build_model_from_args(args)
    if not args.pretrained:
        print("warning: no --checkpoint given; the model has random weights", file=sys.stderr)
    return DygraphPredictor(model, deploy_info(model, cfg, args.img_size))


def read_inputs(args, predictor):
    """{modality: array} read as the datasets read them (RGB uint8; depth float in [0, 1])."""
    from plfusion.data.image_io import read_image
    from plfusion.data.rgbd import read_depth
    images = {}
    for m in predictor.modalities:
        if m not in MODALITY_ARGS:
            raise ValueError(f"the model takes a {m!r} input; tools/infer.py reads {list(MODALITY_ARGS)}")
        path = getattr(args, m)
        if not path:
            raise ValueError(f"the model takes modalities {predictor.modalities}; give --{m} PATH")
        images[m] = read_image(path, "rgb") if m == "rgb" else read_depth(path)
    return images


def main(argv=None):
    args = parse_args(argv)
    from plfusion.utils.cpu import configure_cpu
    configure_cpu(args.threads)
    import numpy as np
    from plfusion.utils.visualize import colorize, depth_to_rgb, overlay, panel, save_image

    predictor = make_predictor(args)
    if predictor.task == "classification":
        if not args.image:
            raise SystemExit("error: a classifier takes --image PATH")
        from plfusion.data.image_io import read_image
        result = predictor.predict(read_image(args.image, "rgb"), topk=args.topk)
        print(f"{args.image} ({args.engine}):")
        for rank, (index, name, prob) in enumerate(result["topk"], 1):
            print(f"  {rank}. {name} (class {index}): {prob:.4f}")
        return result
    if predictor.task != "segmentation":
        raise SystemExit(f"error: this model's task is {predictor.task!r}; tools/infer.py shows classifiers and "
                         f"segmentors")
    if not args.out:
        raise SystemExit("error: a segmentor needs --out PATH for the overlay")
    images = read_inputs(args, predictor)
    result = predictor.predict(images)
    label = result["label"]
    rgb = images.get("rgb")
    if rgb is None:   # a depth-only model: overlay on the depth picture
        rgb = depth_to_rgb(images[predictor.modalities[0]])
    palette = predictor.palette
    ignore = predictor.deploy.get("ignore_index", 255)
    save_image(args.out, overlay(rgb, label, palette, args.alpha, ignore))
    if args.panel:
        tiles = [images["rgb"]] if "rgb" in images else []
        captions = ["rgb"] if "rgb" in images else []
        if "depth" in images:
            tiles.append(depth_to_rgb(images["depth"]))
            captions.append("depth")
        tiles += [colorize(label, palette, ignore), overlay(rgb, label, palette, args.alpha, ignore)]
        captions += ["prediction", "overlay"]
        save_image(args.panel, panel(tiles, captions))
    counts = np.bincount(label.reshape(-1), minlength=len(predictor.class_names))
    shares = ", ".join(f"{predictor.class_names[k]} {100.0 * c / label.size:.1f}%"
                       for k, c in sorted(enumerate(counts), key=lambda kc: -kc[1]) if c)
    print(f"wrote {args.out} ({label.shape[0]}x{label.shape[1]}, {args.engine}): {shares}")
    return result


def run(argv=None):
    """main() with bad input reported as `error: ...` and exit status 2."""
    from plfusion.cli import run_cli
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
