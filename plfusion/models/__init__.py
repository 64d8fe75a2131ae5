"""Model zoo: build backbones, heads and whole models from YAML or by name."""
import copy
import logging

from ..registry import BACKBONES, HEADS, MODELS, PATCHES, ConfigError, add_context, check_kwargs, did_you_mean
from . import vision_transformer  # noqa: F401  (registers ViT / DeiT)
from . import t2t_vit  # noqa: F401  (registers T2T-ViT)
from . import mix_transformer  # noqa: F401  (registers MiT)
from . import swin_transformer, mvitv2  # noqa: F401  (registers Swin / MViTv2)
from . import heads, classifier  # noqa: F401
from . import segmentor  # noqa: F401  (registers Segmentor)
from .pretrained import load_pretrained

logger = logging.getLogger(__name__)

__all__ = ["build_backbone", "build_head", "build_model", "create_model", "list_models", "load_pretrained",
           "apply_patches"]


def _split_pretrained(cfg):
    if not hasattr(cfg, "items"):
        raise ConfigError(f"model.architecture: expected a mapping with a 'name' key, got {cfg!r}")
    cfg = dict(copy.deepcopy(cfg))
    return cfg, cfg.pop("pretrained", None)


def _load_configured(model, pretrained, where):
    """`pretrained: path` from a config: load it, naming the key in any error."""
    if pretrained is None or pretrained is False or pretrained == "":
        return
    if not isinstance(pretrained, str):
        raise ConfigError(f"{where}: expected the path of a checkpoint file, got {pretrained!r} "
                          f"(plfusion never downloads weights)")
    try:
        model.load_pretrained(pretrained)
    except (ValueError, TypeError, OSError) as e:
        raise add_context(e, where)


def build_backbone(cfg):
    """Backbone from `model.architecture` ({name: ..., **kwargs}); `pretrained: path` loads weights."""
    cfg, pretrained = _split_pretrained(cfg)
    if cfg.get("name") in BACKBONES:   # unknown keys, with `pretrained` among the suggestions
        check_kwargs(BACKBONES.get(cfg["name"]), {k: v for k, v in cfg.items() if k != "name"},
                     "model.architecture", also=("pretrained",))
    model = BACKBONES.build(cfg, where="model.architecture")
    _load_configured(model, pretrained, "model.architecture.pretrained")
    return model


def build_head(cfg):
    return HEADS.build(cfg, where="model.head")


def apply_patches(model, patches, where="model.patches"):
    """Apply `[{name: tome, r: 16}, ...]` in order; each entry's other keys go to its apply_patch."""
    if patches is None:
        return model
    if not isinstance(patches, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of {{name: ...}} entries, got {patches!r}")
    from .. import patches as _patches  # noqa: F401  (registers patches)
    for i, p in enumerate(patches):
        p = dict(p) if hasattr(p, "items") else {"name": p}
        name = p.pop("name", None)
        try:
            fn = PATCHES.get(name)
        except KeyError as e:
            raise ConfigError(f"{where}[{i}].name: {e.args[0]}") from None
        check_kwargs(fn, p, f"{where}[{i}]")
        try:
            fn(model, **p)
        except (ValueError, TypeError, RuntimeError) as e:
            raise add_context(e, f"{where}[{i}] ({name})")
    return model


def build_model(cfg):
    """Whole model from the `model` section.

    `name` picks a MODELS entry (default Classifier); `architecture`/`head` configure it;
    `architecture.pretrained` loads backbone weights before patches, `patches` are applied in
    order, then `pretrained` loads whole-model weights. `sync_bn` is read by the trainer
    (SyncBatchNorm across GPU processes) and ignored here.
    """
    if not hasattr(cfg, "items"):
        raise ConfigError(f"model: expected a mapping with 'architecture' (and 'name', 'head', ...), got {cfg!r}")
    cfg = dict(copy.deepcopy(cfg))
    patches = cfg.pop("patches", None)
    pretrained = cfg.pop("pretrained", None)
    cfg.pop("sync_bn", None)
    if "name" not in cfg:
        cfg["name"] = "Classifier"
    if cfg["name"] in MODELS:   # unknown keys, with `patches` and `pretrained` among the suggestions
        check_kwargs(MODELS.get(cfg["name"]), {k: v for k, v in cfg.items() if k != "name"}, "model",
                     also=("patches", "pretrained", "sync_bn"))
    model = MODELS.build(cfg, where="model")
    apply_patches(model, patches)
    _load_configured(model, pretrained, "model.pretrained")
    return model


def create_model(name, pretrained=None, **kwargs):
    """timm-style: create_model('vit_base_patch16_224', num_classes=10, pretrained='w.safetensors')."""
    for reg in (BACKBONES, MODELS):
        if name in reg:
            check_kwargs(reg.get(name), kwargs, f"create_model('{name}')")
            model = reg.get(name)(**kwargs)
            break
    else:
        raise KeyError(f"unknown model '{name}'.{did_you_mean(name, BACKBONES.names() + MODELS.names())}"
                       f" See plfusion.models.list_models().")
    if pretrained:
        model.load_pretrained(pretrained)
    return model


def list_models(pattern="*"):
    """Registered model variants (create_model names) matching a shell-style pattern."""
    return BACKBONES.names(pattern)
