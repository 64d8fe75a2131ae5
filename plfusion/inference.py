"""Serve a model: `Predictor` runs an exported model with Paddle Inference (engine="paddle") or
onnxruntime (engine="onnxruntime", the export's model.onnx), `DygraphPredictor` a dygraph model;
all share one pre- and post-processing, so they give the same predictions.

    from plfusion.inference import Predictor
    pred = Predictor("out/gf_b0")                     # a directory written by plfusion-export
    result = pred.predict({"rgb": rgb_uint8, "depth": depth01})
    result["label"]                                   # HxW class map at the input's size

Pre-processing is the config's val pipeline, stored in deploy.yaml by the export (Resize,
Normalize with its per-modality stats, ToCHW; ResizeCenterCrop, Normalize, ToCHW for a
classifier). Post-processing: a segmentor's prediction output (the ensemble when the model is
multimodal) is upsampled bilinearly to the input's size and arg-maxed; a classifier's logits go
through a softmax and the top-k classes are returned.

CPU: oneDNN is on by default and the thread count comes from the argument, else deploy.yaml's
`runtime.cpu_threads` (the config's `infer.cpu_threads` at export), else every usable core.
GPU: `device="gpu"`, optionally with TensorRT (`tensorrt=True`, `precision="fp16"`); when
TensorRT is not available it runs on the GPU without it and says so. onnxruntime runs on the CPU
with the same thread count (plfusion.onnx_engine).
"""
import logging
import os
import re

import numpy as np
import yaml

from .paddle_check import require_gpu
from .utils.cpu import available_cpus, configure_cpu, restore_cpu_threads

__all__ = ["Predictor", "DygraphPredictor", "load_deploy", "Preprocess", "upsample_argmax", "softmax_topk",
           "create_paddle_predictor", "run_paddle_predictor", "flatten_outputs", "program_ops", "tensorrt_available",
           "run_in_fixed_batches", "DeployError", "DEPLOY_FILE", "PREFIX", "DEPLOY_FORMAT", "DEPLOY_VERSION", "TASKS",
           "ENGINES"]

logger = logging.getLogger(__name__)

PREFIX = "inference"            # OUT/inference.json + OUT/inference.pdiparams
DEPLOY_FILE = "deploy.yaml"
DEPLOY_FORMAT = "plfusion-deploy"
DEPLOY_VERSION = 1
TASKS = ("segmentation", "classification", "features")
ENGINES = ("paddle", "onnxruntime")
# Two oneDNN defects of Paddle Inference 3.3 (PIR), worked around here:
# - the in-place pass reuses a tensor's buffer after a oneDNN layout conversion that aliases it:
#   with ToMe's proportional attention, log(size) overwrites size and the output is NaN. Dropping
#   the pass costs no measurable speed.
# - bilinear_interp placed on oneDNN fails to run ("ConvertPirAttribute2RuntimeAttribute not
#   support ArrayAttribute<DoubleAttribute>"), so a program with it (every SegFormer head) skips
#   the placement pass; the fused oneDNN kernels (fc, matmul, conv) still run.
ONEDNN_UNSAFE_PASSES = ("inplace_pass",)
ONEDNN_FC_PASS = "fc_onednn_enable_pass"
# ToMe's merge ops: a ToMe-merged Swin built without the fc pass then fails inside run(); plain kernels run it
ONEDNN_FC_RETRY_BLOCKERS = ("index_add", "put_along_axis", "one_hot")
ONEDNN_UNPLACEABLE_OPS = ("bilinear_interp",)


class DeployError(ValueError):
    """A model directory or deploy.yaml that cannot be served."""


# ----------------------------------------------------------------------------- deploy.yaml

_REQUIRED = ("format", "version", "task", "model_file", "params_file", "inputs", "outputs", "prediction_output",
             "preprocess", "num_classes")


