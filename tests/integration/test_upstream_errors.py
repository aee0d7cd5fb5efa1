"""`upstream_errors: envelope` through real sockets: error pages become the gateway's envelope."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.configcheck import BASE, config_errors
from tests.conftest import assert_envelope, js, parse_responses, raw

PAGE = (500, b"text/html", b"<html><h1>Traceback: db password=hunter2</h1></html>")


def errors_config(up: Any, policy: str) -> str:
    return f"""
    upstreams:
      shop: {{targets: ["{up.url}"], timeout: 2s}}
    routes:
      - prefix: /api/shop
        upstream: shop
        {policy}
    """


async def get_all(port: int, *paths: str) -> list[Any]:
    requests = b"".join(f"GET {p} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for p in paths[:-1])
    requests += f"GET {paths[-1]} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    return parse_responses(await raw(port, requests))


def etagged(status: int, kind: bytes, body: bytes) -> Any:
    def render(request: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", kind)
        request.setHeader(b"etag", b'"v1"')
        request.setHeader(b"retry-after", b"30")
        return body
    return render


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_page_becomes_the_envelope_with_its_status_and_the_next_request_is_served(
        gateway, upstreams):
    up = await upstreams({"/api/shop/boom": etagged(*PAGE), "/api/shop/ok": js({"ok": True})})
    gw = await gateway(errors_config(up, "upstream_errors: envelope"))
    boom, ok = await get_all(gw.port, "/api/shop/boom", "/api/shop/ok")
    err = assert_envelope(boom, 500, "UPSTREAM_ERROR")
    assert b"hunter2" not in boom.body and boom.header("etag") is None
    assert boom.header("retry-after") == "30"
    assert boom.header("x-content-type-options") == "nosniff"        # the header rules still apply
    assert err["correlation_id"] == gw.log[0]["correlation_id"]
    assert gw.log[0]["error"] == "UPSTREAM_ERROR" and gw.log[0]["status"] == 500
    assert gw.log[0]["upstream_excerpt"] == PAGE[2].decode()
    assert ok.status == 200 and ok.json() == {"ok": True}


@pytest_twisted.ensureDeferred
async def test_json_errors_listed_4xx_and_pass_mode(gateway, upstreams):
    up = await upstreams({"/api/shop/json": js({"error": "sold out"}, 503),
                          "/api/shop/missing": (404, b"text/html", b"<p>no</p>"),
                          "/api/shop/gone": (410, b"text/html", b"<p>gone</p>")})
    gw = await gateway(errors_config(up, "upstream_errors: {mode: envelope, include: [404]}"))
    json_error, missing, gone = await get_all(gw.port, "/api/shop/json", "/api/shop/missing", "/api/shop/gone")
    assert json_error.status == 503 and json_error.json() == {"error": "sold out"}    # an API's own error
    assert_envelope(missing, 404, "UPSTREAM_ERROR")
    assert gone.status == 410 and gone.body == b"<p>gone</p>"                       # not listed
    passing = await gateway(errors_config(up, "upstream_errors: pass"))
    (page,) = await get_all(passing.port, "/api/shop/missing")
    assert page.status == 404 and page.body == b"<p>no</p>"


@pytest_twisted.ensureDeferred
async def test_a_large_streamed_error_page_is_dropped_not_held(gateway, upstreams):
    def big(request: Any) -> None:
        request.setResponseCode(502)
        request.setHeader(b"content-type", b"text/html")
        for _ in range(64):
            request.write(b"x" * 65536)        # 4 MiB, chunked
        request.finish()
        return None

    from twisted.web.server import NOT_DONE_YET

    up = await upstreams({"/api/shop/big": lambda request: big(request) or NOT_DONE_YET})
    gw = await gateway(errors_config(up, "upstream_errors: envelope"))
    (resp,) = await get_all(gw.port, "/api/shop/big")
    assert_envelope(resp, 502, "UPSTREAM_ERROR")
    assert gw.log[0]["upstream_excerpt"] == "x" * 256


def test_the_config_refuses_other_modes_and_statuses():
    route = "  - {prefix: /api/x, upstream: users, upstream_errors: %s}\n"
    assert config_errors(BASE + route % "hide") == [
        "c.yaml:9: routes[2].upstream_errors: expected one of pass, envelope, got 'hide'"]
    assert config_errors(BASE + route % "{include: [404, 500]}") == [
        "c.yaml:9: routes[2].upstream_errors.include[1]: expected a 4xx status (5xx are always included), got 500"]
