"""`compose:` through real sockets: several upstream calls, one JSON answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.conftest import Upstream, assert_envelope, listen, mint_token, parse_responses, raw

Answer = tuple[int, bytes, bytes]        # status, content type, body


class Scripted(Resource):
    """An upstream answering by path (the path with its query); records each request."""

    isLeaf = True

    def __init__(self, answers: dict[str, Answer | Callable[[Any], Any]], seen: list[Any]) -> None:
        super().__init__()
        self.answers = answers
        self.seen = seen

    def render(self, request: Any) -> Any:
        self.seen.append(request)
        answer = self.answers.get(request.uri.decode("latin-1"))
        if answer is None:
            request.setResponseCode(404)
            return b'{"error": "not found"}'
        if callable(answer):
            return answer(request)
        status, kind, body = answer
        request.setResponseCode(status)
        request.setHeader(b"content-type", kind)
        return body


def js(value: Any, status: int = 200) -> Answer:
    return status, b"application/json", json.dumps(value).encode()


async def upstream(reactor: Any, answers: dict[str, Any], ports: list[Any]) -> Upstream:
    seen: list[Any] = []
    site = Site(Scripted(answers, seen))
    site.log = lambda request: None
    port = await listen(reactor, site)
    ports.append(port)
    return Upstream(port.getHost().port, port, seen)


@pytest_twisted.async_yield_fixture()
async def upstreams(reactor: Any) -> Any:
    """Factory fixture: `await upstreams(answers)` -> a scripted JSON upstream."""
    ports: list[Any] = []

    async def start(answers: dict[str, Any]) -> Upstream:
        return await upstream(reactor, answers, ports)

    yield start
    for port in ports:
        await port.stopListening()


async def get(port: int, target: str, headers: str = "") -> Any:
    data = await raw(port, f"GET {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n".encode())
    (response,) = parse_responses(data)
    return response


def profile_config(users: Upstream, orders: Upstream, extra: str = "", orders_extra: str = "") -> str:
    return f"""
    upstreams:
      users: {{targets: ["{users.url}"], connect_timeout: 1s, timeout: 2s}}
      orders: {{targets: ["{orders.url}"], connect_timeout: 1s, timeout: 2s}}
    routes:
      - prefix: /api/profile
        compose:
          path: /{{id}}
          {extra}
          calls:
            user: {{upstream: users, path: "/users/{{id}}"}}
            orders: {{upstream: orders, path: "/orders?customer={{user.customer_id}}", after: user, group: orders{orders_extra}}}
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """


@pytest_twisted.ensureDeferred
async def test_two_calls_merge_into_one_answer_with_the_second_using_the_first(gateway, upstreams):
    users = await upstreams({"/users/7": js({"id": 7, "name": "Ann", "customer_id": "c-9"})})
    orders = await upstreams({"/orders?customer=c-9": js([{"id": 1}, {"id": 2}])})
    gw = await gateway(profile_config(users, orders))
    resp = await get(gw.port, "/api/profile/7")
    assert resp.status == 200, resp.body
    assert resp.json() == {"id": 7, "name": "Ann", "customer_id": "c-9", "orders": [{"id": 1}, {"id": 2}]}
    assert resp.header("x-gateway-completed") == "true"
    assert resp.header("content-type") == "application/json"
    record = gw.log[-1]
    assert [(c["call"], c["upstream"], c["status"]) for c in record["calls"]] == [
        ("user", "users", 200), ("orders", "orders", 200)]
    assert all(c["ms"] >= 0 for c in record["calls"])
