"""Reference for Swin: official, segmentation-backbone or timm Swin with seeded random weights.

Which one is picked by --ref-repo (scratch torch venv only; nothing here is imported by plfusion):
- a microsoft/Swin-Transformer checkout: `models/swin_transformer.py`, the classification model
  (official layout: PatchMerging at the end of each stage, `head`);
- a SwinTransformer/Swin-Transformer-Semantic-Segmentation checkout: the dense backbone
  (`norm0..3`, padding to patch and window multiples), compared on a size that needs padding;
- no --ref-repo: timm's `swin_*` model (timm layout: downsample at the start of the next stage,
  `head.fc`), which exercises our checkpoint renaming.
"""
import importlib.util
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_timm, parser, perturb_, save_case  # noqa: E402

VARIANTS = {  # our name -> (embed_dim, depths, heads, window, img_size)
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_large_patch4_window7_224": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_large_patch4_window12_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}
DENSE_SIZE = (118, 150)   # neither a patch nor a window multiple: exercises every padding path


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def stub_mmseg():
    """Just enough of mmcv_custom / mmseg for the segmentation backbone file to import."""
    for name in ("mmcv_custom", "mmseg", "mmseg.utils", "mmseg.models", "mmseg.models.builder",
                 "mmseg.models.backbones"):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["mmcv_custom"].load_checkpoint = None
    sys.modules["mmseg.utils"].get_root_logger = None
    sys.modules["mmseg.models.builder"].BACKBONES = types.SimpleNamespace(register_module=lambda: (lambda c: c))


def main():
    args = parser(__doc__).parse_args()
    if args.variant not in VARIANTS:
        raise SystemExit(f"unknown --variant {args.variant}; choose from {sorted(VARIANTS)}")
    dim, depths, heads, window, img = VARIANTS[args.variant]
    timm = import_timm()   # the official files import DropPath & co from timm
    torch.manual_seed(args.seed)
    repo = args.ref_repo
    seg_file = repo and os.path.join(repo, "mmseg", "models", "backbones", "swin_transformer.py")
    if seg_file and os.path.isfile(seg_file):
        stub_mmseg()
        mod = load_module(seg_file, "mmseg.models.backbones.swin_transformer")
        model = mod.SwinTransformer(embed_dim=dim, depths=depths, num_heads=heads, window_size=window,
                                    drop_path_rate=0.0, out_indices=(0, 1, 2, 3))
        model.init_weights()
        size = tuple(args.img_size or DENSE_SIZE)
        ours = {"num_classes": 0, "out_indices": [0, 1, 2, 3]}
    elif repo:
        path = os.path.join(repo, "models", "swin_transformer.py")
        if not os.path.isfile(path):
            raise SystemExit(f"--ref-repo {repo}: neither models/swin_transformer.py (microsoft/Swin-Transformer) "
                             f"nor mmseg/models/backbones/swin_transformer.py (segmentation repo) found")
        mod = load_module(path, "official_swin_transformer")
        size = tuple(args.img_size or (img, img))
        model = mod.SwinTransformer(img_size=size, embed_dim=dim, depths=depths, num_heads=heads,
                                    window_size=window, drop_path_rate=0.0)
        ours = {"img_size": list(size)} if args.img_size else {}
    else:
        size = tuple(args.img_size or (img, img))
        kw = {"img_size": size} if args.img_size else {}
        model = timm.create_model(args.variant, pretrained=False, **kw)
        ours = {"img_size": list(size)} if args.img_size else {}
    model.eval()
    perturb_(model, args.seed)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = model(x)
    save_case(args.out, model, x, list(y) if isinstance(y, tuple) else y, args.variant, ours)


if __name__ == "__main__":
    main()
