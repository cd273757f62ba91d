"""Strict YAML configs: dataclasses filled from YAML, dotted overrides, errors that name the key.

Every config section is a dataclass. `from_dict` refuses unknown keys and values of the wrong type,
naming the full dotted key, so a typo stops a run before any compute. YAML is read as YAML 1.2 reads
numbers: `1e-3` is a float (PyYAML, a YAML 1.1 parser, would read it as a string).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type; the message names the key."""


class InputError(ValueError):
    """A command-line option or input file cannot be used; the message says which and why."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: a mantissa without a dot (`1e-3`, `2E+8`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a ConfigError naming `source`, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # a subclass of the safe loader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        raise ConfigError(
            f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")
        ) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        value_type = args[1] if args else Any
        return {str(k): _convert(v, value_type, _join(key, str(k))) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(prefix, unknown[0])}: unknown key (known: {', '.join(sorted(fields))})")
    values = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            values[name] = _convert(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate(prefix)
    return instance


def to_dict(instance: Any) -> Any:
    """The plain-YAML form of a config dataclass (inverse of `from_dict`)."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict, in place.

    A number reaches into a list: `data.corpora.0.path=...` sets the first corpus's path.
    """
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        dotted, raw = override.split("=", 1)
        keys = dotted.strip().split(".")
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                node = node[_list_index(node, key, where)]
            else:
                node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{where}: is not a section, cannot set {dotted}")
        value = parse_yaml(raw, f"override {override!r}") if raw.strip() else ""
        if isinstance(node, list):
            node[_list_index(node, keys[-1], dotted)] = value
        else:
            node[keys[-1]] = value
    return data


def _list_index(items: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"{where}: the list has items 0 to {len(items) - 1}")
    return int(key)


def _expand_section_files(cls: type, data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A section given as a string is the path of a YAML file (relative to `base`) holding it."""
    hints = get_type_hints(cls)
    for name, value in list(data.items()):
        annotation = hints.get(name)
        if annotation is None or not dataclasses.is_dataclass(annotation):
            continue
        if isinstance(value, str):
            path = Path(value) if Path(value).is_absolute() else base / value
            if not path.is_file():
                raise ConfigError(f"{name}: section file {path} does not exist")
            data[name] = _expand_section_files(annotation, read_yaml(path), path.parent)
        elif isinstance(value, dict):
            data[name] = _expand_section_files(annotation, value, base)
    return data


def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML file into dataclass `cls`, after applying dotted overrides.

    A section may be the path of its own YAML file (`model: ../model/tiny.yaml`), so recipes share
    model definitions; overrides reach into it like any other section (`model.text.layers=4`).
    """
    path = Path(path)
    data = _expand_section_files(cls, read_yaml(path), path.parent)
    return from_dict(cls, apply_overrides(data, overrides or []))


def dump(instance: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(instance), sort_keys=False))
