"""TokenVerifier: algorithms, keys, claims and time, driven by task.Clock; RFC test vectors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from twisted.internet.task import Clock

from txgateway.filters.auth.config import ClaimMap, Jwk, JwtConfig, parse_jwks
from txgateway.filters.auth.tokens import Identity, InvalidToken, KeysUnavailable, TokenVerifier, UnknownKey

NOW = 1_700_000_000
SECRET = b"0123456789abcdef" * 4    # 64 bytes: long enough for HS512 (RFC 7518 3.2)


def at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def verifier(clock: Clock | None = None, remote: Any = None, **config: Any) -> TokenVerifier:
    values: dict[str, Any] = {"algorithms": ("HS256",), "secret": SECRET}
    values.update(config)
    return TokenVerifier(JwtConfig(**values), clock if clock is not None else at(), remote)


def claims(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sub": "alice", "role": "admin", "tier": "pro", "iat": NOW, "exp": NOW + 3600}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def mint(key: Any = SECRET, algorithm: str = "HS256", headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """An HS token built by hand (PyJWT refuses PEM keys as HMAC secrets, an attacker does not)."""
    algorithm = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[header["alg"]]
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), algorithm).digest())}"


def rejected(v: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        v.verify(token)
    return str(info.value)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ed448": ed448.Ed448PrivateKey.generate(),
    }


def pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


# --- algorithms ------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_hs_algorithms(algorithm):
    v = verifier(algorithms=(algorithm,))
    assert v.verify(mint(algorithm=algorithm)) == Identity("alice", "admin", "pro", "jwt")
    assert rejected(v, mint(key=SECRET[::-1], algorithm=algorithm)) == "the token's signature is invalid"


@pytest.mark.parametrize(("algorithm", "key_name"), [
    ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"), ("PS256", "rsa"), ("PS512", "rsa"),
    ("ES256", "p256"), ("ES384", "p384"), ("ES512", "p521"), ("EdDSA", "ed25519"), ("EdDSA", "ed448"),
])
def test_asymmetric_algorithms_with_public_keys(keys, algorithm, key_name):
    private = keys[key_name]
    v = verifier(algorithms=(algorithm,), secret=None, public_keys=(private.public_key(),))
    assert v.verify(mint(key=private, algorithm=algorithm)) == Identity("alice", "admin", "pro", "jwt")
    stranger = {
        "rsa": lambda: keys["rsa2"], "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()), "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate, "ed448": ed448.Ed448PrivateKey.generate,
    }[key_name]()
    assert rejected(v, mint(key=stranger, algorithm=algorithm)) == "the token's signature is invalid"


def test_several_public_keys_are_tried_in_turn(keys):
    v = verifier(algorithms=("RS256",), secret=None, public_keys=(keys["rsa2"].public_key(), keys["rsa"].public_key()))
    assert v.verify(mint(key=keys["rsa"], algorithm="RS256")).user_id == "alice"


def test_jwks_keys_are_picked_by_kid(keys):
    jwks = (Jwk("a", "RS256", keys["rsa"].public_key()), Jwk("b", None, keys["rsa2"].public_key()))
    v = verifier(algorithms=("RS256",), secret=None, jwks=jwks)
    assert v.verify(mint(key=keys["rsa"], algorithm="RS256", headers={"kid": "a"})).user_id == "alice"
    assert v.verify(mint(key=keys["rsa2"], algorithm="RS256", headers={"kid": "b"}, sub="bob")).user_id == "bob"
    # signed by b's key but claiming kid a: only a's key is tried
    assert rejected(v, mint(key=keys["rsa2"], algorithm="RS256", headers={"kid": "a"}, sub="eve")) == \
        "the token's signature is invalid"
    assert rejected(v, mint(key=keys["rsa"], algorithm="RS256", headers={"kid": "zz"})) == "the token's kid is unknown"
    signing_input = f"{b64(json.dumps({'alg': 'RS256', 'kid': 7}).encode())}.{b64(json.dumps(claims()).encode())}"
    signature = jwt.get_algorithm_by_name("RS256").sign(signing_input.encode(), keys["rsa"])
    # PyJWT refuses a non-string kid while reading the header
    assert rejected(v, f"{signing_input}.{b64(signature)}") == "the token is malformed"


def test_a_jwks_keys_declared_alg_is_enforced(keys):
    v = verifier(algorithms=("RS256", "PS256"), secret=None, jwks=(Jwk("a", "RS256", keys["rsa"].public_key()),))
    assert v.verify(mint(key=keys["rsa"], algorithm="RS256", headers={"kid": "a"})).user_id == "alice"
    assert rejected(v, mint(key=keys["rsa"], algorithm="PS256", headers={"kid": "a"})) == \
        "the token's algorithm does not match its key"


# --- published test vectors -------------------------------------------------------------------

RFC7515_A1_KEY = base64.urlsafe_b64decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow==")
RFC7515_A1_TOKEN = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
RFC7515_A2_JWK = {
    "kty": "RSA", "e": "AQAB",
    "n": ("ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-"
          "SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-"
          "UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2eth"
          "FkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ"),
}
RFC7515_A2_TOKEN = (
    "eyJhbGciOiJSUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZ"
    "cAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-e"
    "OkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw")
RFC7515_A3_JWK = {"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                  "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
RFC7515_A3_TOKEN = (
    "eyJhbGciOiJFUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q")
RFC8037_A4_JWK = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
RFC8037_A4_JWS = ("eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
                  ".hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg")
RFC_EXP = 1300819380
JOE = ClaimMap(user_id="iss")     # the RFC payloads have no sub: {"iss":"joe","exp":1300819380,...}


def tamper(token: str) -> str:
    head, payload, signature = token.split(".")
    flipped = ("A" if signature[10] != "A" else "B")
    return f"{head}.{payload}.{signature[:10]}{flipped}{signature[11:]}"


def test_rfc7515_a1_hs256():
    clock = at(RFC_EXP - 100)
    v = verifier(clock, secret=RFC7515_A1_KEY, claims=JOE, issuer="joe")
    assert v.verify(RFC7515_A1_TOKEN) == Identity("joe", None, None, "jwt")
    assert rejected(verifier(clock, secret=RFC7515_A1_KEY, claims=JOE), tamper(RFC7515_A1_TOKEN)) == \
        "the token's signature is invalid"
    assert rejected(verifier(at(RFC_EXP), secret=RFC7515_A1_KEY, claims=JOE), RFC7515_A1_TOKEN) == "the token has expired"
    assert rejected(verifier(clock, secret=RFC7515_A1_KEY, claims=JOE, issuer="jane"), RFC7515_A1_TOKEN) == \
        "the token's issuer is not accepted"


def test_rfc7515_a1_hs256_through_the_config_loader(tmp_path):
    """The binary A.1 key, given as a secret_file, is used byte for byte."""
    from txgateway.config.schema import parse_config
    secret = tmp_path / "a1.key"
    secret.write_bytes(RFC7515_A1_KEY)
    config = parse_config(
        'listen: [{endpoint: "tcp:0"}]\nupstreams: {u: {targets: ["http://127.0.0.1:1"]}}\nroutes: []\n'
        f"auth:\n  jwt: {{algorithms: [HS256], secret_file: {secret}, claims: {{user_id: iss}}}}\n", "c.yaml", {})
    assert TokenVerifier(config.auth.jwt, at(RFC_EXP - 1)).verify(RFC7515_A1_TOKEN).user_id == "joe"


def test_rfc7515_a2_rs256_from_a_jwks():
    jwks = parse_jwks({"keys": [RFC7515_A2_JWK]})
    v = verifier(at(RFC_EXP - 100), algorithms=("RS256",), secret=None, jwks=jwks, claims=JOE)
    assert v.verify(RFC7515_A2_TOKEN) == Identity("joe", None, None, "jwt")
    assert rejected(v, tamper(RFC7515_A2_TOKEN)) == "the token's signature is invalid"
    v_late = verifier(at(RFC_EXP + 1), algorithms=("RS256",), secret=None, jwks=jwks, claims=JOE)
    assert rejected(v_late, RFC7515_A2_TOKEN) == "the token has expired"
    # the RS256 vector is not accepted where only PS256 is allowed, though the key is the same RSA key
    assert rejected(verifier(at(RFC_EXP - 100), algorithms=("PS256",), secret=None, jwks=jwks, claims=JOE),
                    RFC7515_A2_TOKEN) == "the token's algorithm is not accepted"


def test_rfc7515_a3_es256_from_a_jwks():
    jwks = parse_jwks({"keys": [RFC7515_A3_JWK]})
    v = verifier(at(RFC_EXP - 100), algorithms=("ES256",), secret=None, jwks=jwks, claims=JOE)
    assert v.verify(RFC7515_A3_TOKEN).user_id == "joe"
    assert rejected(v, tamper(RFC7515_A3_TOKEN)) == "the token's signature is invalid"


def test_rfc8037_a4_ed25519_signature_verifies_but_a_sentence_is_no_claims_set():
    jwks = parse_jwks({"keys": [RFC8037_A4_JWK]})
    v = verifier(algorithms=("EdDSA",), secret=None, jwks=jwks)
    # The signature is checked first: the published one passes, then the payload (plain text) is refused.
    assert rejected(v, RFC8037_A4_JWS) == "the token is malformed"
    assert rejected(v, tamper(RFC8037_A4_JWS)) == "the token's signature is invalid"


# --- required claims, time and leeway --------------------------------------------------------

def test_exp_is_required():
    assert rejected(verifier(), mint(exp=None)) == "the token has no exp claim"
    assert rejected(verifier(leeway=3600.0), mint(exp=None)) == "the token has no exp claim"
    assert rejected(verifier(), mint(exp="tomorrow")) == "the token has no valid exp"
    assert rejected(verifier(), mint(exp=True)) == "the token has no valid exp"
    for bad in (float("nan"), float("inf"), 10**400):       # no token lives forever, none is a 500
        assert rejected(verifier(), mint(exp=bad)) == "the token has no valid exp"


def test_expired():
    token = mint(exp=NOW + 60)
    assert verifier(at(NOW + 59)).verify(token).user_id == "alice"
    # RFC 7519 4.1.4: must not be accepted on or after exp
    assert rejected(verifier(at(NOW + 60)), token) == "the token has expired"
    assert rejected(verifier(at(NOW + 3600)), token) == "the token has expired"


def test_nbf_in_the_future():
    token = mint(nbf=NOW + 60)
    assert rejected(verifier(at(NOW)), token) == "the token is not valid yet"
    assert rejected(verifier(at(NOW + 59)), token) == "the token is not valid yet"
    assert verifier(at(NOW + 60)).verify(token).user_id == "alice"
    assert rejected(verifier(), mint(nbf="soon")) == "the token's nbf is not a number"
    assert rejected(verifier(), mint(nbf=float("nan"))) == "the token's nbf is not a number"
    assert rejected(verifier(), mint(nbf=-10**400)) == "the token's nbf is not a number"
    assert rejected(verifier(), forge_hs({"alg": "HS256"}, {**claims(), "nbf": None}, SECRET)) == (
        "the token's nbf is not a number")


def test_iat_in_the_future():
    assert rejected(verifier(at(NOW)), mint(iat=NOW + 120)) == "the token's iat is invalid or in the future"
    assert rejected(verifier(), mint(iat="now")) == "the token's iat is invalid or in the future"
    assert rejected(verifier(), mint(iat=float("nan"))) == "the token's iat is invalid or in the future"
    assert verifier(at(NOW)).verify(mint(iat=NOW)).user_id == "alice"
    assert verifier(at(NOW)).verify(mint(iat=None)).user_id == "alice"     # iat is optional


def test_leeway_applies_to_exp_nbf_and_iat():
    clock = at(NOW)
    v = verifier(clock, leeway=30.0)
    assert v.verify(mint(exp=NOW - 29)).user_id == "alice"
    assert rejected(v, mint(exp=NOW - 30, sub="x")) == "the token has expired"
    assert v.verify(mint(nbf=NOW + 30, sub="n")).user_id == "n"
    assert rejected(v, mint(nbf=NOW + 31, sub="n2")) == "the token is not valid yet"
    assert v.verify(mint(iat=NOW + 30, sub="i")).user_id == "i"
    assert rejected(v, mint(iat=NOW + 31, sub="i2")) == "the token's iat is invalid or in the future"
    assert rejected(verifier(clock), mint(exp=NOW - 29)) == "the token has expired"     # no leeway: expired


def test_issuer_and_audience():
    v = verifier(issuer="https://auth.example.com", audience=("api", "admin-api"))
    ok = {"iss": "https://auth.example.com"}
    assert v.verify(mint(aud="api", **ok)).user_id == "alice"
    assert v.verify(mint(aud=["other", "admin-api"], **ok)).user_id == "alice"
    assert rejected(v, mint(aud="api", iss="https://evil.example.com")) == "the token's issuer is not accepted"
    assert rejected(v, mint(aud="web", **ok)) == "the token's audience is not accepted"
    assert rejected(v, mint(aud=["web"], **ok)) == "the token's audience is not accepted"
    assert rejected(v, mint(aud="api")) == "the token has no iss claim"
    assert rejected(v, mint(**ok)) == "the token has no aud claim"
    # not configured: not checked
    assert verifier().verify(mint(aud="anything", iss="anyone")).user_id == "alice"


# --- algorithm allowlist and key confusion ---------------------------------------------------

def alg_none(payload: dict[str, Any], name: str = "none") -> str:
    return f"{b64(json.dumps({'alg': name, 'typ': 'JWT'}).encode())}.{b64(json.dumps(payload).encode())}."


@pytest.mark.parametrize("name", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_rejected(keys, name):
    for v in (verifier(), verifier(algorithms=("HS256", "RS256"), public_keys=(keys["rsa"].public_key(),))):
        assert rejected(v, alg_none(claims(), name)) == "the token's algorithm is not accepted"
        # a none token with a signature appended is no better
        assert rejected(v, alg_none(claims(), name) + b64(b"sig")) == "the token's algorithm is not accepted"


def test_algorithm_not_in_the_allowlist(keys):
    v = verifier(algorithms=("HS256",))
    assert rejected(v, mint(algorithm="HS512")) == "the token's algorithm is not accepted"
    assert rejected(v, mint(key=keys["rsa"], algorithm="RS256")) == "the token's algorithm is not accepted"
    v = verifier(algorithms=("RS256",), secret=None, public_keys=(keys["rsa"].public_key(),))
    assert rejected(v, mint(key=keys["rsa"], algorithm="PS256")) == "the token's algorithm is not accepted"
    assert rejected(v, mint(key=keys["rsa"], algorithm="RS512")) == "the token's algorithm is not accepted"
    header = b64(json.dumps({"alg": ["RS256"]}).encode())
    assert rejected(v, f"{header}.{b64(b'{}')}.{b64(b'x')}") == "the token's algorithm is not accepted"


def test_hs_rs_key_confusion_is_impossible(keys):
    """An HS256 token whose HMAC key is the RS public key PEM (which an attacker can download)."""
    public_pem = pem(keys["rsa"])
    forged = forge_hs({"alg": "HS256", "typ": "JWT"}, claims(sub="mallory"), public_pem)
    # the forgery is a well-formed HS256 token: it verifies with the PEM as HMAC secret...
    assert hmac.compare_digest(forged, forge_hs({"alg": "HS256", "typ": "JWT"}, claims(sub="mallory"), public_pem))
    # ...but an RS256-only verifier refuses the algorithm,
    rs_only = verifier(algorithms=("RS256",), secret=None, public_keys=(keys["rsa"].public_key(),))
    assert rejected(rs_only, forged) == "the token's algorithm is not accepted"
    # and where HS256 is allowed too, an HS token is only checked against the configured secret.
    both = verifier(algorithms=("HS256", "RS256"), public_keys=(keys["rsa"].public_key(),))
    assert rejected(both, forged) == "the token's signature is invalid"
    # Same with JWKS keys and the kid of the RSA key.
    jwks = (Jwk("rsa-1", "RS256", keys["rsa"].public_key()),)
    with_kid = forge_hs({"alg": "HS256", "kid": "rsa-1"}, claims(sub="mallory"), public_pem)
    assert rejected(verifier(algorithms=("RS256",), secret=None, jwks=jwks), with_kid) == "the token's algorithm is not accepted"
    assert rejected(verifier(algorithms=("HS256", "RS256"), jwks=jwks), with_kid) == "the token's signature is invalid"
    # and the genuine RS256 token still works on both
    assert both.verify(mint(key=keys["rsa"], algorithm="RS256")).user_id == "alice"


def test_es256_token_against_a_p384_key_is_refused(keys):
    es256 = mint(key=keys["p256"], algorithm="ES256")
    v = verifier(algorithms=("ES256", "ES384"), secret=None, public_keys=(keys["p384"].public_key(),))
    assert rejected(v, es256) == "no key can verify this token"
    jwks = (Jwk("p384", None, keys["p384"].public_key()),)
    v = verifier(algorithms=("ES256", "ES384"), secret=None, jwks=jwks)
    assert rejected(v, mint(key=keys["p256"], algorithm="ES256", headers={"kid": "p384"})) == \
        "the token's algorithm does not match its key"
    assert v.verify(mint(key=keys["p384"], algorithm="ES384", headers={"kid": "p384"})).user_id == "alice"


def test_rs_token_is_never_checked_against_an_ec_or_ed_key(keys):
    v = verifier(algorithms=("RS256", "EdDSA"), secret=None,
                 public_keys=(keys["p256"].public_key(), keys["ed25519"].public_key()))
    assert rejected(v, mint(key=keys["rsa"], algorithm="RS256")) == "no key can verify this token"
    assert v.verify(mint(key=keys["ed25519"], algorithm="EdDSA")).user_id == "alice"


def test_hs_token_without_a_configured_secret(keys):
    # HS allowed by the object, but no secret: nothing to verify with (the config loader refuses this anyway)
    v = verifier(algorithms=("HS256", "RS256"), secret=None, public_keys=(keys["rsa"].public_key(),))
    assert rejected(v, mint()) == "no key can verify this token"


# --- malformed tokens and claims -------------------------------------------------------------

@pytest.mark.parametrize("token", [
    "garbage", "", "a.b", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9",
    f"{b64(b'[1]')}.{b64(b'{}')}.{b64(b'x')}", f"{b64(b'not json')}.{b64(b'{}')}.{b64(b'x')}",
])
def test_malformed_tokens(token):
    assert rejected(verifier(), token) == "the token is malformed"


def test_truncated_and_payload_tampered_tokens():
    token = mint()
    head, payload, signature = token.split(".")
    assert rejected(verifier(), f"{head}.{payload}.{signature[:20]}") == "the token's signature is invalid"
    assert rejected(verifier(), f"{head}.{payload}") == "the token is malformed"
    assert rejected(verifier(), f"{head}.{payload}.") == "the token's signature is invalid"
    assert rejected(verifier(), f"{head}..") == "the token's signature is invalid"
    assert rejected(verifier(), token[: len(head) + 10]) == "the token is malformed"
    other = b64(json.dumps(claims(sub="root")).encode())
    assert rejected(verifier(), f"{head}.{other}.{signature}") == "the token's signature is invalid"
    assert rejected(verifier(), mint(sub=None)) == "the token has no sub claim"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"sub": "alice\r\nX-User-Role: admin"}, "claim sub is empty, too long or contains control characters"),
    ({"sub": "alice\n"}, "claim sub is empty, too long or contains control characters"),
    ({"sub": "a\x00b"}, "claim sub is empty, too long or contains control characters"),
    ({"sub": "a\x7fb"}, "claim sub is empty, too long or contains control characters"),
    ({"sub": "x" * 10240}, "claim sub is empty, too long or contains control characters"),
    ({"sub": "x" * 257}, "claim sub is empty, too long or contains control characters"),
    ({"sub": ""}, "claim sub is empty, too long or contains control characters"),
    ({"role": "admin\r\nX-Evil: 1"}, "claim role is empty, too long or contains control characters"),
    ({"tier": "t" * 10240}, "claim tier is empty, too long or contains control characters"),
    ({"role": ["admin"]}, "claim role must be a string"),
    ({"tier": {"name": "pro"}}, "claim tier must be a string"),
    ({"role": True}, "claim role must be a string"),
    ({"sub": "caf\u00e9 \u2603"}, "claim sub has characters not allowed in a header"),
])
def test_claims_unfit_for_headers_are_rejected(overrides, message):
    assert rejected(verifier(), mint(**overrides)) == message


def test_claim_values_that_are_fine():
    v = verifier()
    assert v.verify(mint(sub="x" * 256, role=None, tier=None)) == Identity("x" * 256, None, None, "jwt")
    assert v.verify(mint(sub="caf\u00e9", role="a b")) == Identity("caf\u00e9", "a b", "pro", "jwt")
    assert rejected(v, mint(role="a\tb")) == "claim role is empty, too long or contains control characters"
    assert verifier(claims=ClaimMap(user_id="uid")).verify(mint(sub=None, uid=42)).user_id == "42"


def test_configured_claim_names():
    v = verifier(claims=ClaimMap(user_id="email", role="grp", tier="plan"))
    identity = v.verify(mint(email="a@example.com", grp="ops", plan="gold"))
    assert identity == Identity("a@example.com", "ops", "gold", "jwt")
    assert identity.headers == ((b"x-user-id", b"a@example.com"), (b"x-user-role", b"ops"), (b"x-user-tier", b"gold"))
    assert Identity("bob").headers == ((b"x-user-id", b"bob"),)
    assert rejected(v, mint()) == "the token has no email claim"


# --- the verified-token cache ----------------------------------------------------------------

@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Counts full verifications (PyJWT decodes): a cache hit does none."""
    calls: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)
    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_cache_hits_recheck_exp(decodes):
    clock = at(NOW)
    v = verifier(clock)
    token = mint(exp=NOW + 60)
    assert v.verify(token).user_id == "alice"
    assert v.verify(token).user_id == "alice"
    assert len(decodes) == 1                          # the second was a cache hit
    clock.advance(59)
    assert v.verify(token).user_id == "alice"
    assert len(decodes) == 1
    clock.advance(1)                                  # now == exp
    assert rejected(v, token) == "the token has expired"
    assert len(decodes) == 1                          # refused from the cache entry itself
    assert rejected(v, token) == "the token has expired"   # and then on a full check
    assert len(decodes) == 2


