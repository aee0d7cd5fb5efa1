"""An upstream's resilience settings: `circuit_breaker:`, `health_check:`, `passive_health:`.

Read into frozen values at load; every bad value is named by key path and line, and
cross-field rules (max_open_for >= open_for, ...) are checked here, not at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.reader import Reader, _Invalid
from txgateway.config.units import parse_duration
from txgateway.upstream.breaker import BreakerSettings

__all__ = ["HealthCheck", "PassiveHealth", "parse_circuit_breaker", "parse_health_check", "parse_passive_health"]


@dataclass(frozen=True)
class HealthCheck:
    """Active checks: GET `path` on every target each `interval`; `unhealthy_threshold`
    failures in a row take a target out, `healthy_threshold` successes bring it back."""

    path: bytes
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3


@dataclass(frozen=True)
class PassiveHealth:
    """Outlier ejection from live traffic: `consecutive_failures` in a row eject a target for
    `eject_for`, doubling on each ejection that follows without a success, up to `max_eject_for`."""

    consecutive_failures: int = 5
    eject_for: float = 10.0
    max_eject_for: float = 300.0


def _durations(r: Reader, f: dict[str, yaml.Node], path: str, keys: tuple[str, ...], low: float = 0.001) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        if key in f:
            value = r.attempt(lambda: r.parsed(f[key], f"{path}.{key}", parse_duration), None)
            if value is not None and value < low:
                r.fail(f[key], f"{path}.{key}", f"expected at least {low * 1000:g}ms, got {f[key].value}")
            elif value is not None:
                out[key] = value
    return out


def _integers(r: Reader, f: dict[str, yaml.Node], path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        if key in f:
            value = r.attempt(lambda: r.integer(f[key], f"{path}.{key}", 1), None)
            if value is not None:
                out[key] = value
    return out


def parse_circuit_breaker(r: Reader, node: yaml.Node, path: str) -> BreakerSettings:
    keys = ("consecutive_failures", "failure_ratio", "window", "min_requests", "open_for", "max_open_for",
            "half_open_requests", "failure_statuses")
    f = r.mapping(node, path, {k: "" for k in keys})
    before = len(r.problems)
    values = _durations(r, f, path, ("window", "open_for", "max_open_for"))
    values.update(_integers(r, f, path, ("consecutive_failures", "min_requests", "half_open_requests")))
    if "failure_ratio" in f:
        if f["failure_ratio"].tag == "tag:yaml.org,2002:null" or f["failure_ratio"].value == "off":
            values["failure_ratio"] = None
        else:
            values["failure_ratio"] = r.attempt(lambda: r.number(f["failure_ratio"], f"{path}.failure_ratio", 0.01, 1.0), 0.5)
    if "failure_statuses" in f:
        statuses = []
        for item_path, item in r.sequence(f["failure_statuses"], f"{path}.failure_statuses"):
            status = r.attempt(lambda: r.integer(item, item_path, 100), None)
            if status is not None and status > 599:
                r.fail(item, item_path, f"expected an HTTP status 100-599, got {status}")
            elif status is not None:
                statuses.append(status)
        values["failure_statuses"] = frozenset(statuses)
    if values.get("max_open_for", BreakerSettings.max_open_for) < values.get("open_for", BreakerSettings.open_for):
        r.fail(f.get("max_open_for") or f.get("open_for"), f"{path}.max_open_for",
               f"must be at least open_for ({values.get('open_for', BreakerSettings.open_for):g}s); "
               f"it is {values.get('max_open_for', BreakerSettings.max_open_for):g}s"
               + ("" if "max_open_for" in values else " by default"))
    if len(r.problems) != before:
        raise _Invalid()
    return BreakerSettings(**values)


def parse_health_check(r: Reader, node: yaml.Node, path: str) -> HealthCheck:
    keys = ("path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold")
    f = r.mapping(node, path, {k: "" for k in keys})
    before = len(r.problems)
    if "path" not in f:
        raise r.fail(node, f"{path}.path", "missing (required): e.g. /healthz")
    check_path = r.string(f["path"], f"{path}.path")
    if not check_path.startswith("/") or any(c in check_path for c in " \r\n\t#"):
        r.fail(f["path"], f"{path}.path", f'expected an absolute path like "/healthz", got "{check_path}"')
    values = _durations(r, f, path, ("interval", "timeout"), 0.01)
    values.update(_integers(r, f, path, ("healthy_threshold", "unhealthy_threshold")))
    if values.get("timeout", HealthCheck.timeout) >= values.get("interval", HealthCheck.interval):
        r.fail(f.get("timeout") or node, f"{path}.timeout",
               f"must be shorter than interval ({values.get('interval', HealthCheck.interval):g}s); it is "
               f"{values.get('timeout', HealthCheck.timeout):g}s" + ("" if "timeout" in values else " by default"))
    if len(r.problems) != before:
        raise _Invalid()
    return HealthCheck(path=check_path.encode(), **values)


def parse_passive_health(r: Reader, node: yaml.Node, path: str) -> PassiveHealth:
    f = r.mapping(node, path, {"consecutive_failures": "", "eject_for": "", "max_eject_for": ""})
    before = len(r.problems)
    values = _durations(r, f, path, ("eject_for", "max_eject_for"))
    values.update(_integers(r, f, path, ("consecutive_failures",)))
    if values.get("max_eject_for", PassiveHealth.max_eject_for) < values.get("eject_for", PassiveHealth.eject_for):
        r.fail(f.get("max_eject_for") or f.get("eject_for"), f"{path}.max_eject_for", "must be at least eject_for")
    if len(r.problems) != before:
        raise _Invalid()
    return PassiveHealth(**values)
