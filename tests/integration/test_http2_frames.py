"""The gateway's own HTTP/2 frame layer (txgateway/transport/h2frames.py, hpackdecode.py)
against an independent implementation: the `h2` library as client, over real TLS sockets.

What the layer does that the other HTTP/2 tests do not reach: flow control both ways (a client
whose window starts shut and opens it by a SETTINGS change mid-stream, a client that reads
slowly, an upload larger than the stream and connection windows), padded and prioritised
frames, the stream limit, and the connection errors of a bad HPACK block or an oversized frame.
"""

from __future__ import annotations

from typing import Any

import h2.settings
import pytest_twisted
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, HeadersFrame
from twisted.internet.threads import deferToThread

from tests.integration.test_http2 import BIG, H2Client, H2Result, cert, listeners, port_of, routes, streaming
from tests.integration.test_http2_abuse import (
    REQUEST,
    assert_only_the_good_request_arrived,
    get_one,
    goaway_code,
    h2_socket,
    read_until_closed,
    send_block,
)

__all__ = ["cert", "streaming"]     # fixtures

WAIT = 10.0


@pytest_twisted.ensureDeferred
async def test_a_window_opened_by_settings_mid_stream_lets_the_response_go_on(reactor, streaming, gateway, cert):
    """SETTINGS_INITIAL_WINDOW_SIZE 0: the head comes, no DATA; raising it by SETTINGS (no
    WINDOW_UPDATE) must resume the stream (RFC 9113 6.9.2)."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(streaming.url))
    port = await port_of(gw, 1)

    def run() -> tuple[H2Result, list[Any], H2Result]:
        with H2Client(port, cert.cert) as client:
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            client._send()
            stream_id = client.request("/api/users/big")
            result = client.results[stream_id]
            client.wait(until=lambda: result.status is not None)
            shut = list(result.chunks)
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
            client._send()
            client.wait(stream_id, timeout=WAIT)
            return result, shut, client.get("/api/users/big")

    result, shut, again = await deferToThread(run)
    assert result.status == 200 and shut == []
    assert result.body == BIG and again.body == BIG


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_gets_every_byte_within_its_windows(reactor, streaming, gateway, cert):
    """The client gives back its windows late and in small steps: 5 MiB arrive whole, and the
    server never sends past the window it was given (h2 would raise FlowControlError)."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(streaming.url))
    port = await port_of(gw, 1)

    def run() -> H2Result:
        with H2Client(port, cert.cert) as client:
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4096})
            client._send()
            stream_id = client.request("/api/users/big")
            return client.wait(stream_id, timeout=30.0)[0]

    result = await deferToThread(run)
    assert result.status == 200 and result.ended
    assert result.body == BIG


