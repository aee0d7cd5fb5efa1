"""Keys from a JWKS URL: fetched without blocking, cached, refetched on rotation.

PyJWT's `PyJWKClient` uses urllib and would freeze the reactor; the fetch here is an
injected `fetch(url) -> Deferred[bytes]` (treq in production). The last good key set
stays in use when a fetch fails; an unknown `kid` triggers at most one refetch per
`cooldown`, and every request waiting for that kid shares the one fetch in flight.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from txgateway.core.periodic import Periodic
from txgateway.filters.auth.config import Jwk, parse_jwks

__all__ = ["RemoteJwks"]

_log = Logger(namespace="txgateway.filters.auth.jwks")


class RemoteJwks:
    def __init__(self, url: str, clock: Any, fetch: Callable[[str], Deferred[bytes]],
                 cooldown: float, refresh: float, timeout: float) -> None:
        self.url = url
        self.clock = clock
        self._fetch = fetch
        self.cooldown = cooldown
        self.timeout = timeout
        self.keys: dict[str | None, list[Jwk]] = {}
        self.fetched_at: float | None = None      # last successful fetch
        self.failures = 0
        self._last_attempt = float("-inf")
        self._inflight: Deferred[Any] | None = None
        self._refresher = Periodic(clock, refresh, self.refresh, now=True)

    def current(self) -> dict[str | None, list[Jwk]]:
        return self.keys

    def start(self) -> None:
        self._refresher.start()

    def stop(self) -> None:
        self._refresher.stop()

    def refresh(self) -> Deferred[None]:
        """Fetch now (periodic refresh, or start); shares a fetch already in flight."""
        if self._inflight is not None:
            return _follow(self._inflight)
        self._last_attempt = self.clock.seconds()
        d: Deferred[Any] = self._fetch(self.url)
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._got, self._failed)
        self._inflight = d
        d.addBoth(self._settled)
        return _follow(d)

    def refetch_for_unknown_kid(self) -> Deferred[None] | None:
        """A refetch for an unknown kid, or None while the cooldown runs."""
        if self._inflight is not None:
            return _follow(self._inflight)
        if self.clock.seconds() - self._last_attempt < self.cooldown:
            return None
        return self.refresh()

    def _got(self, body: bytes) -> None:
        try:
            keys = parse_jwks(json.loads(body))
        except ValueError as e:
            self._failed_reason(f"unusable JWKS: {e}")
            return
        by_kid: dict[str | None, list[Jwk]] = {}
        for key in keys:
            by_kid.setdefault(key.kid, []).append(key)
        if self.failures or self.fetched_at is None:
            _log.info("JWKS from {url}: {count} keys", url=self.url, count=len(keys))
        self.keys = by_kid
        self.fetched_at = self.clock.seconds()
        self.failures = 0

    def _failed(self, failure: Any) -> None:
        self._failed_reason(failure.getErrorMessage() or failure.type.__name__)

    def _failed_reason(self, reason: str) -> None:
        self.failures += 1
        kept = "keeping the last good keys" if self.keys else "no keys yet: asymmetric tokens get 503"
        _log.warn("JWKS fetch from {url} failed ({reason}); {kept}", url=self.url, reason=reason, kept=kept)

    def _settled(self, result: Any) -> None:
        self._inflight = None


def _follow(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with None) when `d` has settled, without touching its result."""
    if d.called:
        return succeed(None)
    follower: Deferred[None] = Deferred()
    d.addBoth(lambda _: follower.callback(None))
    return follower
