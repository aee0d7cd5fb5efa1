"""Authentication over real sockets: what the client gets, what the upstream sees, and that the gateway keeps serving.

Each bad credential gets its exact status, the JSON envelope and the exact `WWW-Authenticate`
challenge, never reaches the upstream, and the next good request still works. The echo
upstream answers with the headers it received, which proves what upstreams can trust.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock, deferLater
from twisted.web.resource import Resource

from tests.conftest import (
    ALICE_KEY,
    BOB_KEY,
    ISSUER,
    SECRET,
    Response,
    assert_envelope,
    free_port,
    jwt_claims,
    listen,
    mint_token,
    parse_responses,
    quiet_site,
    raw,
)
from txgateway.filters.auth.config import hash_api_key


def challenge(error: str, description: str) -> str:
    return f'Bearer realm="txgateway", error="{error}", error_description="{description}"'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def request(path: str = "/api/users/1", headers: list[tuple[str, str]] | None = None, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: api.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def get(gw: Any, path: str = "/api/users/1", token: str | None = None,
              headers: list[tuple[str, str]] | None = None) -> Response:
    all_headers = list(headers or [])
    if token is not None:
        all_headers.append(("Authorization", f"Bearer {token}"))
    (r,) = parse_responses(await raw(gw.port, request(path, all_headers)))
    return r


def seen_identity(r: Response) -> dict[str, str]:
    """The X-User-* headers the echo upstream received."""
    return {k: v for k, v in r.json()["headers"].items() if k.lower().startswith("x-user-")}


async def wait_for(reactor: Any, predicate: Any, timeout: float = 5.0) -> None:
    waited = 0.0
    while not predicate():
        assert waited < timeout, "condition not reached"
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@pytest.fixture(scope="module")
def rsa_keys() -> dict[str, Any]:
    return {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2", "evil")}


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hs_config(echo_url: str, secret_file: str, extra_auth: str = "") -> str:
    return f"""
    auth:
      jwt:
        algorithms: [HS256]
        secret_file: {secret_file}
        issuer: {ISSUER}
        audience: api
{extra_auth}
    upstreams:
      users: {{targets: ["{echo_url}"], timeout: 2s}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users, auth: required}}
      - {{prefix: /api/orders, upstream: users, rewrite_prefix: /orders, roles: [admin]}}
      - {{prefix: /api/maybe, upstream: users, auth: optional}}
      - {{prefix: /api/public, upstream: users}}
    """


async def still_serves(gw: Any) -> None:
    r = await get(gw, token=mint_token(sub="after"))
    assert r.status == 200, r.body
    assert seen_identity(r)["X-User-Id"] == "after"


# --- bad input: one gateway each, exact answers, the next request still works -----------------

def _long_claim_token() -> str:
    return mint_token(sub="x" * 1000)


BAD_BEARERS = [
    # (id, Authorization header value or None, error, description)
    ("missing-header", None, "invalid_request", "credentials are required"),
    ("bearer-with-nothing", "Bearer", "invalid_request", "the bearer token is empty"),
    ("bearer-and-spaces", "Bearer    ", "invalid_request", "the bearer token is empty"),
    ("basic-scheme", "Basic YWxpY2U6c2VjcmV0", "invalid_request", "expected Authorization: Bearer <token>"),
    ("token-without-scheme", lambda: mint_token(), "invalid_request", "expected Authorization: Bearer <token>"),
    ("garbage", "Bearer garbage", "invalid_token", "the token is malformed"),
    ("garbage-dots", "Bearer a.b.c", "invalid_token", "the token is malformed"),
    # 43 base64 characters carry the 32-byte signature: 40 decode cleanly to 30 bytes, 42 do not
    ("truncated-signature", lambda: "Bearer " + mint_token()[:-3], "invalid_token", "the token's signature is invalid"),
    # An HS256 signature is 43 base64url characters; 41 is an impossible length (41 % 4 == 1),
    # so this is malformed whatever the signature's bytes (one character less may still decode).
    ("truncated-to-invalid-base64", lambda: "Bearer " + mint_token()[:-2], "invalid_token", "the token is malformed"),
    ("truncated-in-payload", lambda: "Bearer " + mint_token()[:60], "invalid_token", "the token is malformed"),
    ("wrong-signature", lambda: "Bearer " + mint_token(key=b"another-secret-0123456789abcdef!!"), "invalid_token",
     "the token's signature is invalid"),
    ("tampered-payload", lambda: "Bearer " + _tampered(), "invalid_token", "the token's signature is invalid"),
    ("alg-none", lambda: "Bearer " + _alg_none(), "invalid_token", "the token's algorithm is not accepted"),
    ("alg-not-allowed", lambda: "Bearer " + mint_token(algorithm="HS512", key=SECRET * 2), "invalid_token",
     "the token's algorithm is not accepted"),
    ("expired", lambda: "Bearer " + mint_token(exp=int(time.time()) - 5), "invalid_token", "the token has expired"),
    ("nbf-in-the-future", lambda: "Bearer " + mint_token(nbf=int(time.time()) + 600), "invalid_token",
     "the token is not valid yet"),
    ("iat-in-the-future", lambda: "Bearer " + mint_token(iat=int(time.time()) + 600), "invalid_token",
     "the token's iat is invalid or in the future"),
    ("wrong-iss", lambda: "Bearer " + mint_token(iss="https://evil.test"), "invalid_token", "the token's issuer is not accepted"),
    ("missing-iss", lambda: "Bearer " + mint_token(iss=None), "invalid_token", "the token has no iss claim"),
    ("wrong-aud", lambda: "Bearer " + mint_token(aud="billing"), "invalid_token", "the token's audience is not accepted"),
    ("missing-exp", lambda: "Bearer " + mint_token(exp=None), "invalid_token", "the token has no exp claim"),
    # PyJWT's JSON parser takes NaN, Infinity and huge integers: never expiring, or a 500.
    ("nan-exp", lambda: "Bearer " + mint_token(exp=float("nan")), "invalid_token", "the token has no valid exp"),
    ("infinite-exp", lambda: "Bearer " + mint_token(exp=float("inf")), "invalid_token", "the token has no valid exp"),
    ("400-digit-exp", lambda: "Bearer " + mint_token(exp=10**400), "invalid_token", "the token has no valid exp"),
    ("400-digit-nbf", lambda: "Bearer " + mint_token(nbf=-10**400), "invalid_token", "the token's nbf is not a number"),
    ("missing-sub", lambda: "Bearer " + mint_token(sub=None), "invalid_token", "the token has no sub claim"),
    ("crlf-in-sub", lambda: "Bearer " + mint_token(sub="alice\r\nX-User-Role: admin"), "invalid_token",
     "claim sub is empty, too long or contains control characters"),
    ("lf-in-role", lambda: "Bearer " + mint_token(role="admin\nx"), "invalid_token",
     "claim role is empty, too long or contains control characters"),
    ("1kb-claim", lambda: "Bearer " + _long_claim_token(), "invalid_token",
     "claim sub is empty, too long or contains control characters"),
    ("10kb-claim", lambda: "Bearer " + mint_token(tier="t" * 10240), "invalid_token", "the token is too long"),
    ("list-role", lambda: "Bearer " + mint_token(role=["admin"]), "invalid_token", "claim role must be a string"),
]


def _tampered() -> str:
    head, _, signature = mint_token(sub="alice").split(".")
    return f"{head}.{b64(json.dumps(jwt_claims(sub='root')).encode())}.{signature}"


def _alg_none() -> str:
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64(json.dumps(jwt_claims()).encode())}."


@pytest.mark.parametrize(("authorization", "error", "description"),
                         [case[1:] for case in BAD_BEARERS], ids=[case[0] for case in BAD_BEARERS])
@pytest_twisted.ensureDeferred
async def test_bad_credentials_get_401_with_the_challenge(reactor, echo, gateway, secret_file,
                                                          authorization, error, description):
    gw = await gateway(hs_config(echo.url, secret_file))
    value = authorization() if callable(authorization) else authorization
    headers = [("Authorization", value)] if value is not None else []
    headers.append(("X-User-Id", "forged"))
    r = await get(gw, headers=headers)
    err = assert_envelope(r, 401, "UNAUTHORIZED")
    assert err["message"] == description
    assert r.header("www-authenticate") == challenge(error, description)
    assert echo.requests == []
    record = gw.log[-1]
    assert (record["status"], record["user_id"], record["route"]) == (401, None, "/api/users")
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_rs256_route_refuses_an_hs256_token_signed_with_its_public_key(reactor, echo, gateway, tmp_path, rsa_keys):
    pem_path = tmp_path / "signer.pem"
    pem = public_pem(rsa_keys["k1"])
    pem_path.write_bytes(pem)
    for algorithms in ("[RS256]", "[RS256, HS256]"):
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        extra = f"            secret_file: {secret}" if "HS256" in algorithms else ""
        gw = await gateway(f"""
        auth:
          jwt:
            algorithms: {algorithms}
            public_keys: [{pem_path}]
{extra}
        upstreams:
          users: {{targets: ["{echo.url}"]}}
        routes:
          - {{prefix: /api/users, upstream: users, auth: required}}
        """)
        forged = forge_hs256(jwt_claims(sub="mallory"), pem)
        before = len(echo.requests)
        r = await get(gw, token=forged)
        expected = ("the token's algorithm is not accepted" if algorithms == "[RS256]"
                    else "the token's signature is invalid")
        assert_envelope(r, 401, "UNAUTHORIZED")
        assert r.header("www-authenticate") == challenge("invalid_token", expected)
        assert len(echo.requests) == before
        good = await get(gw, token=jwt.encode(jwt_claims(), rsa_keys["k1"], algorithm="RS256"))
        assert good.status == 200 and seen_identity(good)["X-User-Id"] == "alice"
        stranger = await get(gw, token=jwt.encode(jwt_claims(), rsa_keys["evil"], algorithm="RS256"))
        assert stranger.header("www-authenticate") == challenge("invalid_token", "the token's signature is invalid")


# --- good tokens: what the upstream sees ---------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_valid_token_forwards_identity_and_replaces_forged_headers(reactor, echo, gateway, secret_file):
    gw = await gateway(hs_config(echo.url, secret_file))
    r = await get(gw, token=mint_token(sub="alice", role="admin", tier="pro"),
                  headers=[("X-User-Id", "root"), ("X-User-Role", "superuser"), ("x-user-tier", "enterprise"),
                           ("X-User-Extra", "x")])
    assert r.status == 200, r.body
    assert r.json()["path"] == "/users/1"
    assert seen_identity(r) == {"X-User-Id": "alice", "X-User-Role": "admin", "X-User-Tier": "pro"}
    assert r.header("www-authenticate") is None
    record = gw.log[-1]
    assert (record["status"], record["user_id"]) == (200, "alice")
    # a token without role and tier forwards only the id
    r = await get(gw, token=mint_token(sub="bob", role=None, tier=None), headers=[("X-User-Role", "admin")])
    assert seen_identity(r) == {"X-User-Id": "bob"}
    assert gw.log[-1]["user_id"] == "bob"


@pytest_twisted.ensureDeferred
async def test_a_401_keeps_the_connection_and_the_same_token_works_again(reactor, echo, gateway, secret_file):
    gw = await gateway(hs_config(echo.url, secret_file))
    token = mint_token(sub="carol")
    tokens = [token, "bad", token, mint_token(sub="carol", exp=int(time.time()) - 1), token]
    pipelined = b"".join(
        f"GET /api/users/{i} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {t}\r\n\r\n".encode()
        for i, t in enumerate(tokens))
    rs = parse_responses(await raw(gw.port, pipelined + request("/api/users/last")))
    assert [r.status for r in rs] == [200, 401, 200, 401, 200, 401]
    assert [seen_identity(r)["X-User-Id"] for r in rs if r.status == 200] == ["carol"] * 3
    assert [r.header("connection") for r in rs[:-1]] == [None] * 5
    assert [rec["user_id"] for rec in gw.log[-6:]] == ["carol", None, "carol", None, "carol", None]


@pytest_twisted.ensureDeferred
async def test_a_cached_token_is_remembered_under_its_whole_authorization_value(reactor, echo, gateway, secret_file):
    """The verified-token cache is keyed by the Authorization value as sent: once a token passed
    as `Bearer`, the same token under another scheme is still refused, and when it expires
    while cached it is refused at once."""
    gw = await gateway(hs_config(echo.url, secret_file))
    expires = int(time.time()) + 2
    token = mint_token(sub="dora", exp=expires)
    r = await get(gw, token=token)
    assert (r.status, seen_identity(r)["X-User-Id"]) == (200, "dora")
    for value in (f"Basic {token}", f"Token {token}"):
        r = await get(gw, headers=[("Authorization", value)])
        assert (r.status, r.header("www-authenticate")) == (
            401, challenge("invalid_request", "expected Authorization: Bearer <token>")), value
    r = await get(gw, headers=[("Authorization", f"bearer {token}")])    # the scheme is case-insensitive
    assert (r.status, seen_identity(r)["X-User-Id"]) == (200, "dora")
    assert (await get(gw, token=token)).status == 200           # from the cache
    await wait_for(reactor, lambda: time.time() >= expires, timeout=4.0)
    r = await get(gw, token=token)
    assert (r.status, r.header("www-authenticate")) == (401, challenge("invalid_token", "the token has expired"))
    assert gw.log[-1]["user_id"] is None


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_is_answered_only_after_auth(reactor, echo, gateway, secret_file):
    gw = await gateway(hs_config(echo.url, secret_file))
    head = "POST /api/users/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
    resp = await raw(gw.port, (head + "\r\n").encode(), read_timeout=2)
    assert not resp.startswith(b"HTTP/1.1 100")          # the client is not invited to send a body we refuse
    (r,) = parse_responses(resp)
    assert r.header("www-authenticate") == challenge("invalid_request", "credentials are required")
    resp = await raw(gw.port, [(head + f"Authorization: Bearer {mint_token(sub='erin')}\r\nConnection: close\r\n\r\n").encode(),
                               b"hello"], pause=0.2)
    assert resp.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    (r,) = parse_responses(resp)
    assert r.status == 200 and r.json()["body_bytes"] == 5 and seen_identity(r)["X-User-Id"] == "erin"
    assert len(echo.requests) == 1


@pytest_twisted.ensureDeferred
async def test_roles_give_403_to_a_valid_identity_without_the_role(reactor, echo, gateway, secret_file):
    gw = await gateway(hs_config(echo.url, secret_file))
    assert (await get(gw, "/api/orders/1", token=mint_token(role="admin"))).status == 200
    for token in (mint_token(sub="bob", role="user"), mint_token(sub="bob", role=None), mint_token(sub="bob", role="Admin")):
        r = await get(gw, "/api/orders/1", token=token)
        err = assert_envelope(r, 403, "FORBIDDEN")
        assert err["message"] == "this identity lacks the role this route requires"
        assert r.header("www-authenticate") is None
    assert len(echo.requests) == 1
    assert gw.log[-1]["status"] == 403
    # no credentials on a roles route: 401, not 403
    r = await get(gw, "/api/orders/1")
    assert_envelope(r, 401, "UNAUTHORIZED")
    assert r.header("www-authenticate") == challenge("invalid_request", "credentials are required")


@pytest_twisted.ensureDeferred
async def test_auth_optional(reactor, echo, gateway, secret_file):
    gw = await gateway(hs_config(echo.url, secret_file))
    # anonymous: passes, and forged identity headers are still removed
    r = await get(gw, "/api/maybe", headers=[("X-User-Id", "admin"), ("X-User-Role", "admin")])
    assert r.status == 200 and seen_identity(r) == {}
    assert gw.log[-1]["user_id"] is None
    # present and valid: forwarded
    r = await get(gw, "/api/maybe", token=mint_token(sub="dave", role="user", tier="free"))
    assert seen_identity(r) == {"X-User-Id": "dave", "X-User-Role": "user", "X-User-Tier": "free"}
    assert gw.log[-1]["user_id"] == "dave"
    # present and invalid: rejected, not downgraded to anonymous
    for token, description in ((mint_token(exp=int(time.time()) - 5), "the token has expired"),
                               ("junk", "the token is malformed")):
        r = await get(gw, "/api/maybe", token=token)
        assert_envelope(r, 401, "UNAUTHORIZED")
        assert r.header("www-authenticate") == challenge("invalid_token", description)
    r = await get(gw, "/api/maybe", headers=[("Authorization", "Bearer")])
    assert r.header("www-authenticate") == challenge("invalid_request", "the bearer token is empty")
    assert len(echo.requests) == 2
    # routes without auth ignore credentials entirely (no identity forwarded, no 401)
    r = await get(gw, "/api/public", token="junk", headers=[("X-User-Id", "admin")])
    assert r.status == 200 and seen_identity(r) == {}


# --- API keys --------------------------------------------------------------------------------

def api_key_config(echo_url: str, secret_file: str, keys_file: str, header: str = "X-API-Key") -> str:
    return hs_config(echo_url, secret_file, extra_auth=f"      api_keys: {{header: {header}, file: {keys_file}}}")


@pytest_twisted.ensureDeferred
async def test_api_keys(reactor, echo, gateway, secret_file, keys_file):
    gw = await gateway(api_key_config(echo.url, secret_file, keys_file))
    r = await get(gw, "/api/orders/1", headers=[("X-API-Key", ALICE_KEY), ("X-User-Id", "forged")])
    assert r.status == 200, r.body
    assert seen_identity(r) == {"X-User-Id": "alice-svc", "X-User-Role": "admin", "X-User-Tier": "pro"}
    assert gw.log[-1]["user_id"] == "alice-svc"
    # bob's key is valid but lacks the role
    r = await get(gw, "/api/orders/1", headers=[("x-api-key", BOB_KEY)])
    assert_envelope(r, 403, "FORBIDDEN")
    assert r.header("www-authenticate") is None
    r = await get(gw, "/api/users/1", headers=[("X-API-Key", BOB_KEY)])
    assert seen_identity(r) == {"X-User-Id": "bob-svc", "X-User-Role": "user", "X-User-Tier": "free"}
    # wrong keys: 401 invalid_token
    for wrong in ("nope", ALICE_KEY + "x", ALICE_KEY.upper(), hash_api_key(ALICE_KEY), hash_api_key(ALICE_KEY)[7:], ""):
        r = await get(gw, "/api/users/1", headers=[("X-API-Key", wrong)])
        assert_envelope(r, 401, "UNAUTHORIZED")
        assert r.header("www-authenticate") == challenge("invalid_token", "the API key is not valid")
    # an invalid key is not rescued by a valid token sent alongside
    r = await get(gw, "/api/users/1", token=mint_token(), headers=[("X-API-Key", "nope")])
    assert r.status == 401
    assert len(echo.requests) == 2
    await still_serves(gw)


@pytest_twisted.ensureDeferred
async def test_api_key_from_a_configured_header_and_on_optional_routes(reactor, echo, gateway, secret_file, keys_file):
    gw = await gateway(api_key_config(echo.url, secret_file, keys_file, header="X-Service-Key"))
    r = await get(gw, "/api/users/1", headers=[("X-API-Key", ALICE_KEY)])       # not the configured header
    assert r.header("www-authenticate") == challenge("invalid_request", "credentials are required")
    r = await get(gw, "/api/users/1", headers=[("X-Service-Key", ALICE_KEY)])
    assert r.status == 200 and seen_identity(r)["X-User-Id"] == "alice-svc"
    r = await get(gw, "/api/maybe", headers=[("X-Service-Key", BOB_KEY)])
    assert seen_identity(r)["X-User-Id"] == "bob-svc"
    r = await get(gw, "/api/maybe", headers=[("X-Service-Key", "wrong-key")])
    assert r.header("www-authenticate") == challenge("invalid_token", "the API key is not valid")


# --- JWKS from a URL -----------------------------------------------------------------------

class JwksServer(Resource):
    """An identity provider's JWKS endpoint whose key set (and health) the test changes."""

    isLeaf = True

    def __init__(self, keys: dict[str, Any], kids: tuple[str, ...]) -> None:
        super().__init__()
        self.keys = keys
        self.serve(*kids)
        self.hits = 0
        self.status = 200

    def serve(self, *kids: str) -> None:
        entries = [{**jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[k].public_key(), as_dict=True), "kid": k,
                    "alg": "RS256", "use": "sig"} for k in kids]
        self.body = json.dumps({"keys": entries}).encode()

    def render_GET(self, request: Any) -> bytes:
        self.hits += 1
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.body


