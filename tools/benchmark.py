"""Throughput, latency and memory of a model, engines and settings side by side: see `python tools/benchmark.py -h`.

    python tools/benchmark.py --model vit_base_patch16_224 --engine dygraph inference --tome-r 0 16 \
        --batch-size 8 --threads 2

The logic lives in plfusion.benchmark_cli (also the `plfusion-benchmark` console script).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plfusion.benchmark_cli import main  # noqa: E402,F401  (tests call it)
from plfusion.cli import benchmark_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(benchmark_main())
