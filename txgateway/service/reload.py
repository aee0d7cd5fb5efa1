"""What a reload (SIGHUP, or `reload()` in the Manhole) may change in a running gateway.

Routes, upstreams, auth policies, tiers and header rules are rebuilt from the new file. Some
settings are bound to things made once at start (sockets, the Redis link, the log file, the
JWKS fetcher, the kind of bucket store): a change there is reported and the running value
stays until a restart, rather than half-applied.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from txgateway.config import registry
from txgateway.config.contract import ReloadRefused
from txgateway.config.schema import Config

__all__ = ["ReloadRefused", "keep_restart_only_settings"]

_RESTART_ONLY = ("listen", "admin", "manhole", "redis", "access_log", "access_log_fields", "access_log_redact",
                 "drain_timeout", "tracing")


def keep_restart_only_settings(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the running values of restart-only settings, and the names of those that
    differ. Raises ReloadRefused when keeping the running value would change what a route
    enforces (auth added through a new JWKS URL, a Redis-backed limiter added or removed:
    each filter's `reload` rule says)."""
    changed = [key for key in _RESTART_ONLY if key != "listen" and getattr(new, key) != getattr(running, key)]
    values: dict[str, Any] = {key: getattr(running, key) for key in changed}
    # Listeners: the sockets stay; certificates and TLS settings of the same listeners reload.
    if [(x.endpoint, x.tls is None) for x in new.listen] != [(x.endpoint, x.tls is None) for x in running.listen]:
        values["listen"] = running.listen
        changed.insert(0, "listen")
    else:
        # Certificates (client CA bundles too) and HSTS reload; the version range, ALPN and the
        # client-certificate settings are fixed in the listener when it starts.
        listen = list(new.listen)
        for i, (old_l, new_l) in enumerate(zip(running.listen, new.listen, strict=True)):
            if old_l.tls is None or new_l.tls is None:
                continue
            fixed = [key for key in ("min_version", "alpn", "client_auth") if getattr(new_l.tls, key) != getattr(old_l.tls, key)]
            if fixed:
                tls = dataclasses.replace(new_l.tls, **{key: getattr(old_l.tls, key) for key in fixed})
                listen[i] = dataclasses.replace(new_l, tls=tls)
                changed += [f"listen[{i}].tls.{key}" for key in fixed]
        values["listen"] = tuple(listen)
    if new.redirect_to_https != running.redirect_to_https:
        values["redirect_to_https"] = running.redirect_to_https
        changed.append("redirect_to_https")
    # Each filter's section: its own rule says what a reload may change (registry).
    sections = dict(new.sections)
    for kind in registry.FILTERS:
        if kind.section is None or kind.reload is None:
            continue
        kept, moved = kind.reload(running.sections.get(kind.section), new.sections.get(kind.section))
        if kept is not None:
            sections[kind.section] = kept
        changed += moved
    values["sections"] = MappingProxyType(sections)
    return dataclasses.replace(new, **values), changed
