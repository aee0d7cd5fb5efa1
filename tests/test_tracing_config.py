"""The `tracing:` section: its values, and every validation error with the exact
file:line: key.path: message that check-config prints."""

from __future__ import annotations

import textwrap

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config
from txgateway.ops.tracingconfig import TracingConfig
from txgateway.service.reload import keep_restart_only_settings

# BASE (tests.configcheck) is lines 1-8; `tracing:` is line 9, its first key line 10.
KEYS = "headers, otlp_endpoint, sample_ratio, service_name"
URL = "http://127.0.0.1:4318/v1/traces"


def config(section: str):
    return parse_config(BASE + textwrap.dedent(section), "c.yaml", {})


def errors(section: str) -> list[str]:
    return config_errors(BASE + textwrap.dedent(section), environ={})


def test_no_section_means_no_tracing():
    assert config("").tracing is None


def test_defaults_and_every_value():
    assert config(f'tracing: {{otlp_endpoint: "{URL}"}}\n').tracing == TracingConfig(URL)
    c = config("""\
        tracing:
          otlp_endpoint: "https://otel.example.com/v1/traces"
          service_name: edge
          sample_ratio: 0.01
          headers: {x-api-key: s3cret, X-Tenant: 7}
        """).tracing
    assert (c.otlp_endpoint, c.service_name, c.sample_ratio) == ("https://otel.example.com/v1/traces", "edge", 0.01)
    assert dict(c.headers) == {"x-api-key": "s3cret", "X-Tenant": "7"}
    assert "s3cret" not in repr(c)                      # a collector's key stays out of logs


def test_every_bad_value_names_its_line_and_key():
    assert errors("""\
        tracing:
          otlp_endpoint: "127.0.0.1:4318"
          service_name: ""
          sample_ratio: 1.5
          headers: {"bad header": x, x-ok: "a\\nb"}
          sampler: always
        """) == [
        'c.yaml:10: tracing.otlp_endpoint: expected an http(s) URL like "http://127.0.0.1:4318/v1/traces", '
        'got "127.0.0.1:4318"',
        'c.yaml:11: tracing.service_name: expected a service name, got an empty string',
        "c.yaml:12: tracing.sample_ratio: expected a number from 0.0 to 1.0, got 1.5",
        'c.yaml:13: tracing.headers.bad header: expected a header name like "X-Api-Version", got "bad header"',
        "c.yaml:13: tracing.headers.x-ok: header values must not contain control characters (CR, LF, NUL...)",
        f"c.yaml:14: tracing.sampler: unknown key (expected one of: {KEYS})",
    ]


def test_the_endpoint_is_required_and_the_section_a_mapping():
    assert errors("tracing:\n  service_name: edge\n") == ["c.yaml:10: tracing.otlp_endpoint: missing (required)"]
    assert errors("tracing: on\n") == ["c.yaml:9: tracing: expected a mapping, got 'on'"]


def test_a_reload_keeps_the_running_tracing_settings():
    running = config(f'tracing: {{otlp_endpoint: "{URL}", sample_ratio: 0.5}}\n')
    new = config(f'tracing: {{otlp_endpoint: "{URL}", sample_ratio: 1}}\n')
    kept, changed = keep_restart_only_settings(running, new)
    assert changed == ["tracing"] and kept.tracing == running.tracing
