"""Endpoint strings (`listen`, `admin`, `manhole`): what Twisted would refuse at start is a
config error at load, with the line, the key, the value and the form expected."""

from __future__ import annotations

import errno
import os

import pytest
from twisted.internet.error import CannotListenError

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config
from txgateway.transport.endpoints import cannot_listen, tcp_address

TCP = 'expected "tcp:PORT[:interface=ADDRESS][:backlog=N]", got'
TCP6 = 'expected "tcp6:PORT[:interface=ADDRESS][:backlog=N]", got'
UNIX = 'expected "unix:PATH[:mode=OCTAL][:backlog=N][:lockfile=0|1]", got'
SYSTEMD = 'expected "systemd:domain=INET|INET6|UNIX:name=NAME (or index=N)", got'
ANY = 'expected an endpoint like "tcp:8080:interface=127.0.0.1" (tcp, tcp6, unix or systemd), got'
ESCAPE = "an IPv6 address needs its colons escaped: interface=\\:\\:1"


def listening_on(endpoint: str) -> str:
    """BASE with its one listener on `endpoint` (line 2)."""
    return BASE.replace('"tcp:8080"', f"'{endpoint}'")


@pytest.mark.parametrize(("endpoint", "message"), [
    ("tcp:notaport", f'{TCP} "tcp:notaport": "notaport" is not a number'),
    ("tcp:", f'{TCP} "tcp:": "" is not a number'),
    ("tcp", f'{TCP} "tcp": no port given'),
    ("tcp:99999", f'{TCP} "tcp:99999": ports are 0 to 65535'),
    ("tcp:-1", f'{TCP} "tcp:-1": ports are 0 to 65535'),
    ("tcp:8080:backlog=many", f'{TCP} "tcp:8080:backlog=many": "many" is not a number'),
    ("tcp:8080:interfce=127.0.0.1", f'{TCP} "tcp:8080:interfce=127.0.0.1": unknown option "interfce="'),
    ("tcp:8080:interface=::1", f'{TCP} "tcp:8080:interface=::1": "interface" given twice; {ESCAPE}'),
    ("tcp:8080:127.0.0.1:50:x", f'{TCP} "tcp:8080:127.0.0.1:50:x": too many ":"-separated values; {ESCAPE}'),
    ("tcp6:https", f'{TCP6} "tcp6:https": "https" is not a number'),
    ("unix:/run/gw.sock:mode=999", f'{UNIX} "unix:/run/gw.sock:mode=999": "999" is not an octal number'),
    ("systemd:name=http", f'{SYSTEMD} "systemd:name=http": no domain given'),
    ("systemd:domain=INET", f'{SYSTEMD} "systemd:domain=INET": give exactly one of name= and index='),
    ("systemd:domain=IPX:name=http", f'{SYSTEMD} "systemd:domain=IPX:name=http": domain must be INET, INET6 or UNIX'),
    ("systemd:domain=INET:index=first", f'{SYSTEMD} "systemd:domain=INET:index=first": "first" is not a number'),
    ("http:8080", f'{ANY} "http:8080": unknown endpoint type "http"'),
    ("8080", f'{ANY} "8080": unknown endpoint type "8080"'),
    ("", f'{ANY} "": unknown endpoint type ""'),
])
def test_a_listener_twisted_would_refuse_is_a_config_error(endpoint, message):
    assert config_errors(listening_on(endpoint)) == [f"c.yaml:2: listen[0].endpoint: {message}"]


@pytest.mark.parametrize("endpoint", [
    "tcp:0", "tcp:8080:interface=127.0.0.1", "tcp:port=8080:interface=0.0.0.0:backlog=10", "tcp:8080:localhost",
    "tcp:8080:interface=\\:\\:1", "tcp6:8080", "tcp6:8080:interface=\\:\\:1", "unix:/run/txgateway.sock:mode=660",
    "systemd:domain=INET:name=http", "systemd:domain=INET6:index=0",
])
def test_listeners_twisted_reads_are_accepted(endpoint):
    assert parse_config(listening_on(endpoint), "c.yaml").listen[0].endpoint == endpoint


