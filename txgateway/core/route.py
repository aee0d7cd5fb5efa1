"""A route as the config describes it: what it matches, what answers it, its filters' policies.

Parsed by config/schema.py (with the registry's filters and terminals); read by every layer,
so it lives in core/, at the bottom, and imports nothing of the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Route"]


@dataclass(frozen=True)
class Route:
    """What a route matches, what answers it, and its filters' parsed policies (by filter
    name, from the registry: a filter absent here does nothing on this route)."""

    prefix: str
    upstream: str | None                  # the proxy terminal's upstream (None: another terminal)
    rewrite_prefix: str | None = None
    methods: frozenset[bytes] | None = None
    host: str | None = None
    escaped_slashes: str = "reject"       # %2F, %5C, \ in the path: "reject" (400) or "keep" (opaque)
    case_insensitive: bool = False        # the prefix matches whatever the path's letter case
    terminal: str = "proxy"               # the registry's terminal name
    answer: Any = None                    # the terminal's parsed settings (the proxy's: the upstream)
    policies: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    index: int = 0
    # Per-route limits (None: the global/upstream value). max_body_size is also set on routes
    # without one of their own when another route raises the limit above limits.max_body_size,
    # since the transports then let bodies up to the largest through until the route is known.
    max_body_size: int | None = None
    timeout: float | None = None
    connect_timeout: float | None = None
