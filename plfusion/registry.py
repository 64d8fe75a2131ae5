"""Name -> constructor registries, built from config dicts as PASSL/PLSC do.

`Registry.build` checks a config against the constructor's signature before calling it:

- unknown keys are errors with a did-you-mean (`check_kwargs`), and so are missing required keys;
- values are checked against the parameter (`check_values`): a parameter annotated
  `typing.Annotated[..., Spec(...)]` (e.g. `depth: PositiveInt = 12`) must pass that Spec;
  any other annotation is left to the constructor; an unannotated parameter must match the type
  of its default: bool, int, float (an int is fine), str, or tuple/list (either is fine).
  A parameter without a default, or with default None, is not checked here.
- an exception raised while building gets the config key path (`where`) in front of its message.
"""
import copy
import difflib
import fnmatch
import inspect
import math
import numbers
import typing
from typing import Annotated, Tuple, Union

__all__ = ["Registry", "ConfigError", "did_you_mean", "check_kwargs", "check_values", "add_context", "Spec",
           "PositiveInt", "NonNegativeInt", "PositiveFloat", "Rate", "ImageSize", "PositiveInts",
           "PositiveFloats", "BACKBONES", "HEADS", "MODELS", "DATASETS", "TRANSFORMS", "PATCHES", "LOSSES"]


class ConfigError(ValueError):
    """Bad user configuration: the message names the key path or file it came from."""


def did_you_mean(name, candidates, n=3):
    """Return ' Did you mean: a, b?' for the closest candidates, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _signature_params(fn):
    """The parameters of `fn` (a class: its __init__; a model variant: its `model_cls`), or None."""
    fn = getattr(fn, "model_cls", fn)
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None


def accepted_kwargs(fn):
    """Names a callable accepts, or None when it takes **kwargs (then anything goes).

    A model variant function that forwards **kwargs to its class sets `model_cls`
    so its keys are checked against the class."""
    params = _signature_params(fn)
    if params is None:
        return None
    names = []
    for p in params.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.name != "self" and p.kind is not p.VAR_POSITIONAL:
            names.append(p.name)
    return names


def check_kwargs(fn, kwargs, where, also=()):
    """Raise ConfigError for keys `fn` cannot take (with a did-you-mean), then for values of the
    wrong type or range (`check_values`). `also`: keys the caller handles itself (e.g. `pretrained`)."""
    allowed = accepted_kwargs(fn)
    if allowed is not None:
        known = sorted(set(allowed) | set(also))
        for key in kwargs:
            if key not in known:
                raise ConfigError(
                    f"{where}: unknown key '{key}' for {getattr(fn, '__name__', fn)}."
                    f"{did_you_mean(key, known)} Accepted keys: {', '.join(known)}")
    check_values(fn, {k: v for k, v in kwargs.items() if k not in also}, where)


def add_context(exc, where):
    """Put `where` (a config key path) in front of `exc`'s message, in place: the exception keeps
    its type and traceback. Messages that already start with `where` are left alone."""
    if isinstance(exc, OSError) and exc.strerror is not None:
        if not str(exc.strerror).startswith(where):
            exc.strerror = f"{where}: {exc.strerror}"
    elif exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith(where):
        exc.args = (f"{where}: {exc.args[0]}",) + exc.args[1:]
    return exc


class Spec:
    """What a constructor argument must be, attached as `Annotated[type, Spec(expected, check)]`.

    `check(value) -> bool`; `expected` completes the message 'expected ...'; `numeric` marks a
    number, for which a numeric-looking string gets a hint about YAML's number syntax."""

    def __init__(self, expected, check, numeric=False):
        self.expected, self.check, self.numeric = expected, check, numeric

    def __repr__(self):
        return f"Spec({self.expected!r})"


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _seq_of(check, length=None):
    return lambda v: (isinstance(v, (list, tuple)) and len(v) > 0 and (length is None or len(v) == length)
                      and all(check(x) for x in v))


def _positive_int(v):
    return _is_int(v) and v > 0


