"""Run logging: the text log, VisualDL scalars, and the timing figures of the training log line.

Rank 0 alone writes files: `<output_dir>/<name>.log` (the text log), `<output_dir>/vdl/`
(VisualDL) and `<output_dir>/scalars.jsonl` (one JSON object per logged step, the same
scalars as VisualDL, easy to read back in scripts and tests). Other ranks log warnings and
errors to the console only.
"""
import datetime
import json
import logging
import os
import sys
import time

__all__ = ["setup_logging", "ScalarWriter", "StepTimer", "format_eta"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handlers = []


def setup_logging(output_dir=None, rank=0, filename="train.log", level=logging.INFO):
    """Log `plfusion.*` to the console (rank 0: INFO, others: WARNING) and, on rank 0, to
    `output_dir/filename` (appended, so a resumed run continues the same file)."""
    root = logging.getLogger("plfusion")
    for h in _handlers:
        root.removeHandler(h)
        h.close()
    _handlers.clear()
    root.setLevel(level)
    root.propagate = False
    fmt = logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    _handlers.append(console)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, filename), encoding="utf-8")
        file_handler.setFormatter(fmt)
        _handlers.append(file_handler)
    for h in _handlers:
        root.addHandler(h)
    return root


def format_eta(seconds):
    seconds = max(int(seconds), 0)
    return str(datetime.timedelta(seconds=seconds))


class ScalarWriter:
    """VisualDL LogWriter under `output_dir/vdl` plus `scalars.jsonl`; inactive on ranks other than 0."""

    def __init__(self, output_dir, active=True):
        self.active = active
        self._vdl = None
        self._jsonl = None
        if not active:
            return
        os.makedirs(output_dir, exist_ok=True)
        from visualdl import LogWriter
        self._vdl = LogWriter(logdir=os.path.join(output_dir, "vdl"))
        path = os.path.join(output_dir, "scalars.jsonl")
        self._jsonl = open(path, "a", encoding="utf-8")
        if self._jsonl.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a killed run left half a line: end it so the next record stays whole
                    self._jsonl.write("\n")

    def add_scalars(self, values, step):
        """Write {tag: number} at `step` (tags like 'train/loss', 'eval/top1')."""
        if not self.active:
            return
        for tag, value in values.items():
            self._vdl.add_scalar(tag=tag, value=float(value), step=int(step))
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()

    def flush(self):
        if self.active:
            self._vdl.flush()
            self._jsonl.flush()

    def close(self):
        if self.active:
            self._vdl.close()
            self._jsonl.close()
            self.active = False


class StepTimer:
    """Averages reader_cost (waiting for data) and batch_cost (a whole update) over a log window,
    and estimates the remaining time from the average batch cost since the run started."""

    def __init__(self, total_steps, start_step=0):
        self.total_steps = total_steps
        self.start_step = start_step
        self.run_start = time.time()
        self.reset()

    def reset(self):
        self.reader = 0.0
        self.batch = 0.0
        self.samples = 0
        self.count = 0

    def update(self, reader_cost, batch_cost, samples):
        self.reader += reader_cost
        self.batch += batch_cost
        self.samples += samples
        self.count += 1

    def summary(self, step):
        n = max(self.count, 1)
        done = max(step - self.start_step, 1)
        eta = (time.time() - self.run_start) / done * max(self.total_steps - step, 0)
        return {"reader_cost": self.reader / n, "batch_cost": self.batch / n,
                "ips": self.samples / self.batch if self.batch > 0 else 0.0, "eta": format_eta(eta)}