def load_deploy(model_dir):
    """Read and check `model_dir/deploy.yaml`; returns it as a dict with `model_dir` added."""
    path = os.path.join(model_dir, DEPLOY_FILE)
    if not os.path.isfile(path):
        raise DeployError(f"{model_dir}: no {DEPLOY_FILE}; export the model with plfusion-export "
                          f"(tools/export.py), which writes it after checking the exported model")
    with open(path, encoding="utf-8") as f:
        info = yaml.safe_load(f)
    if not isinstance(info, dict) or info.get("format") != DEPLOY_FORMAT:
        raise DeployError(f"{path}: not a plfusion deploy file (expected format: {DEPLOY_FORMAT})")
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        raise DeployError(f"{path}: missing keys {missing}")
    if info["version"] != DEPLOY_VERSION:
        raise DeployError(f"{path}: version {info['version']!r}; this plfusion reads version {DEPLOY_VERSION}")
    if info["task"] not in TASKS:
        raise DeployError(f"{path}: task {info['task']!r}; expected one of {list(TASKS)}")
    for key in ("model_file", "params_file"):
        if not os.path.isfile(os.path.join(model_dir, info[key])):
            raise DeployError(f"{path}: {key} {info[key]!r} is not in {model_dir}")
    info["model_dir"] = model_dir
    return info


# ----------------------------------------------------------------------------- pre/post-processing

