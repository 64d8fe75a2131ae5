"""Name -> constructor registries, built from config dicts as PASSL/PLSC do."""
import copy
import difflib
import fnmatch
import inspect

__all__ = ["Registry", "ConfigError", "did_you_mean", "check_kwargs",
           "BACKBONES", "HEADS", "MODELS", "DATASETS", "TRANSFORMS", "PATCHES", "LOSSES"]


class ConfigError(ValueError):
    """Bad user configuration: the message names the key path or file it came from."""


def did_you_mean(name, candidates, n=3):
    """Return ' Did you mean: a, b?' for the closest candidates, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def accepted_kwargs(fn):
    """Names a callable accepts, or None when it takes **kwargs (then anything goes).

    A model variant function that forwards **kwargs to its class sets `model_cls`
    so its keys are checked against the class."""
    fn = getattr(fn, "model_cls", fn)
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.name != "self" and p.kind is not p.VAR_POSITIONAL:
            names.append(p.name)
    return names


def check_kwargs(fn, kwargs, where):
    """Raise ConfigError for keys `fn` cannot take, with a did-you-mean."""
    allowed = accepted_kwargs(fn)
    if allowed is None:
        return
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key '{key}' for {getattr(fn, '__name__', fn)}."
                f"{did_you_mean(key, allowed)} Accepted keys: {', '.join(sorted(allowed))}")


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
            raise KeyError(f"unknown {self.name} '{name}'.{did_you_mean(name, self._obj)}"
                           f" See plfusion.models.list_models() for what exists.")
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
        cfg.update(extra)
        check_kwargs(fn, cfg, where)
        return fn(**cfg)


BACKBONES = Registry("backbone")
HEADS = Registry("head")
MODELS = Registry("model")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
PATCHES = Registry("patch")
LOSSES = Registry("loss")