def jwks_config(echo_url: str, jwks_url: str, secret_file: str) -> str:
    return f"""
    auth:
      jwt:
        algorithms: [RS256, HS256]
        jwks_url: "{jwks_url}"
        secret_file: {secret_file}
        issuer: {ISSUER}
        audience: api
    upstreams:
      users: {{targets: ["{echo_url}"], timeout: 2s}}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users, auth: required}}
      - {{prefix: /api/public, upstream: users}}
    """


def rs(keys: dict[str, Any], kid: str | None, clock: Clock, signer: str | None = None, **overrides: Any) -> str:
    return jwt.encode(jwt_claims(clock.seconds(), **overrides), keys[signer or kid], algorithm="RS256",
                      headers={"kid": kid} if kid else None)


def now_clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest_twisted.async_yield_fixture()
async def jwks_server(reactor, rsa_keys):
    started: list[Any] = []

    async def start(*kids: str, port: int = 0) -> tuple[JwksServer, Any, str]:
        resource = JwksServer(rsa_keys, kids)
        site = quiet_site(resource)
        listening = (await listen(reactor, site) if port == 0 else
                     await serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(site))
        started.append(listening)
        return resource, listening, f"http://127.0.0.1:{listening.getHost().port}/.well-known/jwks.json"

    yield start
    for listening in started:
        stopped = listening.stopListening()       # None when the test stopped it already
        if stopped is not None:
            await stopped


