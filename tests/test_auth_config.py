"""The `auth:` section: every key's validation error with file, line and key path, and the values."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.configcheck import config_errors
from tests.test_config import TOP_KEYS
from txgateway.config.schema import parse_config
from txgateway.filters.auth.config import ApiKey, ClaimMap, Jwk, hash_api_key, parse_jwks

# Lines 1-8; the auth section starts at line 9 (`auth:`), its first key at line 10.
BASE = """\
listen:
  - endpoint: "tcp:8080"
upstreams:
  users: {targets: ["http://127.0.0.1:3001"]}
  orders: {targets: ["http://127.0.0.1:3003"]}
routes:
  - {prefix: /api/users, upstream: users, auth: required}
  - {prefix: /api/orders, upstream: orders, roles: [admin]}
"""
SECRET = "s" * 32
ENV = {"JWT_SECRET": SECRET}
ALGORITHMS = ("ES256, ES384, ES512, EdDSA, HS256, HS384, HS512, PS256, PS384, PS512, RS256, RS384, RS512")
JWT_KEYS = ("algorithms, audience, cache_size, claims, issuer, jwks_cooldown, jwks_file, jwks_refresh, jwks_timeout, "
            "jwks_url, leeway, public_keys, secret_env, secret_file")


def config(auth: str, env: dict[str, str] | None = None):
    return parse_config(BASE + textwrap.dedent(auth), "c.yaml", ENV if env is None else env)


def errors(auth: str, env: dict[str, str] | None = None) -> list[str]:
    return config_errors(BASE + textwrap.dedent(auth), environ=ENV if env is None else env)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- values ---------------------------------------------------------------------------------

def test_a_full_jwt_section(tmp_path, rsa_key):
    pem = tmp_path / "signer.pem"
    pem.write_bytes(public_pem(rsa_key))
    jwks = tmp_path / "jwks.json"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks.write_text(json.dumps({"keys": [
        {**json.loads(_jwk_json(ec_key.public_key())), "kid": "ec-1", "alg": "ES256"},
        {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},          # encryption keys are skipped
    ]}))
    c = config(f"""\
        auth:
          jwt:
            algorithms: [HS256, RS256, ES256]
            secret_env: JWT_SECRET
            public_keys: [{pem}]
            jwks_file: {jwks}
            jwks_url: https://auth.example.com/jwks.json
            jwks_cooldown: 1m
            jwks_refresh: 10m
            jwks_timeout: 2s
            issuer: https://auth.example.com
            audience: [api, admin-api]
            leeway: 30s
            claims: {{user_id: email, role: grp}}
            cache_size: 5
        """)
    j = c.auth.jwt
    assert j.algorithms == ("HS256", "RS256", "ES256")
    assert j.secret == SECRET.encode()
    assert len(j.public_keys) == 1 and j.public_keys[0].public_numbers() == rsa_key.public_key().public_numbers()
    (key,) = j.jwks
    assert (key.kid, key.alg) == ("ec-1", "ES256")
    assert key.key.public_numbers() == ec_key.public_key().public_numbers()
    assert j.jwks_url == "https://auth.example.com/jwks.json"
    assert (j.jwks_cooldown, j.jwks_refresh, j.jwks_timeout, j.leeway) == (60.0, 600.0, 2.0, 30.0)
    assert j.issuer == "https://auth.example.com" and j.audience == ("api", "admin-api")
    assert j.claims == ClaimMap(user_id="email", role="grp", tier="tier")
    assert j.cache_size == 5
    assert c.auth.api_keys is None
    assert SECRET not in repr(c.auth)       # the secret never shows in logs or reprs


def test_jwt_defaults_and_a_single_audience():
    j = config("""\
        auth:
          jwt: {algorithms: [HS256], secret_env: JWT_SECRET, audience: api}
        """).auth.jwt
    assert j.audience == ("api",)
    assert (j.issuer, j.leeway, j.claims, j.jwks_cooldown, j.jwks_url, j.public_keys, j.jwks) == (
        None, 0.0, ClaimMap("sub", "role", "tier"), 30.0, None, (), ())


def test_secret_file_is_read_as_bytes_and_stripped(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x03" + b"\xa3" * 40 + b"\n")       # binary secrets work (RFC 7515 A.1's is one)
    j = config(f"""\
        auth:
          jwt: {{algorithms: [HS256], secret_file: {secret}}}
        """).auth.jwt
    assert j.secret == b"\x03" + b"\xa3" * 40


def test_api_keys_values(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(textwrap.dedent(f"""\
        - {{hash: "{hash_api_key('k' * 20)}", id: ci, role: admin, tier: pro}}
        - {{hash: "{hash_api_key('m' * 20)}", id: bot}}
        """))
    c = config(f"""\
        auth:
          api_keys: {{header: X-Service-Key, file: {keys}}}
        """)
    api = c.auth.api_keys
    assert api.header == b"x-service-key" and api.file == str(keys)
    digest = hashlib.sha256(b"k" * 20).digest()
    assert api.keys[digest] == ApiKey("ci", "admin", "pro", digest)
    assert api.keys[hashlib.sha256(b"m" * 20).digest()] == ApiKey("bot", None, None, hashlib.sha256(b"m" * 20).digest())
    assert len(api.keys) == 2
    with pytest.raises(TypeError):
        api.keys[b"x"] = api.keys[digest]           # read-only once loaded
    assert config(f"auth:\n  api_keys: {{file: {keys}}}\n").auth.api_keys.header == b"x-api-key"   # the default


def test_an_empty_keys_file_is_valid(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("# no keys yet\n")
    assert dict(config(f"auth:\n  api_keys: {{file: {keys}}}\n").auth.api_keys.keys) == {}


def test_hash_api_key():
    assert hash_api_key("secret-key-0123456789") == "sha256:" + hashlib.sha256(b"secret-key-0123456789").hexdigest()


# --- jwt: algorithms --------------------------------------------------------------------------

def test_unknown_algorithm():
    assert errors("""\
        auth:
          jwt:
            algorithms: [HS256, HS257, rs256]
            secret_env: JWT_SECRET
        """) == [
        f'c.yaml:11: auth.jwt.algorithms[1]: unknown algorithm "HS257" (expected one of: {ALGORITHMS})',
        f'c.yaml:11: auth.jwt.algorithms[2]: unknown algorithm "rs256" (expected one of: {ALGORITHMS})',
    ]


@pytest.mark.parametrize("name", ["none", "None", "NONE"])
def test_none_algorithm(name):
    assert errors(f"""\
        auth:
          jwt:
            algorithms:
              - HS256
              - {name}
            secret_env: JWT_SECRET
        """) == ['c.yaml:13: auth.jwt.algorithms[1]: "none" is never accepted: unsigned tokens prove nothing']


def test_algorithms_missing_or_empty():
    assert errors("auth:\n  jwt: {secret_env: JWT_SECRET}\n") == [
        "c.yaml:10: auth.jwt.algorithms: missing (required): the list of accepted algorithms, e.g. [RS256]",
    ]
    assert errors("auth:\n  jwt:\n    algorithms: []\n") == ["c.yaml:11: auth.jwt.algorithms: expected at least one algorithm"]
    assert errors("auth:\n  jwt:\n    algorithms: HS256\n") == ["c.yaml:11: auth.jwt.algorithms: expected a list, got 'HS256'"]


def test_unknown_key_in_jwt_and_auth():
    assert errors("""\
        auth:
          jwt:
            algorithms: [HS256]
            secret_env: JWT_SECRET
            secret: inline-secrets-are-not-a-thing
          apikeys: {}
        """) == [
        f"c.yaml:13: auth.jwt.secret: unknown key (expected one of: {JWT_KEYS})",
        "c.yaml:14: auth.apikeys: unknown key (expected one of: api_keys, client_certs, jwt)",
    ]
    # The section exists but is empty: that is the one error (routes do not pile on).
    assert errors("auth: {}\n") == ["c.yaml:9: auth: expected jwt, api_keys and/or client_certs"]


# --- jwt: HS secrets -------------------------------------------------------------------------

def test_hs_algorithm_without_a_secret():
    assert errors("""\
        auth:
          jwt:
            algorithms: [HS256, RS256]
            jwks_url: https://auth.example.com/jwks.json
        """) == ["c.yaml:11: auth.jwt.algorithms: HS algorithms need secret_env or secret_file"]


def test_secret_env_unset_or_empty():
    text = """\
        auth:
          jwt:
            algorithms: [HS384]
            secret_env: JWT_SECRET
        """
    expected = ["c.yaml:12: auth.jwt.secret_env: environment variable JWT_SECRET is not set or empty"]
    assert errors(text, env={}) == expected
    assert errors(text, env={"JWT_SECRET": ""}) == expected
    assert errors(text, env={"OTHER": SECRET}) == expected


def test_secret_shorter_than_32_bytes(tmp_path):
    assert errors("""\
        auth:
          jwt:
            algorithms: [HS256]
            secret_env: JWT_SECRET
        """, env={"JWT_SECRET": "x" * 31}) == [
        "c.yaml:12: auth.jwt.secret_env: the HS secret must be at least 32 bytes for HS256, got 31",
    ]
    short = tmp_path / "short"
    short.write_text("  " + "y" * 20 + "  \n")       # surrounding whitespace does not count
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [HS256]
            secret_file: {short}
        """) == ["c.yaml:12: auth.jwt.secret_file: the HS secret must be at least 32 bytes for HS256, got 20"]
    # 32 multi-byte characters are more than 32 bytes: accepted
    assert config("auth:\n  jwt: {algorithms: [HS256], secret_env: JWT_SECRET}\n",
                  env={"JWT_SECRET": "\u00e9" * 16}).auth.jwt.secret == ("\u00e9" * 16).encode()


