"""A component folder's config.json (diffusers / transformers): read it, and check its values
against the model config dataclass that takes them (a misspelt key or a wrong type named, not
silently defaulted)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from typing import Any, Iterable, Mapping

from lcm_jax.errors import UserError


class ConfigFileError(UserError, ValueError):
    """A config.json that is not a JSON object, or holds a value of the wrong type."""


def read_config(folder: str, name: str = "config.json") -> dict:
    """A component's JSON config, with an error naming the folder when it is not there and the
    file (and where in it) when it is not a JSON object."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {name}: expected a diffusers-layout component "
                                f"folder ({name} + *.safetensors or *.msgpack weights)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"{path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{path!r} is not a UTF-8 text (JSON) file: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigFileError(f"{path!r} holds a JSON {_json_type(cfg)}, expected an object of config keys")
    return cfg


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _type_ok(v: Any, tp: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (lists for tuples; bool is no int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_type_ok(v, a) for a in args)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if tp is tuple or origin is tuple:
        if not isinstance(v, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(x, args[0]) for x in v)
        return not args or (len(v) == len(args) and all(map(_type_ok, v, args)))
    return True  # an annotation we do not check


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if tp is tuple or origin is tuple:
        return f"a list of {_type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "a list"
    return getattr(tp, "__name__", str(tp))


def config_fields(cls: type, cfg: Mapping[str, Any], ignored: Iterable[str], *, source: str,
                  what: str, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The values ``cfg`` gives for the fields of dataclass ``cls`` (less ``skip``), each
    checked against its annotation (a ``ConfigFileError`` names ``source``, the key, the value
    and the type expected). Keys that are neither a field nor ``ignored`` (what the library
    that wrote ``cfg`` saves and we do not use) get one warning: a misspelt key would otherwise
    silently leave a default. Keys starting with "_" (``_class_name``, ...) are metadata."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in set(skip)]
    ignored = set(ignored)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in fields and k not in ignored)
    if unknown:
        logging.warning("%s: ignoring unknown %s config keys %s (misspelt? their fields keep the "
                        "defaults)", source, what, unknown)
    for k in fields:
        if k in cfg and not _type_ok(cfg[k], hints[k]):
            raise ConfigFileError(f"{source}: {what} config {k}={cfg[k]!r} is a JSON {_json_type(cfg[k])}, "
                                  f"expected {_type_name(hints[k])}")
    return {k: cfg[k] for k in fields if k in cfg}
