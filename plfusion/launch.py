"""`python -m plfusion.launch` (`plfusion-launch`): paddle.distributed.launch with a rendezvous timeout.

    python -m plfusion.launch [--rendezvous-timeout 600] --nnodes 2 --master 10.0.0.1:8090 --nproc_per_node 8 \\
        tools/train.py -c CONFIG

Every argument except `--rendezvous-timeout` goes to `python -m paddle.distributed.launch`
unchanged. Paddle's launcher waits for the other nodes for ever; this wrapper gives up when
no training process has joined within the timeout (a node that never started, a wrong
`--master`, a firewall), stops the launcher and says so in one line, with exit status 2.
Once the processes have joined it only waits for the launcher and returns its exit status.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

from .engine.distributed import READY_ENV

__all__ = ["main"]

DEFAULT_TIMEOUT = 600.0


def _option(argv, name):
    """Value of `--name VALUE` or `--name=VALUE` in argv, or None."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _pop_timeout(argv):
    value = _option(argv, "--rendezvous-timeout")
    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--rendezvous-timeout":
            skip = True
            continue
        if arg.startswith("--rendezvous-timeout="):
            continue
        rest.append(arg)
    if value is None:
        return DEFAULT_TIMEOUT, rest
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if timeout <= 0:
        raise SystemExit(f"error: --rendezvous-timeout: expected a positive number of seconds, got {value!r}")
    return timeout, rest


def _stop(proc):
    """Stop the launcher and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    timeout, args = _pop_timeout(argv)
    fd, ready = tempfile.mkstemp(prefix="plfusion-launch-ready-")
    os.close(fd)
    env = dict(os.environ, **{READY_ENV: ready})
    proc = subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch", *args], env=env,
                            start_new_session=True)

    def forward(signum, _frame):
        _stop(proc)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.time() + timeout
        while proc.poll() is None:
            if os.path.getsize(ready) > 0:     # the processes joined: the launcher takes it from here
                return proc.wait()
            if time.time() > deadline:
                _stop(proc)
                nnodes, master = _option(args, "--nnodes") or "1", _option(args, "--master") or "(launcher's own)"
                print(f"error: no training process joined within {timeout:g} s (--rendezvous-timeout): the launcher "
                      f"was still waiting for its peers (--nnodes {nnodes}, --master {master}). Start the same "
                      f"command on every node with the same --master and --nnodes, check that each node reaches the "
                      f"master's address and port, or raise --rendezvous-timeout", file=sys.stderr, flush=True)
                return 2
            time.sleep(0.5)
        return proc.returncode
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        os.remove(ready)


if __name__ == "__main__":
    sys.exit(main())
