"""RemoteJwks with task.Clock and a hand-fired fetch, alone and behind the auth filter."""

from __future__ import annotations

import json
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from txgateway.config.schema import parse_config
from txgateway.core.pipeline import LocalResponse, RequestContext
from txgateway.filters.auth.jwks import RemoteJwks
from txgateway.testing import make_ctx, route_filters

NOW = 1_700_000_000
URL = "https://idp.example.com/.well-known/jwks.json"
SECRET = "h" * 32


class FakeFetch:
    """`fetch(url) -> Deferred[bytes]`; each call's Deferred is fired by the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[bytes]]] = []

    def __call__(self, url: str) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.calls.append((url, d))
        return d

    @property
    def count(self) -> int:
        return len(self.calls)

    @property
    def last(self) -> Deferred[bytes]:
        return self.calls[-1][1]


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ("a", "b", "c")}


def jwks(keys: dict[str, Any], *kids: str) -> bytes:
    entries = [{**jwt.algorithms.RSAAlgorithm.to_jwk(keys[k].public_key(), as_dict=True), "kid": k, "use": "sig"}
               for k in kids]
    return json.dumps({"keys": entries}).encode()


def token(keys: dict[str, Any], kid: str | None, signer: str | None = None, sub: str = "alice", **extra: Any) -> str:
    payload = {"sub": sub, "role": "admin", "exp": NOW + 3600, **extra}
    return jwt.encode(payload, keys[signer or kid or "a"], algorithm="RS256", headers={"kid": kid} if kid else None)


def clock_at(seconds: float = NOW) -> Clock:
    c = Clock()
    c.advance(seconds)
    return c


def remote(clock: Clock, fetch: FakeFetch, cooldown: float = 30.0, refresh: float = 300.0, timeout: float = 5.0) -> RemoteJwks:
    return RemoteJwks(URL, clock, fetch, cooldown, refresh, timeout)


# --- RemoteJwks alone ------------------------------------------------------------------------

def test_first_fetch_on_start(keys):
    clock, fetch = clock_at(), FakeFetch()
    r = remote(clock, fetch)
    assert fetch.count == 0 and r.current() == {} and r.fetched_at is None
    r.start()
    assert [url for url, _ in fetch.calls] == [URL]
    assert r.current() == {}                            # nothing until the fetch answers
    clock.advance(1)
    fetch.last.callback(jwks(keys, "a", "b"))
    assert sorted(r.current()) == ["a", "b"]
    (a,) = r.current()["a"]
    assert a.key.public_numbers() == keys["a"].public_key().public_numbers()
    assert (r.fetched_at, r.failures) == (NOW + 1, 0)
    r.stop()


def test_an_encryption_key_in_the_set_does_not_spoil_it(keys):
    clock, fetch = clock_at(), FakeFetch()
    r = remote(clock, fetch)
    r.start()
    body = json.loads(jwks(keys, "a"))
    body["keys"].append({**jwt.algorithms.RSAAlgorithm.to_jwk(keys["b"].public_key(), as_dict=True),
                         "kid": "enc", "alg": "RSA-OAEP"})
    fetch.last.callback(json.dumps(body).encode())
    assert list(r.current()) == ["a"] and r.failures == 0
    r.stop()


def test_periodic_refresh_and_stop(keys):
    clock, fetch = clock_at(), FakeFetch()
    r = remote(clock, fetch, refresh=300)
    r.start()
    fetch.last.callback(jwks(keys, "a"))
    clock.advance(299)
    assert fetch.count == 1
    clock.advance(1)
    assert fetch.count == 2
    fetch.last.callback(jwks(keys, "b"))
    assert list(r.current()) == ["b"]                   # a refresh replaces the set (rotation)
    r.stop()
    clock.advance(3000)
    assert fetch.count == 2


def test_refetch_for_unknown_kid_respects_the_cooldown(keys):
    clock, fetch = clock_at(), FakeFetch()
    r = remote(clock, fetch, cooldown=30)
    r.start()
    fetch.last.callback(jwks(keys, "a"))
    assert r.refetch_for_unknown_kid() is None          # the start fetch was just now
    clock.advance(29.9)
    assert r.refetch_for_unknown_kid() is None
    clock.advance(0.1)
    d = r.refetch_for_unknown_kid()
    assert d is not None and fetch.count == 2 and not d.called
    assert r.refetch_for_unknown_kid() is not None and fetch.count == 2     # shares the fetch in flight
    fetch.last.callback(jwks(keys, "a", "b"))
    assert d.called and d.result is None
    assert r.refetch_for_unknown_kid() is None and fetch.count == 2
    r.stop()


@pytest.mark.parametrize("failure", [
    lambda d: d.errback(ConnectionRefusedError()),
    lambda d: d.errback(ValueError("HTTP 500")),
    lambda d: d.callback(b"<html>maintenance</html>"),
    lambda d: d.callback(b'{"keys": []}'),
    lambda d: d.callback(b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'),
    lambda d: d.callback(b"\xff\xfe"),
], ids=["refused", "http-500", "not-json", "no-keys", "oct-key", "not-utf8"])
def test_a_failed_fetch_keeps_the_last_good_keys(keys, failure):
    clock, fetch = clock_at(), FakeFetch()
    r = remote(clock, fetch)
    r.start()
    fetch.last.callback(jwks(keys, "a"))
    good = r.current()
    clock.advance(300)
    assert fetch.count == 2
    failure(fetch.last)
    assert r.current() is good and list(good) == ["a"]
    assert (r.failures, r.fetched_at) == (1, NOW)
    clock.advance(300)
    fetch.last.callback(jwks(keys, "b"))
    assert list(r.current()) == ["b"] and r.failures == 0
    r.stop()


def test_a_hanging_fetch_times_out_and_the_next_one_can_start(keys):
    clock, fetch = clock_at(), FakeFetch()
    r = remote(clock, fetch, timeout=5, cooldown=30)
    r.start()
    first = fetch.last
    clock.advance(4.9)
    assert r.failures == 0
    clock.advance(0.1)
    assert r.failures == 1 and first.called           # cancelled by the timeout
    assert r.current() == {}
    clock.advance(30)
    d = r.refetch_for_unknown_kid()
    assert d is not None and fetch.count == 2          # not stuck behind the hung fetch
    fetch.last.callback(jwks(keys, "a"))
    assert list(r.current()) == ["a"]
    r.stop()


# --- behind the AuthFilter -------------------------------------------------------------------

CONFIG = f"""\
listen: [{{endpoint: "tcp:0"}}]
upstreams: {{users: {{targets: ["http://127.0.0.1:1"]}}}}
routes:
  - {{prefix: /api/users, upstream: users, auth: required}}
