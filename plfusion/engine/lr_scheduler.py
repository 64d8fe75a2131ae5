"""Learning-rate schedules, stepped once per optimizer update (iteration), built from `lr_scheduler`.

Update t (0-based) uses lr(t); the trainer calls `scheduler.step()` after each update.

- PolyWarmup: the fusion papers' PolyWarmupAdamW schedule (TokenFusion / GeminiFusion
  `utils/optimizer.py`, from SegFormer):
      t <  W:            base * (1 - (1 - t / W) * (1 - warmup_ratio))
      W <= t < T:        base * (1 - t / T) ** power
      t >= T:            the value of t = T - 1 (the reference stops updating the lr there)
  Note the poly factor uses t / T, not (t - W) / (T - W), as the reference does. Their
  NYUDv2 runs use W = 1500, T = 40000, warmup_ratio = 1e-6, power = 1.0.
- CosineWarmup: linear from `warmup_start_lr` to base over W updates, then
  eta_min + (base - eta_min) * (1 + cos(pi * (t - W) / (T - W))) / 2, and eta_min from T on.
- Step: optional linear warmup, then base * gamma ** (number of milestones <= t).

Config lengths are in iterations (`warmup_iters`, `max_iters`, `milestones`) or, for
epoch-based runs, in epochs (`warmup_epochs`, `milestone_epochs`), converted with the number
of updates per epoch. `max_iters` defaults to the run's total number of updates.
"""
import bisect
import math
import numbers

from paddle.optimizer.lr import LRScheduler

from ..registry import ConfigError, did_you_mean

__all__ = ["PolyWarmup", "CosineWarmup", "Step", "build_lr_scheduler", "SCHEDULERS"]


class _Schedule(LRScheduler):
    """Base: subclasses define `value(t)`; `get_lr` reads the update counter `last_epoch`."""

    def get_lr(self):
        return float(self.value(max(self.last_epoch, 0)))

    def value(self, t):
        raise NotImplementedError


def _linear_warmup(t, warmup_iters, start, end):
    return start + (end - start) * t / warmup_iters


