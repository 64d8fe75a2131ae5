"""Console scripts `plfusion-export` and `plfusion-benchmark` (setup.py entry points).

The same commands run from a checkout as `python tools/export.py` and `python tools/benchmark.py`.
Exit status: 0 on success, 1 when the exported model fails its check against dygraph or cannot be
converted to ONNX, 2 for bad input (a config, file or argument that cannot be used, or a missing
optional package; the message names it).
"""
import sys

__all__ = ["export_main", "benchmark_main", "user_errors", "run_cli"]


def user_errors():
    """The exception types that mean bad input rather than a bug: printed as `error: ...`, exit status 2."""
    from .inference import DeployError
    from .onnx_engine import MissingPackageError
    from .registry import ConfigError
    return (ConfigError, DeployError, MissingPackageError, ValueError, TypeError, KeyError, FileNotFoundError)


def run_cli(main, argv=None):
    """Run a tool's main(argv), reporting bad input as `error: ...` with exit status 2."""
    try:
        main(argv)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def export_main(argv=None):
    """plfusion-export: see plfusion.export."""
    from .export import ExportMismatchError, main
    from .onnx_export import OnnxExportError
    try:
        main(argv)
    except ExportMismatchError as e:
        print(f"error: export check failed: {e}", file=sys.stderr)
        return 1
    except OnnxExportError as e:
        print(f"error: ONNX export failed: {e}", file=sys.stderr)
        return 1
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def benchmark_main(argv=None):
    """plfusion-benchmark: see plfusion.benchmark_cli."""
    from .benchmark_cli import main
    from .onnx_export import OnnxExportError
    try:
        return run_cli(main, argv)
    except OnnxExportError as e:
        print(f"error: ONNX export failed: {e}", file=sys.stderr)
        return 1
