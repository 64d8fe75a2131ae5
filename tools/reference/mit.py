"""Reference for MiT: NVlabs/SegFormer's mix_transformer.py with seeded random weights.

Run in the scratch torch venv only; nothing here is imported by plfusion. --ref-repo is a SegFormer
checkout; `mmseg/models/backbones/mix_transformer.py` is loaded on its own, with the three mmseg /
mmcv names it imports stubbed (registry decorator, logger, checkpoint loader: none is used to build
or run the model). The default size is not a multiple of 32, so the odd-grid paths are compared too.
"""
import importlib.util
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_timm, parser, perturb_, save_case  # noqa: E402

VARIANTS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
DEFAULT_SIZE = (230, 199)
REL_PATH = os.path.join("mmseg", "models", "backbones", "mix_transformer.py")


def stub_mm():
    for name in ("mmseg", "mmseg.models", "mmseg.models.builder", "mmseg.utils", "mmcv", "mmcv.runner"):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["mmseg.models.builder"].BACKBONES = types.SimpleNamespace(register_module=lambda: (lambda c: c))
    sys.modules["mmseg.utils"].get_root_logger = None
    sys.modules["mmcv.runner"].load_checkpoint = None


def import_official(repo):
    path = os.path.join(repo, REL_PATH)
    if not os.path.isfile(path):
        raise SystemExit(f"--ref-repo {repo}: {REL_PATH} not found (expected an NVlabs/SegFormer checkout)")
    spec = importlib.util.spec_from_file_location("segformer_mix_transformer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    args = parser(__doc__).parse_args()
    if args.variant not in VARIANTS:
        raise SystemExit(f"unknown --variant {args.variant}; choose from {VARIANTS}")
    if not args.ref_repo:
        raise SystemExit("--ref-repo (an NVlabs/SegFormer checkout) is required")
    import_timm()
    stub_mm()
    mod = import_official(args.ref_repo)
    torch.manual_seed(args.seed)
    model = getattr(mod, args.variant)().eval()
    perturb_(model, args.seed)
    size = tuple(args.img_size or DEFAULT_SIZE)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = model(x)
    save_case(args.out, model, x, list(y), args.variant, {})


if __name__ == "__main__":
    main()
