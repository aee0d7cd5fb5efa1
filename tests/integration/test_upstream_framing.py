"""An upstream whose framing is wrong must never answer another request with its extra bytes.

Bytes after a complete response (a second response in the same packet, a body on a 204 or on
an answer to HEAD) mean the upstream and the gateway disagree on where a response ends: the
connection is closed, never reused, and the next request (here another client's, waiting for
the only pooled connection) gets its own answer. A response under a transfer-coding other than
chunked is framed as RFC 9112 section 6.3 says (read until the upstream closes), never cut;
control bytes in a reason phrase never reach a client.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.conftest import get_closing, parse_responses, raw, simple_config, until

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
FIRST_ANSWERS = {
    "two responses in one packet": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + SMUGGLED),
    "a body on a 204": (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED),
    "a body on an answer to HEAD": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + SMUGGLED),
}


@pytest.mark.parametrize("case", sorted(FIRST_ANSWERS))
@pytest_twisted.ensureDeferred
async def test_extra_bytes_after_a_response_never_answer_another_client(reactor, raw_upstream, gateway, case):
    method, first_answer = FIRST_ANSWERS[case]
    held = []
    answered = [0]
    connections = set()

    def script(server, data):
        connections.add(server)
        while b"\r\n\r\n" in server.buffer:
            _, _, server.buffer = server.buffer.partition(b"\r\n\r\n")
            answered[0] += 1
            if answered[0] == 1:
                held.append(server)          # answered by the test once client B waits for the pool
            else:
                server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nanswer-%d" % answered[0])

    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url, upstream_extra=", max_connections: 1"))
    pool = gw.gateway.proxy.groups["users"].pools[0]
    a = Deferred.fromCoroutine(raw(gw.port, method + b" /api/users/a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    await until(reactor, lambda: held)
    b = Deferred.fromCoroutine(raw(gw.port, b"GET /api/users/b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    await until(reactor, lambda: pool.waiting)
    held[0].transport.write(first_answer)
    (resp_a,) = parse_responses(await a)
    assert resp_a.status in (200, 204) and b"SMUGGLED" not in resp_a.body
    (resp_b,) = parse_responses(await b)
    assert (resp_b.status, resp_b.body) == (200, b"answer-2")
    assert len(connections) == 2           # B's request went out on a fresh connection
    (member,) = gw.gateway.proxy.groups["users"].balancer.members
    assert member.failures == 0


@pytest_twisted.ensureDeferred
async def test_a_transfer_coding_other_than_chunked_is_read_until_close_never_cut(reactor, raw_upstream, gateway):
    """RFC 9112 6.3: without chunked as the final coding, the body ends when the upstream closes
    (the HTTP cache test suite's required headers-store-Transfer-Encoding depends on it). Before,
    such an answer reached the client as a chunked body cut by a reset."""
    def script(server, data):
        if b"/gzip" in data:
            server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00compressed")
            server.transport.loseConnection()
        elif b"/layered" in data:
            server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        else:
            server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")

    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    for path, body in ((b"/api/users/gzip", b"\x1f\x8b\x08\x00compressed"), (b"/api/users/layered", b"abc"),
                       (b"/api/users/ok", b"ok")):
        resp = await get_closing(gw.port, path)
        assert (resp.status, resp.body) == (200, body)


@pytest_twisted.ensureDeferred
async def test_control_bytes_in_an_upstream_reason_phrase_never_reach_the_client(reactor, raw_upstream, gateway):
    def script(server, data):
        if b"/odd" in data:
            server.transport.write(b"HTTP/1.1 299 \x1b]0;owned\x07\r\nContent-Length: 2\r\n\r\nok")
        elif b"/plain" in data:
            server.transport.write(b"HTTP/1.1 201 Made it\tfine\r\nContent-Length: 2\r\n\r\nok")
        else:
            server.transport.write(b"HTTP/1.1 404 Not\x00Found\x1b[2J\r\nContent-Length: 2\r\n\r\nno")

    up = await raw_upstream(script)
    gw = await gateway(simple_config(up.url))
    status_lines = []
    for path in (b"/api/users/evil", b"/api/users/odd", b"/api/users/plain"):
        answer = await raw(gw.port, b"GET %s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % path)
        status_lines.append(answer.split(b"\r\n", 1)[0])
        assert parse_responses(answer)[0].body in (b"ok", b"no")
    assert status_lines == [b"HTTP/1.1 404 Not Found", b"HTTP/1.1 299 ", b"HTTP/1.1 201 Made it\tfine"]