def test_cache_hits_recheck_exp_with_leeway(decodes):
    clock = at(NOW)
    v = verifier(clock, leeway=30.0)
    token = mint(exp=NOW + 60)
    v.verify(token)
    clock.advance(89)
    assert v.verify(token).user_id == "alice"
    clock.advance(1)
    assert rejected(v, token) == "the token has expired"
    assert len(decodes) == 1


def test_failures_are_never_cached(decodes):
    clock = at(NOW)
    v = verifier(clock, issuer="good")
    bad = mint(iss="bad")
    assert rejected(v, bad) == "the token's issuer is not accepted"
    assert rejected(v, bad) == "the token's issuer is not accepted"
    assert len(decodes) == 2
    early = mint(nbf=NOW + 10, iss="good")
    assert rejected(v, early) == "the token is not valid yet"
    clock.advance(10)
    assert v.verify(early).user_id == "alice"         # the earlier refusal was not remembered
    assert rejected(v, mint(iss="good", sub="a\nb")) == "claim sub is empty, too long or contains control characters"


def test_cache_is_bounded_and_can_be_off(decodes):
    v = verifier(cache_size=2)
    tokens = [mint(sub=f"u{i}") for i in range(3)]
    for token in tokens:
        v.verify(token)
    assert len(decodes) == 3
    v.verify(tokens[2])
    v.verify(tokens[1])
    assert len(decodes) == 3                           # the two newest are cached
    v.verify(tokens[0])
    assert len(decodes) == 4                           # the oldest was evicted
    off = verifier(cache_size=0)
    assert off.verify(tokens[0]).user_id == "u0"
    assert off.verify(tokens[0]).user_id == "u0"
    assert len(decodes) == 6