def test_admin_and_manhole_endpoints_are_checked_like_listeners(tmp_path):
    keys = tmp_path / "authorized_keys"
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops\n")
    text = BASE + f"""\
admin: {{endpoint: "tcp:admin"}}
manhole:
  endpoint: "tcp:2222:backlog=x"
  authorized_keys: {keys}
  host_key: {tmp_path}/host_key
"""
    assert config_errors(text) == [
        f'c.yaml:9: admin.endpoint: {TCP} "tcp:admin": "admin" is not a number',
        f'c.yaml:11: manhole.endpoint: {TCP} "tcp:2222:backlog=x": "x" is not a number',
    ]


def listeners(*endpoints: str) -> str:
    """A valid config whose listeners are `endpoints`, on lines 2, 3, ..."""
    return "listen:\n" + "".join(f"  - endpoint: '{e}'\n" for e in endpoints) + BASE[BASE.index("upstreams:"):]


@pytest.mark.parametrize(("text", "error"), [
    (listeners("tcp:8080", "tcp:8080"),
     'c.yaml:3: listen[1].endpoint: "tcp:8080" binds the same port as listen[0].endpoint ("tcp:8080")'),
    (listeners("tcp:8080", "tcp:8080:interface=127.0.0.1"),
     'c.yaml:3: listen[1].endpoint: "tcp:8080:interface=127.0.0.1" binds the same port as listen[0].endpoint '
     '("tcp:8080")'),
    (listeners("tcp6:8080", "tcp:8080:interface=127.0.0.1"),
     'c.yaml:3: listen[1].endpoint: "tcp:8080:interface=127.0.0.1" binds the same port as listen[0].endpoint '
     '("tcp6:8080")'),
    (listeners("tcp:9901") + 'admin: {endpoint: "tcp:9901:interface=127.0.0.1"}\n',
     'c.yaml:9: admin.endpoint: "tcp:9901:interface=127.0.0.1" binds the same port as listen[0].endpoint '
     '("tcp:9901")'),
    (listeners("tcp:9901") + "admin: {}\n",      # the default admin endpoint is on 9901
     'c.yaml:9: admin.endpoint: "tcp:9901:interface=127.0.0.1" binds the same port as listen[0].endpoint '
     '("tcp:9901")'),
])
def test_two_listeners_of_the_gateway_on_one_port_are_a_config_error(text, error):
    assert config_errors(text) == [f"{error}: only one can listen there"]


@pytest.mark.parametrize("listen", [
    ["tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.2"],
    ["tcp:8080:interface=127.0.0.1", "tcp6:8080:interface=\\:\\:1"],
    ["tcp:8080", "tcp:8081"],
    ["tcp:0", "tcp:0"],
    ["unix:/run/a.sock", "tcp:8080"],
])
def test_listeners_on_distinct_addresses_are_accepted(listen):
    assert [x.endpoint for x in parse_config(listeners(*listen), "c.yaml").listen] == listen


def test_tcp_address_reads_the_string_as_twisted_does():
    assert tcp_address("tcp:8080") == tcp_address("tcp:port=8080:interface=0.0.0.0:backlog=50")
    address = tcp_address("tcp:8080:interface=\\:\\:1:backlog=7")
    assert address is not None
    assert (address.family.name, address.interface, address.port) == ("AF_INET6", "::1", 8080)
    assert tcp_address("unix:/run/gw.sock") is None


@pytest.mark.parametrize(("interface", "port", "errno_", "said"), [
    ("127.0.0.1", 8080, errno.EADDRINUSE, "cannot listen on 127.0.0.1:8080: Address already in use"),
    ("", 8080, errno.EADDRINUSE, "cannot listen on 0.0.0.0:8080: Address already in use"),
    ("::1", 8080, errno.EADDRINUSE, "cannot listen on [::1]:8080: Address already in use"),
    ("127.0.0.1", 80, errno.EACCES,
     "cannot listen on 127.0.0.1:80: Permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"),
    ("10.9.9.9", 8080, errno.EADDRNOTAVAIL, "cannot listen on 10.9.9.9:8080: Cannot assign requested address"),
    (None, "/run/gw.sock", errno.EACCES, "cannot listen on /run/gw.sock: Permission denied"),
])
def test_a_listener_that_cannot_bind_is_said_in_words(interface, port, errno_, said):
    assert cannot_listen(CannotListenError(interface, port, OSError(errno_, os.strerror(errno_)))) == said
