"""Reference for T2T-ViT: the official yitu-opensource/T2T-ViT model with seeded random weights.

Run in the scratch torch venv only; nothing here is imported by plfusion. --ref-repo is a checkout
of the official repo: its `models/t2t_vit.py` (+ token_performer / token_transformer /
transformer_block) is imported as a package without running `models/__init__.py`, so only the
timm names those files use need to import.
"""
import importlib
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_timm, parser, perturb_, save_case  # noqa: E402

VARIANTS = ("t2t_vit_14", "t2t_vit_19", "t2t_vit_24", "t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24")


def import_official(repo):
    models = os.path.join(repo, "models")
    if not os.path.isfile(os.path.join(models, "t2t_vit.py")):
        raise SystemExit(f"--ref-repo {repo}: models/t2t_vit.py not found "
                         f"(expected a yitu-opensource/T2T-ViT checkout)")
    pkg = types.ModuleType("t2t_official")
    pkg.__path__ = [models]  # a package over models/ whose __init__ is never executed
    sys.modules["t2t_official"] = pkg
    return importlib.import_module("t2t_official.t2t_vit")


def main():
    args = parser(__doc__).parse_args()
    if args.variant not in VARIANTS:
        raise SystemExit(f"unknown --variant {args.variant}; choose from {VARIANTS}")
    if not args.ref_repo:
        raise SystemExit("--ref-repo (a yitu-opensource/T2T-ViT checkout) is required")
    size = tuple(args.img_size or (224, 224))
    if size[0] != size[1]:
        raise SystemExit(f"--img-size {size}: the official T2T module reshapes tokens to a square grid")
    import_timm()
    mod = import_official(args.ref_repo)
    torch.manual_seed(args.seed)
    model = getattr(mod, args.variant)(img_size=size[0]).eval()
    perturb_(model, args.seed)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = model(x)
    ours = {"img_size": size[0]} if args.img_size else {}
    save_case(args.out, model, x, y, args.variant, ours)


if __name__ == "__main__":
    main()
