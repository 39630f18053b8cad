"""Loading the trainer's configuration: YAML file, then `--section.key=value` overrides, converted to the types the
dataclasses of config.py declare; and `longseq train --help`, generated from those dataclasses' field docs.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path

import yaml

from longseq import AutoMemory, MemoryConfig
from longseq.train.config import ConfigError, TrainConfig

# The memory section may be switched off as a whole (MemoryConfig's own defaults are all on).
_SWITCHABLE = ("memory",)


def sections() -> dict[str, type]:
    """Section name -> dataclass, in the order of TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _dataclass_of(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Build a TrainConfig from `base`, then a YAML file, then `section.key=value` overrides (later wins)."""
    raw = copy.deepcopy(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read the config file {path}: {e.strerror}.") from e
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_problem(e, str(path)) + " Fix the file there.") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, ...).")
        raw = _merge(raw, loaded)
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def from_dict(raw: dict) -> TrainConfig:
    known = sections()
    for name in raw:
        if name not in known:
            raise ConfigError(f"unknown section {name!r}{_suggest(name, known)}")
    values = {}
    for name, cls in known.items():
        section = raw.get(name)
        if name in _SWITCHABLE and name in raw and section in (None, False):
            values[name] = None
            continue
        if section is None:
            if name in ("model", "data"):
                raise ConfigError(f"the config has no {name}: section; see `longseq train --help`.")
            continue
        if name == "memory":
            values[name] = _memory(section)
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: must be a mapping of keys, got {section!r}.")
        values[name] = _build(cls, section, name)
    return TrainConfig(**values)


def _memory(section) -> MemoryConfig | AutoMemory:
    """`memory: auto` (the default), or a mapping: with `auto: false` a MemoryConfig of exactly its keys, otherwise
    the plan's choice with its keys forced (TrainConfig.memory)."""
    if section == "auto":
        return AutoMemory()
    if not isinstance(section, dict):
        raise ConfigError(f"memory: must be auto, false or a mapping of MemoryConfig keys, got {section!r}.")
    keys = dict(section)
    auto = _coerce(keys.pop("auto", True), bool, "memory.auto")
    explicit = _build(MemoryConfig, keys, "memory")
    return AutoMemory(**{k: getattr(explicit, k) for k in keys}) if auto else explicit


def to_dict(config) -> dict:
    """The config as the loader reads it back (config.yaml of a run)."""
    out = dataclasses.asdict(dataclasses.replace(config, memory=None))
    memory = config.memory
    if isinstance(memory, AutoMemory):
        out["memory"] = {"auto": True, **memory.overrides}
    elif memory is not None:
        out["memory"] = {"auto": False, **dataclasses.asdict(memory)}
    return out


def _build(cls: type, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {prefix}.{key}{_suggest(key, names, prefix + '.')}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}: {e}") from e


def _coerce(value, hint, name: str):
    """Check `value` against the annotation, converting strings from the command line."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise ConfigError(f"{name} cannot be empty; give a value of type {_type_name(hint)}.")
    for option in options:
        if option is type(None):
            continue
        converted = _convert(value, option)
        if converted is not _NO:
            return converted
    raise ConfigError(f"{name}={value!r} is not a valid {_type_name(hint)}.")


_NO = object()


def _convert(value, option):
    origin = typing.get_origin(option) or option
    if origin is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        return {"true": True, "false": False, "1": True, "0": False}.get(text, _NO)
    if origin in (int, float):
        if isinstance(value, bool):
            return _NO
        try:
            number = origin(value) if isinstance(value, str) or origin is float else value
        except ValueError:
            return _NO
        return number if isinstance(number, origin) else _NO
    if origin is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            return _NO
        (item_type,) = typing.get_args(option) or (str,)
        converted = [_convert(v, item_type) for v in items]
        return _NO if _NO in converted else converted
    if origin is dict:
        return value if isinstance(value, dict) else _NO
    return _NO


def _dataclass_of(hint) -> type:
    return next(a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a))


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _suggest(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else f"; known: {', '.join(choices)}."


def _split_override(item: str) -> tuple[str, object]:
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r} must look like --section.key=value.")
    key, value = text.split("=", 1)
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {item}: the value is not valid YAML ({problem}); quote it to pass a string, "
                          f"e.g. --{key}='\"{value}\"'.") from e


def _yaml_problem(error: yaml.YAMLError, where: str) -> str:
    """'FILE:LINE:COLUMN: not valid YAML: problem (context).' from PyYAML's error, in one line."""
    mark = getattr(error, "problem_mark", None)
    place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"{place}: not valid YAML: {problem}" + (f" ({context})." if context else ".")


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    if len(parts) == 1 and key in _SWITCHABLE and value in (None, False):  # --memory=false: the section is off
        raw[key] = None
        return
    if len(parts) == 1 and key == "memory" and value == "auto":
        raw[key] = "auto"
        return
    if len(parts) != 2:
        raise ConfigError(f"override key {key!r} must be section.key, e.g. training.steps; see --help.")
    section = raw.setdefault(parts[0], {})
    if section == "auto" and parts[0] == "memory":  # memory: auto, then one key forced
        section = raw["memory"] = {}
    if section in (None, False) and parts[0] in _SWITCHABLE:
        raise ConfigError(f"{parts[0]} is switched off (false), so --{key} has nothing to set; drop "
                          f"`{parts[0]}: false` (or --{parts[0]}=false) to use the {parts[0]} keys.")
    if section is None:
        section = raw[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]} is {section!r}, not a section; cannot set {key}.")
    section[parts[1]] = value


def _merge(into: dict, new: dict) -> dict:
    out = dict(into)
    for key, value in new.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def help_text() -> str:
    """Every field with its default and doc line, for `longseq train --help`."""
    lines = []
    for name, cls in sections().items():
        doc = field_docs(TrainConfig)[name]
        lines.append(f"\n{name}: {doc}")
        if name == "memory":
            lines.append("  --memory.auto=True\n      The plan's choice for each batch shape, with the keys given "
                         "forced; false: a MemoryConfig of the keys given.")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  --{name}.{f.name}={default!r}\n      {field_docs(cls).get(f.name, '')}")
    return "\n".join(lines)
