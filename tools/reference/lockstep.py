"""Lockstep timing of plfusion against a PyTorch worker process, batch by batch (dev tool).

Imports neither paddle nor torch, so both venvs share it:

- worker side (torch venv): `serve(settings, info, warmup)` times one batch per stdin line naming a
  setting; it prints `ready <JSON: {"labels": [...], **info}>` first, then one time in seconds per
  request. `claim_stdout()` keeps stdout for that protocol and sends every other print to stderr.
- driver side (plfusion venv): `Worker(cmd)` starts such a process; `lockstep(ours, worker, ...)`
  times every setting of both sides once per round, in a rotating order, one process at a time
  after a short idle gap, so each pair of settings sees the same machine load; `speed_ratio`
  is the median over rounds of the per-round ratio.
"""
import json
import os
import statistics
import subprocess
import sys
import time


# ----------------------------------------------------------------------------- worker side

def claim_stdout():
    """A line-buffered handle on the real stdout; fd 1 and sys.stdout then point at stderr, so
    prints of the code being timed (also from C) cannot break the protocol."""
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def serve(settings, info=None, warmup=1, out=None):
    """settings: label -> callable running one batch. Warms up, announces, then answers stdin."""
    out = out or sys.stdout
    for _ in range(warmup):
        for fn in settings.values():
            fn()
    out.write("ready " + json.dumps({"labels": list(settings), **(info or {})}) + "\n")
    out.flush()
    for line in sys.stdin:
        label = line.strip()
        if label not in settings:
            out.write(f"error unknown setting {label!r}; known: {list(settings)}\n")
        else:
            start = time.perf_counter()
            settings[label]()
            out.write(f"{time.perf_counter() - start:.6f}\n")
        out.flush()


# ----------------------------------------------------------------------------- driver side

class Worker:
    """A serving process (see `serve`); `run(label)` returns its time for one batch in seconds."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.close()
            raise RuntimeError(f"{' '.join(cmd[:2])} did not start (exit code {self.proc.returncode}); "
                               f"it said {line!r} (its stderr is above)")
        self.info = json.loads(line[len("ready "):])
        self.labels = list(self.info.pop("labels"))

    def run(self, label):
        self.proc.stdin.write(label + "\n")
        reply = self.proc.stdout.readline().strip()
        try:
            return float(reply)
        except ValueError:
            raise RuntimeError(f"worker answered {reply!r} to {label!r}") from None

    def close(self):
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def lockstep(ours, worker, rounds, warmup=1, gap=0.5, group=None, theirs=None):
    """Time ours (label -> callable) and every worker setting `rounds` times in rotating order.

    `group` (label -> sort key) orders the settings before rotating, e.g. so that the two sides of
    one comparison run back to back and see nearly the same load.
    `gap` seconds of idle precede each timed batch: OpenMP threads of the side that ran last spin
    for up to 200 ms after their work and would slow the other side.
    `theirs` limits the worker's settings to these labels.
    Returns ({label: [seconds per round]}, (load average before, after))."""
    for _ in range(warmup):     # the worker warmed up before announcing itself
        for fn in ours.values():
            fn()
    settings = [(label, False) for label in ours] + [(label, True) for label in worker.labels
                                                     if theirs is None or label in theirs]
    if group:
        settings.sort(key=lambda s: group(s[0]))     # stable: ours before theirs within a group
    times = {label: [] for label, _ in settings}
    load_before = os.getloadavg()[0]
    for i in range(rounds):
        shift = i % len(settings)
        for label, theirs in settings[shift:] + settings[:shift]:
            time.sleep(gap)
            if theirs:
                times[label].append(worker.run(label))
            else:
                start = time.perf_counter()
                ours[label]()
                times[label].append(time.perf_counter() - start)
    return times, (load_before, os.getloadavg()[0])


def speed_ratio(times, a, b):
    """How many times faster a is than b: median over rounds of time_b / time_a."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))
