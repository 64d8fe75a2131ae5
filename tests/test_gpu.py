"""Checks that need a GPU (every test here is marked `gpu`; `make test-gpu` runs them): AMP O1/O2
train steps against float32, SyncBatchNorm on two GPU processes, the GPU predictor against
dygraph, the TensorRT fallbacks, `--device gpu` / a hidden GPU on the command line, and the
environment report's GPU self-check. Where Paddle cannot use a GPU, conftest skips them, naming why."""
import logging
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from plfusion import inference
from plfusion.config import get_config
from plfusion.engine import Trainer
from plfusion.engine.checkpoint import load_checkpoint
from plfusion.export import export_model
from plfusion.inference import Predictor, flatten_outputs
from plfusion.models import build_model
from plfusion.paddle_check import DeviceError, gpu_status
from test_engine_train import make_cfg

pytestmark = pytest.mark.gpu

TRAIN = os.path.join(ROOT, "tools", "train.py")
# Momentum, not AdamW: Adam turns the float noise of near-zero gradients into full-size steps,
# which would make float32 and AMP runs drift apart for reasons that are not AMP's.
MOMENTUM = {"name": "Momentum", "momentum": 0.9, "weight_decay": 1e-4, "grad_clip": {"max_norm": 1.0}}
from test_inference import SEG_CONFIG  # noqa: E402  (the tiny GeminiFusion segmentor)



@pytest.fixture
def on_gpu():
    previous = paddle.device.get_device()
    paddle.set_device("gpu")
    yield
    paddle.set_device(previous)