@pytest_twisted.ensureDeferred
async def test_jwks_rotation_unknown_kid_is_accepted_after_the_refetch(reactor, echo, gateway, secret_file,
                                                                       rsa_keys, jwks_server):
    server, _, url = await jwks_server("k1")
    clock = now_clock()
    gw = await gateway(jwks_config(echo.url, url, secret_file), clock=clock)
    jwks = gw.gateway.jwks
    await wait_for(reactor, lambda: jwks.fetched_at is not None)
    assert server.hits == 1
    r = await get(gw, token=rs(rsa_keys, "k1", clock))
    assert r.status == 200 and seen_identity(r)["X-User-Id"] == "alice"

    # k2 appears in tokens before the provider publishes it: one refetch, still unknown -> 401
    clock.advance(31)
    r = await get(gw, token=rs(rsa_keys, "k2", clock, sub="bob"))
    assert_envelope(r, 401, "UNAUTHORIZED")
    assert r.header("www-authenticate") == challenge("invalid_token", "the token's key is unknown")
    assert server.hits == 2

    # the provider rotates; within the cooldown a flood of random kids does not reach it
    server.serve("k1", "k2")
    for _ in range(20):
        r = await get(gw, token=rs(rsa_keys, uuid.uuid4().hex, clock, signer="evil"))
        assert r.header("www-authenticate") == challenge("invalid_token", "the token's key is unknown")
    r = await get(gw, token=rs(rsa_keys, "k2", clock, sub="bob"))
    assert r.status == 401
    assert server.hits == 2
    assert all(req.getHeader(b"x-user-id") in (b"alice",) for req in echo.requests)

    # after the cooldown the next unknown kid refetches, and k2 is accepted
    clock.advance(31)
    r = await get(gw, token=rs(rsa_keys, "k2", clock, sub="bob"))
    assert r.status == 200, r.body
    assert seen_identity(r) == {"X-User-Id": "bob", "X-User-Role": "admin", "X-User-Tier": "pro"}
    assert server.hits == 3
    assert (await get(gw, token=rs(rsa_keys, "k1", clock))).status == 200
    # a key signed by someone else under a published kid is still refused
    r = await get(gw, token=rs(rsa_keys, "k2", clock, signer="evil"))
    assert r.header("www-authenticate") == challenge("invalid_token", "the token's signature is invalid")
    assert server.hits == 3
    assert gw.log[-2]["user_id"] == "alice"


