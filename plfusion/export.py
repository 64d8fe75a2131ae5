"""Export a model for serving: a Paddle inference model, checked against dygraph, plus deploy.yaml.

    plfusion-export -c CONFIG [--pretrained CKPT] --out DIR          (also tools/export.py)
    plfusion-export --model vit_base_patch16_224 [--pretrained W] --tome-r 16 --out DIR

`export_model` saves DIR/inference.json + DIR/inference.pdiparams (paddle.jit.save) and then runs
the saved model on a random batch twice, through paddle.jit.load and through the Paddle Inference
engine that `plfusion.inference.Predictor` uses (oneDNN on); an output farther than atol/rtol from
the dygraph output raises ExportMismatchError. Only then is DIR/deploy.yaml written: input names
and shapes, modalities, the val pre-processing with its normalisation stats, num_classes, class
names, palette and task, which is everything the Predictor needs.

With --onnx (export_model(onnx=True), the `.[onnx]` extra) DIR/model.onnx is written too,
converted by paddle2onnx and checked through onnxruntime the same way (plfusion.onnx_export).

Fixed in the graph: the input size (token counts are static) and a ToMe model's r; the batch
stays dynamic. Classifiers take one input `image`; multimodal segmentors (TokenFusion,
GeminiFusion) one input per modality, named after it (`rgb`, `depth`), and return the
per-modality logits then their ensemble.
"""
import argparse
import logging
import os
import sys

import numpy as np
import yaml

from .inference import (DEPLOY_FILE, DEPLOY_FORMAT, DEPLOY_VERSION, PREFIX, create_paddle_predictor,
                        flatten_outputs, run_paddle_predictor)
from .registry import ConfigError

__all__ = ["ExportMismatchError", "DynamicBatchError", "export_model", "save_model", "verify_export", "deploy_info",
           "input_specs", "model_kind", "image_size", "input_layout", "inference_transforms", "build_model_from_args",
           "load_weights", "add_model_args", "parse_img_size", "parse_args", "main", "CHECK_ENGINES"]

logger = logging.getLogger(__name__)

CHECK_ENGINES = ("jit", "inference")
ONNX_CHECK = "onnxruntime"     # checks model.onnx beside the prefix; only for exports with --onnx
MAX_INPUTS = 8
SEG_STEPS = ("Resize", "Normalize", "ToCHW")
CLS_STEPS = ("ResizeCenterCrop", "Normalize", "ToCHW")


class ExportMismatchError(RuntimeError):
    """The saved model's outputs differ from the dygraph model's."""


class DynamicBatchError(ValueError):
    """The model cannot be traced with a dynamic batch; export it with a fixed batch_size."""


# ----------------------------------------------------------------------------- model facts

def model_kind(model):
    """'multimodal_segmentor', 'segmentor' or 'classifier' (any one-input model)."""
    from .models.segmentor import Segmentor
    if isinstance(model, Segmentor):
        return "multimodal_segmentor" if model.num_modalities > 1 else "segmentor"
    if getattr(model, "num_modalities", 1) > 1:
        raise TypeError(f"export: {type(model).__name__} takes {model.num_modalities} modalities; export the "
                        f"Segmentor that holds it")
    return "classifier"


def _in_chans(model):
    for obj in (getattr(model, "backbone", None), model):
        n = getattr(obj, "in_chans", None)
        if isinstance(n, int):
            return n
    for layer in model.sublayers(include_self=True):
        pe = getattr(layer, "patch_embed", None)
        if isinstance(getattr(pe, "in_chans", None), int):
            return pe.in_chans
    return 3


def _num_classes(model):
    for obj in (getattr(model, "head", None), getattr(model, "backbone", None), model):
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def image_size(model, img_size=None):
    """(H, W): `img_size` (an int or a pair), else what the model's patch embedding was built for."""
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if not all(isinstance(v, int) and v > 0 for v in (h, w)):
            raise ValueError(f"export: image size must be positive ints, got {img_size!r}")
        return h, w
    for layer in model.sublayers(include_self=True):
        pe = getattr(layer, "patch_embed", None)
        if pe is not None and hasattr(pe, "img_size"):
            return tuple(pe.img_size)
        if isinstance(getattr(layer, "img_size", None), (tuple, list)):
            return tuple(layer.img_size)
    raise ValueError(f"export: cannot tell the input size of {type(model).__name__}; pass --img-size "
                     f"(or give the config's val pipeline a Resize)")