@pytest.mark.parametrize(("algorithms", "length", "expected"), [
    ("[HS384]", 47, "at least 48 bytes for HS384, got 47"),
    ("[HS256, HS384]", 40, "at least 48 bytes for HS384, got 40"),
    ("[HS512, HS256]", 63, "at least 64 bytes for HS512, got 63"),
    ("[HS384, HS512]", 48, "at least 64 bytes for HS512, got 48"),
])
def test_secret_as_long_as_the_longest_allowed_hs_hash(algorithms, length, expected):
    """RFC 7518 3.2: the key MUST be at least as long as the hash output."""
    text = f"auth:\n  jwt:\n    algorithms: {algorithms}\n    secret_env: JWT_SECRET\n"
    assert errors(text, env={"JWT_SECRET": "z" * length}) == [f"c.yaml:12: auth.jwt.secret_env: the HS secret must be {expected}"]
    assert config(text, env={"JWT_SECRET": "z" * (length + 1 if length in (47, 63) else 64)}).auth.jwt.secret


def test_secret_env_and_secret_file_both(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [HS256]
            secret_env: JWT_SECRET
            secret_file: {secret}
        """) == ["c.yaml:13: auth.jwt.secret_file: use secret_env or secret_file, not both"]


def test_unreadable_secret_file(tmp_path):
    missing = tmp_path / "missing"
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [HS256]
            secret_file: {missing}
        """) == [f"c.yaml:12: auth.jwt.secret_file: cannot read {missing}: No such file or directory"]
    assert errors(f"auth:\n  jwt: {{algorithms: [HS256], secret_file: {tmp_path}}}\n") == [
        f"c.yaml:10: auth.jwt.secret_file: cannot read {tmp_path}: Is a directory",
    ]