@pytest_twisted.ensureDeferred
async def test_an_upload_larger_than_every_window_arrives_whole(reactor, streaming, gateway, cert):
    """3 MiB up: past the stream's 64 KiB and the connection's 1 MiB windows, so it goes on
    only as the gateway gives them back (WINDOW_UPDATE for what the upstream took)."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(streaming.url, top="limits: {max_body_size: 8MiB}\n"))
    port = await port_of(gw, 1)
    body = BIG[:3 * 2**20]

    def run() -> H2Result:
        with H2Client(port, cert.cert) as client:
            return client.wait(client.request("/api/users/body", method="POST", body=body), timeout=30.0)[0]

    result = await deferToThread(run)
    assert result.status == 200 and result.body == body
    assert streaming.bodies == [body]


def stream_one(sock: Any) -> tuple[bool, bytes]:
    """Read the server's frames until stream 1 ends (the client's state machine does not know
    the stream: it was sent raw): (ended, its DATA)."""
    received = b""
    body = b""
    sock.settimeout(WAIT)
    while True:
        data = sock.recv(65536)
        assert data, "closed"
        received += data
        while len(received) >= 9 and len(received) >= 9 + int.from_bytes(received[:3], "big"):
            length = int.from_bytes(received[:3], "big")
            kind, flags, stream_id = received[3], received[4], int.from_bytes(received[5:9], "big")
            payload, received = received[9:9 + length], received[9 + length:]
            if stream_id == 1 and kind == 0:
                body += payload
            if stream_id == 1 and kind in (0, 1) and flags & 0x1:
                return True, body


@pytest_twisted.ensureDeferred
async def test_padded_and_prioritised_frames_are_read_as_their_content(reactor, streaming, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(streaming.url))
    port = await port_of(gw, 1)

    def run() -> tuple[bool, bytes]:
        sock, conn = h2_socket(port, cert.cert)
        with sock:
            headers = HeadersFrame(1, conn.encoder.encode([(":method", "POST"), (":path", "/api/users/body"),
                                                           (":authority", "localhost"), (":scheme", "https"),
                                                           ("content-length", "11")]),
                                   flags=["END_HEADERS", "PADDED", "PRIORITY"])
            headers.pad_length = 7
            headers.depends_on, headers.stream_weight = 0, 15
            first = DataFrame(1, b"hello", flags=["PADDED"])
            first.pad_length = 200
            last = DataFrame(1, b" world", flags=["PADDED", "END_STREAM"])
            last.pad_length = 0
            sock.sendall(headers.serialize() + first.serialize() + last.serialize())
            return stream_one(sock)

    ended, body = await deferToThread(run)
    assert ended and body == b"hello world"
    assert streaming.bodies == [b"hello world"]


@pytest_twisted.ensureDeferred
async def test_streams_past_the_limit_are_refused_and_the_others_served(reactor, echo, gateway, cert):
    """SETTINGS_MAX_CONCURRENT_STREAMS is 100: the 101st open stream gets REFUSED_STREAM.
    (100 upstream connections at once overflow the echo's listen backlog of 50: connects are
    retried by the kernel after a second, hence the longer connect_timeout.)"""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + f"""
upstreams:
  users: {{targets: ["{echo.url}"], connect_timeout: 8s, timeout: 9s}}
routes:
  - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
