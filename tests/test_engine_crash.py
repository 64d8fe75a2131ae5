"""SIGKILL a training process (inside a checkpoint save, and between saves), then `--resume auto`:
the run continues from the last complete checkpoint and ends like an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from plfusion.config import get_config
from plfusion.engine import Trainer
from plfusion.engine.checkpoint import PAUSE_ENV, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = {
    "model": {"name": "Classifier",
              "architecture": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 16,
                               "depth": 1, "num_heads": 2, "num_classes": 0, "qkv_bias": False,
                               "drop_path_rate": 0.1},
              "head": {"name": "LinearClsHead", "in_channels": 16, "num_classes": 4}},
    "dataloader": {
        "train": {"dataset": {"name": "SyntheticImageNet", "num_samples": 24, "image_size": 16, "num_classes": 4,
                              "split": "train", "transforms": [{"name": "RandomHorizontalFlip"}, {"name": "Normalize"},
                                                               {"name": "ToCHW"}]},
                  "sampler": {"batch_size": 8}, "loader": {"num_workers": 0}}},
    "loss": {"name": "CrossEntropyLoss"},
    "optimizer": {"name": "AdamW", "weight_decay": 0.01},
    "lr_scheduler": {"name": "CosineWarmup", "learning_rate": 0.01, "warmup_iters": 2},
    "seed": 7,
    "output_dir": "output/overridden_by_the_test",
    "train": {"log_interval": 1, "eval_interval": 0, "save_interval": 2, "keep_last": 0},
}


def write_cfg(tmp_path, iters):
    path = tmp_path / f"cfg_{iters}.yaml"
    path.write_text(yaml.safe_dump(dict(CFG, iters=iters)))
    return str(path)


def start(cfg_path, output_dir, *extra, pause=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = str(pause)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", cfg_path, "-o", f"output_dir={output_dir}",
           "--threads", "1", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False


def losses(output_dir):
    rows = []
    with open(os.path.join(output_dir, "scalars.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:      # the line being written when the process was killed
                pass
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def reference(tmp_path, iters):
    cfg = get_config(write_cfg(tmp_path, iters), [f"output_dir={tmp_path / 'reference'}"])
    trainer = Trainer(cfg)
    out = trainer.train()
    return dict(out["history"]), {k: v.numpy() for k, v in trainer.net.state_dict().items()}


def assert_matches(output_dir, ref_losses, ref_weights, final):
    got = load_checkpoint(os.path.join(output_dir, "checkpoints", final))
    for k, v in ref_weights.items():
        np.testing.assert_allclose(got["model"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    logged = losses(output_dir)     # both processes appended to it; a step logged twice must agree
    for step, value in ref_losses.items():
        np.testing.assert_allclose(logged[step], value, rtol=1e-5, err_msg=f"step {step}")


def test_kill_inside_a_save_resumes_from_the_previous_complete_checkpoint(tmp_path):
    cfg_path = write_cfg(tmp_path, 6)
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoints")
    proc = start(cfg_path, out, pause=1.0)      # sleeps after each file of a checkpoint
    try:
        half_written = lambda: os.path.exists(os.path.join(ckpt, "iter_0000004.pdparams")) and \
            not os.path.exists(os.path.join(ckpt, "iter_0000004.json"))
        assert wait_for(half_written, proc), proc.stdout.read() if proc.poll() is not None else "timeout"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.load(open(os.path.join(ckpt, "latest.json")))["name"] == "iter_0000002"
    assert not os.path.exists(os.path.join(ckpt, "iter_0000004.json"))
    # a fresh run refuses the directory; --resume auto picks iter_0000002, not the half-written iter_0000004
    refused = start(cfg_path, out)
    assert refused.wait(timeout=120) == 2 and "--resume auto" in refused.stdout.read()
    resumed = start(cfg_path, out, "--resume", "auto")
    text = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, text[-3000:]
    assert "resumed from" in text and "iter_0000002: step 2" in text
    ref_losses, ref_weights = reference(tmp_path, 6)
    assert_matches(out, ref_losses, ref_weights, "iter_0000006")


def test_kill_between_saves_resumes_and_matches(tmp_path):
    iters = 300
    cfg_path = write_cfg(tmp_path, iters)
    out = str(tmp_path / "run")
    proc = start(cfg_path, out)
    try:
        # kill while training, some updates after the checkpoint of step 20
        past = lambda: os.path.exists(os.path.join(out, "scalars.jsonl")) and max(losses(out) or [0]) >= 23
        assert wait_for(past, proc), "training ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(losses(out))
    assert killed_at < iters, "the kill came after training finished"
    resumed = start(cfg_path, out, "--resume", "auto")
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text[-3000:]
    restart_step = int(text.split("resumed from ")[1].split(": step ")[1].split(",")[0])
    assert restart_step % 2 == 0 and 20 <= restart_step <= killed_at
    ref_losses, ref_weights = reference(tmp_path, iters)
    assert_matches(out, ref_losses, ref_weights, f"iter_{iters:07d}")
