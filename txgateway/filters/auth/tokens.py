"""JWT verification: algorithm allowlist, key choice by family and kid, claims, a result cache.

Key confusion is impossible by construction: an HS token is only ever checked against the
configured secret, and an asymmetric token only against public keys of the matching type
(RSA for RS/PS, the right curve for ES, Ed25519/Ed448 for EdDSA), one algorithm at a time.
Time claims (`exp`, `nbf`, `iat`) are checked here against the injected clock, with
`leeway`, so tests drive expiry with `task.Clock` and cached tokens are re-checked on use.
PyJWT (`jwt.decode`) costs ~40 us a call; each distinct good token is verified once and
remembered until it expires (bounded, failures never cached).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from txgateway.filters.auth.config import HMAC, Jwk, JwtConfig, header_value_problem

__all__ = ["Identity", "InvalidToken", "KeysUnavailable", "TokenVerifier", "UnknownKey"]

_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@dataclass(frozen=True)
class Identity:
    """Who the request is from, as upstreams will see it (X-User-Id/Role/Tier)."""

    user_id: str
    role: str | None = None
    tier: str | None = None
    source: str = "jwt"       # jwt | api_key | client_cert
    # Built once per identity: cached tokens reuse it on every request. A field set in
    # __post_init__, not a cached_property: compiled by mypyc, that is a property run per read.
    headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out = [(b"x-user-id", self.user_id.encode("latin-1"))]
        if self.role is not None:
            out.append((b"x-user-role", self.role.encode("latin-1")))
        if self.tier is not None:
            out.append((b"x-user-tier", self.tier.encode("latin-1")))
        object.__setattr__(self, "headers", tuple(out))


class InvalidToken(Exception):
    """401 invalid_token; the message is safe to show to the client."""


class UnknownKey(Exception):
    """No key for this token's `kid` (yet): worth one JWKS refetch."""


class KeysUnavailable(Exception):
    """Asymmetric keys were never obtained: 503, not the client's fault."""


def safe_claim(name: str, value: Any) -> str | None:
    """A claim value fit to become a header, or InvalidToken."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidToken(f"claim {name} must be a string")
    text = str(value)
    problem = header_value_problem(text)
    if problem is not None:
        raise InvalidToken(f"claim {name} {problem}")
    return text


def _numeric_date(claims: dict[str, Any], name: str, invalid: str) -> float | None:
    """RFC 7519's NumericDate as seconds, None if absent; `invalid` for anything but a finite number.

    PyJWT's JSON parser takes `NaN`, `Infinity` and integers of any size: a NaN `exp` compares
    false with everything (never expired) and a 400-digit one overflows float arithmetic.
    """
    if name not in claims:
        return None
    value = claims[name]             # null is not a date: refused, not taken for absent
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken(invalid)
    try:
        seconds = float(value)
    except OverflowError:
        raise InvalidToken(invalid) from None
    if not math.isfinite(seconds):
        raise InvalidToken(invalid)
    return seconds


def _fits(algorithm: str, key: Any) -> bool:
    """Does this public key belong to the algorithm's family (and curve)?"""
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES[algorithm])
    if algorithm == "EdDSA":
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