class Preprocess:
    """Raw images -> model inputs, with the transforms listed in deploy.yaml's `preprocess`.

    Segmentation: images is {modality: HxW[xC] array} (or a list in `modalities` order); uint8
    and uint16 arrays are scaled to [0, 1] by Normalize, float arrays are taken as scaled (as the
    datasets' depth readers return). Classification: one HxWx3 uint8 RGB image. Returns a list of
    float32 [1, C, H, W] arrays, one per model input."""

    def __init__(self, task, transforms, modalities):
        self.task = task
        self.modalities = list(modalities)
        if task == "segmentation":
            from .data.seg_transforms import Compose
            self.pipeline = Compose(transforms, where="preprocess")
        else:
            from .data.cls_transforms import build_cls_transforms
            self.pipeline = build_cls_transforms(transforms, where="preprocess")

    def __call__(self, images):
        if self.task != "segmentation":
            img = np.asarray(images)
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"Preprocess: expected one HxWx3 RGB image, got an array of shape {img.shape}")
            return [self.pipeline(img)[None]]
        if isinstance(images, dict):
            absent = [m for m in self.modalities if m not in images]
            if absent:
                raise ValueError(f"Preprocess: the model takes modalities {self.modalities}; missing {absent} "
                                 f"(got {sorted(images)})")
            arrays = [np.asarray(images[m]) for m in self.modalities]
        else:
            arrays = [np.asarray(a) for a in images]
            if len(arrays) != len(self.modalities):
                raise ValueError(f"Preprocess: the model takes {len(self.modalities)} modalities "
                                 f"{self.modalities}, got {len(arrays)} images")
        sizes = {m: a.shape[:2] for m, a in zip(self.modalities, arrays)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Preprocess: the modalities must have one size, got {sizes}")
        sample = {"inputs": arrays, "modalities": list(self.modalities),
                  "label": np.zeros(arrays[0].shape[:2], np.uint8)}
        return [x[None] for x in self.pipeline(sample)["inputs"]]


def upsample_argmax(logits, size):
    """[B, K, h, w] logits -> [B, H, W] int64 class map: bilinear upsampling (align_corners=False,
    as the evaluator and the losses) to size=(H, W), then the arg-max over classes."""
    import paddle
    import paddle.nn.functional as F
    t = paddle.to_tensor(np.ascontiguousarray(logits, dtype=np.float32))
    if list(t.shape[-2:]) != list(size):
        t = F.interpolate(t, size=[int(size[0]), int(size[1])], mode="bilinear", align_corners=False)
    return paddle.argmax(t, axis=1).numpy()


def softmax_topk(logits, k=5):
    """[K] logits -> (probabilities [K], indices of the k largest, best first)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return p, order


# ----------------------------------------------------------------------------- Paddle Inference

def tensorrt_available():
    """True when this paddle was built with TensorRT and can load its runtime."""
    import paddle.inference as pi
    return tuple(pi.get_trt_compile_version()) != (0, 0, 0) and tuple(pi.get_trt_runtime_version()) != (0, 0, 0)


_PRECISIONS = ("fp32", "fp16")


def _gpu_config(config, gpu_id, gpu_memory_mb, tensorrt, precision, max_batch_size, input_shapes):
    import paddle.inference as pi
    half = precision == "fp16"
    mode = pi.PrecisionType.Half if half else pi.PrecisionType.Float32
    if tensorrt and not tensorrt_available():
        logger.warning("Predictor: TensorRT is not available in this paddle build; running on the GPU without it")
        tensorrt = False
    if tensorrt:
        config.enable_use_gpu(gpu_memory_mb, gpu_id)
        config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=max_batch_size, min_subgraph_size=3,
                                      precision_mode=mode, use_static=False, use_calib_mode=False)
        # only a dynamic batch (-1) varies: TensorRT needs its range
        lo = {n: [s[0] if s[0] > 0 else 1] + s[1:] for n, s in input_shapes.items()}
        hi = {n: [s[0] if s[0] > 0 else max_batch_size] + s[1:] for n, s in input_shapes.items()}
        config.set_trt_dynamic_shape_info(lo, hi, hi)
    else:
        config.enable_use_gpu(gpu_memory_mb, gpu_id, mode)
    return tensorrt


def program_ops(model_file):
    """The operator names (without dialect) in a saved PIR program (PREFIX.json)."""
    with open(model_file, encoding="utf-8") as f:
        text = f.read()
    names = set(re.findall(r'"#":"\d+\.([A-Za-z0-9_]+)"', text))
    return {n for n in names if not n.startswith(("a_", "t_"))}   # attribute and type tags share the syntax


def create_paddle_predictor(prefix, device="cpu", threads=None, onednn=True, tensorrt=False, precision="fp32",
                            gpu_id=0, gpu_memory_mb=512, max_batch_size=8, input_shapes=None, onednn_fc=True):
    """A paddle.inference predictor for PREFIX.json/.pdiparams. Returns (predictor, settings dict).

    CPU: `threads` (default every usable core), oneDNN on unless onednn=False. GPU: see Predictor."""
    import paddle.inference as pi
    if device not in ("cpu", "gpu"):
        raise ValueError(f"Predictor: device must be 'cpu' or 'gpu', got {device!r}")
    if precision not in _PRECISIONS:
        raise ValueError(f"Predictor: precision must be one of {list(_PRECISIONS)}, got {precision!r}")
    model_file, params_file = prefix + ".json", prefix + ".pdiparams"
    for path in (model_file, params_file):
        if not os.path.isfile(path):
            raise DeployError(f"Predictor: {path} not found (written by plfusion-export)")
    config = pi.Config(model_file, params_file)
    config.disable_glog_info()
    settings = {"device": device}
    if device == "gpu":
        require_gpu("Predictor(device='gpu')", "device='cpu'", index=gpu_id)
        settings["tensorrt"] = _gpu_config(config, gpu_id, gpu_memory_mb, tensorrt, precision, max_batch_size,
                                           input_shapes or {})
        settings["precision"] = precision
    else:
        if precision != "fp32":
            raise ValueError(f"Predictor: precision {precision!r} is for the GPU; the CPU runs fp32")
        if tensorrt:
            raise ValueError("Predictor: tensorrt=True needs device='gpu'")
        cpu = configure_cpu(threads)    # MKL's fast kernels on AMD for the ops oneDNN does not take
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(cpu["threads"])
        if onednn:
            config.enable_onednn()
            config.set_onednn_cache_capacity(16)   # primitives cached per input shape
            for name in ONEDNN_UNSAFE_PASSES + (() if onednn_fc else (ONEDNN_FC_PASS,)):
                config.delete_pass(name)
            unplaceable = sorted(program_ops(model_file) & set(ONEDNN_UNPLACEABLE_OPS))
            if unplaceable:
                config.delete_pass("onednn_placement_pass")
                logger.info("Predictor: %s cannot run on oneDNN in this paddle; only fused oneDNN kernels are used",
                            unplaceable)
            settings["onednn_placement"] = not unplaceable
        else:
            config.disable_onednn()
        settings.update(threads=cpu["threads"], onednn=bool(onednn), mkl_avx2=cpu["mkl_avx2"],
                        onednn_fc=bool(onednn and onednn_fc))
    config.switch_ir_optim(True)
    try:
        predictor = pi.create_predictor(config)
    except Exception as e:   # noqa: BLE001 - paddle raises many types here; retry without the optional engine
        if settings.get("tensorrt"):
            logger.warning("Predictor: TensorRT engine failed (%s: %s); running on the GPU without it",
                           type(e).__name__, e)
            return create_paddle_predictor(prefix, device, threads, onednn, False, precision, gpu_id,
                                           gpu_memory_mb, max_batch_size, input_shapes)
        if settings.get("onednn") and onednn_fc and not program_ops(model_file) & set(ONEDNN_FC_RETRY_BLOCKERS):
            # Swin's window batch trips the fc pass (it flattens [windows, N, C] wrongly); without that one
            # pass the rest of the graph still runs on oneDNN (Swin-T: 1.8x faster than plain kernels)
            logger.info("Predictor: the oneDNN fc pass failed on %s (%s); retrying without it", model_file,
                        str(e).splitlines()[0])
            return create_paddle_predictor(prefix, device, threads, onednn, tensorrt, precision, gpu_id,
                                           gpu_memory_mb, max_batch_size, input_shapes, onednn_fc=False)
        if settings.get("onednn"):
            # a graph that trips other oneDNN passes still runs on plain CPU kernels
            logger.warning("Predictor: the oneDNN passes failed on %s (%s: %s); running without oneDNN", model_file,
                           type(e).__name__, str(e).splitlines()[0])
            return create_paddle_predictor(prefix, device, threads, False, tensorrt, precision, gpu_id,
                                           gpu_memory_mb, max_batch_size, input_shapes)
        raise
    return predictor, settings


def run_paddle_predictor(predictor, inputs):
    """Feed `inputs` (numpy arrays, in the predictor's input order), run, return every output as numpy."""
    names = predictor.get_input_names()
    if len(inputs) != len(names):
        raise ValueError(f"Predictor: the model takes {len(names)} inputs {names}, got {len(inputs)}")
    for name, x in zip(names, inputs):
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(x, dtype=np.float32))
    predictor.run()
    restore_cpu_threads()     # run() leaves the math library on one thread for the rest of the process
    return [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]


# ----------------------------------------------------------------------------- predictors

class _PredictorBase:
    """predict() = preprocess -> run (the engine's part) -> postprocess, from the deploy info."""

    def __init__(self, deploy):
        self.deploy = deploy
        self.task = deploy["task"]
        self.modalities = [i.get("modality") or i["name"] for i in deploy["inputs"]]
        self.class_names = list(deploy.get("class_names") or [f"class_{k}" for k in range(deploy["num_classes"])])
        self.palette = np.asarray(deploy["palette"], np.uint8) if deploy.get("palette") is not None else None
        self.preprocess = Preprocess(self.task, deploy["preprocess"], self.modalities) \
            if self.task in ("segmentation", "classification") else None

    def run(self, inputs):
        """Batched model inputs (numpy, one per input) -> every output as numpy."""
        raise NotImplementedError

    def prediction(self, outputs):
        return outputs[self.deploy["prediction_output"]]

    def predict(self, images, topk=5):
        """One sample end to end. Segmentation: {"label": HxW int64 at the input size, "logits"};
        classification: {"probs": [K], "topk": [(index, name, probability), ...], "logits"}."""
        if self.preprocess is None:
            raise DeployError(f"predict: task {self.task!r} has no post-processing; call run() for the raw outputs")
        inputs = self.preprocess(images)
        logits = self.prediction(self.run(inputs))
        if self.task == "segmentation":
            first = images[self.modalities[0]] if isinstance(images, dict) else images[0]
            size = np.asarray(first).shape[:2]
            return {"label": upsample_argmax(logits, size)[0], "logits": logits[0]}
        probs, order = softmax_topk(logits[0], topk)
        return {"probs": probs, "logits": logits[0],
                "topk": [(int(i), self.class_names[i], float(probs[i])) for i in order]}


class Predictor(_PredictorBase):
    """An exported model (a plfusion-export directory) run by Paddle Inference or onnxruntime.

    engine 'paddle' (default), device 'cpu': oneDNN on (onednn=False turns it off), `threads`
    intra-op threads. device 'gpu': `gpu_id`, and with tensorrt=True a TensorRT engine in
    `precision` 'fp32' or 'fp16' for batches up to `max_batch_size`; without TensorRT in this
    build, plain GPU.
    engine 'onnxruntime': the export's model.onnx (`plfusion-export --onnx`) on the CPU with
    `threads` intra-op threads; needs the `.[onnx]` extra.
    A model exported with a fixed batch runs any batch, in chunks of its batch."""

    def __init__(self, model_dir, device="cpu", threads=None, onednn=True, tensorrt=False, precision="fp32",
                 gpu_id=0, gpu_memory_mb=512, max_batch_size=8, engine="paddle"):
        if engine not in ENGINES:
            raise ValueError(f"Predictor: engine must be one of {list(ENGINES)}, got {engine!r}")
        deploy = load_deploy(model_dir)
        super().__init__(deploy)
        if threads is None:
            threads = (deploy.get("runtime") or {}).get("cpu_threads") or available_cpus()
        shapes = {i["name"]: list(i["shape"]) for i in deploy["inputs"]}
        if engine == "onnxruntime":
            self._init_onnx(model_dir, device, threads, tensorrt, precision)
            return
        prefix = os.path.join(model_dir, os.path.splitext(deploy["model_file"])[0])
        self.predictor, self.settings = create_paddle_predictor(
            prefix, device, threads, onednn, tensorrt, precision, gpu_id, gpu_memory_mb, max_batch_size, shapes)
        self.settings["engine"] = engine
        self.batch = next(iter(shapes.values()))[0]
        names = list(self.predictor.get_input_names())
        if names != list(shapes):
            raise DeployError(f"{model_dir}: the model's inputs are {names} but {DEPLOY_FILE} lists {list(shapes)}")
        n_out = len(self.predictor.get_output_names())
        if n_out != len(deploy["outputs"]):
            raise DeployError(f"{model_dir}: the model has {n_out} outputs but {DEPLOY_FILE} lists "
                              f"{len(deploy['outputs'])}")
        self._run = lambda inputs: run_paddle_predictor(self.predictor, inputs)

    def _init_onnx(self, model_dir, device, threads, tensorrt, precision):
        from .onnx_engine import create_onnx_session, run_onnx_session, session_shapes
        if device != "cpu" or tensorrt or precision != "fp32":
            raise ValueError("Predictor: engine='onnxruntime' runs fp32 on the CPU here; use engine='paddle' for the "
                             "GPU, TensorRT or fp16")
        onnx = self.deploy.get("onnx")
        if not onnx:
            raise DeployError(f"{model_dir}: exported without ONNX; export again with --onnx "
                              f"(plfusion-export --onnx) for engine='onnxruntime'")
        path = os.path.join(model_dir, onnx["model_file"])
        if not os.path.isfile(path):
            raise DeployError(f"{model_dir}: {DEPLOY_FILE} names {onnx['model_file']!r}, which is not there")
        self.session = create_onnx_session(path, threads)
        cpu = configure_cpu(threads)    # paddle's threads for the post-processing
        ins, outs = session_shapes(self.session)
        want = [i["name"] for i in self.deploy["inputs"]]
        if list(ins) != want:
            raise DeployError(f"{path}: the model's inputs are {list(ins)} but {DEPLOY_FILE} lists {want}")
        if len(outs) != len(self.deploy["outputs"]):
            raise DeployError(f"{path}: the model has {len(outs)} outputs but {DEPLOY_FILE} lists "
                              f"{len(self.deploy['outputs'])}")
        self.batch = next(iter(ins.values()))[0]
        self.settings = {"engine": "onnxruntime", "device": "cpu", "threads": threads, "batch": self.batch,
                         "mkl_avx2": cpu["mkl_avx2"]}
        self._run = lambda inputs: run_onnx_session(self.session, inputs)

    def run(self, inputs):
        return run_in_fixed_batches(self._run, inputs, self.batch)


class DygraphPredictor(_PredictorBase):
    """A dygraph model with the pre/post-processing of an export: `deploy` is the dict that
    plfusion.export.deploy_info builds from the config (what the export would write)."""

    def __init__(self, model, deploy):
        super().__init__(deploy)
        self.model = model
        model.eval()

    def run(self, inputs):
        import paddle
        tensors = [paddle.to_tensor(np.ascontiguousarray(x, dtype=np.float32)) for x in inputs]
        with paddle.no_grad():
            out = self.model(tensors if len(tensors) > 1 else tensors[0])
        return [t.numpy() for t in flatten_outputs(out)]


def run_in_fixed_batches(run, inputs, batch):
    """`run` (numpy inputs -> numpy outputs) of a graph whose batch is fixed at `batch`, on inputs of
    any batch: in chunks of `batch`, the last one padded with copies of its last sample (samples
    are independent in these models), outputs cut back. `batch` None or -1: one call as given."""
    n = inputs[0].shape[0]
    if batch is None or batch < 1 or n == batch:
        return run(inputs)
    parts = []
    for start in range(0, n, batch):
        chunk = [x[start:start + batch] for x in inputs]
        k = chunk[0].shape[0]
        if k < batch:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch - k, axis=0)]) for c in chunk]
        parts.append([o[:k] for o in run(chunk)])
    return [np.concatenate(outs) for outs in zip(*parts)]


def flatten_outputs(out):
    """A model's output (a tensor, or nested lists of them) as a flat list, in the exported order."""
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return [out]
