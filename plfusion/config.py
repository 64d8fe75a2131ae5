"""YAML configs with `_base_` inheritance and `-o a.b.c=value` overrides (PASSL style)."""
import copy
import os

import yaml

from .registry import ConfigError, did_you_mean

__all__ = ["AttrDict", "get_config", "parse_overrides", "apply_override", "dump_config",
           "TOP_LEVEL_SECTIONS", "ConfigError"]

# Sections a config may hold at the top level; anything else is a typo.
TOP_LEVEL_SECTIONS = (
    "model", "dataloader", "optimizer", "lr_scheduler", "epochs", "iters", "output_dir", "seed",
    "loss", "amp", "ema", "train", "eval", "log", "checkpoint", "export", "infer", "distributed",
    "metric", "teacher", "mixup", "description",
)

# Keys an override may create even though the loaded files do not have them.
CREATABLE_KEYS = ("model.patches", "model.pretrained", "model.architecture.pretrained")


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would keep
    the last value and silently drop the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:   # an unhashable key; PyYAML reports it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"key {key!r} is given twice (first on line {first.line + 1}); only one value can count",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _yaml_load(stream):
    return yaml.load(stream, Loader=_StrictLoader)


class AttrDict(dict):
    """dict with attribute access; nested dicts become AttrDicts."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'.{did_you_mean(key, self.keys())}") from None

    def __setattr__(self, key, value):
        self[key] = value

    def __deepcopy__(self, memo):
        return AttrDict({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self):
        return _plain(self)


def _attr(obj):
    if isinstance(obj, dict):
        return AttrDict({k: _attr(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_attr(v) for v in obj]
    return obj


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _read_yaml(path, included_from=None):
    if not os.path.isfile(path):
        via = f" (named in _base_ of {included_from})" if included_from else ""
        raise FileNotFoundError(f"config file not found: {path}{via}")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = _yaml_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"YAML error in {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base, new):
    """Deep-merge `new` into a copy of `base`; dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_delete_", False):
            out[k] = _merge(out[k], v)
        else:
            if isinstance(v, dict):
                v = {kk: vv for kk, vv in v.items() if kk != "_delete_"}
            out[k] = copy.deepcopy(v)
    return out


def _load(path, stack=(), included_from=None):
    path = os.path.abspath(path)
    if path in stack:
        raise ConfigError(f"_base_ cycle: {' -> '.join(stack + (path,))}")
    data = _read_yaml(path, included_from)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: _base_ entries must be paths, got {b!r}")
        bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        merged = _merge(merged, _load(bpath, stack + (path,), included_from=path))
    return _merge(merged, data)


def parse_overrides(overrides):
    """['a.b=1', '+c=x'] -> [(path_list, value, create)] with YAML-typed values."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        create = key.startswith("+")
        key = key.lstrip("+")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = _yaml_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
        out.append((key.split("."), value, create))
    return out


def _keys_of(node):
    if isinstance(node, dict):
        return list(node.keys())
    if isinstance(node, list):
        return [str(i) for i in range(len(node))]
    return []


def apply_override(cfg, path, value, create=False, source="override"):
    """Set cfg[path] = value, refusing keys that do not exist unless `create`."""
    dotted = ".".join(path)
    may_create = create or dotted in CREATABLE_KEYS
    node = cfg
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        here = ".".join(path[:depth]) or "<root>"
        if isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                raise ConfigError(f"{source} '{dotted}': '{here}' is a list of {len(node)} items; "
                                  f"'{key}' is not a valid index")
            key = int(key)
            if last:
                node[key] = _attr(value)
                return
            node = node[key]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source} '{dotted}': '{here}' is a {type(node).__name__}, not a section")
        if key not in node:
            if last and may_create:
                node[key] = _attr(value)
                return
            if create:
                node[key] = AttrDict()
            else:
                raise ConfigError(
                    f"{source} '{dotted}': key '{key}' does not exist under '{here}'."
                    f"{did_you_mean(key, _keys_of(node))} Existing keys: {', '.join(map(str, _keys_of(node)))}."
                    f" Prefix with '+' to add a new key.")
        if last:
            node[key] = _attr(value)
            return
        node = node[key]


def _check_sections(cfg, path):
    for k in cfg:
        if k not in TOP_LEVEL_SECTIONS:
            raise ConfigError(f"{path}: unknown top-level section '{k}'."
                              f"{did_you_mean(k, TOP_LEVEL_SECTIONS)}")


def get_config(path, overrides=None, show=False):
    """Load `path` (resolving `_base_`), apply overrides, and return an AttrDict."""
    cfg = _attr(_load(path))
    _check_sections(cfg, path)
    for keys, value, create in parse_overrides(overrides):
        apply_override(cfg, keys, value, create)
    _check_sections(cfg, path)
    if show:
        print(yaml.safe_dump(_plain(cfg), sort_keys=False))
    return cfg


def dump_config(cfg, path):
    """Write the resolved config as YAML (atomically)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(_plain(cfg), f, sort_keys=False)
    os.replace(tmp, path)
