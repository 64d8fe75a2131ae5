"""Console scripts `plfusion-export` and `plfusion-benchmark` (setup.py entry points).

The same commands run from a checkout as `python tools/export.py` and `python tools/benchmark.py`.
"""
import sys

__all__ = ["export_main", "benchmark_main"]


def export_main(argv=None):
    """plfusion-export: see plfusion.export (a failed check exits with status 1 and the reason)."""
    from .export import ExportMismatchError, main
    try:
        main(argv)
    except ExportMismatchError as e:
        print(f"error: export check failed: {e}", file=sys.stderr)
        return 1
    return 0


def benchmark_main(argv=None):
    """plfusion-benchmark: see plfusion.benchmark_cli."""
    from .benchmark_cli import main
    main(argv)
    return 0