def input_specs(model, size, names, batch=None):
    """One InputSpec [batch, C, H, W] float32 per input name (batch None: dynamic)."""
    import paddle
    c = _in_chans(model)
    return [paddle.static.InputSpec([batch, c, size[0], size[1]], "float32", n) for n in names]


# ----------------------------------------------------------------------------- deploy metadata

def _section(cfg, *keys):
    node = cfg
    for k in keys:
        if not hasattr(node, "get") or node.get(k) is None:
            return None
        node = node[k]
    return node


def _class_names(dataset_cfg, num_classes):
    """Names from the val dataset config (its class_names, or the dataset's own list), else None."""
    names = None
    if dataset_cfg is not None:
        given = dataset_cfg.get("class_names")
        if isinstance(given, (list, tuple)):
            names = [str(n) for n in given]
        elif isinstance(given, str):
            from .data.imagenet import read_class_names
            names = read_class_names(given)
        else:
            from .data import rgbd, synthetic_imagenet, synthetic_rgbd
            known = {"NYUDv2": rgbd.NYUDV2_CLASSES, "SUNRGBD": rgbd.SUNRGBD_CLASSES,
                     "SyntheticRGBD": synthetic_rgbd.SYNTHETIC_CLASSES,
                     "SyntheticImageNet": synthetic_imagenet.SYNTHETIC_CLASSES}
            names = known.get(dataset_cfg.get("name"))
            names = list(names)[:num_classes] if names is not None else None
    if names is not None and len(names) != num_classes:
        logger.warning("export: the val dataset names %d classes but the model predicts %d; the classes stay unnamed "
                       "(class_<k>)", len(names), num_classes)
        names = None
    return list(names) if names is not None else None


def _spec_name(spec, where):
    if callable(spec) and not hasattr(spec, "get"):
        raise ConfigError(f"{where}: a Python callable cannot be written to {DEPLOY_FILE}; use {{name: ...}} entries")
    if not hasattr(spec, "get") or "name" not in spec:
        raise ConfigError(f"{where}: expected a {{name: ..., ...}} transform entry, got {spec!r}")
    return spec["name"]


def _floats(values):
    """float32 statistics as short decimals (7 significant digits restore the float32 exactly)."""
    return [float(f"{float(v):.7g}") for v in np.atleast_1d(np.asarray(values, np.float64))]


