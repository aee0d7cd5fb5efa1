"""A reader over PyYAML's node tree that keeps line numbers for every error.

PyYAML's `safe_load` throws positions away; composing nodes keeps them, so every complaint
can say `file:line: key.path: what was expected`. Errors are collected, not raised one by
one, so `check-config` reports all of them in one run.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from txgateway.transport.endpoints import endpoint_problem

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_METHOD = re.compile(r"^[A-Z]+$")


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config file is invalid; `problems` lists every error found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    def report(self, file: str) -> str:
        """What check-config and twistd print when `file` is refused: each problem, then a count."""
        return f"{self}\n{file}: {len(self.problems)} error(s), configuration rejected"


class _Invalid(Exception):
    """Raised inside the reader to abandon one value after recording its problem."""


@dataclass
class Reader:
    """Typed access to YAML nodes; each accessor records a problem and raises `_Invalid`."""

    file: str
    problems: list[ConfigProblem] = field(default_factory=list)
    # Read first from the top level: names of request headers with `_` are refused without it,
    # since such headers are dropped before anything reads them (filters/headerconfig.py).
    underscores_in_headers: bool = False

    def fail(self, node: yaml.Node | None, path: str, message: str) -> _Invalid:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(ConfigProblem(self.file, line, path, message))
        return _Invalid()

    def attempt(self, fn: Callable[[], T], default: T) -> T:
        """Run one accessor; on a recorded problem return `default` and keep going."""
        try:
            return fn()
        except _Invalid:
            return default

    def require(self, node: yaml.Node, fields: dict[str, yaml.Node], path: str, keys: tuple[str, ...]) -> None:
        """Record "missing (required)" for each of `keys` that the mapping `fields` lacks."""
        for key in keys:
            if key not in fields:
                self.fail(node, f"{path}.{key}", "missing (required)")

    def mapping(self, node: yaml.Node, path: str, allowed: dict[str, str]) -> dict[str, yaml.Node]:
        """A mapping whose keys must be in `allowed` (key -> short description for typos)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, path, f"expected a mapping, got {_kind(node)}")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.fail(key_node, path, "expected string keys")
                continue
            if key in out:
                self.fail(key_node, _join(path, key), "duplicate key")
                continue
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                self.fail(key_node, _join(path, key), f"unknown key (expected one of: {known})")
                continue
            out[key] = value_node
        return out

    def free_mapping(self, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """A mapping with user-chosen keys (upstream names, header names)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, path, f"expected a mapping, got {_kind(node)}")
        seen: set[str] = set()
        out = []
        for key_node, value_node in node.value:
            key = self.attempt(lambda: self.string(key_node, path), None)
            if key is None:
                continue
            if key in seen:
                self.fail(key_node, _join(path, key), "duplicate key")
                continue
            seen.add(key)
            out.append((key, key_node, value_node))
        return out

    def sequence(self, node: yaml.Node, path: str) -> Iterator[tuple[str, yaml.Node]]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, path, f"expected a list, got {_kind(node)}")
        for index, item in enumerate(node.value):
            yield f"{path}[{index}]", item

    def scalar(self, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, path, f"expected a single value, got {_kind(node)}")
        try:
            return yaml.constructor.SafeConstructor().construct_object(node)
        except yaml.MarkedYAMLError as e:  # unknown tag (!foo), bad !!binary...
            raise self.fail(node, path, f"invalid value: {e.problem}") from None
        except ValueError as e:  # a timestamp-shaped value that is no date (2024-13-45)
            raise self.fail(node, path, f"invalid value {node.value!r}: {e}") from None

    def string(self, node: yaml.Node, path: str) -> str:
        value = self.scalar(node, path)
        if not isinstance(value, str):
            raise self.fail(node, path, f"expected a string, got {value!r}")
        return value

    def file_path(self, node: yaml.Node, path: str) -> str:
        """A file name; a relative one is relative to the config file's directory, wherever
        the gateway or check-config runs from."""
        name = self.string(node, path)
        if not name:
            raise self.fail(node, path, "expected a file path, got an empty string")
        return os.path.join(os.path.dirname(os.path.abspath(self.file)), name)

    def endpoint(self, node: yaml.Node, path: str) -> str:
        """A Twisted endpoint string to listen on, as Twisted's parser reads it."""
        description = self.string(node, path)
        problem = endpoint_problem(description)
        if problem is not None:
            raise self.fail(node, path, problem)
        return description

    def boolean(self, node: yaml.Node, path: str) -> bool:
        value = self.scalar(node, path)
        if not isinstance(value, bool):
            raise self.fail(node, path, f"expected true or false, got {value!r}")
        return value

    def integer(self, node: yaml.Node, path: str, minimum: int = 0) -> int:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(node, path, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, node: yaml.Node, path: str, low: float, high: float) -> float:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.fail(node, path, f"expected a number from {low} to {high}, got {value!r}")
        return float(value)

    def choice(self, node: yaml.Node, path: str, choices: tuple[str, ...]) -> str:
        value = self.scalar(node, path)
        if value not in choices:
            raise self.fail(node, path, f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def methods(self, node: yaml.Node, path: str) -> tuple[bytes, ...]:
        """A list of HTTP methods, in the order written."""
        methods = []
        for item_path, item in self.sequence(node, path):
            method = self.string(item, item_path)
            if not _METHOD.match(method):
                raise self.fail(item, item_path, f'expected an upper-case HTTP method like "GET", got "{method}"')
            methods.append(method.encode())
        return tuple(methods)

    def networks(self, node: yaml.Node, path: str) -> tuple[IPNetwork, ...]:
        """A list of addresses or CIDRs (IPv4 and IPv6); a bare address is its /32 or /128."""
        out = []
        for item_path, item in self.sequence(node, path):
            text = self.attempt(lambda: self.string(item, item_path), None)
            if text is None:
                continue
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                self.fail(item, item_path, f'expected an address or CIDR like "10.0.0.0/8", got "{text}"')
        return tuple(out)

    def parsed(self, node: yaml.Node, path: str, parse: Callable[[Any], T]) -> T:
        """A scalar run through a unit parser (durations, sizes, rates)."""
        value = self.scalar(node, path)
        try:
            return parse(value if isinstance(value, int) and not isinstance(value, bool) else str(value))
        except ValueError as e:
            raise self.fail(node, path, str(e)) from None


def cannot_write(file: str) -> str | None:
    """Why `file` (absolute) cannot be appended to or created, or None if it can."""
    if os.path.isdir(file):
        return "it is a directory"
    if os.path.exists(file):
        return None if os.access(file, os.W_OK) else "it is not writable"
    directory = os.path.dirname(file)
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    return None if os.access(directory, os.W_OK | os.X_OK) else f"directory {directory} is not writable"


def compose(text: str, file: str) -> yaml.Node | None:
    """Parse YAML into nodes, turning syntax errors into a ConfigError with the line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark else None
        problem = e.problem
        if mark is not None and text[mark.index:mark.index + 1] == "\t":
            problem = f"a tab at column {mark.column + 1}: indent with spaces (YAML does not allow tabs there)"
        raise ConfigError([ConfigProblem(file, line, "", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigProblem(file, None, "", f"invalid YAML: {e}")]) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)
