"""Adapter methods and their hyperparameters: what ``method=`` accepts and how ``settings`` are read.

Owns the method lookup (`method_names`, `config_class`: every method of `flora.methods.METHODS`
plus prompt and prefix tuning, and ``"full"``), the fields a method's config takes
(`setting_types`), and the conversion of values (Python values, or ``KEY=VALUE`` strings from
``--set`` / ``--adapter-set`` / ``--training-arg``) to those fields' types (`coerce_value`,
`coerce_settings`, `build_adapter_config`, `parse_assignments`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from flora.methods import METHODS, AdapterConfig

FULL = "full"
_REGEX_CHARS = set("*+?[](){}|^$\\")


def _config_classes() -> dict[str, type]:
    """``{peft_type: config class}`` of every adapter method `AdapterModel.add_adapter` takes."""
    return {key: method.config for key, method in METHODS.items()}


def method_names() -> list[str]:
    """What ``method=`` accepts: ``"full"`` and every adapter method (`flora.methods.METHODS`)."""
    return [FULL, *(name.lower() for name in _config_classes())]


def config_class(method: str) -> type[AdapterConfig]:
    """The config dataclass of ``method`` (case-insensitive); a clear error for an unknown one."""
    classes = _config_classes()
    key = str(method).upper()
    if key not in classes:
        raise ValueError(f"unknown method {method!r} (expected one of {', '.join(method_names())})")
    return classes[key]


def setting_types(cls: type[AdapterConfig]) -> dict[str, Any]:
    """``{field: type}`` of the hyperparameters a method's config takes (what ``--set`` accepts)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name != "base_model_name_or_path"}


def parse_assignments(items: Sequence[str], what: str = "--set") -> dict[str, str]:
    """``["r=8", "alpha=16"] -> {"r": "8", "alpha": "16"}``."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        result[key] = value.strip()
    return result


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` (a Python value, or a string from the command line) converted to the type ``hint``.

    Strings may be JSON (``[...]``, ``{...}``, ``null``, numbers); lists also take ``a,b,c``. For a
    ``list[str] | str`` field (``target_modules``) a plain string is a comma-separated list of
    module names, unless it is ``all-linear`` or a regular expression (has ``*+?[](){}|^$\\``).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return json_or_text(value) if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and len(members) < len(args):
            return None
        if value is None and len(members) < len(args):
            return None
        if isinstance(value, str) and str in members and any(typing.get_origin(m) is list for m in members):
            text = value.strip()
            if text.startswith("["):
                return coerce_value(text, next(m for m in members if typing.get_origin(m) is list), where)
            if text == "all-linear" or _REGEX_CHARS & set(text):
                return text
            return [part.strip() for part in text.split(",") if part.strip()]
        for member in members:
            try:
                return coerce_value(value, member, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: {value!r} is not a {_type_name(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: {value!r} is not a boolean (expected true or false)")
    if hint is int or hint is float:
        return _coerce_number(value, hint, where)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: {value!r} is not a string")
        return value
    if origin is list:
        (item_type,) = args or (Any,)
        if isinstance(value, str):
            text = value.strip()
            value = _json(text, where) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: {value!r} is not a list")
        return [coerce_value(v, item_type, where) for v in value]
    if origin is dict:
        key_type, value_type = args or (str, Any)
        if isinstance(value, str):
            value = _json(value.strip(), where)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {value!r} is not a JSON object (expected e.g. '{{\"q_proj\": 4}}')")
        return {coerce_value(k, key_type, where): coerce_value(v, value_type, where) for k, v in value.items()}
    return value


def _coerce_number(value: Any, hint: type[int] | type[float], where: str) -> int | float:
    """``value`` as an ``int`` (ints, whole floats, integer strings) or a ``float`` (numbers, number strings)."""
    what = "an integer" if hint is int else "a number"
    if isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not {what}")
    if isinstance(value, int):
        return value if hint is int else float(value)
    if isinstance(value, float) and (hint is float or value.is_integer()):
        return hint(value)
    try:
        return hint(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not {what}") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {text!r} is not valid JSON ({err.msg})") from None


def json_or_text(text: str) -> Any:
    """``text`` parsed as JSON, or ``text`` itself when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def coerce_settings(method: str, settings: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``settings`` checked against ``method``'s config fields and converted to their types."""
    cls = config_class(method)
    fields = setting_types(cls)
    unknown = [key for key in settings if key not in fields]
    if unknown:
        raise ValueError(
            f"{where}{method} has no hyperparameter {', '.join(map(repr, unknown))} (valid: {', '.join(fields)})"
        )
    return {key: coerce_value(value, fields[key], f"{where}{method} {key}") for key, value in settings.items()}


def build_adapter_config(method: str, settings: Mapping[str, Any], where: str = "") -> AdapterConfig:
    """``method``'s config with ``settings`` (validated and converted: see `coerce_settings`)."""
    values = coerce_settings(method, settings, where)
    try:
        return config_class(method)(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}{method} settings {values}: {err}") from None