@pytest_twisted.ensureDeferred
async def test_jwks_down_at_start_gives_503_then_recovers(reactor, echo, gateway, secret_file, rsa_keys, jwks_server):
    port = free_port()
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    clock = now_clock()
    gw = await gateway(jwks_config(echo.url, url, secret_file), clock=clock)
    jwks = gw.gateway.jwks
    await wait_for(reactor, lambda: jwks.failures >= 1)
    for token in (rs(rsa_keys, "k1", clock), rs(rsa_keys, None, clock, signer="k1")):
        r = await get(gw, token=token)
        err = assert_envelope(r, 503, "UPSTREAM_UNAVAILABLE")
        assert err["message"] == "the identity provider's keys are not available"
        assert r.header("retry-after") == "30"
        assert r.header("www-authenticate") is None
    assert echo.requests == []
    assert gw.log[-1]["status"] == 503 and gw.log[-1]["user_id"] is None
    # everyone else is still served: HS tokens, public routes, and bad tokens still get their 401
    r = await get(gw, token=mint_token(clock.seconds(), sub="hs-user"))
    assert r.status == 200 and seen_identity(r)["X-User-Id"] == "hs-user"
    assert (await get(gw, "/api/public/x")).status == 200
    assert (await get(gw, token="junk")).status == 401
    # the provider comes up; after the cooldown the next request fetches and is accepted
    server, _, _ = await jwks_server("k1", port=port)
    clock.advance(30)
    r = await get(gw, token=rs(rsa_keys, "k1", clock))
    assert r.status == 200, r.body
    assert seen_identity(r)["X-User-Id"] == "alice"
    assert server.hits == 1 and jwks.failures == 0


