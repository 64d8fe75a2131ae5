"""Training failures end the run and leave the last good checkpoint untouched: a rank that dies
in a two-process (gloo) run stops the whole launch with an error naming it, and a NaN loss in a
resumed run leaves the checkpoint it resumed from byte-identical."""
import glob
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import yaml

from plfusion.engine import Trainer, TrainingDiverged
from plfusion.engine.checkpoint import load_checkpoint
from plfusion.engine.trainer import DIE_ENV
from test_engine_distributed import CFG as DIST_CFG, ROOT, run
from test_engine_train import make_cfg


def _digests(directory):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(directory, "*")))}


def test_a_dead_rank_stops_the_launch_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(DIST_CFG, train={"log_interval": 1, "eval_interval": 0,
                                                              "save_interval": 2, "keep_last": 0})))
    out = str(tmp_path / "run")
    monkeypatch.setenv(DIE_ENV, "1:5")     # rank 1 vanishes before update 5; iter_0000004 is on disk
    launch = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
              str(tmp_path / "log"), os.path.join(ROOT, "tools", "train.py"), "-c", str(cfg_path),
              "-o", f"output_dir={out}", "--threads", "1"]
    # the timeout only guards against a hang: the launcher stops rank 0 as soon as rank 1 is gone
    res = run(launch, tmp_path, timeout=150)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    assert "Container rank 1 status failed" in text and "code 3" in text, text[-3000:]
    rank0 = (tmp_path / "log" / "workerlog.0").read_text()
    assert "step 4/8" in rank0 and "step 5/8" not in rank0      # rank 0 never finished the update without rank 1

    ckpt = os.path.join(out, "checkpoints")
    assert json.load(open(os.path.join(ckpt, "latest.json")))["name"] == "iter_0000004"
    assert sorted(_digests(ckpt)) == ["iter_0000002.json", "iter_0000002.pdopt", "iter_0000002.pdparams",
                                      "iter_0000004.json", "iter_0000004.pdopt", "iter_0000004.pdparams",
                                      "latest.json"]                     # no half-written temporary files
    last = load_checkpoint(os.path.join(ckpt, "iter_0000004"))
    assert last["state"]["global_step"] == 4 and last["state"]["world_size"] == 2
    assert all(np.isfinite(v).all() for v in last["model"].values())


def test_nan_after_resume_leaves_the_resumed_checkpoint_byte_identical(tmp_path):
    cfg, _ = make_cfg(tmp_path, "nan", iters=None, epochs=3,
                      dataloader={"train": {"dataset": {"name": "EngineTestPoisoned", "bad_epoch": 1}}},
                      train={"eval_interval": 0, "save_interval": 1})
    del cfg["iters"]
    Trainer(cfg).train(max_steps=4)                       # epoch 1 of clean data, saved as epoch_1
    ckpt = os.path.join(cfg.output_dir, "checkpoints")
    before = _digests(ckpt)
    assert "epoch_1.pdparams" in before
    with pytest.raises(TrainingDiverged, match=r"at step 5 .*epoch_1"):
        Trainer(cfg).train(resume="auto")
    assert _digests(ckpt) == before
