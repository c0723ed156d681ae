"""The method registry: `method: NAME` in a config → the `Method` class that declared NAME.

Built-in methods register when `ssl_kd.methods` is imported; a new method is one file with a
`@register`-ed class (a test registers a toy method the same way), and nothing else changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ssl_kd.errors import ConfigError

if TYPE_CHECKING:
    from ssl_kd.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: makes `cls` available under each of `cls.names`."""
    if not cls.names or not cls.section:
        raise TypeError(f"{cls.__name__} must declare `names` and `section`")
    for name in cls.names:
        if _METHODS.get(name, cls) is not cls:
            raise ValueError(f"method name {name!r} is taken by {_METHODS[name].__name__}")
    sections = {other.section: other for other in _METHODS.values()}
    if sections.get(cls.section, cls) is not cls:
        raise ValueError(f"config section {cls.section!r} is taken by {sections[cls.section]}")
    for name in cls.names:
        _METHODS[name] = cls
    return cls


def unregister(cls: type[Method]) -> None:
    for name in cls.names:
        if _METHODS.get(name) is cls:
            del _METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered under `name`.

    Raises:
        ConfigError: no such method; the message lists the registered names.
    """
    if name not in _METHODS:
        raise ConfigError(f"method={name!r} is not valid; choose one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def sections() -> dict[str, type]:
    """Config section key → its dataclass, for every registered method."""
    return {cls.section: cls.config_class for cls in dict.fromkeys(_METHODS.values())}