def test_a_secret_without_an_hs_algorithm():
    assert errors("""\
        auth:
          jwt:
            algorithms: [RS256]
            jwks_url: https://auth.example.com/jwks.json
            secret_env: JWT_SECRET
        """) == ["c.yaml:13: auth.jwt: a secret is configured but no HS algorithm is allowed"]


def test_a_bad_secret_does_not_hide_other_problems():
    assert errors("""\
        auth:
          jwt:
            algorithms: [HS256]
            secret_env: JWT_SECRET
            jwks_url: "ftp://auth.example.com/jwks.json"
            leeway: soon
        """, env={}) == [
        "c.yaml:12: auth.jwt.secret_env: environment variable JWT_SECRET is not set or empty",
        'c.yaml:13: auth.jwt.jwks_url: expected an http(s) URL, got "ftp://auth.example.com/jwks.json"',
        'c.yaml:14: auth.jwt.leeway: expected a duration like "250ms", "5s" or "1m", got "soon"',
    ]


# --- jwt: public keys --------------------------------------------------------------------------

def test_unreadable_or_non_pem_public_key_file(tmp_path, rsa_key):
    good = tmp_path / "good.pem"
    good.write_bytes(public_pem(rsa_key))
    private = tmp_path / "private.pem"
    private.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    der = tmp_path / "key.der"
    der.write_bytes(rsa_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    missing = tmp_path / "missing.pem"
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [RS256]
            public_keys:
              - {good}
              - {missing}
              - {private}
              - {garbage}
              - {der}
        """) == [
        f"c.yaml:14: auth.jwt.public_keys[1]: cannot read {missing}: No such file or directory",
        f"c.yaml:15: auth.jwt.public_keys[2]: {private} is not a PEM public key",
        f"c.yaml:16: auth.jwt.public_keys[3]: {garbage} is not a PEM public key",
        f"c.yaml:17: auth.jwt.public_keys[4]: {der} is not a PEM public key",
    ]


@pytest.mark.parametrize(("content", "reason"), [
    ("{", "is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("", "is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    ("[]", 'is not a usable JWKS: expected a JSON object with a "keys" list'),
    ('{"keys": {}}', 'is not a usable JWKS: expected a JSON object with a "keys" list'),
    ('{"keys": []}', "is not a usable JWKS: no signature keys in it"),
    ('{"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]}', "is not a usable JWKS: no signature keys in it"),
    ('{"keys": ["x"]}', "is not a usable JWKS: keys[0] is not an object"),
    ('{"keys": [{"kty": "oct", "k": "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"}]}',
     "is not a usable JWKS: keys[0] is a symmetric (oct) key; only public keys belong in a JWKS"),
])
def test_malformed_jwks_file(tmp_path, content, reason):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(content)
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [RS256]
            jwks_file: {jwks}
        """) == [f"c.yaml:12: auth.jwt.jwks_file: {jwks} {reason}"]


