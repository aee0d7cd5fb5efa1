"""The identify step of the pipeline: API key, JWT or client certificate -> Identity -> X-User-* headers.

Upstreams trust `X-User-Id`, `X-User-Role` and `X-User-Tier` because the gateway removed
whatever the client sent (headers.ForwardingHeaders) and sets them only from credentials
verified here. Route policy: `auth: none` skips this step, `optional` forwards an identity
when valid credentials are present and rejects invalid ones, `required` (and `roles`)
reject requests without a valid identity (401) or without the role (403).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, Final

from twisted.internet.defer import Deferred

from txgateway.core.pipeline import LocalResponse, RequestContext, error_response
from txgateway.filters.auth.config import AuthConfig, RouteAuth, header_value_problem
from txgateway.filters.auth.jwks import RemoteJwks
from txgateway.filters.auth.tokens import Identity, InvalidToken, KeysUnavailable, TokenVerifier, UnknownKey

__all__ = ["AuthFilter", "Authenticator", "CertIdentities"]

_MAX_TOKEN: Final = 8192


def _challenge(error: str, description: str) -> list[tuple[bytes, bytes]]:
    value = f'Bearer realm="txgateway", error="{error}", error_description="{description}"'
    return [(b"www-authenticate", value.encode())]


def unauthorized(ctx: RequestContext, error: str, description: str) -> LocalResponse:
    """401 with the RFC 6750 challenge: `invalid_request` (no/unusable credentials) or
    `invalid_token` (credentials present but not valid)."""
    return error_response(ctx, 401, "UNAUTHORIZED", description, _challenge(error, description))


class Authenticator:
    """What every route's auth filter shares: the token verifier (and its cache of verified
    tokens), the JWKS fetcher, the API keys."""

    def __init__(self, config: AuthConfig, clock: Any, remote: RemoteJwks | None = None) -> None:
        self.config = config
        self.remote = remote
        jwt_config = config.jwt
        self.verifier = (TokenVerifier(jwt_config, clock, remote.current if remote is not None else None)
                         if jwt_config is not None else None)
        api_keys = config.api_keys
        self.key_header = api_keys.header if api_keys is not None else None
        self.keys = api_keys.keys if api_keys is not None else {}
        certs = config.client_certs
        self.certs = CertIdentities(certs.identities) if certs is not None else None


class CertIdentities:
    """Verified client certificates' user ids (transport/clientcert.py) as identities: role
    and tier from `auth.client_certs.file`, none for ids not listed there."""

    _MAX_CACHED = 10_000

    def __init__(self, listed: Mapping[str, tuple[str | None, str | None]]) -> None:
        self.cache: dict[str, Identity] = {uid: Identity(uid, role, tier, "client_cert")
                                           for uid, (role, tier) in listed.items()}

    def identity(self, user_id: str) -> Identity | None:
        """None when the id could not go upstream as X-User-Id (control characters, too long)."""
        known = self.cache.get(user_id)
        if known is not None:
            return known
        if header_value_problem(user_id) is not None:
            return None
        identity = Identity(user_id, None, None, "client_cert")
        if len(self.cache) < self._MAX_CACHED:
            self.cache[user_id] = identity
        return identity


class AuthFilter:
    """One route's identify step (`auth: optional|required`, `roles`)."""

    name = "auth"
    on_response_head = None
    on_response_body = None
    on_finished = None

    def __init__(self, authenticator: Authenticator, policy: RouteAuth) -> None:
        self.remote = authenticator.remote
        self.verifier = authenticator.verifier
        self.key_header = authenticator.key_header
        self.keys = authenticator.keys
        self.certs = authenticator.certs
        self.required = policy.required
        self.roles = policy.roles

    def on_request(self, ctx: RequestContext) -> LocalResponse | Deferred[LocalResponse | None] | None:
        required, roles = self.required, self.roles
        key = ctx.header(self.key_header) if self.key_header is not None else None
        if key is not None:
            return self._admit(ctx, self._api_key(key), roles, "the API key is not valid")
        authorization = ctx.header(b"authorization")
        if authorization is None:
            certs = self.certs
            if certs is not None:
                user_id = ctx.get_state("client_cert")       # a verified client certificate's
                if user_id is not None:
                    return self._admit(ctx, certs.identity(user_id), roles,
                                       "the client certificate's identity cannot go upstream as a header")
            if required:
                return unauthorized(ctx, "invalid_request", "credentials are required")
            return None
        verifier = self.verifier
        if verifier is not None:
            try:
                identity = verifier.cached(authorization)     # a token seen before: no parsing
            except InvalidToken as e:
                return unauthorized(ctx, "invalid_token", str(e))
            if identity is not None:
                return self._admit(ctx, identity, roles, "")
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or verifier is None:
            return unauthorized(ctx, "invalid_request", "expected Authorization: Bearer <token>")
        if not token:
            return unauthorized(ctx, "invalid_request", "the bearer token is empty")
        if len(token) > _MAX_TOKEN:
            return unauthorized(ctx, "invalid_token", "the token is too long")
        return self._verify(ctx, token, authorization, roles, retry=True)

    def _verify(self, ctx: RequestContext, token: bytes, authorization: bytes, roles: frozenset[str] | None,
                retry: bool) -> LocalResponse | Deferred[LocalResponse | None] | None:
        try:
            identity = self.verifier.verify_raw(token, authorization)  # type: ignore[union-attr]
        except InvalidToken as e:
            return unauthorized(ctx, "invalid_token", str(e))
        except (KeysUnavailable, UnknownKey) as missing:
            # One JWKS refetch (shared, at most once per cooldown), then verify once more.
            refetch = self.remote.refetch_for_unknown_kid() if retry and self.remote is not None else None
            if refetch is not None:
                spans = ctx.get_state("tracing")
                if spans is not None and self.remote is not None:   # tracing: on (ops/tracing.py): a span of the request
                    spans.around(refetch, "GET", {"http.request.method": "GET", "url.full": self.remote.url,
                                                  "txgateway.jwks": "refetch for an unknown kid"})
                return refetch.addCallback(lambda _: self._verify(ctx, token, authorization, roles, retry=False))
            if isinstance(missing, UnknownKey):
                return unauthorized(ctx, "invalid_token", "the token's key is unknown")
            return error_response(ctx, 503, "UPSTREAM_UNAVAILABLE", "the identity provider's keys are not available",
                                  [(b"retry-after", b"%d" % max(1, int(self.remote.cooldown if self.remote else 1)))])
        return self._admit(ctx, identity, roles, "")

    def _api_key(self, presented: bytes) -> Identity | None:
        """Keys are stored only as SHA-256 digests and found by digest. Any timing the lookup
        shows concerns digests of keys the caller chose, never a stored key itself; the
        final check is `hmac.compare_digest` all the same."""
        digest = hashlib.sha256(presented).digest()
        record = self.keys.get(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        return Identity(record.id, record.role, record.tier, "api_key")

    def _admit(self, ctx: RequestContext, identity: Identity | None, roles: frozenset[str] | None,
               failure: str) -> LocalResponse | None:
        if identity is None:
            return unauthorized(ctx, "invalid_token", failure)
        ctx.identity = identity        # verified: the access log names it, on a 403 too
        if roles is not None and identity.role not in roles:
            return error_response(ctx, 403, "FORBIDDEN", "this identity lacks the role this route requires")
        ctx.headers.extend(identity.headers)
        return None