auth:
  jwt: {{algorithms: [RS256, HS256], jwks_url: "{URL}", secret_env: S}}
"""


class Setup:
    def __init__(self, keys: dict[str, Any]) -> None:
        self.keys = keys
        self.clock = clock_at()
        self.fetch = FakeFetch()
        config = parse_config(CONFIG, "c.yaml", {"S": SECRET})
        jwt_config = config.auth.jwt
        self.remote = RemoteJwks(jwt_config.jwks_url, self.clock, self.fetch, jwt_config.jwks_cooldown,
                                 jwt_config.jwks_refresh, jwt_config.jwks_timeout)
        self.config = config
        self.filters = route_filters(config, "auth", self.clock, jwks=self.remote)

    def request(self, bearer: str) -> tuple[RequestContext, Any]:
        ctx = make_ctx(self.config, "/api/users", headers=[(b"authorization", b"Bearer " + bearer.encode())],
                       start=self.clock.seconds())
        return ctx, self.filters.on_request(ctx)


def settled(result: Any) -> Any:
    """The outcome of a filter answer that has settled (Deferred or not)."""
    if isinstance(result, Deferred):
        assert result.called, "still waiting"
        out: list[Any] = []
        result.addBoth(out.append)
        return out[0]
    return result


def assert_401(result: Any, description: str) -> None:
    assert isinstance(result, LocalResponse), result
    assert result.status == 401
    assert dict(result.headers)[b"www-authenticate"] == (
        f'Bearer realm="txgateway", error="invalid_token", error_description="{description}"').encode()


def test_unknown_kid_refetches_once_and_a_flood_of_random_kids_does_not(keys):
    s = Setup(keys)
    s.remote.start()
    s.fetch.last.callback(jwks(keys, "a"))
    ctx, result = s.request(token(keys, "a"))
    assert result is None and ctx.identity.user_id == "alice"
    assert s.fetch.count == 1

    s.clock.advance(31)
    ctx, result = s.request(token(keys, "b"))          # rotated: b is new
    assert isinstance(result, Deferred) and s.fetch.count == 2
    # while that fetch is in flight, a flood of unknown kids waits on it rather than fetching more
    flood = [s.request(token(keys, uuid.uuid4().hex, signer="c"))[1] for _ in range(50)]
    assert s.fetch.count == 2 and all(isinstance(d, Deferred) for d in flood)
    s.fetch.last.callback(jwks(keys, "a", "b"))
    assert settled(result) is None and ctx.identity.user_id == "alice"
    for d in flood:
        assert_401(settled(d), "the token's key is unknown")

    # after the refetch, within the cooldown: random kids are refused at once, no fetch
    for _ in range(200):
        s.clock.advance(0.1)
        assert_401(s.request(token(keys, uuid.uuid4().hex, signer="c"))[1], "the token's key is unknown")
    assert s.fetch.count == 2
    # known kids keep working throughout
    assert s.request(token(keys, "a"))[1] is None and s.request(token(keys, "b"))[1] is None
    # once the cooldown is over, one more refetch
    s.clock.advance(10.5)
    assert isinstance(s.request(token(keys, "zz", signer="c"))[1], Deferred)
    assert s.fetch.count == 3
    s.remote.stop()


def test_a_kid_still_unknown_after_the_refetch_is_refused(keys):
    s = Setup(keys)
    s.remote.start()
    s.fetch.last.callback(jwks(keys, "a"))
    s.clock.advance(31)
    _, result = s.request(token(keys, "b"))
    s.fetch.last.callback(jwks(keys, "a"))
    assert_401(settled(result), "the token's key is unknown")
    assert s.fetch.count == 2
    s.remote.stop()


def test_rotation_into_place_with_a_failed_fetch_keeps_old_keys_working(keys):
    s = Setup(keys)
    s.remote.start()
    s.fetch.last.callback(jwks(keys, "a"))
    s.clock.advance(31)
    _, result = s.request(token(keys, "b"))
    s.fetch.last.errback(ConnectionRefusedError())
    assert_401(settled(result), "the token's key is unknown")      # 401, not 503: keys exist
    assert s.request(token(keys, "a"))[1] is None                  # the last good keys still work
    s.remote.stop()


def test_never_fetched_answers_503_with_retry_after(keys):
    s = Setup(keys)
    s.remote.start()
    ctx, result = s.request(token(keys, "a"))          # the start fetch is still in flight: wait for it
    assert isinstance(result, Deferred)
    s.fetch.last.errback(ConnectionRefusedError())
    response = settled(result)
    assert isinstance(response, LocalResponse) and response.status == 503
    headers = dict(response.headers)
    assert headers[b"retry-after"] == b"30" and headers[b"content-type"] == b"application/json"
    assert b"www-authenticate" not in headers
    assert json.loads(response.body) == {"error": {
        "code": "UPSTREAM_UNAVAILABLE", "message": "the identity provider's keys are not available",
        "status": 503, "correlation_id": "cid-1"}}
    assert ctx.identity is None
    # within the cooldown: 503 at once, without fetching again, also for kid-less tokens
    for kid in ("a", None, "x"):
        response = s.request(token(keys, kid, signer="a"))[1]
        assert isinstance(response, LocalResponse) and response.status == 503
    assert s.fetch.count == 1
    # HS tokens do not depend on the JWKS
    hs = jwt.encode({"sub": "hs-user", "exp": NOW + 60}, SECRET, algorithm="HS256")
    ctx, result = s.request(hs)
    assert result is None and ctx.identity.user_id == "hs-user"
    # after the cooldown the next request refetches; when it succeeds the token is accepted
    s.clock.advance(30)
    ctx, result = s.request(token(keys, "a"))
    assert isinstance(result, Deferred) and s.fetch.count == 2
    s.fetch.last.callback(jwks(keys, "a"))
    assert settled(result) is None and ctx.identity.user_id == "alice"
    s.remote.stop()


def test_a_client_leaving_while_waiting_for_the_refetch(keys):
    import gc

    from twisted.logger import globalLogPublisher
    failures: list[Any] = []

    def observer(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)
    globalLogPublisher.addObserver(observer)
    try:
        _client_leaves(keys)
        gc.collect()                                    # unhandled Deferred errors are logged on collection
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not failures, [e["log_failure"].getTraceback() for e in failures]


def _client_leaves(keys: dict[str, Any]) -> None:
    s = Setup(keys)
    s.remote.start()
    s.fetch.last.callback(jwks(keys, "a"))
    s.clock.advance(31)
    _, waiting = s.request(token(keys, "b"))
    _, other = s.request(token(keys, "b", sub="bob"))
    outcome: list[Any] = []
    waiting.addErrback(lambda f: outcome.append(f.check(CancelledError)))
    waiting.cancel()                                   # what the pipeline does when the client hangs up
    assert outcome == [CancelledError]
    s.fetch.last.callback(jwks(keys, "a", "b"))        # the fetch still completes, without errors
    assert sorted(s.remote.current()) == ["a", "b"]
    assert settled(other) is None                      # and the other waiter is admitted
    s.remote.stop()