PositiveInt = Annotated[int, Spec("a positive int", _positive_int, numeric=True)]
NonNegativeInt = Annotated[int, Spec("an int >= 0", lambda v: _is_int(v) and v >= 0, numeric=True)]
PositiveFloat = Annotated[float, Spec("a positive number", lambda v: _is_number(v) and v > 0, numeric=True)]
Rate = Annotated[float, Spec("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1, numeric=True)]
ImageSize = Annotated[Union[int, Tuple[int, int]], Spec(
    "a positive int or a pair [h, w] of positive ints",
    lambda v: _positive_int(v) or _seq_of(_positive_int, 2)(v), numeric=True)]
PositiveInts = Annotated[Tuple[int, ...], Spec("a non-empty list of positive ints", _seq_of(_positive_int))]
PositiveFloats = Annotated[Tuple[float, ...], Spec("a non-empty list of positive numbers",
                                                   _seq_of(lambda v: _is_number(v) and v > 0))]

# unannotated parameters: the type of the default decides (bool before int: bool is an int)
_BY_DEFAULT = (
    (bool, Spec("a bool (true/false)", lambda v: isinstance(v, bool))),
    (int, Spec("an int", _is_int, numeric=True)),
    (float, Spec("a number", _is_number, numeric=True)),
    (str, Spec("a string", lambda v: isinstance(v, str))),
    ((tuple, list), Spec("a list", lambda v: isinstance(v, (list, tuple)))),
)


def _spec_of(param):
    ann = param.annotation
    if typing.get_origin(ann) is Annotated:
        return next((m for m in ann.__metadata__ if isinstance(m, Spec)), None)
    if ann is not param.empty or param.default is param.empty or param.default is None:
        return None
    return next((spec for types, spec in _BY_DEFAULT if isinstance(param.default, types)), None)


def _looks_numeric(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_values(fn, kwargs, where):
    """Raise ConfigError naming `where.key` for a value of the wrong type or range (see the module doc)."""
    params = _signature_params(fn) or {}
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None or (value is None and param.default is None):
            continue
        spec = _spec_of(param)
        if spec is None or spec.check(value):
            continue
        hint = ""
        if spec.numeric and isinstance(value, str) and _looks_numeric(value):
            hint = (" (a quoted number, or YAML 1.1 reading a number like 1e-6 without a decimal point "
                    "as a string: write 1.0e-6)")
        raise ConfigError(f"{where}.{key}: expected {spec.expected}, got {value!r} "
                          f"({type(value).__name__}){hint}")


class Registry:
    def __init__(self, name):
        self.name = name
        self._obj = {}

    def register(self, obj=None, name=None):
        """Use as `@REG.register`, `@REG.register(name="x")` or `REG.register(fn)`."""
        def _add(o):
            key = name or o.__name__
            if key in self._obj and self._obj[key] is not o:
                raise KeyError(f"{self.name} registry: '{key}' is registered twice")
            self._obj[key] = o
            return o
        return _add(obj) if obj is not None else _add

    def register_variant(self, cls, name, **defaults):
        """Register `name` as `cls` with preset keyword defaults (timm-style model variants)."""
        def factory(**kwargs):
            return cls(**{**defaults, **kwargs})
        factory.__name__ = name
        factory.__qualname__ = name
        factory.model_cls = cls
        factory.defaults = dict(defaults)
        self.register(factory, name=name)
        return factory

    def __contains__(self, name):
        return name in self._obj

    def names(self, pattern="*"):
        return sorted(k for k in self._obj if fnmatch.fnmatch(k, pattern))

    def get(self, name):
        if name not in self._obj:
            if self.name in ("backbone", "model"):
                known = " See plfusion.models.list_models() for what exists."
            else:
                known = f" Known {self.name}s: {', '.join(self.names())}."
            raise KeyError(f"unknown {self.name} '{name}'.{did_you_mean(name, self._obj)}{known}")
        return self._obj[name]

    def build(self, cfg, where=None, **extra):
        """Build from a dict with a `name` key; other keys become keyword arguments."""
        where = where or self.name
        if cfg is None or not hasattr(cfg, "get"):
            raise ConfigError(f"{where}: expected a mapping with a 'name' key, got {cfg!r}")
        cfg = dict(copy.deepcopy(cfg))
        name = cfg.pop("name", None)
        if name is None:
            raise ConfigError(f"{where}: missing 'name' (one of {self.names()[:20]}...)")
        try:
            fn = self.get(name)
        except KeyError as e:
            raise ConfigError(f"{where}.name: {e.args[0]}") from None
        check_kwargs(fn, cfg, where)
        cfg.update(extra)
        params = _signature_params(fn) or {}
        for p in params.values():
            if (p.name != "self" and p.default is p.empty and p.name not in cfg
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)):
                raise ConfigError(f"{where}: {name} needs '{p.name}'")
        try:
            return fn(**cfg)
        except (ValueError, TypeError, OSError) as e:
            raise add_context(e, where)


BACKBONES = Registry("backbone")
HEADS = Registry("head")
MODELS = Registry("model")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
PATCHES = Registry("patch")
LOSSES = Registry("loss")
