"""The `txgateway` command: tools around the daemon (the daemon itself runs under twistd)."""

from __future__ import annotations

import argparse
import sys
import time

from txgateway import __version__
from txgateway.config.schema import ConfigError, load_config
from txgateway.config.units import parse_duration

__all__ = ["main"]


def check_config(path: str) -> int:
    """Validate like `nginx -t`: every problem on stderr, exit status 0 or 1."""
    try:
        config = load_config(path)
    except ConfigError as e:
        print(e.report(path), file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams, "
          f"{len(config.listen)} listeners)")
    return 0


def mint_token(args: argparse.Namespace) -> int:
    """An HS-signed token from the config's secret: for trying the gateway out."""
    import jwt

    from txgateway.filters.auth.config import HMAC
    if args.demo:
        from txgateway.service.demo import demo_config
        config = demo_config()
    else:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1
    jwt_config = config.auth.jwt if config.auth is not None else None
    if jwt_config is None or jwt_config.secret is None:
        print(f"{config.file}: auth.jwt has no HS secret (secret_env or secret_file) to sign with", file=sys.stderr)
        return 1
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as e:
        print(f"--ttl: {e}", file=sys.stderr)
        return 2
    now = int(time.time())
    claims: dict[str, object] = {jwt_config.claims.user_id: args.sub, "iat": now, "exp": now + int(ttl)}
    if args.role:
        claims[jwt_config.claims.role] = args.role
    if args.tier:
        claims[jwt_config.claims.tier] = args.tier
    if jwt_config.issuer:
        claims["iss"] = jwt_config.issuer
    if jwt_config.audience:
        claims["aud"] = jwt_config.audience[0]
    algorithm = next(a for a in jwt_config.algorithms if a in HMAC)
    print(jwt.encode(claims, jwt_config.secret, algorithm=algorithm))
    return 0


def hash_key(args: argparse.Namespace) -> int:
    """Read an API key on stdin, print the keys-file entry that stores only its hash."""
    from txgateway.filters.auth.config import hash_api_key
    key = sys.stdin.readline().rstrip("\r\n")
    if len(key) < 16:
        print("refusing: an API key should be at least 16 characters of randomness "
              "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')", file=sys.stderr)
        return 1
    print(f'- {{hash: "{hash_api_key(key)}", id: {_flow_scalar(args.id)}, role: {_flow_scalar(args.role)}, '
          f'tier: {_flow_scalar(args.tier)}}}')
    return 0


def _flow_scalar(value: str) -> str:
    """`value` as it must be written inside `{...}` to read back as that same string
    (quoted when bare it would be a number, a boolean, or break the mapping: `a, b`, `#x`)."""
    import json

    import yaml
    try:
        if yaml.safe_load(f"{{k: {value}}}") == {"k": value}:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="txgateway",
        description="txgateway tools. Run the gateway itself with: twistd -n txgateway --config FILE")
    parser.add_argument("--version", action="version", version=f"txgateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a config file and exit (0 = valid)")
    check.add_argument("file", help="path to the YAML config file")
    token = commands.add_parser("token", help="mint a test JWT signed with the config's HS secret")
    source = token.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the gateway's config file (auth.jwt must have an HS secret)")
    source.add_argument("--demo", action="store_true", help="sign for `twistd -n txgateway --demo`")
    token.add_argument("--sub", required=True, help="the user id (claim named by auth.jwt.claims.user_id)")
    token.add_argument("--role", help="the role claim")
    token.add_argument("--tier", help="the tier claim")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 1h (default 1h)")
    hashing = commands.add_parser("hash-key", help="read an API key on stdin, print its keys-file entry")
    hashing.add_argument("--id", default="CHANGE-ME", help="the key's id (becomes X-User-Id)")
    hashing.add_argument("--role", default="user", help="the key's role (X-User-Role)")
    hashing.add_argument("--tier", default="free", help="the key's tier (X-User-Tier)")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "token":
        return mint_token(args)
    return hash_key(args)


if __name__ == "__main__":
    sys.exit(main())
