"""Optimizers (AdamW, SGD, Momentum) with parameter groups, built from the `optimizer` section.

    optimizer:
      name: AdamW
      weight_decay: 0.01
      betas: [0.9, 0.999]
      grad_clip: {max_norm: 1.0}
      param_groups: [{pattern: "head.*", lr_mult: 10.0}]      # first matching group wins
      no_weight_decay: [norm, bias, pos_embed, cls_token]

Parameter groups:
- `param_groups` entries match structured parameter names (`backbone.blocks.0.attn.qkv.weight`)
  with shell patterns (`pattern`: a string or a list); each may set `lr_mult` and
  `weight_decay`. A pattern that matches no trainable parameter is an error (a typo).
- No weight decay for a parameter whose name contains one of the `no_weight_decay` keywords
  (or matches it, when the entry is a shell pattern). The keyword `norm` also covers every
  parameter of a normalisation layer whatever its name. Names a sublayer returns from its
  `no_weight_decay()` (timm's protocol, relative to that sublayer) are honoured as well.

Gradient clipping is by the global norm over *all* parameters: Paddle's `grad_clip` argument
clips each parameter group separately, so the trainer calls `clip_grad_norm` itself (after
the data-parallel all-reduce and AMP unscaling) instead of handing a clip to the optimizer.
"""
import fnmatch
import logging
import numbers

import paddle
import paddle.nn as nn

from ..registry import ConfigError, did_you_mean

__all__ = ["build_optimizer", "build_param_groups", "clip_grad_norm", "OPTIMIZER_KEYS", "DEFAULT_NO_WEIGHT_DECAY"]

logger = logging.getLogger(__name__)

DEFAULT_NO_WEIGHT_DECAY = ("norm", "bias", "pos_embed", "cls_token")

_COMMON = ("name", "weight_decay", "grad_clip", "param_groups", "no_weight_decay")
OPTIMIZER_KEYS = {
    "AdamW": _COMMON + ("betas", "epsilon"),
    "SGD": _COMMON,
    "Momentum": _COMMON + ("momentum", "nesterov"),
}
_GROUP_KEYS = ("pattern", "lr_mult", "weight_decay")
_NORM_LAYERS = (nn.LayerNorm, nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D, nn.SyncBatchNorm,
                nn.GroupNorm, nn.InstanceNorm1D, nn.InstanceNorm2D, nn.InstanceNorm3D)


def _is_pattern(text):
    return any(c in text for c in "*?[")


