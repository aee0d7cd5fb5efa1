"""What the config tests share: `config_errors` (a config that must be refused), `BASE`,
`route_auth`, and `unwritable` (a directory or file this process cannot write)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from txgateway.config.schema import ConfigError, ConfigProblem, Route, parse_config

# A valid config of 8 lines, two upstreams and a route to each: the config tests append the
# section under test from line 9, so the line numbers they expect depend on these 8.
BASE = """\
listen:
  - endpoint: "tcp:8080"
upstreams:
  users: {targets: ["http://127.0.0.1:3001"]}
  orders: {targets: ["http://127.0.0.1:3003"]}
routes:
  - {prefix: /api/users, upstream: users}
  - {prefix: /api/orders, upstream: orders}
"""


def route_auth(route: Route) -> tuple[str, frozenset[str] | None]:
    """A route's auth mode and roles ("none", None without auth)."""
    policy = route.policies.get("auth")
    return ("none", None) if policy is None else (policy.mode, policy.roles)


def config_errors(text: str, file: str = "c.yaml", environ: Mapping[str, str] | None = None) -> list[str]:
    """The problems parse_config reports for `text`, one a line as check-config prints them.

    The ConfigError must list at least one problem, each a ConfigProblem, and its own text
    must be exactly theirs, one a line (so `str(error).splitlines()` is the same list).
    `environ` is passed on as is (None: os.environ).
    """
    with pytest.raises(ConfigError) as info:
        parse_config(text, file, environ)
    problems = info.value.problems
    assert problems, "a ConfigError must list at least one problem"
    assert all(isinstance(p, ConfigProblem) for p in problems)
    assert str(info.value) == "\n".join(str(p) for p in problems)
    return [str(p) for p in problems]


def unwritable(tmp_path: Path, kind: str) -> Path:
    """A directory, or a file, this process cannot write: made read-only, or (root writes
    anything) on a read-only file system."""
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        if kind == "file":
            path.write_text("")
        else:
            path.mkdir()
        path.chmod(0o555)
        return path
    for candidate in {"dir": ["/proc/sys"], "file": ["/proc/sys/kernel/ostype"]}[kind]:
        if os.path.exists(candidate) and not os.access(candidate, os.W_OK):
            return Path(candidate)
    pytest.skip(f"running as root, with no read-only {kind} to try")
