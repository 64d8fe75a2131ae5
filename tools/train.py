"""Train a plfusion model (or evaluate with --eval): see `python tools/train.py -h`.

Several processes: python -m paddle.distributed.launch --nproc_per_node N tools/train.py -c CONFIG
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plfusion.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
