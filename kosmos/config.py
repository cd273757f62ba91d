"""Strict YAML configs: dataclasses filled from YAML, dotted overrides, errors that name the key.

Every config section is a dataclass. `from_dict` refuses unknown keys and values of the wrong type,
naming the full dotted key, so a typo stops a run before any compute; it reports every such problem
of the file at once (`ConfigProblems`), not the first alone. YAML is read as YAML 1.2 reads
numbers: `1e-3` is a float (PyYAML, a YAML 1.1 parser, would read it as a string).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

# Field metadata of a file or folder path. A relative path is relative to the YAML file that names
# it (as a section file is); one given on the command line, to the working directory. Loading makes
# every path absolute, so a resolved config means the same from any folder. URLs stay as they are.
PATH = {"path": True}
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # `s3://...`, `https://...`, `pipe:...`


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type; the message names the key."""


class InputError(ValueError):
    """A command-line option or input file cannot be used; the message says which and why."""


class ConfigProblems(ConfigError):
    """Several problems found together, one line each (the command line prints each on its own)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def problems_of(error: ConfigError) -> list[str]:
    """The problems an error reports: each of a `ConfigProblems`, else the error itself."""
    return error.problems if isinstance(error, ConfigProblems) else [str(error)]


def raise_problems(problems: list[str]) -> None:
    """Raise the problems found, if any: one as a `ConfigError`, several as `ConfigProblems`."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigProblems(problems)


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
        options = [option for option in args if option is not type(None)]
        if len(options) == 1:  # `X | None`: X's own problems
            return _convert(value, options[0], key)
        errors = []
        for option in options:
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
        items = _convert_each((v, item, f"{key}[{i}]") for i, v in enumerate(value))
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        value_type = args[1] if args else Any
        converted = _convert_each((v, value_type, _join(key, str(k))) for k, v in value.items())
        return dict(zip(map(str, value), converted))
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


def _convert_each(items) -> list:
    """`_convert` of each (value, annotation, key); the problems of all of them together."""
    converted, problems = [], []
    for value, annotation, key in items:
        try:
            converted.append(_convert(value, annotation, key))
        except ConfigError as error:
            problems += problems_of(error)
    raise_problems(problems)
    return converted


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types (all of them at once)."""
    instance, problems = collect(cls, data, prefix)
    raise_problems(problems)
    return instance


def collect(cls: type[T], data: dict[str, Any], prefix: str = "") -> tuple[T | None, list[str]]:
    """`cls` built from `data` as far as it goes, and every problem found on the way.

    A key whose value is refused is listed and takes its default, so that the rest of the config can
    still be checked (by the section's `validate`, and by whoever checks the files it names); a
    required key refused or missing leaves no instance (None).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}"]
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = ", ".join(sorted(fields))
    problems = [f"{_join(prefix, name)}: unknown key (known: {known})" for name in sorted(set(data) - set(fields))]
    values = {}
    complete = True
    for name, field in fields.items():
        key = _join(prefix, name)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if name not in data:
            if required:
                problems.append(f"{key}: required key is missing")
                complete = False
            continue
        try:
            values[name] = _convert(data[name], hints[name], key)
        except ConfigError as error:
            problems += problems_of(error)
            complete = complete and not required
    if not complete:
        return None, problems
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate(prefix)
        except ConfigError as error:
            problems += problems_of(error)
    return instance, problems


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
    """A section given as a string is the path of a YAML file (relative to `base`) holding it; the
    paths a file names are made absolute against its folder (`resolve_paths`)."""
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
    return resolve_paths(cls, data, base)


def resolve_paths(cls: type, data: Any, base: Path) -> Any:
    """`data` (a `cls` section as read, changed in place) with its relative `PATH` fields made
    absolute against `base`; URLs and empty values stay as they are."""
    if not isinstance(data, dict):
        return data
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        value = data.get(field.name)
        if field.metadata.get("path") and isinstance(value, str):
            data[field.name] = absolute_path(value, base)
            continue
        section, many = _section_type(hints[field.name])
        if section is not None:
            for item in value if many and isinstance(value, list) else [value]:
                resolve_paths(section, item, base)
    return data


def absolute_path(value: str, base: Path) -> str:
    """A config's path `value` as an absolute path (relative ones against `base`); URLs as they are."""
    if not value or URL.match(value):
        return value
    return os.path.abspath(Path(base) / Path(value).expanduser())


def _section_type(annotation: Any) -> tuple[type | None, bool]:
    """The dataclass a field holds, and whether it holds a list of them."""
    if dataclasses.is_dataclass(annotation):
        return annotation, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple) and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        return next(((a, False) for a in args if dataclasses.is_dataclass(a)), (None, False))
    return None, False


def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML file into dataclass `cls`, after applying dotted overrides.

    A section may be the path of its own YAML file (`model: ../model/tiny.yaml`), so recipes share
    model definitions; overrides reach into it like any other section (`model.text.layers=4`).
    """
    instance, problems = load_collecting(cls, path, overrides)
    raise_problems(problems)
    return instance


def load_collecting(
    cls: type[T], path: str | Path, overrides: list[str] | None = None
) -> tuple[T | None, list[str]]:
    """`load`, as far as it goes (`collect`): the config, or None, and every problem of its keys."""
    path = Path(path)
    data = _expand_section_files(cls, read_yaml(path), path.parent)
    # Paths given on the command line are relative to the working directory.
    data = resolve_paths(cls, apply_overrides(data, overrides or []), Path.cwd())
    return collect(cls, data)


def dump(instance: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(instance), sort_keys=False))
