"""Export a model as a checked Paddle inference model with its deploy.yaml: see `python tools/export.py -h`.

    python tools/export.py -c configs/geminifusion/nyudv2_mit_b3.yaml --pretrained run/ --out out/gf_b3
    python tools/export.py --model vit_base_patch16_224 [--pretrained w.safetensors] --tome-r 16 --out out/vit_b_r16

The logic lives in plfusion.export (also the `plfusion-export` console script).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plfusion.export import ExportMismatchError, main, verify_export  # noqa: E402,F401  (tests use both)
from plfusion.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