def test_jwks_file_with_an_unusable_key_or_missing(tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": [{"kty": "RSA", "e": "AQAB"}]}')
    (problem,) = errors(f"auth:\n  jwt:\n    algorithms: [RS256]\n    jwks_file: {jwks}\n")
    assert problem.startswith(f"c.yaml:12: auth.jwt.jwks_file: {jwks} is not a usable JWKS: keys[0] is not a usable key: ")
    missing = tmp_path / "missing.json"
    assert errors(f"auth:\n  jwt:\n    algorithms: [RS256]\n    jwks_file: {missing}\n") == [
        f"c.yaml:12: auth.jwt.jwks_file: cannot read {missing}: No such file or directory",
    ]


@pytest.mark.parametrize("url", ["ftp://auth.example.com/jwks.json", "auth.example.com/jwks.json", "https://", "https:///jwks", ""])
def test_bad_jwks_url(url):
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [ES256]
            jwks_url: "{url}"
        """) == [f'c.yaml:12: auth.jwt.jwks_url: expected an http(s) URL, got "{url}"']


@pytest.mark.parametrize("algorithm", ["RS256", "PS384", "ES512", "EdDSA"])
def test_asymmetric_algorithm_with_no_key_source(algorithm):
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [HS256, {algorithm}]
            secret_env: JWT_SECRET
            issuer: https://auth.example.com
        """) == ["c.yaml:11: auth.jwt.algorithms: RS/PS/ES/EdDSA algorithms need public_keys, jwks_file or jwks_url"]


def test_bad_durations_in_jwt():
    assert errors("""\
        auth:
          jwt:
            algorithms: [HS256]
            secret_env: JWT_SECRET
            leeway: 30
            jwks_cooldown: later
            jwks_refresh: -5m
            jwks_timeout: 1 s
        """) == [
        'c.yaml:13: auth.jwt.leeway: expected a duration like "250ms", "5s" or "1m", got "30"',
        'c.yaml:14: auth.jwt.jwks_cooldown: expected a duration like "250ms", "5s" or "1m", got "later"',
        'c.yaml:15: auth.jwt.jwks_refresh: expected a duration like "250ms", "5s" or "1m", got "-5m"',
        'c.yaml:16: auth.jwt.jwks_timeout: expected a duration like "250ms", "5s" or "1m", got "1 s"',
    ]