def test_the_last_token_seen_expires_after_the_bound_dropped_it(decodes):
    """The verifier remembers the last cached token apart from the bounded cache: once the
    bound dropped its entry it is still refused at its exp, and then fully checked again."""
    clock = at(NOW)
    v = verifier(clock, cache_size=1)
    first, second = mint(exp=NOW + 60), mint(sub="bob", exp=NOW + 60)
    v.verify(first)
    assert v.verify(first).user_id == "alice"          # a cache hit: now the last one seen
    v.verify(second)                                   # takes the cache's one place
    assert v.verify(first).user_id == "alice"
    clock.advance(60)
    assert rejected(v, first) == "the token has expired"
    assert len(decodes) == 2
    assert rejected(v, first) == "the token has expired"
    assert len(decodes) == 3


def test_cache_is_keyed_by_the_raw_token(decodes):
    v = verifier()
    token = mint()
    assert v.verify_raw(token.encode()).user_id == "alice"
    assert v.verify(token).user_id == "alice"          # the same bytes: the same entry
    assert len(decodes) == 1
    assert rejected(v, token + "\u20ac") == "the token is malformed"   # no latin-1 form: never decoded


# --- remote (JWKS URL) keys ------------------------------------------------------------------

def test_remote_keys_unknown_kid_and_never_fetched(keys):
    remote: dict[str | None, list[Jwk]] = {}
    v = verifier(algorithms=("RS256",), secret=None, remote=lambda: remote)
    token = mint(key=keys["rsa"], algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(KeysUnavailable):
        v.verify(token)
    with pytest.raises(KeysUnavailable):
        v.verify(mint(key=keys["rsa"], algorithm="RS256"))          # without kid too
    remote["k0"] = [Jwk("k0", "RS256", keys["rsa2"].public_key())]
    with pytest.raises(UnknownKey):
        v.verify(token)
    remote["k1"] = [Jwk("k1", "RS256", keys["rsa"].public_key())]
    assert v.verify(token).user_id == "alice"
    # a kid-less token is tried against every remote key of the right type
    assert v.verify(mint(key=keys["rsa"], algorithm="RS256", sub="nokid")).user_id == "nokid"
    # HS tokens never wait for the JWKS
    assert verifier(algorithms=("HS256", "RS256"), remote=lambda: {}).verify(mint()).user_id == "alice"


def test_static_keys_answer_before_remote_ones(keys):
    v = verifier(algorithms=("RS256",), secret=None, jwks=(Jwk("local", None, keys["rsa"].public_key()),),
                 remote=lambda: {})
    assert v.verify(mint(key=keys["rsa"], algorithm="RS256", headers={"kid": "local"})).user_id == "alice"
    with pytest.raises(UnknownKey):       # remote keys not fetched yet, but local keys exist: worth a refetch, not 503
        v.verify(mint(key=keys["rsa"], algorithm="RS256", headers={"kid": "elsewhere"}))
