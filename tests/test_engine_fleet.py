"""The real job under fleet: the RGB-D fusion quickstarts (shrunk for time) on two CPU ranks keep
identical parameters and BatchNorm buffers at every save, evaluate to the same mIoU on both ranks,
resume after one rank is killed as if never stopped; two nodes of one process each train exactly
like one node with two; a node that never arrives times out with one line; diverged replicas
stop the save."""
import os
import sys

import numpy as np
import pytest
import yaml

from plfusion.engine.checkpoint import CheckpointManager, load_checkpoint
from plfusion.engine.trainer import DIE_ENV, DIVERGE_ENV
from test_engine_distributed import CFG as CLS_CFG, ROOT, run

TRAIN = os.path.join(ROOT, "tools", "train.py")
SHRINK = ["-o", "dataloader.train.dataset.num_samples=32", "-o", "dataloader.train.dataset.image_size=[32,48]",
          "-o", "dataloader.val.dataset.num_samples=10", "-o", "dataloader.val.dataset.image_size=[32,48]",
          "-o", "dataloader.train.sampler.batch_size=2", "-o", "dataloader.val.sampler.batch_size=4",
          "-o", "iters=6", "-o", "lr_scheduler.max_iters=6", "-o", "lr_scheduler.warmup_iters=2",
          "-o", "train.save_interval=2", "-o", "train.eval_interval=2", "-o", "train.keep_last=0",
          "-o", "eval.save_predictions=0", "-o", "train.log_interval=1", "--threads", "1"]


def launch(tmp_path, args, log, env=None, timeout=300, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "plfusion.launch", *extra, "--nproc_per_node", str(nproc),
           "--log_dir", str(tmp_path / log), TRAIN, *args]
    if env:
        os.environ.update(env)
    try:
        res = run(cmd, tmp_path, timeout=timeout)
    finally:
        for k in env or {}:
            os.environ.pop(k, None)
    logs = {p.name: p.read_text() for p in (tmp_path / log).glob("workerlog.*")} if (tmp_path / log).is_dir() else {}
    return res, logs


def _explain(res, logs):
    return res.stdout[-2000:] + res.stderr[-2000:] + "".join(v[-2500:] for v in logs.values())


def _checkpoints(out):
    return [load_checkpoint(p) for _, p in CheckpointManager(out).complete()]


def _assert_ranks_agree(ckpts, bn_key):
    assert ckpts
    for ck in ckpts:
        state = ck["state"]
        assert state["world_size"] == 2
        d = state["rank_weight_digests"]
        assert len(d) == 2 and d[0] == d[1], state["name"]           # parameters and buffers identical
        m = state["rank_metrics"]
        assert m[0] == m[1] and "miou" in m[0], state["name"]        # both ranks evaluated to the same mIoU
        assert bn_key in ck["model"]


def test_geminifusion_two_ranks_agree_at_every_save_and_resume_after_a_kill(tmp_path):
    cfg = os.path.join(ROOT, "configs", "quickstart", "geminifusion_mit_b0_synthetic.yaml")
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    res, logs = launch(tmp_path, ["-c", cfg, *SHRINK, "-o", f"output_dir={ref}"], "log_ref")
    assert res.returncode == 0, _explain(res, logs)
    assert "running statistics are averaged over the ranks" in logs["workerlog.0"]
    ckpts = _checkpoints(ref)
    assert [c["state"]["global_step"] for c in ckpts] == [2, 4, 6]
    _assert_ranks_agree(ckpts, "head.linear_fuse.bn._mean")

    res, logs = launch(tmp_path, ["-c", cfg, *SHRINK, "-o", f"output_dir={killed}"], "log_kill", env={DIE_ENV: "1:5"})
    assert res.returncode != 0, _explain(res, logs)       # rank 1 died before update 5, after the step-4 save
    assert [c["state"]["global_step"] for c in _checkpoints(killed)] == [2, 4]
    res, logs = launch(tmp_path, ["-c", cfg, *SHRINK, "-o", f"output_dir={killed}", "--resume", "auto"], "log_resume")
    assert res.returncode == 0, _explain(res, logs)
    assert "resumed from" in logs["workerlog.0"] and "iter_0000004" in logs["workerlog.0"]
    resumed = _checkpoints(killed)
    _assert_ranks_agree(resumed, "head.linear_fuse.bn._mean")
    a, b = resumed[-1], ckpts[-1]
    assert a["state"]["global_step"] == b["state"]["global_step"] == 6
    for k in b["model"]:       # the resumed run ends where the uninterrupted one did
        np.testing.assert_allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert a["state"]["metrics"]["miou"] == pytest.approx(b["state"]["metrics"]["miou"], abs=1e-3)


