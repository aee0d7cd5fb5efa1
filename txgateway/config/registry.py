"""The registry: every filter and terminal a route can use, in chain order.

A new filter is one module in txgateway/filters/ declaring a `FilterKind` (contract.py) plus
its line here; docs/extending.md shows one.
"""

from __future__ import annotations

from txgateway.config.contract import FilterKind, TerminalKind
from txgateway.filters.auth.config import AUTH
from txgateway.filters.cache.config import CACHE
from txgateway.filters.headerconfig import HEADER_RULES
from txgateway.filters.ratelimit.config import RATE_LIMIT
from txgateway.terminals.respond import RESPOND
from txgateway.upstream.config import PROXY

__all__ = ["FILTERS", "TERMINALS", "route_keys"]

# Chain order: identify (401/403) before limiting (429), header rules, then the cache: a hit
# is answered only to requests the filters before it let through, and the cache stores the
# upstream's own headers (its head hook runs first on the way back).
FILTERS: tuple[FilterKind, ...] = (AUTH, RATE_LIMIT, HEADER_RULES,
                                   CACHE)
TERMINALS: tuple[TerminalKind, ...] = (PROXY, RESPOND)


def route_keys() -> dict[str, str]:
    """Every route key a filter or terminal owns, for the config's key check."""
    keys = {key: "" for kind in FILTERS for key in kind.route_keys}
    keys.update({kind.route_key: "" for kind in TERMINALS})
    return keys
