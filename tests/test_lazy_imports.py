"""Optional features import their libraries only when the config uses them.

The gateway's resident memory is mostly imported code: prometheus_client (admin /metrics),
twisted.web (the admin site), hpack (HTTP/2), PyJWT (auth), txredisapi (Redis limiter), treq
(health checks, JWKS), twisted.conch (Manhole), the OpenTelemetry SDK (tracing) and msgspec
(`transform: {allow}`) cost a plain
proxy several MiB it never uses. Each case builds and starts the service in a fresh interpreter,
as twistd would, and looks at what got imported.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

import txgateway

OPTIONAL = ("prometheus_client", "twisted.web.server", "twisted.web.http", "hpack", "jwt", "txredisapi", "treq",
            "twisted.conch", "opentelemetry", "msgspec")

# Builds the service from a config file and starts it (listeners bind, pools, checks and the
# Redis link start; the reactor never runs), then prints which OPTIONAL modules are loaded.
SCRIPT = """
import json, sys
from twisted.internet import reactor
from txgateway.service.tap import Options, makeService
options = Options()
options.parseOptions(["--config", sys.argv[1]])
makeService(options, reactor).startService()
print(json.dumps([name for name in json.loads(sys.argv[2]) if name in sys.modules]))
"""


def loaded_after_start(tmp_path: Path, config: str) -> list[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(config))
    root = str(Path(txgateway.__file__).resolve().parent.parent)   # this checkout's txgateway
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(path), json.dumps(OPTIONAL)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, env=env, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


PLAIN = """\
listen:
  - endpoint: "tcp:0:interface=127.0.0.1"
access_log: "off"
upstreams:
  users: {targets: ["http://127.0.0.1:9"], timeout: 5s}
routes:
  - {prefix: /api/users, upstream: users, rewrite_prefix: /users, rate_limit: {key: ip, rate: 10/second}}
"""


def test_a_plain_proxy_imports_no_optional_library(tmp_path):
    """The benchmark's shape (plain listener, one upstream, local rate limit): none of them."""
    assert loaded_after_start(tmp_path, PLAIN) == []


def test_ip_rules_and_cors_import_no_optional_library(tmp_path):
    assert loaded_after_start(tmp_path, PLAIN.replace("routes:", 'ip_rules: {ip_deny: ["192.0.2.0/24"]}\nroutes:') + """\
  - {prefix: /api/web, upstream: users, ip_allow: ["10.0.0.0/8"], cors: {origins: ["https://app.example.com"]}}
""") == []


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_each_feature_imports_its_library_when_configured(tmp_path):
    """The other side: the lazy imports still happen, where each feature is built or started."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "jwt_secret").write_bytes(b"lazy-imports-test-secret-0123456789abcdef\n")
    (tmp_path / "authorized_keys").write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" ops@example\n")
    assert loaded_after_start(tmp_path, f"""\
        listen:
          - endpoint: "tcp:0:interface=127.0.0.1"
            tls: {{certificates: [{{cert: {cert}, key: {key}}}], alpn: [h2, http/1.1]}}
        access_log: "off"
        admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
        manhole:
          endpoint: "tcp:0:interface=127.0.0.1"
          authorized_keys: {tmp_path / "authorized_keys"}
          host_key: {tmp_path / "host_key"}
        auth:
          jwt: {{algorithms: [HS256], secret_file: {tmp_path / "jwt_secret"}}}
        redis: {{url: "redis://127.0.0.1:9/0"}}
        rate_limits: {{backend: redis, on_redis_error: allow, tiers: {{free: {{rate: 100/hour}}}}}}
        tracing: {{otlp_endpoint: "http://127.0.0.1:9/v1/traces"}}
        upstreams:
          users:
            targets: ["http://127.0.0.1:9"]
            timeout: 5s
            health_check: {{path: /healthz, interval: 60s}}
        routes:
          - {{prefix: /api/users, upstream: users, auth: required, rate_limit: {{key: ip, rate: 10/second}},
              transform: {{allow: [id]}}}}
        """) == list(OPTIONAL)
