"""The `auth:` section: JWT verification settings and the API-key file, validated at load.

Key material is loaded here, once, so a missing secret, an unreadable PEM file or a
malformed JWKS stops the gateway at start with file, key and line, instead of turning into
401s at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from txgateway.config.reader import ConfigError, Reader, _Invalid, compose
from txgateway.config.units import parse_duration
from txgateway.filters.auth.forwardconfig import ForwardAuthConfig, parse_forward
from txgateway.filters.headerconfig import header_name

__all__ = [
    "ASYMMETRIC",
    "HMAC",
    "ApiKey",
    "ApiKeysConfig",
    "AuthConfig",
    "ClaimMap",
    "Jwk",
    "JwtConfig",
    "hash_api_key",
    "parse_auth",
    "parse_jwks",
]

HMAC = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
# RFC 7518 3.2: an HS key MUST be at least as long as the hash output (bytes)
_MIN_SECRET = {"HS256": 32, "HS384": 48, "HS512": 64}
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


def hash_api_key(key: str) -> str:
    """What the keys file stores for `key`: the key itself never is."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ClaimMap:
    """Which JWT claims become X-User-Id, X-User-Role and X-User-Tier."""

    user_id: str = "sub"
    role: str = "role"
    tier: str = "tier"


@dataclass(frozen=True)
class Jwk:
    """A public verification key from a JWKS, with its declared `kid` and `alg` if any."""

    kid: str | None
    alg: str | None
    key: Any


def parse_jwks(data: Any) -> tuple[Jwk, ...]:
    """Signature keys of a JWKS document; raises ValueError saying what is wrong.

    Symmetric (`oct`) keys are refused: a shared secret published next to public keys is
    how HS/RS confusion attacks start.
    """
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('expected a JSON object with a "keys" list')
    import jwt  # imported here: a config without JWT never loads PyJWT (memory)

    out = []
    for index, entry in enumerate(data["keys"]):
        if not isinstance(entry, dict):
            raise ValueError(f"keys[{index}] is not an object")
        if entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            raise ValueError(f"keys[{index}] is a symmetric (oct) key; only public keys belong in a JWKS")
        declared = entry.get("alg")
        if (isinstance(declared, str) and declared not in HMAC | ASYMMETRIC) or entry.get("crv") in ("X25519", "X448"):
            continue  # an encryption or key-agreement key ("use" is optional): not ours, and no reason to refuse the set
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"keys[{index}] is not a usable key: {e}") from None
        kid = entry.get("kid")
        alg = entry.get("alg")
        out.append(Jwk(kid if isinstance(kid, str) else None, alg if isinstance(alg, str) else None, key))
    if not out:
        raise ValueError("no signature keys in it")
    return tuple(out)


@dataclass(frozen=True)
class JwtConfig:
    algorithms: tuple[str, ...]
    secret: bytes | None = field(default=None, repr=False)
    public_keys: tuple[Any, ...] = ()          # cryptography public keys from PEM files
    jwks: tuple[Jwk, ...] = ()                 # from jwks_file
    jwks_url: str | None = None
    jwks_cooldown: float = 30.0                # at most one refetch per cooldown on unknown kid
    jwks_refresh: float = 300.0                # periodic refresh of jwks_url
    jwks_timeout: float = 5.0
    issuer: str | None = None
    audience: tuple[str, ...] | None = None
    leeway: float = 0.0
    claims: ClaimMap = ClaimMap()
    cache_size: int = 10000                    # verified tokens kept until their exp


@dataclass(frozen=True)
class ApiKey:
    id: str
    role: str | None
    tier: str | None
    digest: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class ApiKeysConfig:
    header: bytes                              # lower-case header name
    keys: Mapping[bytes, ApiKey]               # sha256 digest -> record
    file: str


@dataclass(frozen=True)
class ClientCertsConfig:
    identities: Mapping[str, tuple[str | None, str | None]] = field(default_factory=lambda: MappingProxyType({}))
    file: str | None = None                    # user id -> (role, tier)


@dataclass(frozen=True)
class AuthConfig:
    jwt: JwtConfig | None = None
    api_keys: ApiKeysConfig | None = None
    client_certs: ClientCertsConfig | None = None


