"""Reference for MViTv2: timm's `mvitv2_*`, or the official facebookresearch/mvit model with --ref-repo.

Seeded random weights (scratch torch venv only). timm names are ours; the official model's
flat `blocks.N` / `head.projection` names exercise our checkpoint renaming. The official head
applies softmax in eval mode; it is replaced by the identity so that logits are compared.
"""
import importlib.util
import logging
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_timm, parser, perturb_, save_case  # noqa: E402

CONFIGS = {"mvitv2_tiny": "configs/MVITv2_T.yaml", "mvitv2_small": "configs/MVITv2_S.yaml",
           "mvitv2_base": "configs/MVITv2_B.yaml", "mvitv2_large": "configs/test/MVITv2_L_test.yaml"}
# mvit/config/defaults.py values the model reads (the YAML files override MVIT.*)
DEFAULTS = {
    "MODEL": dict(NUM_CLASSES=1000, DROPOUT_RATE=0.0, HEAD_ACT="softmax", ACT_CHECKPOINT=False),
    "MVIT": dict(MODE="conv", POOL_FIRST=False, CLS_EMBED_ON=False, PATCH_KERNEL=[7, 7], PATCH_STRIDE=[4, 4],
                 PATCH_PADDING=[3, 3], EMBED_DIM=96, NUM_HEADS=1, MLP_RATIO=4.0, QKV_BIAS=True, DROPPATH_RATE=0.1,
                 DEPTH=16, DIM_MUL=[], HEAD_MUL=[], POOL_KV_STRIDE=None, POOL_KV_STRIDE_ADAPTIVE=None,
                 POOL_Q_STRIDE=[], POOL_KVQ_KERNEL=(3, 3), ZERO_DECAY_POS_CLS=False, USE_ABS_POS=False,
                 REL_POS_SPATIAL=True, REL_POS_ZERO_INIT=False, RESIDUAL_POOLING=True, DIM_MUL_IN_ATT=True),
}


def official_model(repo, variant, size):
    """Import mvit/models/{common,attention,mvit_model}.py with the training-side modules stubbed."""
    import yaml
    for name in ("mvit", "mvit.utils", "mvit.models"):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(repo, *name.split("."))]
        sys.modules[name] = mod
    stubs = {"mvit.utils.logging": dict(get_logger=logging.getLogger),
             "mvit.utils.misc": dict(validate_checkpoint_wrapper_import=lambda *a: None),
             "mvit.models.build": dict(MODEL_REGISTRY=types.SimpleNamespace(register=lambda: (lambda c: c)))}
    for name, attrs in stubs.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    for name in ("common", "attention", "mvit_model"):
        spec = importlib.util.spec_from_file_location(f"mvit.models.{name}",
                                                      os.path.join(repo, "mvit", "models", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    with open(os.path.join(repo, CONFIGS[variant])) as f:
        overrides = yaml.safe_load(f)
    mvit = {**DEFAULTS["MVIT"], **overrides["MVIT"], "DROPPATH_RATE": 0.0}
    cfg = types.SimpleNamespace(
        DATA=types.SimpleNamespace(TRAIN_CROP_SIZE=size, TEST_CROP_SIZE=size),
        MODEL=types.SimpleNamespace(**DEFAULTS["MODEL"]), MVIT=types.SimpleNamespace(**mvit))
    model = sys.modules["mvit.models.mvit_model"].MViT(cfg)
    model.head.act = torch.nn.Identity()
    return model


def main():
    args = parser(__doc__).parse_args()
    if args.variant not in CONFIGS:
        raise SystemExit(f"unknown --variant {args.variant}; choose from {sorted(CONFIGS)}")
    if args.img_size and args.img_size[0] != args.img_size[1]:
        raise SystemExit("--img-size: the references build square models only")
    size = args.img_size[0] if args.img_size else 224
    torch.manual_seed(args.seed)
    if args.ref_repo:
        model = official_model(args.ref_repo, args.variant, size)
    else:
        timm = import_timm()
        model = timm.create_model(args.variant, pretrained=False, img_size=size)
    model.eval()
    perturb_(model, args.seed)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        y = model(x)
    save_case(args.out, model, x, y, args.variant, {"img_size": [size, size]} if args.img_size else {})


if __name__ == "__main__":
    main()
