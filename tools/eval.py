"""Evaluate a plfusion checkpoint (--resume) or weights file (--pretrained): see `python tools/eval.py -h`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plfusion.engine.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main())
