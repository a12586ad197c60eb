"""Reading a config: YAML 1.2, a file or a shipped config by name, section.key=value overrides, and
the check of every value against its field's type (vae_dist.config declares the fields).

`load_config` reads the file into {section: {key: value}}, applies the overrides, and builds each
section's dataclass (vae_dist.config declares them and their checks), collecting every problem.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import yaml

from vae_dist.errors import BadInput

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; only the annotations name it

    from vae_dist.config import Config

# The training configs shipped inside the package (package data): --config mnist finds mnist.yaml.
SHIPPED = files("vae_dist") / "configs"


class ConfigError(BadInput, ValueError):
    """A config file or override is wrong; the message names the key and what is allowed."""


class _YAML12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `mode: off` stays the string "off"."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# ... and 1.2 floats: 2e-3 is a number (YAML 1.1 wants 2.0e-3).
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_YAML12Loader)


# ---------------------------------------------------------------------------------------------------
# A file, or a shipped config by name
# ---------------------------------------------------------------------------------------------------


def shipped_configs() -> list[str]:
    """The names `--config` accepts without a path: the YAML files in vae_dist/configs/, sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in SHIPPED.iterdir() if p.name.endswith(".yaml"))


def find_config(value: str | Path) -> Path | Traversable:
    """The file `--config VALUE` means: an existing file is a path (as typed, relative to the working
    folder); otherwise a bare name, `mnist` or `mnist.yaml` (no folder in it), is a config shipped in
    vae_dist/configs/. A folder, or a value that is neither, is a ConfigError that names the choices."""
    path = Path(value)
    if path.is_file():
        return path
    name = str(value).removesuffix(".yaml")
    if "/" not in str(value) and name in shipped_configs():
        return SHIPPED / f"{name}.yaml"
    if path.is_dir():
        names = sorted(p.name for p in path.glob("*.yaml"))
        holds = f" (it holds {', '.join(names)})" if names else ""
        raise ConfigError(
            f"--config {path} is a folder{holds}; pass one YAML file, e.g. --config {path / (names[0] if names else 'mnist.yaml')}."
        )
    raise ConfigError(
        f"--config {value} is neither a file nor a shipped config; the shipped configs are "
        f"{', '.join(shipped_configs())}: pass one by name (e.g. --config mnist) or the path of a YAML file."
    )


