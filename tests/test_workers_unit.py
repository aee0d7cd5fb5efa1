"""`bind_listener`: the --workers parent's reading of a `tcp:`/`tcp6:` endpoint string.

Real sockets on port 0 (the kernel picks), checked with getsockname/getsockopt; the backlog,
which the kernel does not report back, by recording the listen() call.
"""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.error import CannotListenError

from txgateway.service import workers
from txgateway.service.workers import bind_listener
from txgateway.transport.endpoints import cannot_listen


@pytest.fixture
def listened(monkeypatch) -> list[int]:
    """The backlog of every listen() on a socket created through socket.socket meanwhile."""
    backlogs: list[int] = []

    class Recording(socket.socket):
        def listen(self, backlog: int = 0) -> None:
            backlogs.append(backlog)
            super().listen(backlog)

    monkeypatch.setattr(workers.socket, "socket", Recording)
    return backlogs


def check_listening(sock: socket.socket, family: int) -> None:
    assert sock.family == family and sock.type == socket.SOCK_STREAM
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert sock.get_inheritable()             # the workers get it across exec
    assert not sock.getblocking()             # a reactor adopts it


@pytest.mark.parametrize(("endpoint", "family", "address"), [
    ("tcp:0:interface=127.0.0.1", socket.AF_INET, "127.0.0.1"),
    ("tcp:0", socket.AF_INET, "0.0.0.0"),
    ("tcp6:0:interface=\\:\\:1", socket.AF_INET6, "::1"),      # colons escaped, as Twisted wants them
    ("tcp6:0", socket.AF_INET6, "::"),
    ("tcp6:0:backlog=64:interface=\\:\\:1", socket.AF_INET6, "::1"),
])
def test_binds_the_interface_and_family(endpoint, family, address):
    sock = bind_listener(endpoint)
    try:
        check_listening(sock, family)
        assert sock.getsockname()[0] == address
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_binds_the_port_given():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sock = bind_listener(f"tcp:{port}:interface=127.0.0.1")
    try:
        assert sock.getsockname() == ("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass                               # it accepts into its queue: listening for real
    finally:
        sock.close()


@pytest.mark.parametrize(("endpoint", "backlog"), [
    ("tcp:0:interface=127.0.0.1", 1024),                    # the default, like the one-process listeners
    ("tcp:0:interface=127.0.0.1:backlog=4096", 4096),
    ("tcp:0:backlog=7:interface=127.0.0.1", 7),
    ("tcp6:0:interface=\\:\\:1:backlog=50", 50),
])
def test_backlog(listened, endpoint, backlog):
    sock = bind_listener(endpoint)
    sock.close()
    assert listened == [backlog]


def test_an_address_in_use_is_an_error_naming_the_address():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    before = set(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(CannotListenError) as caught:
            bind_listener(f"tcp:{port}:interface=127.0.0.1")
        assert cannot_listen(caught.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
        assert set(os.listdir("/proc/self/fd")) <= before      # the socket that failed is closed
    finally:
        holder.close()


@pytest.mark.parametrize("endpoint", [
    "unix:/tmp/x.sock",
    "unix:address=/run/txgateway.sock:mode=660",
    "ssl:8443:privateKey=key.pem:certKey=cert.pem",
    "systemd:domain=INET:index=0",
])
def test_refuses_what_it_cannot_share(endpoint, listened):
    with pytest.raises(ValueError) as caught:
        bind_listener(endpoint)
    message = str(caught.value)
    assert message.startswith("--workers shares tcp: and tcp6: listeners only") and repr(endpoint) in message
    assert listened == []                      # refused before binding anything


@pytest.mark.parametrize("endpoint", [
    "tcp:http",                                 # a port must be a number
    "tcp:",
    "tcp",
    "tcp6:0:interface=::1",                     # unescaped: guessing would bind every interface
    "tcp:0:bogus=1",
])
def test_refuses_a_tcp_listener_it_cannot_read(endpoint, listened):
    with pytest.raises(ValueError) as caught:
        bind_listener(endpoint)
    assert str(caught.value).startswith(f"cannot read the listener {endpoint!r}")
    assert listened == []


def test_nothing_leaks_from_a_refusal():
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ValueError):
            bind_listener("unix:/tmp/x.sock")
    assert set(os.listdir("/proc/self/fd")) <= before