def _two_nodes(tmp_path, args, name, timeout=300):
    """Two launchers on this host, one process each, meeting at one master port."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PADDLE_TRAINERS_NUM", None)
    procs = [subprocess.Popen([sys.executable, "-m", "plfusion.launch", "--rendezvous-timeout", "120", "--nnodes", "2",
                               "--master", f"127.0.0.1:{port}", "--nproc_per_node", "1", "--log_dir",
                               str(tmp_path / f"{name}_node{n}"), TRAIN, *args],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in range(2)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    logs = {f"node{n}": "".join(f.read_text() for f in (tmp_path / f"{name}_node{n}").glob("workerlog.*"))
            for n in range(2)}
    return [p.returncode for p in procs], "".join(o[-2000:] for o in outs) + "".join(v[-2500:] for v in logs.values())


def test_two_nodes_train_exactly_like_one_node_with_two_processes(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CLS_CFG))
    one, two = str(tmp_path / "one_node"), str(tmp_path / "two_nodes")
    res, logs = launch(tmp_path, ["-c", str(cfg), "-o", f"output_dir={one}", "--max-steps", "5"], "log_one")
    assert res.returncode == 0, _explain(res, logs)
    codes, text = _two_nodes(tmp_path, ["-c", str(cfg), "-o", f"output_dir={two}", "--max-steps", "5"], "cls")
    assert codes == [0, 0], text
    a = load_checkpoint(os.path.join(one, "checkpoints", "iter_0000005"))
    b = load_checkpoint(os.path.join(two, "checkpoints", "iter_0000005"))
    assert a["state"]["rank_weight_digests"] == b["state"]["rank_weight_digests"]
    for k in a["model"]:
        np.testing.assert_array_equal(a["model"][k], b["model"][k], err_msg=k)


def test_tokenfusion_on_two_nodes(tmp_path):
    cfg = os.path.join(ROOT, "configs", "quickstart", "tokenfusion_mit_b0_synthetic.yaml")
    out = str(tmp_path / "tf")
    codes, text = _two_nodes(tmp_path, ["-c", cfg, *SHRINK, "-o", f"output_dir={out}", "-o", "iters=4",
                                        "-o", "lr_scheduler.max_iters=4"], "tf")
    assert codes == [0, 0], text
    ckpts = _checkpoints(out)
    assert [c["state"]["global_step"] for c in ckpts] == [2, 4]
    _assert_ranks_agree(ckpts, "head.linear_fuse.bn._variance")


def test_a_node_that_never_arrives_times_out_with_one_line(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CLS_CFG))
    res = run([sys.executable, "-m", "plfusion.launch", "--rendezvous-timeout", "5", "--nnodes", "2", "--master",
               "127.0.0.1:1", "--nproc_per_node", "1", "--log_dir", str(tmp_path / "log"), TRAIN, "-c", str(cfg),
               "-o", f"output_dir={tmp_path / 'out'}"], tmp_path, timeout=60)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no training process joined within 5 s") and "--nnodes 2" in last, last


def test_diverged_replicas_stop_the_save_naming_the_tensor(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dict(CLS_CFG, train={"log_interval": 1, "eval_interval": 0, "save_interval": 2})))
    out = str(tmp_path / "run")
    res, logs = launch(tmp_path, ["-c", str(cfg), "-o", f"output_dir={out}"], "log", env={DIVERGE_ENV: "1:3"},
                       timeout=150)
    assert res.returncode != 0, _explain(res, logs)
    text = "".join(logs.values())
    assert "ranks hold different weights at step 4: 1 tensor(s) of rank(s) [1] differ from rank 0" in text, text[-3000:]
    # the step-2 checkpoint stays the last one; nothing was written at step 4
    assert [c["state"]["global_step"] for c in _checkpoints(out)] == [2]
