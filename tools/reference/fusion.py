"""Reference for TokenFusion / GeminiFusion: the official `WeTr` with seeded random weights.

Run in the scratch torch venv only; nothing here is imported by plfusion. --ref-repo is a checkout
of yikaiw/TokenFusion (its `semantic_segmentation/` folder is used) for `tokenfusion_*` variants,
or of JiaDingCN/GeminiFusion for `geminifusion_*`. Their `models` package is loaded as it is, with
the imports it needs but does not use to build or run the model stubbed: mmcv's ConvModule (given
here as the conv + bn + ReLU it builds for the head, with mmcv's names), the Swin checkpoint
loader and mmdet's logger. WeTr loads `pretrained/<backbone>.pth` in its constructor; a unimodal
checkpoint of the freshly initialised encoder is written to a temporary folder for that.

Every parameter is then perturbed (the per-modality norm copies independently) and, for
TokenFusion, the score nets are pushed so that part of the tokens fall below the 0.02 threshold
and the exchange is exercised. Outputs: [logits_rgb, logits_depth, ensemble].
"""
import importlib.util
import json
import os
import re
import sys
import tempfile
import types

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_timm, parser, perturb_, save_case  # noqa: E402

# variant -> (fusion, official backbone name, our backbone config)
VARIANTS = {
    "tokenfusion_mit_b0": ("tokenfusion", "mit_b0", {"name": "mit_b0"}),
    "geminifusion_mit_b0": ("geminifusion", "mit_b0", {"name": "mit_b0"}),
    "geminifusion_swin_tiny": ("geminifusion", "swin_tiny",
                               {"name": "swin_tiny_patch4_window7_224", "out_indices": [0, 1, 2, 3],
                                "num_classes": 0}),
}
DEFAULT_SIZE = (96, 128)
NUM_CLASSES = 40


class ConvModule(nn.Module):
    """What mmcv's ConvModule(norm_cfg=BN) builds for the SegFormer head: conv (no bias), bn, ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, norm_cfg=None, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=norm_cfg is None)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


def stub_imports():
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    module("mmcv")
    module("mmcv.cnn", ConvModule=ConvModule)
    module("mmcv_custom", load_checkpoint=lambda *args, **kwargs: None)
    module("mmdet")
    module("mmdet.utils", get_root_logger=lambda *args, **kwargs: None)


def import_official(root, fusion):
    models = os.path.join(root, "semantic_segmentation", "models") if fusion == "tokenfusion" else \
        os.path.join(root, "models")
    if not os.path.isfile(os.path.join(models, "segformer.py")):
        raise SystemExit(f"--ref-repo {root}: {models}/segformer.py not found (expected a "
                         f"{'yikaiw/TokenFusion' if fusion == 'tokenfusion' else 'JiaDingCN/GeminiFusion'} checkout)")
    name = f"official_{fusion}_models"
    if name in sys.modules:     # already loaded (a benchmark builds several models in one process)
        return sys.modules[f"{name}.segformer"], sys.modules[f"{name}.mix_transformer"]
    spec = importlib.util.spec_from_file_location(name, os.path.join(models, "__init__.py"),
                                                  submodule_search_locations=[models])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return sys.modules[f"{name}.segformer"], sys.modules[f"{name}.mix_transformer"]


def write_unimodal_checkpoint(folder, encoder, backbone):
    """pretrained/<backbone>.pth with the encoder's weights under unimodal names (what WeTr expands)."""
    sd = {}
    for k, v in encoder.state_dict().items():
        sd[re.sub(r"\.ln_\d+", "", k.replace("module.", ""))] = v.clone()
    sd["head.weight"] = torch.zeros(1000, encoder.embed_dims[-1])
    sd["head.bias"] = torch.zeros(1000)
    os.makedirs(os.path.join(folder, "pretrained"), exist_ok=True)
    torch.save(sd, os.path.join(folder, "pretrained", f"{backbone}.pth"))


def build_wetr(segformer, mix_transformer, fusion, backbone, dpr=0.0):
    """dpr: GeminiFusion's drop path rate (the official TokenFusion MiT fixes its own, 0.1)."""
    if "swin" in backbone:
        return segformer.WeTr(backbone, num_classes=NUM_CLASSES, n_heads=8, dpr=dpr, drop_rate=0.0)
    args = () if fusion == "tokenfusion" else (8, 0.0, 0.0)
    encoder = getattr(mix_transformer, backbone)(*args)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        write_unimodal_checkpoint(tmp, encoder, backbone)
        os.chdir(tmp)
        try:
            if fusion == "tokenfusion":
                return segformer.WeTr(backbone, num_classes=NUM_CLASSES, embedding_dim=256, pretrained=True)
            return segformer.WeTr(backbone, num_classes=NUM_CLASSES, n_heads=8, dpr=dpr, drop_rate=0.0)
        finally:
            os.chdir(cwd)


def build_official(repo, fusion, backbone, dpr=0.0):
    """The official WeTr (fusion 'tokenfusion' or 'geminifusion') from a checkout, freshly initialised."""
    import_timm()
    stub_imports()
    segformer, mix_transformer = import_official(os.path.abspath(repo), fusion)
    return build_wetr(segformer, mix_transformer, fusion, backbone, dpr)


def push_scores_(model, seed):
    """Widen the TokenFusion score nets' weights and centre their output near the 0.02 threshold,
    so a good part of the masks falls below it and the exchange is exercised."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"score_nets\.\d+\.[1357]\.weight$", name):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[1] ** 0.5)
            elif re.search(r"score_nets\.\d+\.7\.bias$", name):
                p.copy_(torch.tensor([-2.0, 2.0]))


def main():
    args = parser(__doc__).parse_args()
    if args.variant not in VARIANTS:
        raise SystemExit(f"unknown --variant {args.variant}; choose from {sorted(VARIANTS)}")
    if not args.ref_repo:
        raise SystemExit("--ref-repo (a yikaiw/TokenFusion or JiaDingCN/GeminiFusion checkout) is required")
    fusion, backbone, ours = VARIANTS[args.variant]
    torch.manual_seed(args.seed)
    model = build_official(args.ref_repo, fusion, backbone).eval()
    perturb_(model, args.seed)
    if fusion == "tokenfusion":
        push_scores_(model, args.seed)
    size = tuple(args.img_size or DEFAULT_SIZE)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = [torch.randn(2, 3, *size, generator=g), torch.randn(2, 3, *size, generator=g)]
    with torch.no_grad():
        outs, masks = model(x)
    if masks is not None:
        below = [float((m < 0.02).float().mean()) for block in masks for m in block]
        print(f"reference: {sum(below) / len(below):.1%} of the token masks are below 0.02 (exchanged)")
    save_case(args.out, model, x, list(outs), "Segmentor", {})
    meta_path = os.path.join(args.out, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["list_input"] = True
    meta["model_cfg"] = {"name": "Segmentor", "architecture": ours,
                         "head": {"name": "SegFormerHead", "num_classes": NUM_CLASSES, "embed_dim": 256},
                         "patches": [{"name": fusion, "num_modalities": 2}]}
    with open(meta_path, "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
