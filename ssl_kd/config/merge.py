"""Schema defaults ← YAML file ← `a.b=value` overrides, with errors that name the key.

Generic over the method sections: the caller (ssl_kd/run_config.py) passes the registered
methods' section classes, so nothing here knows a method.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ssl_kd.config.sections import SHARED_SECTIONS, Config
from ssl_kd.errors import ConfigError

_MISSING = object()


def schema(sections: Mapping[str, type]) -> DictConfig:
    """The typed OmegaConf tree: the shared sections plus one node per method section."""
    root = OmegaConf.structured(Config)
    with open_dict(root):
        del root["sections"]
        for key, section_class in sections.items():
            root[key] = OmegaConf.structured(section_class)
    return root


def free_dicts(sections: Mapping[str, type]) -> tuple[str, ...]:
    """Dotted paths of dict-typed fields (model.kwargs, ...): any key may go below them."""
    classes = {name: _field_class(Config, name) for name in SHARED_SECTIONS} | dict(sections)
    found = []
    for key, section_class in classes.items():
        hints = typing.get_type_hints(section_class)
        for name, hint in hints.items():
            if typing.get_origin(hint) is dict:
                found.append(f"{key}.{name}")
    return tuple(found)


def _field_class(owner: type, name: str) -> type:
    hint = typing.get_type_hints(owner)[name]
    assert isinstance(hint, type) and dataclasses.is_dataclass(hint), name
    return hint


def flatten(node: Mapping[str, Any], free: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}, stopping at the free dicts (compared as one value)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping | DictConfig) and dotted not in free:
            flat.update(flatten(value, free, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _unknown_key_message(tree: DictConfig, dotted: str) -> str:
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            where = ".".join(parts[:depth]) or "<top level>"
            valid = sorted(str(key) for key in node) if isinstance(node, DictConfig) else []
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean '{'.'.join([*parts[:depth], close[0]])}'?" if close else ""
            return (
                f"unknown config key '{dotted}'. Valid keys in {where}: {', '.join(valid)}.{hint}"
            )
        node = node[part]
    return f"unknown config key '{dotted}'"


def _dotted_keys(node: DictConfig, free: tuple[str, ...], prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        dotted = f"{prefix}{key!s}"
        value = node._get_node(key)  # no interpolation resolution
        if isinstance(value, DictConfig) and dotted not in free:
            keys.extend(_dotted_keys(value, free, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def merge(tree: DictConfig, other: DictConfig, source: str, free: tuple[str, ...]) -> DictConfig:
    """`other` merged over `tree`; an unknown key or a bad value is a ConfigError naming it."""
    for dotted in _dotted_keys(other, free):
        under_free = any(dotted.startswith(prefix + ".") for prefix in free)
        if not under_free and OmegaConf.select(tree, dotted, default=_MISSING) is _MISSING:
            raise ConfigError(f"{source}: {_unknown_key_message(tree, dotted)}")
    try:
        return OmegaConf.merge(tree, other)  # type: ignore[return-value]
    except (ValidationError, ConfigKeyError) as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"{source}: bad value for '{key}': {first_line(err)}") from None


def first_line(err: Exception) -> str:
    """OmegaConf's messages go on with the node's full_key/reference_type on more lines."""
    message = str(getattr(err, "msg", "") or err)
    return message.splitlines()[0] if message else type(err).__name__


def read_yaml(path: str | Path) -> DictConfig:
    """A YAML file holding a mapping of config keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line number
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return loaded


def parse_override(override: str) -> DictConfig:
    """`a.b=value` → a one-key tree."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. train.epochs=10)")
    try:
        return OmegaConf.from_dotlist([override])
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {override!r}: {first_line(err)}") from None


def to_config(tree: DictConfig, sections: Mapping[str, type]) -> Config:
    """The merged tree → a `Config` of dataclasses (method sections in `Config.sections`)."""
    try:
        shared: dict[str, Any] = {
            key: OmegaConf.to_object(tree[key]) if key in SHARED_SECTIONS else tree[key]
            for key in ("method", "output_dir", *SHARED_SECTIONS)
        }
        own = {key: OmegaConf.to_object(tree[key]) for key in sections}
    except OmegaConfBaseException as err:
        raise ConfigError(first_line(err)) from None
    return Config(**shared, sections=own)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain containers, method sections at the top level (the YAML and checkpoint layout)."""
    tree = {
        "method": cfg.method,
        "output_dir": cfg.output_dir,
        **{key: getattr(cfg, key) for key in SHARED_SECTIONS},
        **cfg.sections,
    }
    return {
        key: OmegaConf.to_container(OmegaConf.structured(value))
        if dataclasses.is_dataclass(value)
        else value
        for key, value in tree.items()
    }


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
