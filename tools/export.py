"""Export a model (optionally ToMe-patched) as a static inference model, then check it against dygraph.

    python tools/export.py --model vit_base_patch16_224 [--pretrained w.safetensors] --tome-r 16 --out out/vit_b_r16
    python tools/export.py -c configs/x.yaml -o model.architecture.img_size=384 --out out/x

Saves OUT/inference.json + OUT/inference.pdiparams (paddle.jit.save), loads them back with
paddle.jit.load and compares their outputs with the dygraph model's on a random batch; a
difference beyond --atol/--rtol is an error. ToMe needs a fixed r and input size (token counts
become static), and the batch stays dynamic. A new model kind (e.g. a multimodal segmentor) adds
its input-spec function to EXPORTERS and a case to model_kind().
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PREFIX = "inference"


class ExportMismatchError(RuntimeError):
    """The saved model's outputs differ from the dygraph model's."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model name, e.g. vit_base_patch16_224")
    src.add_argument("-c", "--config", help="YAML config; its `model` section is built (patches included)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. -o model.architecture.img_size=384 (with -c)")
    p.add_argument("--pretrained", help="weights file to load (.pdparams/.safetensors/.pth)")
    p.add_argument("--tome-r", default=None, metavar="R",
                   help="patch with ToMe at this fixed r: 16, '16,-1' or '[8,8,4]'")
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--check-batch", type=int, default=2, help="batch size of the random check input")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if args.override and not args.config:
        p.error("-o/--override needs -c/--config")
    if args.img_size is not None and args.img_size < 1:
        p.error(f"--img-size must be positive, got {args.img_size}")
    if args.check_batch < 1:
        p.error(f"--check-batch must be >= 1, got {args.check_batch}")
    return args


def build_model(args):
    """The model from --model or -c/-o; --pretrained loads strictly (an export with missing weights is a bug)."""
    from plfusion.models import build_model as build_from_cfg
    from plfusion.models import create_model
    if args.config:
        from plfusion.config import get_config
        overrides = list(args.override)
        if args.img_size:
            overrides.append(f"+model.architecture.img_size={args.img_size}")
        model = build_from_cfg(get_config(args.config, overrides).model)
    else:
        model = create_model(args.model, **({"img_size": args.img_size} if args.img_size else {}))
    if args.pretrained:
        print(model.load_pretrained(args.pretrained, strict=True))
    return model


def image_size(model, img_size=None):
    """(H, W): --img-size, else what the model's patch embedding was built for."""
    if img_size:
        return img_size, img_size
    for layer in model.sublayers(include_self=True):
        pe = getattr(layer, "patch_embed", None)
        if pe is not None and hasattr(pe, "img_size"):
            return tuple(pe.img_size)
        if isinstance(getattr(layer, "img_size", None), (tuple, list)):
            return tuple(layer.img_size)
    raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass --img-size")


def classifier_spec(img_size):
    """Image classifier / backbone: one NCHW float image batch, the batch dynamic."""
    import paddle
    h, w = img_size
    return [paddle.static.InputSpec([None, 3, h, w], "float32", "image")]


EXPORTERS = {"classifier": classifier_spec}   # kind -> input spec; save() is shared


def model_kind(model):
    """Which exporter fits `model`."""
    return "classifier"


def _flatten(out):
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return [out]


def save(model, spec, out_dir):
    """to_static + jit.save under OUT/inference; returns the path prefix."""
    import paddle
    static = paddle.jit.to_static(model, input_spec=spec, full_graph=True)
    prefix = os.path.join(out_dir, PREFIX)
    paddle.jit.save(static, prefix)
    return prefix


def run_dygraph(model, inputs):
    import paddle
    model.eval()
    with paddle.no_grad():
        return [t.numpy() for t in _flatten(model(*inputs))]


def verify_export(expected, prefix, inputs, atol=1e-4, rtol=1e-4):
    """Run the saved model (paddle.jit.load) on `inputs` and compare with `expected` (dygraph outputs as
    numpy arrays, computed before to_static touched the model); raise on a mismatch.

    Returns the largest absolute difference."""
    import paddle
    loaded = paddle.jit.load(prefix)
    with paddle.no_grad():
        got = _flatten(loaded(*inputs))
    if len(expected) != len(got):
        raise ExportMismatchError(f"{prefix}: the saved model returns {len(got)} outputs, dygraph {len(expected)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(expected, got)):
        a, b = np.asarray(a), np.asarray(b.numpy())
        if a.shape != b.shape:
            raise ExportMismatchError(f"{prefix}: output {i} has shape {list(b.shape)} after export, "
                                      f"{list(a.shape)} in dygraph")
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(b, a, atol=atol, rtol=rtol):
            raise ExportMismatchError(f"{prefix}: output {i} differs from dygraph by up to {diff:.3g} "
                                      f"(atol {atol}, rtol {rtol})")
    return worst


def main(argv=None):
    args = parse_args(argv)
    import paddle
    from plfusion.patches import tome

    model = build_model(args)
    if args.tome_r is not None:
        r = tome.parse_r_text(args.tome_r)
        if not tome.is_patched(model):
            tome.apply_patch(model)
        model.r = r
    model.eval()
    if tome.is_patched(model):
        print(f"ToMe: r = {model.r!r} (fixed in the exported graph)")
    os.makedirs(args.out, exist_ok=True)
    kind = model_kind(model)
    size = image_size(model, args.img_size)
    spec = EXPORTERS[kind](size)
    inputs = [paddle.rand([args.check_batch] + list(s.shape[1:]), dtype=s.dtype) for s in spec]
    expected = run_dygraph(model, inputs)
    prefix = save(model, spec, args.out)
    worst = verify_export(expected, prefix, inputs, args.atol, args.rtol)
    print(f"saved {prefix}.* ({kind}); paddle.jit.load matches dygraph on a random "
          f"{[list(x.shape) for x in inputs]} input: max |diff| = {worst:.3g}")
    return prefix


if __name__ == "__main__":
    main()
