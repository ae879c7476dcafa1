"""YAML configuration read into validated values, with errors that name file, line and field.

Every config file of the project (energy policies, the agent, the collector) is read through
:func:`load_section`, which keeps the line of every YAML node. Parsers call the typed getters
of :class:`Section` and build their own dataclasses; any problem raises
:class:`~tensorslm.controller.errors.ConfigError` with the file, the line and the dotted field path::

    root = load_section("agent.yaml")
    port = root.int("port", default=1883, minimum=1, maximum=65535)
    broker = root.section("broker")
    root.reject_unknown()   # after every known field was read
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from tensorslm.errors import ConfigError

_MISSING = object()


def _plain(node: yaml.Node) -> Any:
    """Convert a composed YAML node to Python values (safe constructors only)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


class Value:
    """A scalar or sequence item, with its position for error messages."""

    def __init__(self, node: yaml.Node, file: str, path: str) -> None:
        self.node = node
        self.file = file
        self.path = path

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line, field=self.path)

    @property
    def plain(self) -> Any:
        return _plain(self.node)


class Section(Value):
    """A YAML mapping. Getters record which keys were read so unknown keys can be refused."""

    def __init__(self, node: yaml.Node, file: str, path: str = "") -> None:
        super().__init__(node, file, path)
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"expected a mapping (key: value lines), got {_kind(node)}",
                              file=file, line=node.start_mark.line + 1, field=path or None)
        self._items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = _plain(key_node)
            if not isinstance(key, str):
                raise ConfigError(f"keys must be strings, got {key!r}", file=file,
                                  line=key_node.start_mark.line + 1, field=path or None)
            if key in self._items:
                raise ConfigError("duplicate key", file=file, line=key_node.start_mark.line + 1,
                                  field=self._child(key))
            self._items[key] = (key_node, value_node)
        self._read: set[str] = set()

    # -- structure ---------------------------------------------------------------------------
    def _child(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def keys(self) -> list[str]:
        return list(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def field_error(self, key: str, message: str) -> ConfigError:
        """An error about field ``key`` (at its line if present, else at the mapping's)."""
        line = self._items[key][1].start_mark.line + 1 if key in self._items else self.line
        return ConfigError(message, file=self.file, line=line, field=self._child(key))

    def _get(self, key: str, default: Any) -> yaml.Node | None:
        self._read.add(key)
        if key not in self._items:
            if default is _MISSING:
                raise ConfigError("required field is missing", file=self.file, line=self.line,
                                  field=self._child(key))
            return None
        node = self._items[key][1]
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            if default is _MISSING:
                raise self.field_error(key, "required field is empty")
            return None
        return node

    def reject_unknown(self) -> None:
        """Raise for the first key that no getter asked for, listing the accepted keys."""
        for key, (key_node, _) in self._items.items():
            if key not in self._read:
                accepted = ", ".join(sorted(self._read)) or "(none)"
                raise ConfigError(f"unknown field; accepted fields here: {accepted}",
                                  file=self.file, line=key_node.start_mark.line + 1,
                                  field=self._child(key))

    # -- typed getters -----------------------------------------------------------------------
    def section(self, key: str, default: Any = _MISSING) -> "Section | None":
        node = self._get(key, default)
        if node is None:
            return default if default is not None else None
        return Section(node, self.file, self._child(key))

    def sections(self, key: str, default: Any = _MISSING) -> list["Section"]:
        """A list of mappings (e.g. the operating points of a policy)."""
        return [Section(item.node, self.file, item.path) for item in self.list(key, default)]

    def list(self, key: str, default: Any = _MISSING) -> list[Value]:
        node = self._get(key, default)
        if node is None:
            return [] if default is _MISSING or default is None else list(default)
        if not isinstance(node, yaml.SequenceNode):
            raise self.field_error(key, f"expected a list, got {_kind(node)}")
        return [Value(item, self.file, f"{self._child(key)}[{i}]")
                for i, item in enumerate(node.value)]

    def mapping(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        node = self._get(key, default)
        if node is None:
            return {} if default is _MISSING or default is None else dict(default)
        if not isinstance(node, yaml.MappingNode):
            raise self.field_error(key, f"expected a mapping, got {_kind(node)}")
        return _plain(node)

    def _scalar(self, key: str, default: Any) -> Any:
        node = self._get(key, default)
        if node is None:
            return _MISSING
        if not isinstance(node, yaml.ScalarNode):
            raise self.field_error(key, f"expected a single value, got {_kind(node)}")
        return _plain(node)

    def str(self, key: str, default: Any = _MISSING, *, choices: Sequence[str] | None = None,
            nonempty: bool = True) -> Any:
        value = self._scalar(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.field_error(key, f"expected text, got {type(value).__name__} {value!r}")
        if nonempty and not value.strip():
            raise self.field_error(key, "expected non-empty text")
        if choices is not None and value not in choices:
            raise self.field_error(key, f"expected one of {', '.join(choices)}; got {value!r}")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self._scalar(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.field_error(key, f"expected true or false, got {value!r}")
        return value

    def int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        value = self._scalar(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.field_error(key, f"expected a whole number, got {value!r}")
        _check_range(self, key, value, minimum, maximum)
        return value

    def float(self, key: str, default: Any = _MISSING, *, minimum: float | None = None,
              maximum: float | None = None) -> Any:
        value = self._scalar(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.field_error(key, f"expected a number, got {value!r}")
        _check_range(self, key, value, minimum, maximum)
        return float(value)

    def choice(self, key: str, choices: Iterable[str], default: Any = _MISSING) -> Any:
        return self.str(key, default, choices=list(choices))


def _check_range(section: Section, key: str, value: float, minimum: float | None,
                 maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise section.field_error(key, f"expected at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise section.field_error(key, f"expected at most {maximum}, got {value}")


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}"


def load_section(path: str | Path) -> Section:
    """Read a YAML file whose top level is a mapping. Raises ConfigError with file and line."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=file) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=file) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {exc.problem or exc.context}", file=file, line=line) from None
    if node is None:
        raise ConfigError("file is empty; expected a mapping of settings", file=file, line=1)
    return Section(node, file)