_JWT_KEYS = {k: "" for k in (
    "algorithms", "secret_env", "secret_file", "public_keys", "jwks_file", "jwks_url", "jwks_cooldown",
    "jwks_refresh", "jwks_timeout", "issuer", "audience", "leeway", "claims", "cache_size")}


def parse_auth(r: Reader, node: yaml.Node, environ: Mapping[str, str] | None = None) -> AuthConfig:
    fields = r.mapping(node, "auth", {"jwt": "", "api_keys": "", "client_certs": ""})
    if not fields:
        raise r.fail(node, "auth", "expected jwt, api_keys and/or client_certs")
    env = os.environ if environ is None else environ
    jwt_config = r.attempt(lambda: _jwt(r, fields["jwt"], env), None) if "jwt" in fields else None
    keys = r.attempt(lambda: _api_keys(r, fields["api_keys"]), None) if "api_keys" in fields else None
    certs = r.attempt(lambda: _client_certs(r, fields["client_certs"]), None) if "client_certs" in fields else None
    return AuthConfig(jwt=jwt_config, api_keys=keys, client_certs=certs)


def _jwt(r: Reader, node: yaml.Node, env: Mapping[str, str]) -> JwtConfig:
    path = "auth.jwt"
    f = r.mapping(node, path, _JWT_KEYS)
    if "algorithms" not in f:
        raise r.fail(node, f"{path}.algorithms", "missing (required): the list of accepted algorithms, e.g. [RS256]")
    algorithms = []
    for item_path, item in r.sequence(f["algorithms"], f"{path}.algorithms"):
        name = r.attempt(lambda: r.string(item, item_path), "")
        if name.lower() == "none":
            r.fail(item, item_path, '"none" is never accepted: unsigned tokens prove nothing')
        elif name not in HMAC | ASYMMETRIC:
            r.fail(item, item_path, f'unknown algorithm "{name}" (expected one of: {", ".join(sorted(HMAC | ASYMMETRIC))})')
        else:
            algorithms.append(name)
    if not algorithms:
        raise r.fail(f["algorithms"], f"{path}.algorithms", "expected at least one algorithm")
    values: dict[str, Any] = {"algorithms": tuple(algorithms)}
    strongest = max((a for a in algorithms if a in HMAC), key=_MIN_SECRET.__getitem__, default="HS256")
    secret = r.attempt(lambda: _secret(r, f, env, path, strongest), None)  # its problem is recorded; keep checking
    wants_hmac = any(a in HMAC for a in algorithms)
    wants_keys = any(a in ASYMMETRIC for a in algorithms)
    if wants_hmac and not {"secret_env", "secret_file"} & set(f):
        r.fail(f["algorithms"], f"{path}.algorithms", "HS algorithms need secret_env or secret_file")
    if secret is not None and not wants_hmac:
        r.fail(f.get("secret_env") or f.get("secret_file"), path, "a secret is configured but no HS algorithm is allowed")
    values["secret"] = secret
    if "public_keys" in f:
        values["public_keys"] = tuple(
            k for k in (r.attempt(lambda: _pem(r, n, p), None) for p, n in r.sequence(f["public_keys"], f"{path}.public_keys"))
            if k is not None)
    if "jwks_file" in f:
        no_keys: tuple[Jwk, ...] = ()
        values["jwks"] = r.attempt(lambda: _jwks_file(r, f["jwks_file"], f"{path}.jwks_file"), no_keys)
    if "jwks_url" in f:
        url = r.string(f["jwks_url"], f"{path}.jwks_url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            r.fail(f["jwks_url"], f"{path}.jwks_url", f'expected an http(s) URL, got "{url}"')
        values["jwks_url"] = url
    if wants_keys and not ({"public_keys", "jwks_file", "jwks_url"} & set(f)):
        r.fail(f["algorithms"], f"{path}.algorithms", "RS/PS/ES/EdDSA algorithms need public_keys, jwks_file or jwks_url")
    for key in ("jwks_cooldown", "jwks_refresh", "jwks_timeout", "leeway"):
        if key in f:
            values[key] = r.attempt(lambda: r.parsed(f[key], f"{path}.{key}", parse_duration), getattr(JwtConfig, key))
    if "issuer" in f:
        values["issuer"] = r.string(f["issuer"], f"{path}.issuer")
    if "audience" in f:
        aud = r.scalar(f["audience"], f"{path}.audience") if not isinstance(f["audience"], yaml.SequenceNode) else None
        if isinstance(aud, str):
            values["audience"] = (aud,)
        else:
            values["audience"] = tuple(r.string(n, p) for p, n in r.sequence(f["audience"], f"{path}.audience"))
    if "claims" in f:
        c = r.mapping(f["claims"], f"{path}.claims", {"user_id": "", "role": "", "tier": ""})
        values["claims"] = ClaimMap(**{k: r.string(v, f"{path}.claims.{k}") for k, v in c.items()})
    if "cache_size" in f:
        values["cache_size"] = r.integer(f["cache_size"], f"{path}.cache_size")
    return JwtConfig(**values)


def _secret(r: Reader, f: dict[str, yaml.Node], env: Mapping[str, str], path: str, algorithm: str) -> bytes | None:
    if "secret_env" in f and "secret_file" in f:
        raise r.fail(f["secret_file"], f"{path}.secret_file", "use secret_env or secret_file, not both")
    if "secret_env" in f:
        name = r.string(f["secret_env"], f"{path}.secret_env")
        value = env.get(name, "")
        if not value:
            raise r.fail(f["secret_env"], f"{path}.secret_env", f"environment variable {name} is not set or empty")
        secret = value.encode()
        where = (f["secret_env"], f"{path}.secret_env")
    elif "secret_file" in f:
        file = r.file_path(f["secret_file"], f"{path}.secret_file")
        try:
            with open(file, "rb") as fh:
                secret = fh.read().strip()
        except OSError as e:
            raise r.fail(f["secret_file"], f"{path}.secret_file", f"cannot read {file}: {e.strerror}") from None
        where = (f["secret_file"], f"{path}.secret_file")
    else:
        return None
    if len(secret) < _MIN_SECRET[algorithm]:
        raise r.fail(where[0], where[1],
                     f"the HS secret must be at least {_MIN_SECRET[algorithm]} bytes for {algorithm}, got {len(secret)}")
    return secret


def _pem(r: Reader, node: yaml.Node, path: str) -> Any:
    file = r.file_path(node, path)
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise r.fail(node, path, f"cannot read {file}: {e.strerror}") from None
    try:
        return load_pem_public_key(data)
    except ValueError:
        raise r.fail(node, path, f"{file} is not a PEM public key") from None


def _jwks_file(r: Reader, node: yaml.Node, path: str) -> tuple[Jwk, ...]:
    file = r.file_path(node, path)
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as e:
        raise r.fail(node, path, f"cannot read {file}: {e.strerror}") from None
    except ValueError as e:
        raise r.fail(node, path, f"{file} is not valid JSON: {e}") from None
    try:
        return parse_jwks(data)
    except ValueError as e:
        raise r.fail(node, path, f"{file} is not a usable JWKS: {e}") from None


def _api_keys(r: Reader, node: yaml.Node) -> ApiKeysConfig:
    path = "auth.api_keys"
    f = r.mapping(node, path, {"header": "", "file": ""})
    header = header_name(r, f["header"], f"{path}.header", from_clients=True).decode() if "header" in f else "X-API-Key"
    if "file" not in f:
        raise r.fail(node, f"{path}.file", "missing (required): the keys file (entries: {hash, id, role, tier})")
    file, root, fr = _entries_file(r, f["file"], f"{path}.file")
    return ApiKeysConfig(header=header.lower().encode(), keys=MappingProxyType(_keys_file(fr, root)), file=file)


def _entries_file(r: Reader, node: yaml.Node, path: str) -> tuple[str, yaml.Node | None, Reader]:
    """A file of entries the config names (API keys, client identities): its path, its YAML
    root, and a reader reporting its problems with its own name and lines."""
    file = r.file_path(node, path)
    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise r.fail(node, path, f"cannot read {file}: {e.strerror}") from None
    try:
        root = compose(text, file)
    except ConfigError as e:  # reported with the rest, not instead of it
        r.problems.extend(e.problems)
        raise _Invalid() from None
    return file, root, Reader(file, r.problems)


def _client_certs(r: Reader, node: yaml.Node) -> ClientCertsConfig:
    """`client_certs: {file: FILE}`: verified client certificates (listen[].tls.client_ca) are
    credentials; FILE gives identities their role and tier (entries: {id, role, tier})."""
    path = "auth.client_certs"
    f = r.mapping(node, path, {"file": ""})
    if "file" not in f:
        return ClientCertsConfig()
    file, root, fr = _entries_file(r, f["file"], f"{path}.file")
    identities: dict[str, tuple[str | None, str | None]] = {}
    for item_path, item in (fr.sequence(root, "identities") if root is not None else []):
        entry = fr.attempt(lambda: fr.mapping(item, item_path, {"id": "", "role": "", "tier": ""}), None)
        if entry is None:
            continue
        if "id" not in entry:
            fr.fail(item, item_path, "each entry needs id: the certificate's URI SAN, else its subject CN")
            continue
        identity = {name: fr.attempt(lambda: _identity_field(fr, entry[name], f"{item_path}.{name}"), "")
                    for name in ("id", "role", "tier") if name in entry}
        if "" in identity.values():
            continue
        if identity["id"] in identities:
            fr.fail(entry["id"], f"{item_path}.id", "the same id is listed twice")
            continue
        identities[identity["id"]] = (identity.get("role"), identity.get("tier"))
    return ClientCertsConfig(MappingProxyType(identities), file)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_IDENTITY_LENGTH = 256


def header_value_problem(text: str) -> str | None:
    """Why an identity value (user id, role, tier) could not go upstream as a header, or None."""
    if not text or len(text) > MAX_IDENTITY_LENGTH or _CONTROL.search(text):
        return "is empty, too long or contains control characters"
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return "has characters not allowed in a header"
    return None


def _identity_field(r: Reader, node: yaml.Node, path: str) -> str:
    text = r.string(node, path)
    problem = header_value_problem(text)
    if problem is not None:
        raise r.fail(node, path, f"{problem} (it goes upstream as an X-User-* header), got {text!r}")
    return text


def _keys_file(r: Reader, root: yaml.Node | None) -> dict[bytes, ApiKey]:
    keys: dict[bytes, ApiKey] = {}
    if root is None:
        return keys
    for path, item in r.sequence(root, "keys"):
        entry = r.attempt(lambda: r.mapping(item, path, {"hash": "", "id": "", "role": "", "tier": ""}), None)
        if entry is None:
            continue
        if "hash" not in entry or "id" not in entry:
            r.fail(item, path, "each key needs hash and id (make the hash with: txgateway hash-key)")
            continue
        digest = r.string(entry["hash"], f"{path}.hash")
        match = _HASH.match(digest)
        if not match:
            r.fail(entry["hash"], f"{path}.hash", 'expected "sha256:<64 hex digits>" (from txgateway hash-key)')
            continue
        raw = bytes.fromhex(match.group(1))
        if raw in keys:
            r.fail(entry["hash"], f"{path}.hash", "the same key is listed twice")
            continue
        identity = {name: r.attempt(lambda: _identity_field(r, entry[name], f"{path}.{name}"), "")
                    for name in ("id", "role", "tier") if name in entry}
        if "" in identity.values():
            continue
        keys[raw] = ApiKey(id=identity["id"], role=identity.get("role"), tier=identity.get("tier"), digest=raw)
    return keys


@dataclass(frozen=True)
class RouteAuth:
    """A route's `auth:` (and `roles:`, which imply required)."""

    required: bool
    roles: frozenset[str] | None = None
    forward: ForwardAuthConfig | None = None      # auth: {forward: ...}: an auth service decides

    @property
    def mode(self) -> str:
        return "forward" if self.forward is not None else "required" if self.required else "optional"


def _route_mode(r: Reader, node: yaml.Node, path: str, scope: Any) -> str | ForwardAuthConfig:
    if isinstance(node, yaml.MappingNode):
        f = r.mapping(node, path, {"forward": ""})
        if "forward" not in f:
            raise r.fail(node, path, "expected none, optional, required or {forward: {...}}")
        return parse_forward(r, f["forward"], f"{path}.forward", scope)
    return r.choice(node, path, ("none", "optional", "required"))


def parse_route_auth(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Any) -> RouteAuth | None:
    """`auth: none | optional | required | {forward: ...}` and `roles`; None for a route without auth."""
    none: str | ForwardAuthConfig = "none"
    chosen = r.attempt(lambda: _route_mode(r, fields["auth"], f"{path}.auth", scope), none) \
        if "auth" in fields else None
    forward = chosen if isinstance(chosen, ForwardAuthConfig) else None
    mode = "required" if forward is not None else chosen
    roles = None
    if "roles" in fields:
        roles = frozenset(r.string(n, p) for p, n in r.sequence(fields["roles"], f"{path}.roles"))
        if not roles:
            r.fail(fields["roles"], f"{path}.roles", "expected at least one role")
        if mode not in (None, "required"):
            r.fail(fields["roles"], f"{path}.roles", f"roles need auth: required, got auth: {mode}")
        mode = "required"
    if mode in (None, "none"):
        return None
    if forward is None and "auth" not in scope.sections:
        key = "auth" if "auth" in fields else "roles"
        r.fail(fields[key], f"{path}.{key}", "this route needs credentials but the config has no auth: section")
    return RouteAuth(mode == "required", roles, forward)


def _parse_section(r: Reader, node: yaml.Node, top: dict[str, yaml.Node], environ: Mapping[str, str] | None) -> AuthConfig:
    return parse_auth(r, node, environ)


def _jwks_url(section: AuthConfig | None) -> str | None:
    return section.jwt.jwks_url if section is not None and section.jwt is not None else None


_JWKS_RESTART_ONLY = ("jwks_cooldown", "jwks_refresh", "jwks_timeout")


def _reload(running: AuthConfig | None, new: AuthConfig | None) -> tuple[AuthConfig | None, list[str]]:
    """Keys, claims and API keys reload; the JWKS fetcher is made once at start, with its URL
    (a change refuses the reload) and its timings (kept until a restart)."""
    import dataclasses

    from txgateway.config.contract import ReloadRefused
    if _jwks_url(running) != _jwks_url(new):
        raise ReloadRefused(f"auth.jwt.jwks_url changed ({_jwks_url(running)} -> {_jwks_url(new)}): that needs a restart")
    old_jwt = running.jwt if running is not None else None
    new_jwt = new.jwt if new is not None else None
    if new is None or old_jwt is None or new_jwt is None or new_jwt.jwks_url is None:
        return new, []
    fetcher = [key for key in _JWKS_RESTART_ONLY if getattr(new_jwt, key) != getattr(old_jwt, key)]
    if not fetcher:
        return new, []
    kept = dataclasses.replace(new_jwt, **{key: getattr(old_jwt, key) for key in fetcher})
    return dataclasses.replace(new, jwt=kept), [f"auth.jwt.{key}" for key in fetcher]


def _build(resources: Any, policy: RouteAuth, route: Any) -> Any:
    if policy.forward is not None:
        from txgateway.filters.auth.forward import build_forward_auth  # the upstream client: only with forward
        return build_forward_auth(resources, policy, policy.forward)
    from txgateway.filters.auth.filter import (  # PyJWT, cryptography's key types: only with auth:
        Authenticator,
        AuthFilter,
    )
    authenticator = resources.shared("auth", lambda: Authenticator(resources.config.auth, resources.clock,
                                                                   resources.jwks))
    return AuthFilter(authenticator, policy)


def _kind() -> Any:
    from txgateway.config.contract import FilterKind
    return FilterKind(name="auth", build=_build, route_keys=("auth", "roles"), parse_route=parse_route_auth,
                      section="auth", parse_section=_parse_section, reload=_reload)


AUTH = _kind()