def inference_transforms(task, specs, size, modalities, where="dataloader.val.dataset.transforms"):
    """The val pipeline as explicit, serialisable transform entries for `task` at input `size`.

    Only the deterministic steps an inference pipeline has are accepted (segmentation: Resize,
    Normalize, ToCHW; classification: ResizeCenterCrop, Normalize, ToCHW). The resize is set to
    the exported size (and added first when the pipeline has none); Normalize is written with its
    resolved statistics; ToCHW comes last. `specs` None is the datasets' default (Normalize, ToCHW)."""
    seg = task == "segmentation"
    allowed = SEG_STEPS if seg else CLS_STEPS
    specs = [{"name": "Normalize"}, {"name": "ToCHW"}] if specs is None else list(specs)
    out, resized = [], False
    for i, spec in enumerate(specs):
        name = _spec_name(spec, f"{where}[{i}]")
        if name not in allowed:
            raise ConfigError(f"{where}[{i}]: {name} is not an inference step; a {task} pipeline for serving may "
                              f"hold {list(allowed)}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        if name == "ToCHW":
            continue
        if name == "Normalize":
            if seg:
                from .data.seg_transforms import Normalize
                norm = Normalize(**kwargs)
                stats = {m: {"mean": _floats(norm.stats[m]["mean"]), "std": _floats(norm.stats[m]["std"]),
                             "channels": norm.stats[m].get("channels")} for m in modalities if m in norm.stats}
                missing = [m for m in modalities if m not in norm.stats]
                if missing:
                    raise ConfigError(f"{where}[{i}]: Normalize has no statistics for modalities {missing}")
                out.append({"name": "Normalize", "stats": stats})
            else:
                from .data.cls_transforms import Normalize
                norm = Normalize(**kwargs)
                out.append({"name": "Normalize", "mean": _floats(norm.mean), "std": _floats(norm.std),
                            "scale": norm.scale})
            continue
        resized = True
        if seg:
            from .data.seg_transforms import Resize
            given = Resize(**kwargs).size
            step = {"name": "Resize", "size": [int(size[0]), int(size[1])], "resize_label": False}
        else:
            from .data.cls_transforms import ResizeCenterCrop
            rcc = ResizeCenterCrop(**kwargs)
            given = tuple(rcc.size)
            step = {"name": "ResizeCenterCrop", "size": [int(size[0]), int(size[1])], "crop_ratio": rcc.crop_ratio,
                    "interpolation": rcc.interpolation, "antialias": rcc.antialias}
        if tuple(given) != tuple(size):
            logger.warning("export: %s[%d] %s size %s replaced by the exported input size %s", where, i, name,
                           list(given), list(size))
        out.insert(0, step)
    if not resized:
        step = ({"name": "Resize", "size": [int(size[0]), int(size[1])], "resize_label": False} if seg else
                {"name": "ResizeCenterCrop", "size": [int(size[0]), int(size[1])], "crop_ratio": 1.0,
                 "interpolation": "bicubic", "antialias": True})
        out.insert(0, step)
    out.append({"name": "ToCHW"})
    return out


def _modalities(model, kind, dataset_cfg):
    if kind == "classifier":
        return ["image"]
    m = model.num_modalities
    given = dataset_cfg.get("modalities") if dataset_cfg is not None else None
    if given is None:
        return ["rgb", "depth"][:m] if m <= 2 else [f"input_{i}" for i in range(m)]
    given = [given] if isinstance(given, str) else list(given)
    if len(given) != m:
        raise ConfigError(f"dataloader.val.dataset.modalities: {given} lists {len(given)} modalities but the model "
                          f"takes {m}")
    return given


def input_layout(model, cfg=None, img_size=None):
    """(model kind, val dataset config or None, input (H, W), input names) of `model` built from `cfg`.

    The size is `img_size`, else (segmentors) the val pipeline's Resize, else the model's own."""
    kind = model_kind(model)
    dataset_cfg = _section(cfg, "dataloader", "val", "dataset") if cfg is not None else None
    transforms = dataset_cfg.get("transforms") if dataset_cfg is not None else None
    if img_size is None and kind != "classifier" and transforms:
        for spec in transforms:
            if hasattr(spec, "get") and spec.get("name") == "Resize":
                from .data.seg_transforms import Resize
                img_size = Resize(**{k: v for k, v in spec.items() if k != "name"}).size
    return kind, dataset_cfg, image_size(model, img_size), _modalities(model, kind, dataset_cfg)


def deploy_info(model, cfg=None, img_size=None, output_shapes=None):
    """What a Predictor needs to serve `model` (built from `cfg`, if given) at `img_size`:
    task, inputs, outputs, the val pre-processing, num_classes, class names, palette.

    output_shapes (from a dygraph run) name and check the outputs; without them they are derived
    from the model. The export adds the check results and writes this dict as deploy.yaml."""
    kind, dataset_cfg, size, modalities = input_layout(model, cfg, img_size)
    transforms = dataset_cfg.get("transforms") if dataset_cfg is not None else None
    seg = kind != "classifier"
    num_classes = _num_classes(model)
    if output_shapes is not None:
        pred_shape = output_shapes[-1] if seg else output_shapes[0]
        num_classes = int(pred_shape[1]) if len(pred_shape) >= 2 else num_classes
        task = "segmentation" if seg else ("classification" if len(output_shapes) == 1 and len(pred_shape) == 2
                                           else "features")
    else:
        task = "segmentation" if seg else ("classification" if num_classes else "features")
    if num_classes is None and task != "features":
        raise ValueError(f"export: cannot tell how many classes {type(model).__name__} predicts")
    if kind == "multimodal_segmentor":
        outputs = [f"logits_{m}" for m in modalities] + ["ensemble"]
    elif task == "features":
        outputs = [f"output_{i}" for i in range(len(output_shapes or [None]))]
    else:
        outputs = ["logits"]
    if dataset_cfg is None and task == "classification":
        # no config: timm's eval transform (short side to size / 0.875, centre crop, ImageNet stats)
        transforms = [{"name": "ResizeCenterCrop", "size": list(size)}, {"name": "Normalize"}, {"name": "ToCHW"}]
    c = _in_chans(model)
    info = {
        "format": DEPLOY_FORMAT, "version": DEPLOY_VERSION, "task": task,
        "model_file": PREFIX + ".json", "params_file": PREFIX + ".pdiparams",
        "inputs": [{"name": m, "modality": m, "shape": [-1, c, int(size[0]), int(size[1])], "dtype": "float32"}
                   for m in modalities],
        "outputs": [{"name": n} for n in outputs],
        "prediction_output": len(outputs) - 1,
        "preprocess": (inference_transforms(task, transforms, size, modalities)
                       if task in ("segmentation", "classification") else []),
        "num_classes": num_classes,
    }
    if output_shapes is not None:
        if len(output_shapes) != len(outputs):
            raise AssertionError(f"export: {len(output_shapes)} outputs, expected {outputs}")
        for o, s in zip(info["outputs"], output_shapes):
            o["shape"] = [-1] + [int(v) for v in s[1:]]
    names = _class_names(dataset_cfg, num_classes) if task != "features" else None
    if names is not None:
        info["class_names"] = names
    if task == "segmentation":
        from .data.rgbd import make_palette
        info["palette"] = make_palette(num_classes).tolist()
        info["ignore_index"] = int(dataset_cfg.get("ignore_index", 255)) if dataset_cfg is not None else 255
    threads = _section(cfg, "infer", "cpu_threads") if cfg is not None else None
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"infer.cpu_threads: expected a positive int, got {threads!r}")
        info["runtime"] = {"cpu_threads": threads}
    return info