def run(cmd, cwd, env=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    env.pop("PADDLE_TRAINERS_NUM", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _train_losses(tmp_path, name, amp=None):
    changes = {"iters": 4, "replace": {"optimizer": MOMENTUM}, "train": {"eval_interval": 0, "save_interval": 0}}
    if amp is not None:
        changes["amp"] = amp
    cfg, _ = make_cfg(tmp_path, name, **changes)
    trainer = Trainer(cfg)
    return trainer, [loss for _, loss in trainer.train()["history"]]


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_train_steps_stay_finite_and_match_float32(tmp_path, on_gpu, level):
    _, fp32 = _train_losses(tmp_path, "fp32")
    trainer, amp = _train_losses(tmp_path, f"amp_{level}", {"enable": True, "level": level, "dtype": "float16"})
    assert trainer.amp_enabled and trainer.amp_level == level and trainer.scaler is not None
    assert len(amp) == len(fp32) == 4 and np.isfinite(amp).all()
    # the first loss is the same weights on the same batch: only float16 rounding differs; later ones
    # also carry the updates (and a step the loss scaler may skip on overflow)
    assert amp[0] == pytest.approx(fp32[0], rel=1e-2)
    np.testing.assert_allclose(amp, fp32, rtol=5e-2)
    if level == "O2":
        assert any(p.dtype == paddle.float16 for p in trainer.net.parameters())


def test_sync_batchnorm_on_two_gpu_processes(tmp_path):
    _, count = gpu_status()
    if count < 2:
        pytest.skip(f"SyncBatchNorm over NCCL needs 2 GPUs, one per process; this Paddle sees {count}")
    out, log = tmp_path / "run", tmp_path / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log), TRAIN,
           "-c", os.path.join(ROOT, "configs", "quickstart", "geminifusion_mit_b0_synthetic.yaml"),
           "-o", "+model.sync_bn=true", "-o", f"output_dir={out}", "-o", "dataloader.train.dataset.num_samples=32",
           "-o", "dataloader.val.dataset.num_samples=8", "-o", "eval.save_predictions=0", "--max-steps", "3",
           "--device", "gpu"]
    res = run(cmd, tmp_path)
    logs = {r: (log / f"workerlog.{r}").read_text() for r in (0, 1) if (log / f"workerlog.{r}").exists()}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + "".join(v[-3000:] for v in logs.values())
    assert "use SyncBatchNorm" in logs[0] and "device gpu" in logs[0]
    ckpt = load_checkpoint(os.path.join(out, "checkpoints", "iter_0000003"))
    digests = ckpt["state"]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]      # weights and SyncBN statistics agree


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A GeminiFusion MiT-B0 segmentor exported on the CPU (where the export's own check runs in
    exact float32), with float32 CPU dygraph outputs on a fixed batch as the reference."""
    tmp = tmp_path_factory.mktemp("gpu_export")
    (tmp / "gf.yaml").write_text(SEG_CONFIG)
    cfg = get_config(str(tmp / "gf.yaml"))
    previous = paddle.device.get_device()
    paddle.set_device("cpu")
    try:
        paddle.seed(1)
        model = build_model(cfg.model)
        export_model(model, str(tmp / "export"), cfg)
        xs = [np.random.default_rng(5).standard_normal([2, 3, 64, 64]).astype(np.float32) for _ in range(2)]
        with paddle.no_grad():
            expected = [t.numpy() for t in flatten_outputs(model([paddle.to_tensor(x) for x in xs]))]
    finally:
        paddle.set_device(previous)
    return {"model_dir": str(tmp / "export"), "xs": xs, "expected": expected}


def test_gpu_predictor_matches_dygraph(exported):
    pred = Predictor(exported["model_dir"], device="gpu")
    assert pred.settings["device"] == "gpu" and pred.settings["tensorrt"] is False
    got = pred.run(exported["xs"])
    assert len(got) == len(exported["expected"])
    # Paddle computes float32 matmuls in TF32 on Ampere and newer GPUs: about 1e-3 relative
    for a, b in zip(got, exported["expected"]):
        np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)
    with pytest.raises(DeviceError, match="GPU 99 does not exist"):
        Predictor(exported["model_dir"], device="gpu", gpu_id=99)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_tensorrt_missing_falls_back_to_the_plain_gpu(exported, monkeypatch, caplog):
    monkeypatch.setattr(inference, "tensorrt_available", lambda: False)
    logging.getLogger("plfusion").addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="plfusion"):
        trt = Predictor(exported["model_dir"], device="gpu", tensorrt=True)
    assert trt.settings["tensorrt"] is False
    assert any("TensorRT is not available" in m for m in _warnings(caplog))
    plain = Predictor(exported["model_dir"], device="gpu")
    for a, b in zip(trt.run(exported["xs"]), plain.run(exported["xs"])):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_a_failing_tensorrt_engine_falls_back_to_the_plain_gpu(exported, monkeypatch, caplog):
    import paddle.inference as pi
    real, calls = pi.create_predictor, []

    def first_call_fails(config):   # the TensorRT attempt fails as an engine build would; the retry runs
        calls.append(config)
        if len(calls) == 1:
            raise RuntimeError("simulated TensorRT engine build failure")
        return real(config)

    monkeypatch.setattr(inference, "tensorrt_available", lambda: True)
    monkeypatch.setattr(pi, "create_predictor", first_call_fails)
    logging.getLogger("plfusion").addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="plfusion"):
        trt = Predictor(exported["model_dir"], device="gpu", tensorrt=True, max_batch_size=2)
    assert len(calls) == 2 and trt.settings["tensorrt"] is False
    assert any("TensorRT engine failed" in m and "simulated" in m for m in _warnings(caplog))
    for a, b in zip(trt.run(exported["xs"]), exported["expected"]):
        np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)


def test_train_cli_runs_on_the_gpu_and_a_hidden_gpu_is_one_error(tmp_path):
    _, cfg_path = make_cfg(tmp_path, "cli", iters=2, train={"eval_interval": 0, "save_interval": 0})
    ok = run([sys.executable, TRAIN, "-c", cfg_path, "--device", "gpu", "--max-steps", "1"], tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "device: gpu:0" in ok.stdout + ok.stderr
    hidden = run([sys.executable, TRAIN, "-c", cfg_path, "-o", f"output_dir={tmp_path / 'hidden'}", "--device", "gpu"],
                 tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    lines = [line for line in hidden.stderr.splitlines() if line.strip()]
    assert hidden.returncode == 2, hidden.stdout[-3000:] + hidden.stderr[-3000:]
    assert lines[-1].startswith("error: --device gpu: ") and "build but sees no GPU" in lines[-1]
    assert not any(line.startswith("Traceback") for line in lines)


def test_env_report_self_check_passes_on_every_gpu_with_amp():
    from plfusion.env import collect
    report = collect()
    _, count = gpu_status()
    assert report["paddle_build"]["cuda"] and len(report["devices"]["gpus"]) == count
    names = [r["name"] for r in report["self_check"]]
    assert names[0] == "cpu" and f"gpu:{count - 1} AMP O1 float16" in names
    assert all(r["ok"] for r in report["self_check"]), report["self_check"]