@pytest_twisted.ensureDeferred
async def test_jwks_down_later_keeps_the_old_keys_working(reactor, echo, gateway, secret_file, rsa_keys, jwks_server):
    server, listening, url = await jwks_server("k1")
    clock = now_clock()
    gw = await gateway(jwks_config(echo.url, url, secret_file), clock=clock)
    jwks = gw.gateway.jwks
    await wait_for(reactor, lambda: jwks.fetched_at is not None)
    # the provider answers errors at the periodic refresh
    server.status = 500
    clock.advance(300)
    await wait_for(reactor, lambda: jwks.failures == 1)
    assert server.hits == 2
    assert (await get(gw, token=rs(rsa_keys, "k1", clock))).status == 200
    # then it is gone altogether
    await listening.stopListening()
    clock.advance(300)
    await wait_for(reactor, lambda: jwks.failures == 2)
    r = await get(gw, token=rs(rsa_keys, "k1", clock, sub="still-here"))
    assert r.status == 200, r.body
    assert seen_identity(r)["X-User-Id"] == "still-here"
    # an unknown kid during the outage: one refetch attempt (after the cooldown), then 401, not 503
    clock.advance(31)
    r = await get(gw, token=rs(rsa_keys, "k2", clock))
    assert r.header("www-authenticate") == challenge("invalid_token", "the token's key is unknown")
    assert jwks.failures == 3
    assert (await get(gw, token=rs(rsa_keys, "k1", clock))).status == 200


@pytest_twisted.ensureDeferred
async def test_an_oversized_jwks_response_is_refused_not_buffered(reactor, echo, gateway, secret_file, rsa_keys,
                                                                  jwks_server):
    from txgateway.service.gateway import MAX_JWKS_BYTES
    server, _, url = await jwks_server("k1")
    server.body = b'{"keys": [' + b" " * (MAX_JWKS_BYTES + 10) + b"]}"
    clock = now_clock()
    gw = await gateway(jwks_config(echo.url, url, secret_file), clock=clock)
    jwks = gw.gateway.jwks
    await wait_for(reactor, lambda: jwks.failures >= 1)
    assert jwks.keys == {}
    r = await get(gw, token=rs(rsa_keys, "k1", clock))
    assert_envelope(r, 503, "UPSTREAM_UNAVAILABLE")