# ----------------------------------------------------------------------------- save and check

def _wrap(model, num_inputs):
    """A layer whose forward has one named argument per input: to_static accepts neither *args nor a
    list-valued input spec. Wrapping also leaves `model` itself in dygraph."""
    import paddle.nn as nn

    if num_inputs == 1:
        class OneInput(nn.Layer):
            def __init__(self, inner):
                super().__init__()
                self.model = inner

            def forward(self, x):
                return self.model(x)
        return OneInput(model)
    if num_inputs > MAX_INPUTS:
        raise ValueError(f"export: at most {MAX_INPUTS} modalities can be exported, got {num_inputs}")

    class ModalityInputs(nn.Layer):
        def __init__(self, inner, n):
            super().__init__()
            self.model = inner
            self.num_inputs = n

        def forward(self, x0, x1=None, x2=None, x3=None, x4=None, x5=None, x6=None, x7=None):
            return self.model([x0, x1, x2, x3, x4, x5, x6, x7][:self.num_inputs])
    return ModalityInputs(model, num_inputs)


def save_model(model, specs, out_dir):
    """to_static + paddle.jit.save under OUT/inference; returns the path prefix."""
    import paddle
    os.makedirs(out_dir, exist_ok=True)
    static = paddle.jit.to_static(_wrap(model, len(specs)), input_spec=specs, full_graph=True)
    prefix = os.path.join(out_dir, PREFIX)
    try:
        paddle.jit.save(static, prefix)
    except (AssertionError, ValueError) as e:
        if specs[0].shape[0] in (None, -1) and ("reshape can be -1" in str(e) or "needs a fixed batch" in str(e)):
            raise DynamicBatchError(f"export: {type(model).__name__} reshapes with the batch size, which a dynamic "
                                    f"batch cannot trace; fix the batch with --batch-size N "
                                    f"(export_model(batch_size=N))") from e
        raise
    return prefix


