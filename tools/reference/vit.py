"""Reference for ViT/DeiT: timm's model with seeded random weights (scratch torch venv only)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_timm, parser, perturb_, save_case  # noqa: E402


def main():
    args = parser(__doc__).parse_args()
    timm = import_timm()
    torch.manual_seed(args.seed)
    kwargs = {}
    if args.img_size:
        kwargs["img_size"] = tuple(args.img_size)
    model = timm.create_model(args.variant, pretrained=False, **kwargs).eval()
    perturb_(model, args.seed)
    size = args.img_size or model.default_cfg["input_size"][1:]
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = model(x)
    ours = {"img_size": list(size)} if args.img_size else {}
    save_case(args.out, model, x, y, args.variant, ours)


if __name__ == "__main__":
    main()
