"""The registry: every filter and terminal a route can use, in chain order.

A new filter is one module in txgateway/filters/ declaring a `FilterKind` (contract.py) plus
its line here; docs/extending.md shows one.
"""

from __future__ import annotations

from txgateway.config.contract import FilterKind, TerminalKind
from txgateway.filters.auth.config import AUTH
from txgateway.filters.cache.config import CACHE
from txgateway.filters.cors import CORS
from txgateway.filters.headerconfig import HEADER_RULES
from txgateway.filters.iprules import IP_RULES
from txgateway.filters.ratelimit.config import RATE_LIMIT
from txgateway.filters.split import SPLIT
from txgateway.filters.transform import TRANSFORM
from txgateway.filters.upstreamerrors import UPSTREAM_ERRORS
from txgateway.filters.websocket import WEBSOCKET
from txgateway.terminals.compose.config import COMPOSE
from txgateway.terminals.respond import RESPOND
from txgateway.upstream.config import PROXY

__all__ = ["FILTERS", "TERMINALS", "route_keys"]

# Chain order: refuse by address, then answer CORS preflights (a browser sends them without
# credentials), before identifying (401/403); identify before limiting (429); a tunnel counted
# only once both let it through; then the split (it may sticky-hash the user id); header rules.
# upstream_errors after them: on the way back its head hook runs before theirs, so the header
# rules also apply to the envelope it puts in place of an upstream's error page. transform: no
# request body is read for a refused request. The cache last: a hit is answered only to
# requests every filter before it let through (and goes back through their response hooks as
# a miss does), and it stores the upstream's own answer (its head hook runs first on the way back).
FILTERS: tuple[FilterKind, ...] = (IP_RULES, CORS, AUTH, RATE_LIMIT, WEBSOCKET, SPLIT, HEADER_RULES,
                                   UPSTREAM_ERRORS, TRANSFORM, CACHE)
TERMINALS: tuple[TerminalKind, ...] = (PROXY, RESPOND, COMPOSE)


def route_keys() -> dict[str, str]:
    """Every route key a filter or terminal owns, for the config's key check."""
    keys = {key: "" for kind in FILTERS for key in kind.route_keys}
    keys.update({kind.route_key: "" for kind in TERMINALS})
    return keys