def _compare(expected, got, prefix, engine, atol, rtol):
    if len(expected) != len(got):
        raise ExportMismatchError(f"{prefix}: the {engine} run returns {len(got)} outputs, dygraph {len(expected)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(expected, got)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ExportMismatchError(f"{prefix}: output {i} has shape {list(b.shape)} in the {engine} run, "
                                      f"{list(a.shape)} in dygraph")
        if not np.isfinite(b).all() and np.isfinite(a).all():
            raise ExportMismatchError(f"{prefix}: output {i} of the {engine} run has NaN/inf values where "
                                      f"dygraph has none")
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(b, a, atol=atol, rtol=rtol):
            raise ExportMismatchError(f"{prefix}: output {i} of the {engine} run differs from dygraph by up to "
                                      f"{diff:.3g} (atol {atol}, rtol {rtol})")
    return worst


def verify_export(expected, prefix, inputs, atol=1e-4, rtol=1e-4, engines=CHECK_ENGINES, threads=None):
    """Run the saved model on `inputs` and compare every output with `expected` (the dygraph outputs
    as numpy arrays); raise ExportMismatchError on a mismatch.

    engines: 'jit' (paddle.jit.load) and/or 'inference' (Paddle Inference on the CPU with oneDNN,
    as the Predictor serves it), and 'onnxruntime' (the model.onnx beside PREFIX).
    Returns {engine: largest absolute difference}."""
    import paddle
    arrays = [x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x, np.float32) for x in inputs]
    unknown = [e for e in engines if e not in CHECK_ENGINES + (ONNX_CHECK,)]
    if unknown:
        raise ValueError(f"verify_export: unknown engines {unknown}; expected some of "
                         f"{list(CHECK_ENGINES + (ONNX_CHECK,))}")
    worst = {}
    if "jit" in engines:
        loaded = paddle.jit.load(prefix)
        with paddle.no_grad():
            got = [t.numpy() for t in flatten_outputs(loaded(*[paddle.to_tensor(a) for a in arrays]))]
        worst["jit"] = _compare(expected, got, prefix, "paddle.jit.load", atol, rtol)
    if "inference" in engines:
        predictor, _ = create_paddle_predictor(prefix, threads=threads)
        worst["inference"] = _compare(expected, run_paddle_predictor(predictor, arrays), prefix,
                                      "Paddle Inference (oneDNN)", atol, rtol)
    if ONNX_CHECK in engines:
        from .onnx_engine import ONNX_FILE
        from .onnx_export import verify_onnx
        worst[ONNX_CHECK] = verify_onnx(expected, os.path.join(os.path.dirname(prefix), ONNX_FILE), arrays, atol,
                                        rtol, threads or 1)
    return worst


