"""The `tracing:` section: where spans go (OTLP/HTTP), under which service name, how many.

Kept apart from ops/tracing.py so reading a config never imports the OpenTelemetry SDK."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

import yaml

from txgateway.config.reader import Reader, _Invalid
from txgateway.filters.headerconfig import header_name, header_value

__all__ = ["TracingConfig", "parse_tracing"]

@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str                      # the collector's OTLP/HTTP traces URL (.../v1/traces)
    service_name: str = "txgateway"
    sample_ratio: float = 1.0               # for traces the gateway starts; a caller's traceparent decides its own
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)  # may hold a token


def parse_tracing(r: Reader, node: yaml.Node) -> TracingConfig:
    path = "tracing"
    f = r.mapping(node, path, {k: "" for k in ("otlp_endpoint", "service_name", "sample_ratio", "headers")})
    before = len(r.problems)
    if "otlp_endpoint" not in f:
        raise r.fail(node, f"{path}.otlp_endpoint", "missing (required)")
    endpoint = r.attempt(lambda: _endpoint(r, f["otlp_endpoint"]), "")
    service = r.attempt(lambda: r.string(f["service_name"], f"{path}.service_name"), "txgateway") \
        if "service_name" in f else "txgateway"
    if not service:
        r.fail(f["service_name"], f"{path}.service_name", "expected a service name, got an empty string")
    ratio = r.attempt(lambda: r.number(f["sample_ratio"], f"{path}.sample_ratio", 0.0, 1.0), 1.0) \
        if "sample_ratio" in f else 1.0
    headers: dict[str, str] = r.attempt(lambda: _headers(r, f["headers"]), {}) if "headers" in f else {}
    if len(r.problems) != before:
        raise _Invalid()
    return TracingConfig(endpoint, service, ratio, MappingProxyType(headers))


def _endpoint(r: Reader, node: yaml.Node) -> str:
    url = r.string(node, "tracing.otlp_endpoint")
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise r.fail(node, "tracing.otlp_endpoint",
                     f'expected an http(s) URL like "http://127.0.0.1:4318/v1/traces", got "{url}"')
    return url


def _headers(r: Reader, node: yaml.Node) -> dict[str, str]:
    """Headers every export sends (a collector's API key)."""
    out = {}
    for name, key, value in r.free_mapping(node, "tracing.headers"):
        where = f"tracing.headers.{name}"
        pair = r.attempt(lambda: (header_name(r, key, where), header_value(r, value, where)), None)
        if pair is not None:
            out[pair[0].decode()] = pair[1].decode("latin-1")
    return out