class TokenVerifier:
    """Verifies bearer tokens against the config; `keys` supplies JWKS keys by kid."""

    def __init__(self, config: JwtConfig, clock: Any,
                 remote_keys: Callable[[], dict[str | None, list[Jwk]]] | None = None,
                 ) -> None:
        self.config = config
        self.clock = clock
        self._seconds: Callable[[], float] = clock.seconds    # called bound: a method call on Any is generic
        self._remote_keys = remote_keys
        self._allowed = frozenset(config.algorithms)
        self._static_by_kid = {k.kid: k for k in config.jwks if k.kid}
        self._static_anonymous = [Jwk(None, None, k) for k in config.public_keys] + [k for k in config.jwks if not k.kid]
        # The Authorization value as the request carried it -> (identity, nbf - leeway, exp +
        # leeway): bounded by cache_size (the oldest entry goes first), re-checked against the
        # clock on every use (an expired token is dropped and refused), failures never stored.
        self._cache: dict[bytes, tuple[Identity, float, float]] = {}
        # The last key found there and its entry: a client sends the same value request after
        # request, and comparing it costs a fraction of hashing it (~160 bytes) for the lookup.
        self._last_key: bytes | None = None
        self._last: tuple[Identity, float, float] | None = None
        self._options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "verify_aud": config.audience is not None, "verify_iss": config.issuer is not None,
                         "require": ["exp"]}

    def verify(self, token: str) -> Identity:
        try:
            raw = token.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidToken("the token is malformed") from None
        return self.verify_raw(raw)

    def cached(self, key: bytes) -> Identity | None:
        """The identity of a token verified before under `key`, None if there is none; raises
        InvalidToken when the token is no longer (or not yet) valid. A request's whole
        Authorization value is the key: a token seen before costs no parsing at all."""
        last_key = self._last_key
        cached = self._last if last_key is not None and key == last_key else None
        if cached is None:
            cached = self._cache.get(key)
            if cached is None:
                return None
            self._last_key, self._last = key, cached
        identity, not_before, expires = cached
        now = self._seconds()
        if not_before <= now < expires:
            return identity
        self._cache.pop(key, None)        # gone already when the cache's bound dropped it
        self._last_key = self._last = None
        raise InvalidToken("the token has expired" if now >= expires else "the token is not valid yet")

    def verify_raw(self, raw: bytes, key: bytes | None = None) -> Identity:
        """`verify` of the token as the request carried it, remembered under `key` (the token
        itself unless given): a cached token costs no decoding."""
        if key is None:
            key = raw
        identity = self.cached(key)
        if identity is not None:
            return identity
        now = self.clock.seconds()
        leeway = self.config.leeway
        token = raw.decode("latin-1")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the token is malformed") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._allowed:
            raise InvalidToken("the token's algorithm is not accepted")
        claims = self._decode(token, algorithm, header.get("kid"))
        exp = _numeric_date(claims, "exp", "the token has no valid exp")
        if exp is None:
            raise InvalidToken("the token has no valid exp")
        if now >= exp + leeway:  # RFC 7519 4.1.4: not accepted on or after exp
            raise InvalidToken("the token has expired")
        nbf = _numeric_date(claims, "nbf", "the token's nbf is not a number")
        if nbf is None:
            nbf = float("-inf")
        elif now < nbf - leeway:
            raise InvalidToken("the token is not valid yet")
        iat = _numeric_date(claims, "iat", "the token's iat is invalid or in the future")
        if iat is not None and iat > now + leeway:
            raise InvalidToken("the token's iat is invalid or in the future")
        names = self.config.claims
        user_id = safe_claim(names.user_id, claims.get(names.user_id))
        if user_id is None:
            raise InvalidToken(f"the token has no {names.user_id} claim")
        identity = Identity(user_id, safe_claim(names.role, claims.get(names.role)),
                            safe_claim(names.tier, claims.get(names.tier)), "jwt")
        cache = self._cache
        if self.config.cache_size > 0:  # cache_size: 0 turns the cache off
            if len(cache) >= self.config.cache_size:
                del cache[next(iter(cache))]
            cache[key] = (identity, nbf - leeway, exp + leeway)
        return identity

    def _decode(self, token: str, algorithm: str, kid: Any) -> dict[str, Any]:
        config = self.config
        last: Exception | None = None
        for key in self._keys_for(algorithm, kid):
            try:
                return jwt.decode(token, key=key, algorithms=[algorithm], audience=config.audience and list(config.audience),
                                  issuer=config.issuer, options=self._options)  # type: ignore[arg-type]
            except jwt.InvalidSignatureError as e:
                last = e
            except jwt.MissingRequiredClaimError as e:
                raise InvalidToken(f"the token has no {e.claim} claim") from None
            except jwt.InvalidIssuerError:
                raise InvalidToken("the token's issuer is not accepted") from None
            except jwt.InvalidAudienceError:
                raise InvalidToken("the token's audience is not accepted") from None
            except jwt.PyJWTError:
                raise InvalidToken("the token is malformed") from None
        if last is not None:
            raise InvalidToken("the token's signature is invalid")
        raise InvalidToken("no key can verify this token")

    def _keys_for(self, algorithm: str, kid: Any) -> Iterable[Any]:
        if algorithm in HMAC:
            return [self.config.secret] if self.config.secret is not None else []
        remote = self._remote_keys() if self._remote_keys is not None else None
        if kid is not None:  # PyJWT's header parsing already refused a non-string kid
            found = self._static_by_kid.get(kid)
            candidates = [found] if found is not None else (remote or {}).get(kid, [])
            if not candidates:
                if remote is not None:
                    if not remote and not self._static_by_kid and not self._static_anonymous:
                        raise KeysUnavailable()
                    raise UnknownKey(kid)
                raise InvalidToken("the token's kid is unknown")
        else:
            candidates = list(self._static_anonymous)
            if remote is not None:
                if not remote and not candidates and not self._static_by_kid:
                    raise KeysUnavailable()
                candidates += [k for keys in remote.values() for k in keys]
        usable = [k.key for k in candidates if k.alg in (None, algorithm) and _fits(algorithm, k.key)]
        if not usable and kid is not None:
            raise InvalidToken("the token's algorithm does not match its key")
        return usable