class PolyWarmup(_Schedule):
    def __init__(self, learning_rate, max_iters, warmup_iters=1500, warmup_ratio=1e-6, power=1.0):
        self.max_iters = int(max_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        self.power = float(power)
        super().__init__(learning_rate)

    def value(self, t):
        base = self.base_lr
        if t < self.warmup_iters:
            return base * (1.0 - (1.0 - t / self.warmup_iters) * (1.0 - self.warmup_ratio))
        t = min(t, self.max_iters - 1)
        return base * (1.0 - t / self.max_iters) ** self.power


class CosineWarmup(_Schedule):
    def __init__(self, learning_rate, max_iters, warmup_iters=0, warmup_start_lr=0.0, eta_min=0.0):
        self.max_iters = int(max_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_start_lr = float(warmup_start_lr)
        self.eta_min = float(eta_min)
        super().__init__(learning_rate)

    def value(self, t):
        if t < self.warmup_iters:
            return _linear_warmup(t, self.warmup_iters, self.warmup_start_lr, self.base_lr)
        if t >= self.max_iters:
            return self.eta_min
        span = max(self.max_iters - self.warmup_iters, 1)
        cos = 0.5 * (1.0 + math.cos(math.pi * (t - self.warmup_iters) / span))
        return self.eta_min + (self.base_lr - self.eta_min) * cos


class Step(_Schedule):
    def __init__(self, learning_rate, milestones, gamma=0.1, warmup_iters=0, warmup_start_lr=0.0):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_start_lr = float(warmup_start_lr)
        super().__init__(learning_rate)

    def value(self, t):
        if t < self.warmup_iters:
            return _linear_warmup(t, self.warmup_iters, self.warmup_start_lr, self.base_lr)
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)


SCHEDULERS = {"PolyWarmup": PolyWarmup, "CosineWarmup": CosineWarmup, "Step": Step}

# Config keys per schedule: (required, optional with defaults). Epoch keys are converted.
_KEYS = {
    "PolyWarmup": {"warmup_iters": 1500, "warmup_epochs": None, "warmup_ratio": 1e-6, "power": 1.0,
                   "max_iters": None},
    "CosineWarmup": {"warmup_iters": 0, "warmup_epochs": None, "warmup_start_lr": 0.0, "eta_min": 0.0,
                     "max_iters": None},
    "Step": {"milestones": None, "milestone_epochs": None, "gamma": 0.1, "warmup_iters": 0,
             "warmup_epochs": None, "warmup_start_lr": 0.0},
}


def _number(cfg, key, where, minimum=None, integer=False, allow_equal=True):
    value = cfg[key]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if ok and minimum is not None:
        ok = value >= minimum if allow_equal else value > minimum
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = "" if minimum is None else f" {'>=' if allow_equal else '>'} {minimum}"
        raise ConfigError(f"{where}.{key}: expected {kind}{bound}, got {value!r}")
    return int(value) if integer else float(value)


def build_lr_scheduler(cfg, iters_per_epoch, total_iters, where="lr_scheduler"):
    """The schedule named by `cfg.name`, with epoch lengths converted to updates."""
    if not hasattr(cfg, "get"):
        raise ConfigError(f"{where}: expected a mapping with 'name' and 'learning_rate', got {cfg!r}")
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in SCHEDULERS:
        raise ConfigError(f"{where}.name: unknown schedule {name!r}.{did_you_mean(name, SCHEDULERS)} "
                          f"Available: {', '.join(SCHEDULERS)}")
    if "learning_rate" not in cfg:
        raise ConfigError(f"{where}.learning_rate: missing (the base learning rate)")
    allowed = _KEYS[name]
    for key in cfg:
        if key != "learning_rate" and key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key for {name}.{did_you_mean(key, list(allowed) + ['learning_rate'])}"
                              f" Accepted keys: learning_rate, {', '.join(allowed)}")
    lr = _number(cfg, "learning_rate", where, minimum=0.0)
    opts = {k: v for k, v in allowed.items()}
    opts.update(cfg)

    def iters(key_iters, key_epochs):
        if cfg.get(key_epochs) is not None:
            if key_iters in cfg:
                raise ConfigError(f"{where}: give {key_iters} or {key_epochs}, not both")
            return int(round(_number(opts, key_epochs, where, minimum=0.0) * iters_per_epoch))
        return _number(opts, key_iters, where, minimum=0, integer=True)

    kwargs = {}
    if "warmup_iters" in allowed:
        kwargs["warmup_iters"] = iters("warmup_iters", "warmup_epochs")
    if name in ("PolyWarmup", "CosineWarmup"):
        max_iters = total_iters if opts.get("max_iters") is None else \
            _number(opts, "max_iters", where, minimum=1, integer=True)
        if max_iters < 1:
            raise ConfigError(f"{where}: the schedule needs at least one update, got max_iters={max_iters}")
        kwargs["max_iters"] = max_iters
        if kwargs["warmup_iters"] > max_iters:
            raise ConfigError(f"{where}: warmup ({kwargs['warmup_iters']} updates) is longer than the schedule "
                              f"({max_iters} updates); lower warmup_iters/warmup_epochs")
    if name == "PolyWarmup":
        ratio = _number(opts, "warmup_ratio", where, minimum=0.0)
        if ratio > 1:
            raise ConfigError(f"{where}.warmup_ratio: expected a number in [0, 1], got {ratio!r}")
        kwargs.update(warmup_ratio=ratio, power=_number(opts, "power", where, minimum=0.0, allow_equal=False))
    elif name == "CosineWarmup":
        kwargs.update(warmup_start_lr=_number(opts, "warmup_start_lr", where, minimum=0.0),
                      eta_min=_number(opts, "eta_min", where, minimum=0.0))
    else:
        kwargs["warmup_start_lr"] = _number(opts, "warmup_start_lr", where, minimum=0.0)
        kwargs["gamma"] = _number(opts, "gamma", where, minimum=0.0, allow_equal=False)
        given = [k for k in ("milestones", "milestone_epochs") if cfg.get(k) is not None]
        if len(given) != 1:
            raise ConfigError(f"{where}: Step needs exactly one of 'milestones' (updates) or "
                              f"'milestone_epochs' (epochs), got {given or 'neither'}")
        key = given[0]
        raw = cfg[key]
        if not isinstance(raw, (list, tuple)) or not all(
                isinstance(m, numbers.Real) and not isinstance(m, bool) and m >= 0 for m in raw):
            raise ConfigError(f"{where}.{key}: expected a list of non-negative numbers, got {raw!r}")
        kwargs["milestones"] = [int(round(m * iters_per_epoch)) if key == "milestone_epochs" else int(m)
                                for m in raw]
    return SCHEDULERS[name](lr, **kwargs)
