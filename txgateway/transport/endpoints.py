"""Endpoint strings (`listen`, `admin`, `manhole`): read by Twisted's own parser, checked at load.

A string Twisted would refuse at start (`tcp:notaport`, an unescaped IPv6 colon, an unknown
option) is a config error saying what form was expected; a listener that cannot bind at start
(address in use, no permission) is one line naming it, never a traceback.
"""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError

__all__ = ["ListenerError", "TcpAddress", "cannot_listen", "endpoint_problem", "overlapping", "tcp_address"]

# The endpoint types a gateway listens on, each with the form Twisted reads.
_FORMS = {
    "tcp": "tcp:PORT[:interface=ADDRESS][:backlog=N]",
    "tcp6": "tcp6:PORT[:interface=ADDRESS][:backlog=N]",
    "unix": "unix:PATH[:mode=OCTAL][:backlog=N][:lockfile=0|1]",
    "systemd": "systemd:domain=INET|INET6|UNIX:name=NAME (or index=N)",
}
_ANY = 'an endpoint like "tcp:8080:interface=127.0.0.1" (tcp, tcp6, unix or systemd)'
_SYSTEMD_DOMAIN = re.compile(r"(^|:)domain=(INET|INET6|UNIX)(:|$)")

_IPV6 = "; an IPv6 address needs its colons escaped: interface=\\:\\:1"
# What Twisted's parser raises (Python's own messages for its parse functions), in words.
_REASONS = (
    (re.compile(r"invalid literal for int\(\) with base 8: '(.*)'"), '"{}" is not an octal number'),
    (re.compile(r"invalid literal for int\(\) with base 10: '(.*)'"), '"{}" is not a number'),
    (re.compile(r"Unknown endpoint type: '(.*)'"), 'unknown endpoint type "{}"'),
    (re.compile(r"unexpected keyword argument '(.*?)'"), 'unknown option "{}="'),
    (re.compile(r"multiple values for argument '(.*?)'"), '"{}" given twice' + _IPV6),
    (re.compile(r"positional arguments? but \d+ (?:were|was) given"), 'too many ":"-separated values' + _IPV6),
    (re.compile(r"missing \d+ required positional arguments?: '(.*?)'"), "no {} given"),
    (re.compile(r"exactly one of descriptor index or name"), "give exactly one of name= and index="),
)


class ListenerError(Exception):
    """A listener that cannot be made or bound; its text is one line naming it."""


@dataclass(frozen=True)
class TcpAddress:
    """Where a tcp: or tcp6: endpoint listens, as Twisted reads its string."""

    family: socket.AddressFamily
    interface: str
    port: int


def tcp_address(description: str) -> TcpAddress | None:
    """The address of a tcp:/tcp6: endpoint string (None for other types); raises ValueError
    or TypeError as Twisted's parser does for a malformed one."""
    if description.split(":", 1)[0] not in ("tcp", "tcp6"):
        return None
    endpoint: Any = serverFromString(None, description)   # parsed only; Twisted keeps what it read
    ipv6 = not isinstance(endpoint, TCP4ServerEndpoint) or isIPv6Address(endpoint._interface)
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    interface = endpoint._interface or ("::" if ipv6 else "0.0.0.0")
    return TcpAddress(family, interface, endpoint._port)


def endpoint_problem(description: str) -> str | None:
    """Why `description` cannot be listened on, as a config error's text; None if it can (as far
    as can be known before start: a systemd socket must then be inherited)."""
    kind = description.split(":", 1)[0]
    expected = f'expected "{_FORMS[kind]}"' if kind in _FORMS else f"expected {_ANY}"
    got = f'got "{description}"'
    try:
        serverFromString(None, description)     # parsed only: the reactor is never used
    except (KeyError, IndexError):   # systemd: a socket this process did not inherit (start says so)
        if not _SYSTEMD_DOMAIN.search(description):
            return f"{expected}, {got}: domain must be INET, INET6 or UNIX"
    except (ValueError, TypeError) as e:
        return f"{expected}, {got}: {_reason(e)}"
    # Twisted takes any number for a port (the bind then fails with OverflowError, a traceback).
    # An interface may be a host name: whether it resolves, and to an address of this host, is
    # only known at start (where a failure is one line).
    address = tcp_address(description)
    if address is not None and not 0 <= address.port <= 65535:
        return f"{expected}, {got}: ports are 0 to 65535"
    return None


def _reason(error: Exception) -> str:
    text = str(error)
    for pattern, reason in _REASONS:
        match = pattern.search(text)
        if match:
            return reason.format(*match.groups())
    return text


def overlapping(a: str, b: str) -> bool:
    """Whether two valid endpoint strings would bind the same TCP port (one of them then fails
    with "address already in use"). Port 0 (any free port) never overlaps."""
    x, y = tcp_address(a), tcp_address(b)
    if x is None or y is None or x.port != y.port or x.port == 0:
        return False
    if "::" in (x.interface, y.interface):     # IPv6 "any" takes the port for IPv4 too (Linux's default)
        return True
    wildcard = "::" if x.family == socket.AF_INET6 else "0.0.0.0"
    return (x.family == y.family and wildcard in (x.interface, y.interface)) or x.interface == y.interface


def cannot_listen(error: CannotListenError) -> str:
    """Where a listener failed to bind, and why, in words: "cannot listen on ADDRESS: REASON"."""
    port = error.port
    if error.interface is None:                # a unix socket: `port` is its path
        where = str(port)
    else:
        shown = error.interface or "0.0.0.0"
        where = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
    why = error.socketError.strerror or str(error.socketError)
    if error.socketError.errno == errno.EACCES and isinstance(port, int) and port < 1024:
        why += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return f"cannot listen on {where}: {why}"