def test_issuer_audience_claims_cache_size_types():
    base = "auth:\n  jwt:\n    algorithms: [HS256]\n    secret_env: JWT_SECRET\n"
    assert errors(base + "    issuer: [a, b]\n") == ["c.yaml:13: auth.jwt.issuer: expected a single value, got a list"]
    assert errors(base + "    audience: {a: 1}\n") == ["c.yaml:13: auth.jwt.audience: expected a single value, got a mapping"]
    assert errors(base + "    audience: [api, 7]\n") == ["c.yaml:13: auth.jwt.audience[1]: expected a string, got 7"]
    assert errors(base + "    claims: {user_id: sub, name: name}\n") == [
        "c.yaml:13: auth.jwt.claims.name: unknown key (expected one of: role, tier, user_id)",
    ]
    assert errors(base + "    cache_size: -1\n") == ["c.yaml:13: auth.jwt.cache_size: expected an integer >= 0, got -1"]


# --- api_keys ------------------------------------------------------------------------------------

def test_api_keys_file_missing_or_unreadable(tmp_path):
    assert errors("auth:\n  api_keys: {header: X-API-Key}\n") == [
        "c.yaml:10: auth.api_keys.file: missing (required): the keys file (entries: {hash, id, role, tier})",
    ]
    missing = tmp_path / "keys.yaml"
    assert errors(f"""\
        auth:
          api_keys:
            header: X-API-Key
            file: {missing}
        """) == [f"c.yaml:12: auth.api_keys.file: cannot read {missing}: No such file or directory"]
    assert errors(f"auth:\n  api_keys:\n    file: {tmp_path}\n") == [
        f"c.yaml:11: auth.api_keys.file: cannot read {tmp_path}: Is a directory",
    ]


def test_keys_file_entries_are_reported_with_the_keys_files_name_and_line(tmp_path):
    keys = tmp_path / "keys.yaml"
    good = hash_api_key("a" * 20)
    keys.write_text(textwrap.dedent(f"""\
        - {{hash: "{good}", id: ci, role: admin, tier: pro}}
        - {{hash: "sha256:abc", id: short}}
        - {{hash: "{good.upper()}", id: upper}}
        - {{hash: "md5:{'0' * 32}", id: md5}}
        - {{hash: "{hash_api_key('b' * 20)}"}}
        - {{id: nohash}}
        - {{hash: "{good}", id: again}}
        - {{hash: "{hash_api_key('c' * 20)}", id: ok, colour: red}}
        - just-a-key
        - {{hash: "{hash_api_key('d' * 20)}", id: "ci\\r\\nx-user-role: admin", role: "", tier: "élite"}}
        - {{hash: "{hash_api_key('e' * 20)}", id: "服务"}}
        """))
    assert errors(f"""\
        auth:
          api_keys:
            file: {keys}
        """) == [
        f'{keys}:2: keys[1].hash: expected "sha256:<64 hex digits>" (from txgateway hash-key)',
        f'{keys}:3: keys[2].hash: expected "sha256:<64 hex digits>" (from txgateway hash-key)',
        f'{keys}:4: keys[3].hash: expected "sha256:<64 hex digits>" (from txgateway hash-key)',
        f"{keys}:5: keys[4]: each key needs hash and id (make the hash with: txgateway hash-key)",
        f"{keys}:6: keys[5]: each key needs hash and id (make the hash with: txgateway hash-key)",
        f"{keys}:7: keys[6].hash: the same key is listed twice",
        f"{keys}:8: keys[7].colour: unknown key (expected one of: hash, id, role, tier)",
        f"{keys}:9: keys[8]: expected a mapping, got 'just-a-key'",
        # id, role and tier go upstream as X-User-* headers: a CR/LF there would be header injection
        (f"{keys}:10: keys[9].id: is empty, too long or contains control characters (it goes upstream as an "
         "X-User-* header), got 'ci\\r\\nx-user-role: admin'"),
        (f"{keys}:10: keys[9].role: is empty, too long or contains control characters (it goes upstream as an "
         "X-User-* header), got ''"),
        f"{keys}:11: keys[10].id: has characters not allowed in a header (it goes upstream as an X-User-* header), got '服务'",
    ]


