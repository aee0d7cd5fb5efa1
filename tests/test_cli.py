"""`txgateway check-config` as users run it, and the `twistd txgateway` plugin and options."""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from twisted.python import usage

from tests.configcheck import route_auth
from tests.installed import TWISTD, TXGATEWAY
from tests.test_config import ROUTE_KEYS
from tests.test_tls_config import CertAuthority
from txgateway.config.schema import Config

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "txgateway.yaml"
TLS_EXAMPLE = EXAMPLE.parent / "tls-example.yaml"

BROKEN = """\
listen:
  - endpoint: "tcp:8080"
admin: {endpoint: "tcp:9901:interface=127.0.0.1", token: s3cret-token-in-the-config-file}
upstreams:
  users: {targets: ["http://127.0.0.1:3001"], timeout: 5}
routes:
  - prefix: /api/users
    upstream: users
  - prefix: /api/orders
    upstrem: orders
  - prefix: /api/search
    upstream: search
"""


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TXGATEWAY), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_check_config_accepts_the_example():
    result = run("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{EXAMPLE}: OK (8 routes, 5 upstreams, 1 listeners)\n"
    assert result.stderr == ""


def test_check_config_accepts_the_example_with_no_environment():
    """The live admin section needs no token variable; the manhole stays commented out."""
    result = subprocess.run([str(TXGATEWAY), "check-config", str(EXAMPLE)], capture_output=True, text=True,
                            timeout=60, env={}, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{EXAMPLE}: OK (8 routes, 5 upstreams, 1 listeners)\n"
    assert result.stderr == ""


def test_check_config_never_prints_an_admin_token_that_is_too_short(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(EXAMPLE.read_text().replace("\n  # token_env: TXGATEWAY_ADMIN_TOKEN",
                                                "\n  token_env: TXGATEWAY_ADMIN_TOKEN"))
    line = path.read_text().splitlines().index(
        "  token_env: TXGATEWAY_ADMIN_TOKEN   # bearer token (>= 16 chars) for /status, /metrics and") + 1
    result = subprocess.run([str(TXGATEWAY), "check-config", str(path)], capture_output=True, text=True,
                            timeout=60, env={"TXGATEWAY_ADMIN_TOKEN": "sh0rt-s3cret"}, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:{line}: admin.token_env: environment variable TXGATEWAY_ADMIN_TOKEN must hold a token of at least "
        "16 characters",
        f"{path}: 1 error(s), configuration rejected",
    ]
    assert "sh0rt-s3cret" not in result.stdout + result.stderr
    ok = subprocess.run([str(TXGATEWAY), "check-config", str(path)], capture_output=True, text=True, timeout=60,
                        env={"TXGATEWAY_ADMIN_TOKEN": "l0ng-en0ugh-s3cret"}, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "l0ng-en0ugh-s3cret" not in ok.stdout + ok.stderr


def test_check_config_with_a_relative_path(tmp_path):
    (tmp_path / "gw.yaml").write_text(EXAMPLE.read_text())
    result = run("check-config", "gw.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gw.yaml: OK")


def test_the_tls_example_checks_from_any_directory(tmp_path):
    """etc/tls-example.yaml names its certificate relative to itself (etc/dev-cert/, made by
    `make dev-cert`): check-config finds it from wherever it runs."""
    etc = tmp_path / "checkout" / "etc"
    (etc / "dev-cert").mkdir(parents=True)
    example = etc / "tls-example.yaml"
    example.write_text(TLS_EXAMPLE.read_text())
    issued = CertAuthority().issue(etc / "dev-cert", "localhost", "localhost", ("localhost",))
    assert Path(issued.cert) == etc / "dev-cert" / "localhost.pem"
    (tmp_path / "elsewhere").mkdir()
    result = run("check-config", str(example), cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{example}: OK (1 routes, 1 upstreams, 2 listeners)\n"


def test_check_config_reports_every_error_with_file_line_and_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:3: admin.token: unknown key (expected one of: allowed_hosts, config_api, endpoint, token_env)",
        f'{path}:5: upstreams.users.timeout: expected a duration like "250ms", "5s" or "1m", got "5"',
        f"{path}:9: routes[1].upstream: missing (required; or respond: to answer from the gateway)",
        f"{path}:10: routes[1].upstrem: unknown key (expected one of: {ROUTE_KEYS})",
        f'{path}:12: routes[2].upstream: no upstream named "search" (defined: users)',
        f"{path}: 5 error(s), configuration rejected",
    ]


def test_check_config_on_invalid_yaml(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("listen:\n  - endpoint: x\n routes: []\n")
    result = run("check-config", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:3: invalid YAML: ")
    assert lines[-1] == f"{path}: 1 error(s), configuration rejected"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", [
    "listen: [{endpoint: 'tcp:0'}]\nupstreams: {}\nroutes: []\naccess_log: !!python/name:os.system ''\n",
    "listen: [{endpoint: 'tcp:0'}]\nupstreams: {}\nroutes: []\ndrain_timeout: 10\n",
    "listen: [{endpoint: 'tcp:0'}]\nupstreams: {}\nroutes: []\ndrain_timeout: 2024-13-45\n",
])
def test_check_config_never_shows_a_traceback(tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith(f"{path}:4: ")


def test_check_config_on_a_directory_and_on_binary(tmp_path):
    result = run("check-config", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"{tmp_path}: cannot read config: Is a directory"
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"listen: []\n\xff\xfe\n")
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"{path}:2: cannot read config: not UTF-8 text (byte 0xff)"
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: cannot read config: No such file or directory",
        f"{path}: 1 error(s), configuration rejected",
    ]


def test_usage_errors():
    result = run()
    assert result.returncode == 2
    assert "usage: txgateway" in result.stderr
    result = run("check-config")
    assert result.returncode == 2
    assert "file" in result.stderr


def test_main_in_process(tmp_path, capsys):
    from txgateway.service.cli import main
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert "OK" in capsys.readouterr().out
    path = tmp_path / "b.yaml"
    path.write_text(BROKEN)
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: admin.token: unknown key (expected one of: allowed_hosts, config_api, endpoint, token_env)\n" in err
    assert "s3cret" not in err


# --- the twistd plugin --------------------------------------------------------------------

def test_twistd_plugin_is_discoverable():
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "txgateway" in makers
    maker = makers["txgateway"]
    assert maker.description
    from txgateway.service import tap
    assert maker.options is tap.Options
    assert maker.makeService == tap.makeService


def test_twistd_lists_the_plugin():
    result = subprocess.run([str(TWISTD), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert any(line.split()[:1] == ["txgateway"] for line in result.stdout.splitlines())


def options(*args: str):
    from txgateway.service.tap import Options
    opts = Options()
    opts.parseOptions(list(args))
    return opts


def test_options_require_config_or_demo():
    with pytest.raises(usage.UsageError, match=r"^--config FILE is required \(or --demo to try txgateway out\)$"):
        options()


def test_options_demo_and_config_exclude_each_other():
    with pytest.raises(usage.UsageError, match=r"^--demo and --config exclude each other$"):
        options("--demo", "--config", str(EXAMPLE))


def test_options_with_a_valid_config():
    opts = options("--config", str(EXAMPLE))
    assert isinstance(opts["loaded"], Config)
    assert opts["loaded"].file == str(EXAMPLE)
    assert options("-c", str(EXAMPLE))["config"] == str(EXAMPLE)
    assert options("--demo")["demo"]


def test_options_with_an_invalid_config_name_the_file_line_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        listen: [{endpoint: "tcp:8080"}]
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"]}
        routes:
          - {prefix: /api/users, upstream: users}
          - {prefix: /api/x, upstream: nowhere}
        """))
    with pytest.raises(SystemExit) as info:
        options("--config", str(path))
    assert info.value.code == (f'{path}:6: routes[1].upstream: no upstream named "nowhere" (defined: users)\n'
                               f"{path}: 1 error(s), configuration rejected")


def test_options_with_a_missing_config(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as info:
        options("--config", str(path))
    assert info.value.code == (f"{path}: cannot read config: No such file or directory\n"
                               f"{path}: 1 error(s), configuration rejected")


def test_check_config_accepts_the_example_with_no_environment_at_all():
    """The example's live auth section needs no secret: it must check out on a bare machine."""
    result = subprocess.run([str(TXGATEWAY), "check-config", str(EXAMPLE)], capture_output=True, text=True,
                            timeout=60, env={}, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{EXAMPLE}: OK (8 routes, 5 upstreams, 1 listeners)\n"


def test_check_config_reports_auth_problems_with_file_line_and_path(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text(textwrap.dedent(f"""\
        listen: [{{endpoint: "tcp:8080"}}]
        upstreams:
          users: {{targets: ["http://127.0.0.1:3001"]}}
        routes:
          - {{prefix: /api/users, upstream: users, auth: optional, roles: [admin]}}
        auth:
          jwt:
            algorithms: [HS256, none]
            secret_env: TXGW_TEST_UNSET_SECRET
            public_keys: [{tmp_path}/missing.pem]
        """))
    env = {k: v for k, v in os.environ.items() if k != "TXGW_TEST_UNSET_SECRET"}
    result = subprocess.run([str(TXGATEWAY), "check-config", str(path)], capture_output=True, text=True,
                            timeout=60, env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:5: routes[0].roles: roles need auth: required, got auth: optional",
        f'{path}:8: auth.jwt.algorithms[1]: "none" is never accepted: unsigned tokens prove nothing',
        f"{path}:9: auth.jwt.secret_env: environment variable TXGW_TEST_UNSET_SECRET is not set or empty",
        f"{path}:10: auth.jwt.public_keys[0]: cannot read {tmp_path}/missing.pem: No such file or directory",
        f"{path}: 4 error(s), configuration rejected",
    ]


# --- txgateway token ------------------------------------------------------------------------

def test_token_for_the_demo_verifies_against_the_demo_config():
    import jwt as pyjwt
    from twisted.internet.task import Clock

    from txgateway.filters.auth.tokens import Identity, TokenVerifier
    from txgateway.service.demo import DEMO_SECRET, demo_config
    before = int(time.time())
    result = run("token", "--demo", "--sub", "alice", "--role", "admin", "--tier", "pro")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.count(".") == 2
    assert pyjwt.get_unverified_header(token)["alg"] == "HS256"
    claims = pyjwt.decode(token, DEMO_SECRET, algorithms=["HS256"], issuer="txgateway-demo")
    assert {k: claims[k] for k in ("sub", "role", "tier", "iss")} == {
        "sub": "alice", "role": "admin", "tier": "pro", "iss": "txgateway-demo"}
    assert before <= claims["iat"] <= int(time.time()) and claims["exp"] - claims["iat"] == 3600
    clock = Clock()
    clock.advance(time.time())
    assert TokenVerifier(demo_config().auth.jwt, clock).verify(token) == Identity("alice", "admin", "pro", "jwt")
    # and not with another secret
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(token, DEMO_SECRET + "x", algorithms=["HS256"])


def test_token_ttl_and_optional_claims():
    import jwt as pyjwt

    from txgateway.service.demo import DEMO_SECRET
    result = run("token", "--demo", "--sub", "bob", "--ttl", "15m")
    assert result.returncode == 0, result.stderr
    claims = pyjwt.decode(result.stdout.strip(), DEMO_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 900
    assert "role" not in claims and "tier" not in claims and claims["sub"] == "bob"
    bad = run("token", "--demo", "--sub", "bob", "--ttl", "forever")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == '--ttl: expected a duration like "250ms", "5s" or "1m", got "forever"\n'


def test_token_from_a_config_with_an_hs_secret_uses_its_claims_issuer_and_audience(tmp_path):
    import jwt as pyjwt
    secret = tmp_path / "secret"
    secret.write_text("c" * 48 + "\n")
    path = tmp_path / "gw.yaml"
    path.write_text(textwrap.dedent(f"""\
        listen: [{{endpoint: "tcp:8080"}}]
        upstreams: {{users: {{targets: ["http://127.0.0.1:3001"]}}}}
        routes: [{{prefix: /api/users, upstream: users, auth: required}}]
        auth:
          jwt:
            algorithms: [RS256, HS384]
            jwks_url: https://auth.example.com/jwks.json
            secret_file: {secret}
            issuer: https://auth.example.com
            audience: [api, other]
            claims: {{user_id: uid, role: grp, tier: plan}}
        """))
    result = run("token", "--config", str(path), "--sub", "carol", "--role", "ops", "--tier", "gold")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert pyjwt.get_unverified_header(token)["alg"] == "HS384"
    claims = pyjwt.decode(token, "c" * 48, algorithms=["HS384"], audience="api", issuer="https://auth.example.com")
    assert (claims["uid"], claims["grp"], claims["plan"], claims["aud"]) == ("carol", "ops", "gold", "api")
    assert "sub" not in claims


def test_token_with_a_config_lacking_an_hs_secret(tmp_path):
    path = tmp_path / "rs-only.yaml"
    path.write_text(textwrap.dedent("""\
        listen: [{endpoint: "tcp:8080"}]
        upstreams: {users: {targets: ["http://127.0.0.1:3001"]}}
        routes: [{prefix: /api/users, upstream: users, auth: required}]
        auth:
          jwt: {algorithms: [RS256], jwks_url: "https://auth.example.com/jwks.json"}
        """))
    result = run("token", "--config", str(path), "--sub", "alice")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"{path}: auth.jwt has no HS secret (secret_env or secret_file) to sign with\n"
    no_auth = tmp_path / "no-auth.yaml"
    no_auth.write_text('listen: [{endpoint: "tcp:8080"}]\nupstreams: {u: {targets: ["http://127.0.0.1:1"]}}\nroutes: []\n')
    result = run("token", "--config", str(no_auth), "--sub", "alice")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"{no_auth}: auth.jwt has no HS secret (secret_env or secret_file) to sign with\n"
    # the example config (RS256 from a JWKS URL) has none either
    result = run("token", "--config", str(EXAMPLE), "--sub", "alice")
    assert result.returncode == 1
    assert result.stderr == f"{EXAMPLE}: auth.jwt has no HS secret (secret_env or secret_file) to sign with\n"


def test_token_with_an_invalid_or_missing_config(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = run("token", "--config", str(missing), "--sub", "alice")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"{missing}: cannot read config: No such file or directory\n"
    path = tmp_path / "unset.yaml"
    path.write_text(textwrap.dedent("""\
        listen: [{endpoint: "tcp:8080"}]
        upstreams: {users: {targets: ["http://127.0.0.1:3001"]}}
        routes: []
        auth:
          jwt: {algorithms: [HS256], secret_env: TXGW_TEST_UNSET_SECRET}
        """))
    env = {k: v for k, v in os.environ.items() if k != "TXGW_TEST_UNSET_SECRET"}
    result = subprocess.run([str(TXGATEWAY), "token", "--config", str(path), "--sub", "alice"], capture_output=True,
                            text=True, timeout=60, env=env, check=False)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"{path}:5: auth.jwt.secret_env: environment variable TXGW_TEST_UNSET_SECRET is not set or empty\n"
    assert "Traceback" not in result.stderr


def test_token_usage_errors():
    assert run("token", "--sub", "alice").returncode == 2                       # --config or --demo
    assert run("token", "--demo").returncode == 2                               # --sub
    result = run("token", "--demo", "--config", str(EXAMPLE), "--sub", "a")
    assert result.returncode == 2 and "not allowed with" in result.stderr


# --- txgateway hash-key -------------------------------------------------------------------

def run_stdin(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TXGATEWAY), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_hash_key_prints_a_keys_file_entry():
    key = "k3y-" + "x" * 28
    result = run_stdin(key + "\n", "hash-key", "--id", "ci-bot", "--role", "admin", "--tier", "pro")
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert result.stdout == f'- {{hash: "sha256:{digest}", id: ci-bot, role: admin, tier: pro}}\n'
    assert key not in result.stdout and result.stderr == ""
    defaults = run_stdin(key, "hash-key")                                        # no newline at the end: same key
    assert defaults.stdout == f'- {{hash: "sha256:{digest}", id: CHANGE-ME, role: user, tier: free}}\n'
    crlf = run_stdin(key + "\r\n", "hash-key", "--id", "ci-bot", "--role", "admin", "--tier", "pro")
    assert crlf.stdout == result.stdout


def test_hash_key_entry_works_in_a_keys_file(tmp_path):
    from txgateway.config.schema import parse_config
    key = "a-real-key-0123456789"
    entries = [run_stdin(key, "hash-key", "--id", "svc", "--role", "admin", "--tier", "pro").stdout,
               run_stdin("another-key-0123456789", "hash-key", "--id", "other").stdout]
    keys = tmp_path / "keys.yaml"
    keys.write_text("".join(entries))
    config = parse_config('listen: [{endpoint: "tcp:0"}]\nupstreams: {u: {targets: ["http://127.0.0.1:1"]}}\n'
                          f"routes: []\nauth:\n  api_keys: {{file: {keys}}}\n", "c.yaml", {})
    records = config.auth.api_keys.keys
    record = records[hashlib.sha256(key.encode()).digest()]
    assert (record.id, record.role, record.tier) == ("svc", "admin", "pro")
    assert len(records) == 2


@pytest.mark.parametrize("value", ["x, role: admin", "a: b", "123", "yes", "null", "#ops", "[admin]", 'say "hi"'])
def test_hash_key_quotes_values_that_would_not_read_back_as_themselves(tmp_path, value):
    """An id such as `123` or `x, role: admin` must not become a number or an extra key."""
    from txgateway.config.schema import parse_config
    result = run_stdin("a-real-key-0123456789", "hash-key", "--id", value, "--role", value, "--tier", value)
    assert result.returncode == 0, result.stderr
    keys = tmp_path / "keys.yaml"
    keys.write_text(result.stdout)
    config = parse_config('listen: [{endpoint: "tcp:0"}]\nupstreams: {u: {targets: ["http://127.0.0.1:1"]}}\n'
                          f"routes: []\nauth:\n  api_keys: {{file: {keys}}}\n", "c.yaml", {})
    (record,) = config.auth.api_keys.keys.values()
    assert (record.id, record.role, record.tier) == (value, value, value)


@pytest.mark.parametrize("key", ["", "\n", "short", "x" * 15, "x" * 15 + "\n" + "y" * 20])
def test_hash_key_refuses_short_keys(key):
    result = run_stdin(key, "hash-key")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("refusing: an API key should be at least 16 characters of randomness")


def test_hash_key_accepts_16_characters():
    result = run_stdin("x" * 16 + "\n", "hash-key")
    assert result.returncode == 0
    assert hashlib.sha256(b"x" * 16).hexdigest() in result.stdout


# --- the demo ------------------------------------------------------------------------------

def test_the_demo_protects_users_and_orders():
    from txgateway.service.demo import BANNER, demo_config
    config = demo_config()
    policies = {r.prefix: route_auth(r) for r in config.routes}
    assert policies == {"/api/users": ("required", None), "/api/search": ("none", None),
                        "/api/orders": ("required", frozenset({"admin"})), "/api/profile": ("required", None)}
    assert config.auth.jwt.algorithms == ("HS256",)
    assert "txgateway token --demo" in BANNER