def _real(value, where, minimum=0.0, strict=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ConfigError(f"{where}: expected a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _norm_param_names(model):
    names = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, _NORM_LAYERS):
            for pname, _ in layer.named_parameters(include_sublayers=False):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return names


def _model_no_decay_names(model):
    """Full names listed by sublayers' `no_weight_decay()` (each relative to its sublayer)."""
    names = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        fn = getattr(layer, "no_weight_decay", None)
        if callable(fn):
            for n in fn():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def _parse_groups(groups, where):
    if groups is None:
        return []
    if not isinstance(groups, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of {{pattern: ..., lr_mult: ...}} entries, got {groups!r}")
    parsed = []
    for i, g in enumerate(groups):
        at = f"{where}[{i}]"
        if not hasattr(g, "items"):
            raise ConfigError(f"{at}: expected a mapping with 'pattern', got {g!r}")
        for key in g:
            if key not in _GROUP_KEYS:
                raise ConfigError(f"{at}.{key}: unknown key.{did_you_mean(key, _GROUP_KEYS)} "
                                  f"Accepted keys: {', '.join(_GROUP_KEYS)}")
        patterns = g.get("pattern")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"{at}.pattern: expected a parameter-name pattern or a list of them, got "
                              f"{g.get('pattern')!r}")
        lr_mult = _real(g.get("lr_mult", 1.0), f"{at}.lr_mult")
        wd = None if g.get("weight_decay") is None else _real(g["weight_decay"], f"{at}.weight_decay")
        parsed.append({"patterns": list(patterns), "lr_mult": lr_mult, "weight_decay": wd, "where": at})
    return parsed


def build_param_groups(model, weight_decay, param_groups=None, no_weight_decay=DEFAULT_NO_WEIGHT_DECAY,
                       where="optimizer"):
    """Paddle parameter groups [{'params', 'learning_rate' (a multiplier), 'weight_decay'}] and a
    per-parameter summary {name: (lr_mult, weight_decay)} for logging and tests."""
    groups = _parse_groups(param_groups, f"{where}.param_groups")
    if no_weight_decay is None:
        no_weight_decay = []
    if not isinstance(no_weight_decay, (list, tuple)) or not all(isinstance(k, str) and k for k in no_weight_decay):
        raise ConfigError(f"{where}.no_weight_decay: expected a list of name keywords or patterns, "
                          f"got {no_weight_decay!r}")
    norm_names = _norm_param_names(model) if "norm" in no_weight_decay else set()
    model_names = _model_no_decay_names(model)
    matched = [0] * len(groups)
    buckets, summary = {}, {}
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        lr_mult, wd = 1.0, weight_decay
        for gi, g in enumerate(groups):
            if any(fnmatch.fnmatchcase(name, p) for p in g["patterns"]):
                matched[gi] += 1
                lr_mult = g["lr_mult"]
                if g["weight_decay"] is not None:
                    wd = g["weight_decay"]
                break
        exempt = (name in norm_names or any(name == n or name.startswith(n + ".") for n in model_names)
                  or any(fnmatch.fnmatchcase(name, k) if _is_pattern(k) else k in name for k in no_weight_decay))
        if exempt:
            wd = 0.0
        buckets.setdefault((lr_mult, wd), []).append(param)
        summary[name] = (lr_mult, wd)
    for gi, g in enumerate(groups):
        if matched[gi] == 0:
            raise ConfigError(f"{g['where']}.pattern: {g['patterns']} matches no trainable parameter (earlier "
                              f"groups take precedence). Parameter names look like: "
                              f"{', '.join(list(summary)[:5])}")
    if not buckets:
        raise ConfigError(f"{where}: the model has no trainable parameters")
    paddle_groups = [{"params": params, "learning_rate": lr_mult, "weight_decay": wd}
                     for (lr_mult, wd), params in buckets.items()]
    return paddle_groups, summary


def build_optimizer(cfg, model, learning_rate, multi_precision=False, where="optimizer"):
    """(optimizer, max_grad_norm or None) from the `optimizer` section.

    `learning_rate` is the LR scheduler (or a float). `model` is the unwrapped Layer."""
    if not hasattr(cfg, "get"):
        raise ConfigError(f"{where}: expected a mapping with a 'name', got {cfg!r}")
    name = cfg.get("name")
    if name not in OPTIMIZER_KEYS:
        raise ConfigError(f"{where}.name: unknown optimizer {name!r}.{did_you_mean(name, OPTIMIZER_KEYS)} "
                          f"Available: {', '.join(OPTIMIZER_KEYS)}")
    for key in cfg:
        if key not in OPTIMIZER_KEYS[name]:
            raise ConfigError(f"{where}.{key}: unknown key for {name}.{did_you_mean(key, OPTIMIZER_KEYS[name])} "
                              f"Accepted keys: {', '.join(OPTIMIZER_KEYS[name])}")
    weight_decay = _real(cfg.get("weight_decay", 0.01 if name == "AdamW" else 0.0), f"{where}.weight_decay")
    max_norm = None
    clip = cfg.get("grad_clip")
    if clip is not None:
        if not hasattr(clip, "get"):
            raise ConfigError(f"{where}.grad_clip: expected {{max_norm: number}} or null, got {clip!r}")
        for key in clip:
            if key != "max_norm":
                raise ConfigError(f"{where}.grad_clip.{key}: unknown key.{did_you_mean(key, ['max_norm'])} "
                                  f"Accepted keys: max_norm")
        max_norm = _real(clip.get("max_norm"), f"{where}.grad_clip.max_norm", strict=True)
    groups, summary = build_param_groups(model, weight_decay, cfg.get("param_groups"),
                                         cfg.get("no_weight_decay", list(DEFAULT_NO_WEIGHT_DECAY)), where)
    for (lr_mult, wd) in sorted({v for v in summary.values()}):
        count = sum(1 for v in summary.values() if v == (lr_mult, wd))
        logger.info("param group: lr x%g, weight_decay %g: %d tensors", lr_mult, wd, count)

    if name == "AdamW":
        betas = cfg.get("betas", [0.9, 0.999])
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"{where}.betas: expected two numbers in [0, 1), got {betas!r}")
        eps = _real(cfg.get("epsilon", 1e-8), f"{where}.epsilon", strict=True)
        opt = paddle.optimizer.AdamW(learning_rate=learning_rate, parameters=groups, beta1=float(betas[0]),
                                     beta2=float(betas[1]), epsilon=eps, weight_decay=weight_decay,
                                     multi_precision=multi_precision)
    elif name == "Momentum":
        momentum = _real(cfg.get("momentum", 0.9), f"{where}.momentum")
        nesterov = cfg.get("nesterov", False)
        if not isinstance(nesterov, bool):
            raise ConfigError(f"{where}.nesterov: expected true or false, got {nesterov!r}")
        opt = paddle.optimizer.Momentum(learning_rate=learning_rate, parameters=groups, momentum=momentum,
                                        use_nesterov=nesterov, weight_decay=weight_decay,
                                        multi_precision=multi_precision)
    else:
        opt = paddle.optimizer.SGD(learning_rate=learning_rate, parameters=groups, weight_decay=weight_decay,
                                   multi_precision=multi_precision)
    opt.param_summary = summary
    return opt, max_norm


@paddle.no_grad()
def clip_grad_norm(parameters, max_norm):
    """Scale all gradients so their global L2 norm is at most `max_norm`; returns the norm before."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = paddle.sqrt(paddle.add_n([paddle.sum(paddle.square(g.astype("float32"))) for g in grads]))
    norm = float(total)
    if max_norm is not None and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.scale_(scale)
    return norm
