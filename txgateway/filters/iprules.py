"""`ip_allow:` / `ip_deny:`: which client addresses may use a route (and, under `ip_rules:`, every route).

Decided on `ctx.client_ip`, the address `trusted_proxies` resolved: an `X-Forwarded-For` from
a peer that is not a trusted proxy is ignored there, so a client cannot write its way in. A
refused address gets 403 `FORBIDDEN` before its credentials are looked at. A deny entry wins
over an allow entry; with an allow list, only the addresses it names pass. The gateway-wide
rules and the route's both apply. Addresses the rules cannot read (a trusted proxy that
forwarded garbage) are refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import FilterKind, Scope
from txgateway.config.reader import IPNetwork, Reader
from txgateway.core.pipeline import LocalResponse, RequestContext, error_response

__all__ = ["IP_RULES", "IpRules", "IpRulesFilter"]

_KEYS = ("ip_allow", "ip_deny")
_CACHED = 4096          # decisions remembered per route (a client sends many requests)


@dataclass(frozen=True)
class IpRules:
    """One set of rules: the route's, or the gateway's (`ip_rules:`)."""

    allow: tuple[IPNetwork, ...] = ()      # empty: every address not denied
    deny: tuple[IPNetwork, ...] = ()

    def admits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)


def _rules(r: Reader, fields: Mapping[str, yaml.Node], path: str) -> IpRules:
    """`ip_allow` and `ip_deny` of a route or of the `ip_rules:` section (`path` leads to them)."""
    no_networks: tuple[IPNetwork, ...] = ()
    lists = {key: r.attempt(lambda: r.networks(fields[key], f"{path}.{key}"), no_networks)
             for key in _KEYS if key in fields}
    for key in lists:
        if isinstance(fields[key], yaml.SequenceNode) and not fields[key].value:
            r.fail(fields[key], f"{path}.{key}", "expected at least one address or CIDR (leave the key out for none)")
    return IpRules(allow=lists.get("ip_allow", ()), deny=lists.get("ip_deny", ()))


def parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> IpRules | None:
    """The route's own rules; an empty set on routes without them when `ip_rules:` applies to
    every route; None (no filter at all) when neither exists."""
    if fields:
        return _rules(r, fields, path)
    return IpRules() if "ip_rules" in scope.sections else None


def parse_section(r: Reader, node: yaml.Node, top: dict[str, yaml.Node], environ: Any) -> IpRules:
    fields = r.mapping(node, "ip_rules", {key: "" for key in _KEYS})
    if not fields:
        raise r.fail(node, "ip_rules", "expected ip_allow and/or ip_deny")
    return _rules(r, fields, "ip_rules")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped         # a dual-stack listener's view of an IPv4 client
    return address


class IpRulesFilter:
    """One route's address check: the gateway's rules, then the route's."""

    name = "ip_rules"
    on_response_head = None
    on_response_body = None
    on_finished = None

    def __init__(self, rules: tuple[IpRules, ...]) -> None:
        self.rules = rules
        self._decided: dict[str, bool] = {}

    def admits(self, ip: str) -> bool:
        known = self._decided.get(ip)
        if known is None:
            address = _address(ip)
            known = address is not None and all(rules.admits(address) for rules in self.rules)
            if len(self._decided) < _CACHED:
                self._decided[ip] = known
        return known

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        if self.admits(ctx.client_ip):
            return None
        ctx.note("ip_rules", "refused")
        return error_response(ctx, 403, "FORBIDDEN", "requests from this address are not allowed on this route")


def _build(resources: Any, policy: IpRules, route: Any) -> IpRulesFilter:
    everywhere = resources.config.sections.get("ip_rules")
    return IpRulesFilter(tuple(rules for rules in (everywhere, policy) if rules is not None and (rules.allow or rules.deny)))


IP_RULES = FilterKind(name="ip_rules", build=_build, route_keys=_KEYS, parse_route=parse_route,
                      section="ip_rules", parse_section=parse_section)