def export_model(model, out_dir, cfg=None, img_size=None, check_batch=2, atol=1e-4, rtol=1e-4, seed=0,
                 threads=None, source=None, batch_size=None, onnx=False, onnx_batch_size=None, onnx_opset=None):
    """Export `model` (built from `cfg`, if given) to `out_dir`, check it, write deploy.yaml.

    The check feeds a seeded standard-normal batch of `check_batch` (a normalised image's range)
    and compares dygraph with both saved-model runs (see verify_export); deploy.yaml is written
    only when they agree. `batch_size` fixes the batch in the graph (default: dynamic; Swin and
    MViTv2 need a fixed one, their reshapes name the batch) and is then the check batch too.
    `source` (a dict, e.g. config and weights paths) is recorded in deploy.yaml.
    onnx=True also writes model.onnx (see plfusion.onnx_export: `onnx_batch_size` fixes its batch,
    `onnx_opset` its opset) and checks it through onnxruntime on the same batch.
    Returns the deploy dict, with `prefix` (the saved model's path prefix) added."""
    import paddle
    from .patches import tome
    if onnx:
        from .onnx_export import require_onnx_export
        require_onnx_export()     # before the slow part
    for name, value in (("check_batch", check_batch), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"export: {name} must be a positive int, got {value!r}")
    check_batch = batch_size or check_batch
    model.eval()
    _, _, size, names = input_layout(model, cfg, img_size)
    specs = input_specs(model, size, names, batch_size)
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal([check_batch] + list(s.shape[1:])).astype(np.float32) for s in specs]
    tensors = [paddle.to_tensor(a) for a in arrays]
    with paddle.no_grad():
        out = model(tensors if len(tensors) > 1 else tensors[0])
    expected = [t.numpy() for t in flatten_outputs(out)]
    info = deploy_info(model, cfg, size, [e.shape for e in expected])
    if batch_size is not None:
        for entry in info["inputs"] + info["outputs"]:
            entry["shape"][0] = batch_size
    prefix = save_model(model, specs, out_dir)
    worst = verify_export(expected, prefix, arrays, atol, rtol, threads=threads)
    if onnx:
        from .onnx_export import ONNX_OPSET, export_onnx
        info["onnx"], worst[ONNX_CHECK] = export_onnx(model, specs, prefix, expected, arrays, atol, rtol,
                                                      threads or 1, onnx_batch_size, onnx_opset or ONNX_OPSET)
    info["check"] = {"batch": check_batch, "atol": atol, "rtol": rtol, "seed": seed,
                     "max_abs_diff": {k: float(v) for k, v in worst.items()}}
    if tome.is_patched(model):
        if model._tome_info.get("dense"):
            info["tome_ratio"] = model.ratio if not isinstance(model.ratio, tuple) else list(model.ratio)
        else:
            info["tome_r"] = model.r if not isinstance(model.r, tuple) else list(model.r)
    info["source"] = dict(source or {})
    info["paddle"] = paddle.__version__
    with open(os.path.join(out_dir, DEPLOY_FILE), "w", encoding="utf-8") as f:
        yaml.safe_dump(info, f, sort_keys=False, default_flow_style=None, width=120)
    info["prefix"] = prefix
    return info


# ----------------------------------------------------------------------------- command line

def parse_img_size(values, parser):
    """--img-size H [W] -> (H, W) or None; a bad value is a parser error."""
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        parser.error(f"--img-size takes one or two positive ints (H [W]), got {values}")
    return (values[0], values[0]) if len(values) == 1 else tuple(values)


