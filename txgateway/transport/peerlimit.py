"""`limits.max_connections_per_ip`: open connections per client address, on all listeners.

A connection over the cap is refused where it is accepted: the factory builds no protocol,
so Twisted closes the socket before a byte is read (or a TLS handshake is spent). Plain
listeners count in `HTTP1Factory`; TLS listeners in `PeerLimitedTLSFactory`, the outermost
protocol there, so an h2 connection counts like an HTTP/1.1 one. Every connection is counted
(a dict entry per address), so a reload that sets a cap applies to those already open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from txgateway.transport.tls import ServerTLS, TLSFactory

__all__ = ["PeerLimit", "PeerLimitedTLSFactory"]


class PeerLimit:
    """Counts open connections per address; `limit()` is read at each accept (reloads)."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def admit(self, addr: Any) -> str | None:
        """The address to `release` later, or None: refuse the connection."""
        host = str(getattr(addr, "host", "") or "")   # UNIX sockets have none: never capped
        count = self.open.get(host, 0)
        cap = self.limit()
        if cap and host and count >= cap:
            return None
        self.open[host] = count + 1
        return host

    def release(self, host: str) -> None:
        count = self.open.get(host, 0) - 1
        if count > 0:
            self.open[host] = count
        else:
            self.open.pop(host, None)


class PeerLimitedTLSFactory(TLSFactory):
    """TLS for a listener, refusing connections over the per-address cap."""

    def __init__(self, tls: ServerTLS, wrapped: Any, peers: PeerLimit) -> None:
        super().__init__(tls, False, wrapped)  # type: ignore[arg-type]  # zope interfaces
        self.peers = peers
        self.hosts: dict[Any, str] = {}

    def buildProtocol(self, addr: Any) -> Any:
        host = self.peers.admit(addr)
        if host is None:
            return None
        protocol = super().buildProtocol(addr)
        self.hosts[protocol] = host
        return protocol

    def unregisterProtocol(self, protocol: Any) -> None:
        super().unregisterProtocol(protocol)
        host = self.hosts.pop(protocol, None)
        if host is not None:
            self.peers.release(host)