def test_keys_file_that_is_not_a_list_or_not_yaml(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("ci: sha256:abc\n")
    assert errors(f"auth:\n  api_keys: {{file: {keys}}}\n") == [f"{keys}:1: keys: expected a list, got a mapping"]
    keys.write_text("- {hash: x\n")
    # A YAML syntax error in the keys file is reported beside the main file's own problems.
    assert errors(f"bogus: 1\nauth:\n  api_keys: {{file: {keys}}}\n") == [
        f"c.yaml:9: bogus: unknown key (expected one of: {TOP_KEYS})",
        f"{keys}:2: invalid YAML: expected ',' or '}}', but got '<stream end>'",
    ]


def test_jwt_and_api_keys_problems_are_all_reported(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {hash: nope, id: x}\n")
    assert errors(f"""\
        auth:
          jwt:
            algorithms: [HS256, HS1024]
          api_keys:
            file: {keys}
        """, env={}) == [
        f'c.yaml:11: auth.jwt.algorithms[1]: unknown algorithm "HS1024" (expected one of: {ALGORITHMS})',
        "c.yaml:11: auth.jwt.algorithms: HS algorithms need secret_env or secret_file",
        f'{keys}:1: keys[0].hash: expected "sha256:<64 hex digits>" (from txgateway hash-key)',
    ]


# --- parse_jwks on published keys ----------------------------------------------------------------

RFC7517_A1_RSA = {  # RFC 7515 A.2 / RFC 7517 A.1: the RS256 example's public key
    "kty": "RSA", "kid": "2011-04-29", "alg": "RS256", "e": "AQAB",
    "n": ("ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-"
          "SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-"
          "UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2eth"
          "FkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ"),
}
RFC8037_ED25519 = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}


def test_parse_jwks_of_published_keys():
    rsa_jwk, ed_jwk = parse_jwks({"keys": [RFC7517_A1_RSA, RFC8037_ED25519]})
    assert isinstance(rsa_jwk, Jwk) and (rsa_jwk.kid, rsa_jwk.alg) == ("2011-04-29", "RS256")
    assert isinstance(rsa_jwk.key, rsa.RSAPublicKey) and rsa_jwk.key.public_numbers().e == 65537
    assert isinstance(ed_jwk.key, ed25519.Ed25519PublicKey) and (ed_jwk.kid, ed_jwk.alg) == (None, None)


def test_parse_jwks_ignores_a_non_string_kid_and_refuses_a_non_string_alg():
    (key,) = parse_jwks({"keys": [{**RFC7517_A1_RSA, "kid": 7}]})
    assert (key.kid, key.alg) == (None, "RS256")
    with pytest.raises(ValueError, match=r"^keys\[0\] is not a usable key: "):
        parse_jwks({"keys": [{**RFC7517_A1_RSA, "alg": ["RS256"]}]})


def _jwk_json(public_key) -> str:
    import jwt
    return jwt.algorithms.ECAlgorithm.to_jwk(public_key)


def test_parse_jwks_skips_encryption_and_key_agreement_keys_without_use():
    """RFC 7517: `use` is optional. An IdP's encryption key beside its signing keys must not make the
    whole set unusable (for a jwks_url that would mean 503 for every RS token)."""
    encryption = {"kty": "RSA", "alg": "RSA-OAEP", "kid": "enc-1", "e": "AQAB", "n": RFC7517_A1_RSA["n"]}
    agreement = {"kty": "OKP", "crv": "X25519", "kid": "ecdh-1", "x": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"}
    (key,) = parse_jwks({"keys": [encryption, RFC7517_A1_RSA, agreement]})
    assert key.kid == "2011-04-29"
    with pytest.raises(ValueError, match=r"^no signature keys in it$"):
        parse_jwks({"keys": [encryption, agreement]})
    # a malformed key of a signature type is still an error, not skipped
    with pytest.raises(ValueError, match=r"^keys\[1\] is not a usable key: "):
        parse_jwks({"keys": [RFC7517_A1_RSA, {"kty": "RSA", "alg": "RS256", "e": "AQAB"}]})