def add_model_args(p, required=True):
    """--model / -c CONFIG / -o / --pretrained / --img-size, shared with plfusion-benchmark and infer."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--model", help="registered model name, e.g. vit_base_patch16_224")
    src.add_argument("-c", "--config", help="YAML config; its `model` section is built (patches included)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. -o model.architecture.img_size=384 (with -c)")
    p.add_argument("--pretrained", "--checkpoint", dest="pretrained", metavar="CKPT",
                   help="weights: a .pdparams/.safetensors/.pth file, a training checkpoint prefix or run directory")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="N",
                   help="input size: H [W] (default: the config's val Resize, else the model's own)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="plfusion-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--tome-r", default=None, metavar="R",
                   help="patch with ToMe at this fixed r: 16, '16,-1' or '[8,8,4]'")
    p.add_argument("--tome-ratio", default=None, metavar="RATIO",
                   help="MiT, Swin and MViTv2 models: ToMe at this fixed merge ratio, 0.5 or one per stage '0.5,0.5,0.25,0'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--check-batch", type=int, default=2, help="batch size of the random check input")
    p.add_argument("--batch-size", type=int, default=None,
                   help="fix the batch in the graph (default: dynamic); Swin and MViTv2 need it")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every usable core)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (paddle2onnx), checked through onnxruntime; needs the .[onnx] extra")
    p.add_argument("--onnx-batch-size", type=int, default=None, metavar="N",
                   help="fix the ONNX model's batch (default: as the Paddle model; a dynamic batch that does not "
                        "convert falls back to 1)")
    p.add_argument("--onnx-opset", type=int, default=None, metavar="N", help="ONNX opset (default: 17)")
    args = p.parse_args(argv)
    if args.override and not args.config:
        p.error("-o/--override needs -c/--config")
    if (args.onnx_batch_size is not None or args.onnx_opset is not None) and not args.onnx:
        p.error("--onnx-batch-size and --onnx-opset need --onnx")
    args.img_size = parse_img_size(args.img_size, p)
    for name in ("check_batch", "batch_size", "onnx_batch_size", "onnx_opset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def load_weights(model, spec):
    """Load `spec` strictly (a serving model with missing weights is a bug): a weights file, or a
    training checkpoint (its prefix, one of its files, or a run directory: the newest complete one).
    Returns the load report."""
    path = spec
    if os.path.isdir(spec) or not os.path.isfile(spec):
        from .engine.checkpoint import resolve_checkpoint
        path = resolve_checkpoint(spec, spec) + ".pdparams"
    return model.load_pretrained(path, strict=True)


def build_model_from_args(args):
    """(model, cfg or None) from --model or -c/-o, with --pretrained loaded strictly."""
    from .models import build_model, create_model
    cfg = None
    if args.config:
        from .config import get_config
        cfg = get_config(args.config, args.override)
        if args.img_size is not None and cfg.model.get("name", "Classifier") != "Segmentor":
            # a classifier's token grid is built for its input size (a Segmentor's follows its input)
            h, w = args.img_size
            size = h if h == w else f"[{h}, {w}]"
            cfg = get_config(args.config, list(args.override) + [f"+model.architecture.img_size={size}"])
        model = build_model(cfg.model)
    else:
        h, w = args.img_size or (None, None)
        kwargs = {"img_size": h if h == w else [h, w]} if args.img_size else {}
        model = create_model(args.model, **kwargs)
    if args.pretrained:
        logger.info("%s", load_weights(model, args.pretrained))
    return model, cfg


def main(argv=None):
    args = parse_args(argv)
    from .utils.cpu import configure_cpu
    configure_cpu(args.threads)
    from .patches import tome
    model, cfg = build_model_from_args(args)
    if args.tome_r is not None:
        r = tome.parse_r_text(args.tome_r)
        if not tome.is_patched(model):
            tome.apply_patch(model)
        model.r = r
    if args.tome_ratio is not None:
        ratio = tome.parse_ratio_text(args.tome_ratio)
        if not tome.is_patched(model):
            tome.apply_patch(model, ratio=0.0)
        model.ratio = ratio
    if tome.is_patched(model):
        setting = f"ratio = {model.ratio!r}" if model._tome_info.get("dense") else f"r = {model.r!r}"
        print(f"ToMe: {setting} (fixed in the exported graph)")
    source = {"config": args.config, "model": args.model, "pretrained": args.pretrained, "overrides": args.override}
    info = export_model(model, args.out, cfg, args.img_size, args.check_batch, args.atol, args.rtol,
                        threads=args.threads, source={k: v for k, v in source.items() if v},
                        batch_size=args.batch_size, onnx=args.onnx, onnx_batch_size=args.onnx_batch_size,
                        onnx_opset=args.onnx_opset)
    shapes = [i["shape"] for i in info["inputs"]]
    print(f"saved {info['prefix']}.* and {os.path.join(args.out, DEPLOY_FILE)} ({info['task']}, inputs "
          f"{[i['name'] for i in info['inputs']]} {shapes}); on a random batch of {info['check']['batch']} the saved "
          f"model matches dygraph: max |diff| "
          + ", ".join(f"{k} {v:.3g}" for k, v in info["check"]["max_abs_diff"].items()))
    if "onnx" in info:
        onnx = info["onnx"]
        batch = "dynamic" if onnx["batch"] == -1 else f"fixed at {onnx['batch']}"
        print(f"saved {os.path.join(args.out, onnx['model_file'])} (opset {onnx['opset']}, batch {batch}"
              + (f"; the dynamic batch does not convert: {onnx['dynamic_batch_error']}"
                 if "dynamic_batch_error" in onnx else "") + ")")
    sys.stdout.flush()
    return info["prefix"]