def read_config_file(value: str | Path, errors: list[str]) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} from the file `--config VALUE` means (see `find_config`). A file that
    cannot be used at all raises ConfigError; a section that is not a mapping is appended to
    `errors`, to be reported with every other problem."""
    path = find_config(value)
    try:
        text = path.read_text()
        loaded = read_yaml(text) if text.strip() else None  # YAML refuses a tab even in a blank file
    except (yaml.YAMLError, ValueError) as err:  # ValueError: not UTF-8, or an integer over 4300 digits
        mark = getattr(err, "problem_mark", None)  # yaml's own text spans lines; keep its problem and place
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or (str(err).splitlines() or [""])[0]
        raise ConfigError(
            f"config file {path} is not readable YAML ({what}{where}); fix it, "
            "or start again from a copy of configs/mnist.yaml."
        ) from err
    if loaded is None:  # 0 bytes, only blanks or only comments: a run on silent defaults is a mistake
        raise ConfigError(
            f"config file {path} is empty (no sections, only blanks or comments); copy configs/mnist.yaml "
            "and edit it, or drop --config to run with the defaults."
        )
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path} holds {_yaml_kind(loaded)} at the top level, but it must be a mapping of "
            "sections (data:, model:, optim:, ...) each holding key: value lines; see configs/mnist.yaml."
        )
    tree = {}
    for section, values in loaded.items():
        if values is not None and not isinstance(values, dict):
            errors.append(
                f"{path}: section {section!r} holds {_yaml_kind(values)}, but it must be a mapping of "
                "key: value lines indented under it, as in configs/mnist.yaml."
            )
            continue
        tree[section] = dict(values or {})
    return tree


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.epochs=3' -> ('train', 'epochs', 3); the value is read as YAML, so 3 is an int and [1, 2] a list."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not of the form section.key=value, e.g. train.epochs=3.")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = read_yaml(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError):  # ValueError: an integer over Python's 4300-digit limit
        value = raw
    return section, key, value


# ---------------------------------------------------------------------------------------------------
# The whole config: the file, the overrides, every section
# ---------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (a file, or a shipped config by name: vae_dist.config_load.find_config),
    apply section.key=value overrides, check everything, return the Config."""
    errors: list[str] = []  # a bad section or override is reported with every other problem, not alone
    tree = read_config_file(path, errors) if path is not None else {}
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as err:
            errors.append(str(err))
            continue
        tree.setdefault(section, {})[key] = value
    try:
        cfg = config_from_dict(tree)
    except ConfigError as err:
        errors.append(str(err))
    if errors:
        raise ConfigError(" ".join(errors))
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and check a Config from {section: {key: value}} (a YAML file, or a saved run's config):
    every value against its field's type here, then the sections' own checks (vae_dist.config)."""
    from vae_dist.config import SECTIONS, build_config  # the sections import this module: imported when used

    errors: list[str] = []
    sections = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            errors.append(f"{section} is not a config section; the sections are: {', '.join(SECTIONS)}.")
            continue
        sections[section] = section_values(section, SECTIONS[section], values, errors)
    if errors:
        raise ConfigError(" ".join(errors))
    return build_config(sections)


# ---------------------------------------------------------------------------------------------------
# Each value against its field's type
# ---------------------------------------------------------------------------------------------------


def section_values(name: str, cls: type, values: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """The values of config section `name` (dataclass `cls`), each of its field's type; a problem with
    a key is one sentence appended to `errors`, and the key is left out (at its default)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            errors.append(f"{name}.{key} is not a config key; {name} has: {', '.join(hints)}.")
            continue
        if _non_finite(value, hints[key]):
            default = _default(cls, key)
            example = f", e.g. {name}.{key}={default}" if default is not None else ""
            errors.append(
                f"{name}.{key}={_shown(value)}: must be {_finite_name(hints[key])} (inf and nan are refused, "
                f"and YAML reads a number beyond ±1.8e308 as inf); give an ordinary value{example}."
            )
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            errors.append(f"{name}.{key}={value!r}: must be {_type_name(hints[key])}.")
            continue
        kwargs[key] = coerced
    return kwargs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Returns (ok, value) with ints widened to float where a float is expected; nothing else is converted."""
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in get_args(tp), None
        for arg in get_args(tp):
            if arg is not type(None):
                ok, v = _coerce(value, arg)
                if ok:
                    return True, v
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return True, float(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, str(value)  # paths like run.dir=2024 stay strings
    return isinstance(value, tp), value


def _non_finite(value: Any, tp: Any) -> bool:
    """True when a number for a float-typed key (or inside a list of them) is infinite or NaN, in any spelling:
    YAML's .inf/.nan, 1e400 (which YAML reads as inf), the strings inf/nan (YAML leaves them strings but
    Python's float() accepts them), or an integer too large for a float."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return value is not None and any(_non_finite(value, a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return isinstance(value, list) and any(_non_finite(v, get_args(tp)[0]) for v in value)
    if tp is not float or isinstance(value, bool):
        return False
    try:
        return not math.isfinite(float(value)) if isinstance(value, (int, float, str)) else False
    except OverflowError:  # float(10**400)
        return True
    except ValueError:  # a string that is no number at all: _coerce reports it as the wrong type
        return False


def _finite_name(tp: Any) -> str:
    """'a finite number', 'a list of finite numbers', '... or null': what a float-typed key accepts."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_finite_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    return "a list of finite numbers" if get_origin(tp) is list else "a finite number"


def _shown(value: Any) -> str:
    """A value as the user would type it (inf, not 'inf'), cut short when it is a 400-digit integer."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _yaml_kind(value: Any) -> str:
    """What a YAML value is, in YAML's words: 'a list', 'a string', 'a number', ..."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")


def _default(cls: type, key: str) -> Any:
    """The field's default value, for an example in an error message."""
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default
