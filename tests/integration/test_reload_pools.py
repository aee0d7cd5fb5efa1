"""A reload that changes an upstream's settings retires its old pools: connects in progress and
busy exchanges finish, and their connections close when released.

Before, the old pools were closed on the spot: closing a connect in progress raised out of
reload() (its failure callback removed it from the dict being iterated), and a connection busy
at the time went back into the dropped pool's idle list when its response ended, never reused
and never closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.conftest import assert_envelope, parse_responses, raw_request, running_gateways, with_defaults
from txgateway.config.schema import load_config

WAIT = 10.0          # every bounded wait in this file


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n".encode()


def u_config(url: str, timeout: str, connect_timeout: str = "2s") -> str:
    return with_defaults(f"""\
        drain_timeout: 1s
        upstreams:
          u: {{targets: ["{url}"], connect_timeout: {connect_timeout}, timeout: {timeout}}}
        routes:
          - {{prefix: /api, upstream: u}}
        """)


async def poll(reactor: Any, condition: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


@contextlib.contextmanager
def full_accept_queue() -> Iterator[str]:
    """A listener (never accepting) whose backlog one connection fills: further connects to its
    URL stay in progress (their SYNs are dropped) until the connect timeout."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        time.sleep(0.1)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        filler.close()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_a_reload_while_a_connect_is_in_progress_applies_and_the_gateway_still_stops(reactor, tmp_path):
    path = tmp_path / "gateway.yaml"
    with full_accept_queue() as url:
        async with running_gateways(reactor) as runner:
            path.write_text(u_config(url, "10s", connect_timeout="1s"))
            gw, port = await runner.start(load_config(str(path)))
            answer = deferToThread(raw_request, port, get("/api/a"), read_timeout=WAIT)
            old_pool = gw.proxy.groups["u"].pools[0]
            await poll(reactor, lambda: old_pool._pending, "the connect to the upstream to begin")

            path.write_text(u_config(url, "11s", connect_timeout="1s"))       # u changed: its group is retired
            assert gw.reload() == []
            assert gw.config.upstreams["u"].timeout == 11.0
            assert [line for line in runner.lines if "reload: " in line and " applied: " in line], runner.lines
            assert old_pool.retired and old_pool._pending, "the connect in progress is left to finish"

            # The retired connect times out like any other: the client gets its 504.
            (resp,) = parse_responses(await answer)
            assert_envelope(resp, 504, "GATEWAY_TIMEOUT")
            await poll(reactor, lambda: not old_pool._pending and old_pool.total == 0, "the old pool to be empty")

            # Stopping with a connect in progress (in the new pool) cancels it and completes.
            answer = deferToThread(raw_request, port, get("/api/b"), read_timeout=WAIT)
            new_pool = gw.proxy.groups["u"].pools[0]
            assert new_pool is not old_pool
            await poll(reactor, lambda: new_pool._pending, "the second connect to begin")
            runner.started.remove(gw)
            await gw.stopService()
            assert not new_pool._pending and new_pool.total == 0
            assert not gw.deadlines._loop.running
            await answer                      # answered or cut: either way it ends


@dataclasses.dataclass
class HeldUpstream:
    """Answers each request (keep-alive, Content-Length) only when `release()` is called."""
    servers: list[Any] = dataclasses.field(default_factory=list)

    def script(self, server: Any, data: bytes) -> None:
        if b"\r\n\r\n" in server.buffer and server not in self.servers:
            self.servers.append(server)

    def release(self) -> None:
        """Answer the latest request."""
        self.servers[-1].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Type: text/plain\r\n\r\nheld")


@pytest_twisted.ensureDeferred
async def test_a_busy_connection_of_a_changed_upstream_closes_when_its_exchange_ends(
        reactor, tmp_path, raw_upstream):
    held = HeldUpstream()
    up = await raw_upstream(held.script)
    path = tmp_path / "gateway.yaml"
    async with running_gateways(reactor) as runner:
        path.write_text(u_config(up.url, "10s"))
        gw, port = await runner.start(load_config(str(path)))
        answer = deferToThread(raw_request, port, get("/api/slow"), read_timeout=WAIT)
        await poll(reactor, lambda: held.servers, "the request to reach the upstream")
        old_pool = gw.proxy.groups["u"].pools[0]

        path.write_text(u_config(up.url, "11s"))             # u changed: its group is retired
        assert gw.reload() == []
        assert gw.proxy.groups["u"].pools[0] is not old_pool

        held.release()
        (resp,) = parse_responses(await answer)
        assert (resp.status, resp.body) == (200, b"held")     # the exchange in flight finished

        (server,) = held.servers
        await poll(reactor, lambda: server.transport.disconnected, "the upstream to see its connection closed")
        assert not old_pool.idle, [c.open for c in old_pool.idle]
        assert old_pool.total == 0

        # The next request takes the new pool, on a new connection.
        answer = deferToThread(raw_request, port, get("/api/next"), read_timeout=WAIT)
        await poll(reactor, lambda: len(held.servers) == 2, "the next request to reach the upstream")
        held.release()
        (resp,) = parse_responses(await answer)
        assert (resp.status, resp.body) == (200, b"held")
