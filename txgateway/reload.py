"""What a reload (SIGHUP, or `reload()` in the Manhole) may change in a running gateway.

Routes, upstreams, auth policies, tiers and header rules are rebuilt from the new file. Some
settings are bound to things made once at start (sockets, the Redis link, the log file, the
JWKS fetcher, the kind of bucket store): a change there is reported and the running value
stays until a restart, rather than half-applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from txgateway.config import Config

__all__ = ["ReloadRefused", "keep_restart_only_settings"]

_RESTART_ONLY = ("listen", "admin", "manhole", "redis", "access_log", "drain_timeout")
_LIMITER_RESTART_ONLY = ("backend", "sync_interval", "on_redis_error", "instances", "max_buckets")
_JWKS_RESTART_ONLY = ("jwks_cooldown", "jwks_refresh", "jwks_timeout")


class ReloadRefused(Exception):
    """The new file needs a restart to mean what it says (applying part of it would leave
    routes unprotected or limited by settings that do not exist)."""


def keep_restart_only_settings(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the running values of restart-only settings, and the names of those that
    differ. Raises ReloadRefused when keeping the running value would change what a route
    enforces (a JWKS URL added, removed or changed; a Redis-backed limiter added or removed)."""
    changed = [key for key in _RESTART_ONLY if key != "listen" and getattr(new, key) != getattr(running, key)]
    values: dict[str, Any] = {key: getattr(running, key) for key in changed}
    # Listeners: the sockets stay; certificates and TLS settings of the same listeners reload.
    if [(x.endpoint, x.tls is None) for x in new.listen] != [(x.endpoint, x.tls is None) for x in running.listen]:
        values["listen"] = running.listen
        changed.insert(0, "listen")
    else:
        # Certificates and HSTS reload; the version range and ALPN are fixed in the listener's
        # TLS options when it starts.
        listen = list(new.listen)
        for i, (old_l, new_l) in enumerate(zip(running.listen, new.listen, strict=True)):
            if old_l.tls is None or new_l.tls is None:
                continue
            fixed = [key for key in ("min_version", "alpn") if getattr(new_l.tls, key) != getattr(old_l.tls, key)]
            if fixed:
                tls = dataclasses.replace(new_l.tls, **{key: getattr(old_l.tls, key) for key in fixed})
                listen[i] = dataclasses.replace(new_l, tls=tls)
                changed += [f"listen[{i}].tls.{key}" for key in fixed]
        values["listen"] = tuple(listen)
    if new.redirect_to_https != running.redirect_to_https:
        values["redirect_to_https"] = running.redirect_to_https
        changed.append("redirect_to_https")
    old_limits, new_limits = running.rate_limits, new.rate_limits
    if old_limits is not None and new_limits is not None:
        moved = [key for key in _LIMITER_RESTART_ONLY if getattr(new_limits, key) != getattr(old_limits, key)]
        if moved:
            values["rate_limits"] = dataclasses.replace(new_limits, **{key: getattr(old_limits, key) for key in moved})
            changed += [f"rate_limits.{key}" for key in moved]
    elif (old_limits is None) != (new_limits is None) and (old_limits or new_limits).backend != "local":  # type: ignore[union-attr]
        raise ReloadRefused("rate_limits: a Redis-backed limiter added or removed needs a restart")
    old_jwt = running.auth.jwt if running.auth is not None else None
    new_jwt = new.auth.jwt if new.auth is not None else None
    old_url = old_jwt.jwks_url if old_jwt is not None else None
    new_url = new_jwt.jwks_url if new_jwt is not None else None
    if old_url != new_url:
        raise ReloadRefused(f"auth.jwt.jwks_url changed ({old_url} -> {new_url}): that needs a restart")
    if old_jwt is not None and new.auth is not None and new_jwt is not None and new_url is not None:
        # The JWKS fetcher is made once, with these: the new file's other jwt settings apply.
        fetcher = [key for key in _JWKS_RESTART_ONLY if getattr(new_jwt, key) != getattr(old_jwt, key)]
        if fetcher:
            kept = dataclasses.replace(new_jwt, **{key: getattr(old_jwt, key) for key in fetcher})
            values["auth"] = dataclasses.replace(new.auth, jwt=kept)
            changed += [f"auth.jwt.{key}" for key in fetcher]
    return dataclasses.replace(new, **values), changed