""")
    port = await port_of(gw, 1)

    def run() -> tuple[list[int], list[int | None], H2Result]:
        with H2Client(port, cert.cert) as client:
            client.wait(until=lambda: client.conn.remote_settings.max_concurrent_streams == 100)
            client.conn.remote_settings.max_concurrent_streams = 1000     # let the client overstep
            client.conn.remote_settings.acknowledge()
            # 101 streams whose bodies never end: each stays open on the server.
            ids = [client.request(f"/api/users/{i}", method="POST", end=False) for i in range(101)]
            client.wait(until=lambda: client.results[ids[-1]].reset is not None)
            codes = [client.results[i].reset for i in ids]
            for stream_id in ids[:100]:
                client.conn.end_stream(stream_id)
            client._send()
            client.wait(*ids[:100])
            return [client.results[i].status or 0 for i in ids[:100]], codes, client.get("/api/users/after")

    statuses, codes, after = await deferToThread(run)
    assert codes == [None] * 100 + [ErrorCodes.REFUSED_STREAM]
    assert statuses == [200] * 100 and after.status == 200


def send_raw(port: int, cafile: str, frame: bytes) -> tuple[bool, int | None]:
    """The client preface, then `frame` as it is: (closed, the GOAWAY's error code)."""
    sock, _ = h2_socket(port, cafile)
    with sock:
        sock.sendall(frame)
        closed, received = read_until_closed(sock, WAIT)
        return closed, goaway_code(received)


@pytest_twisted.ensureDeferred
async def test_a_bad_hpack_block_or_an_oversized_frame_ends_the_connection(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    bad_index = HeadersFrame(1, b"\x80", flags=["END_HEADERS", "END_STREAM"]).serialize()      # index 0
    beyond_table = HeadersFrame(1, b"\xff\x80\x01", flags=["END_HEADERS", "END_STREAM"]).serialize()
    bad_huffman = HeadersFrame(1, b"\x04\x81\xff", flags=["END_HEADERS", "END_STREAM"]).serialize()   # EOS
    oversized = DataFrame(1, b"x" * 16385).serialize()

    def run() -> tuple[list[tuple[bool, int | None]], H2Result]:
        outcomes = [send_raw(port, cert.cert, frame) for frame in (bad_index, beyond_table, bad_huffman, oversized)]
        return outcomes, get_one(port, cert.cert, "/api/users/fine")

    outcomes, good = await deferToThread(run)
    assert outcomes == [(True, ErrorCodes.COMPRESSION_ERROR)] * 3 + [(True, ErrorCodes.FRAME_SIZE_ERROR)]
    assert_only_the_good_request_arrived(good, echo)


@pytest_twisted.ensureDeferred
async def test_a_huffman_coded_request_with_indexed_headers_is_decoded(reactor, echo, gateway, cert):
    """h2's encoder Huffman-codes and indexes: the second request refers to the first's entries."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    extra = [("x-custom-header", "some value ~ long enough to be worth Huffman coding"), ("accept", "text/plain")]

    def run() -> list[H2Result]:
        with H2Client(port, cert.cert) as client:
            return [client.get(f"/api/users/{i}", headers=extra) for i in range(3)]

    answers = await deferToThread(run)
    assert [r.status for r in answers] == [200] * 3
    assert [r.uri for r in echo.requests] == [b"/users/0", b"/users/1", b"/users/2"]
    assert [r.getHeader(b"x-custom-header") for r in echo.requests] == [extra[0][1].encode()] * 3


@pytest_twisted.ensureDeferred
async def test_a_block_split_over_continuation_frames_and_trailers_are_read(reactor, streaming, gateway, cert):
    """27 KiB of headers (max_header_bytes 64KiB) come as HEADERS + CONTINUATION (the client's
    frames hold 16 KiB; answered by the gateway: the upstreams take 16 KiB of headers at most);
    a body ended by trailers (a HEADERS frame with END_STREAM)."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(
        streaming.url, top="limits: {max_header_bytes: 64KiB}\n",
        extra_routes="  - {prefix: /local, respond: {status: 204}}\n"))
    port = await port_of(gw, 1)
    large = [(f"x-large-{i}", "v" * 9 * 1024) for i in range(3)]

    def run() -> tuple[H2Result, H2Result]:
        with H2Client(port, cert.cert) as client:
            split = client.get("/local", headers=large)
            stream_id = client.request("/api/users/body", method="POST", body=b"before trailers", end=False)
            client.wait(until=lambda: stream_id not in client.outgoing)
            client.conn.send_headers(stream_id, [("x-checksum", "none")], end_stream=True)
            client._send()
            return split, client.wait(stream_id)[0]

    split, trailed = await deferToThread(run)
    assert split.status == 204
    assert trailed.status == 200 and trailed.body == b"before trailers"
    assert streaming.bodies == [b"before trailers"]


@pytest_twisted.ensureDeferred
async def test_a_small_block_that_decodes_past_max_header_bytes_ends_the_connection(reactor, echo, gateway, cert):
    """h2's encoder indexes the first 3 KiB header and refers to it after: the block is a few
    KiB, its header list (RFC 9113 6.5.2's accounting) over the default 16 KiB."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    repeated = [*REQUEST, *[("x-big", "b" * 3 * 1024)] * 8]

    def run() -> tuple[tuple[bool, int | None], H2Result]:
        return send_block(port, cert.cert, repeated), get_one(port, cert.cert, "/api/users/fine")

    outcome, good = await deferToThread(run)
    assert outcome == (True, ErrorCodes.ENHANCE_YOUR_CALM)
    assert_only_the_good_request_arrived(good, echo)
