"""Throughput and memory measurement for tools/benchmark.py and the notebooks.

Settings are compared side by side in one process: every timed round runs each setting once, in
a rotating order, so a noisy shared machine slows all settings alike; results are medians.
Paddle's CPU kernels use one thread unless told otherwise, so the thread count is set explicitly
(`set_cpu_threads` lives in plfusion.utils.cpu with the other CPU settings; it is re-exported here).
"""
import math
import resource
import statistics
import sys
import time

from .cpu import available_cpus, set_cpu_threads

__all__ = ["set_cpu_threads", "available_cpus", "measure_throughput", "compare_throughput", "peak_memory",
           "current_rss_mb", "latency_percentiles", "format_table", "print_table"]


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare_throughput(fns, batch, iters=10, warmup=2, baseline=None):
    """Time each callable of `fns` ({label: fn}, fn runs one batch) `iters` times, interleaved.

    Returns {label: {"ips": median images/s, "median_s", "min_s", "times": [...]}}; with a
    `baseline` label also "speedup": the median over rounds of baseline time / this time, which
    cancels load that changes between rounds better than a ratio of medians."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if baseline is not None and baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of the settings {list(fns)}")
    labels = list(fns)
    for _ in range(warmup):
        for label in labels:
            fns[label]()
    times = {label: [] for label in labels}
    for i in range(iters):
        shift = i % len(labels)   # rotate the order so no setting always runs first
        for label in labels[shift:] + labels[:shift]:
            times[label].append(_timed(fns[label]))
    out = {}
    for label, ts in times.items():
        med = statistics.median(ts)
        out[label] = {"ips": batch / med, "median_s": med, "min_s": min(ts), "times": ts}
        if baseline is not None:
            out[label]["speedup"] = statistics.median(b / t for b, t in zip(times[baseline], ts))
    return out


def measure_throughput(fn, batch, iters=10, warmup=2):
    """Images/s of `fn` (one call = one batch of `batch` images): median over `iters` timed calls."""
    return compare_throughput({"fn": fn}, batch, iters, warmup)["fn"]


def latency_percentiles(times, percents=(50, 90, 99)):
    """{"p50": seconds, ...} of per-batch times, linear interpolation between order statistics."""
    if not times:
        raise ValueError("latency_percentiles: no times given")
    ordered = sorted(times)
    out = {}
    for p in percents:
        if not 0 <= p <= 100:
            raise ValueError(f"latency_percentiles: percent must be in [0, 100], got {p}")
        pos = (len(ordered) - 1) * p / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{p:g}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return out


def _status_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb():
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def _paddle_host_stats():
    """paddle's CPU allocator statistics (bytes), or None if this paddle build lacks them."""
    import paddle
    core = paddle.base.core
    return core if hasattr(core, "host_memory_stat_peak_value") else None


def peak_memory(fn):
    """Run fn once and report its memory in MB.

    tensor_peak_mb: peak bytes held by paddle's CPU allocator during the call (weights included),
    from its own counters, reset first. rss_peak_mb: the process's resident high-water mark; on
    Linux it is reset first (writing 5 to /proc/self/clear_refs) so it covers this call
    (rss_scope "call"), elsewhere it is the process-lifetime peak ("process")."""
    core = _paddle_host_stats()
    if core is not None:
        core.host_memory_stat_reset_peak_value("Allocated", 0)
    rss_before = current_rss_mb()
    scope = "process"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        scope = "call"
    except OSError:
        pass
    fn()
    kb = _status_kb("VmHWM") if scope == "call" else None
    if kb is None:
        scope = "process"
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    tensor = core.host_memory_stat_peak_value("Allocated", 0) / 2 ** 20 if core is not None else None
    return {"tensor_peak_mb": tensor, "rss_peak_mb": kb / 1024.0, "rss_before_mb": rss_before, "rss_scope": scope}


def format_table(rows, columns, title=None):
    """Plain-text table: rows are dicts, columns are (key, header, format) triples."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(k) is None else fmt.format(row[k])) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows, columns, title=None, file=None):
    print(format_table(rows, columns, title), file=file or sys.stdout, flush=True)
