"""docs/extending.md's example filter, built and run from the document's own code.

A fenced block whose first line names a file (`# txgateway/filters/requireheader.py`) is that
file: the module runs as `txgateway.filters.requireheader`, the registry block decides where
the filter sits in `registry.FILTERS` (config/schema.py, service/requestpath.py and
testing.py read it when they run), and the test blocks run as tests. Every other python block
must at least compile. If the document's code breaks, these fail.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytest_twisted

from tests.configcheck import config_errors
from tests.conftest import assert_envelope, parse_responses, raw, with_defaults
from txgateway.config import registry
from txgateway.config.schema import parse_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(DOC.read_text()) if lang == language]


def named(path: str) -> str:
    """The python block that is the file `path` (its first line: `# path`)."""
    (code,) = [code for code in blocks("python") if code.startswith(f"# {path}\n")]
    return code


def run_block(path: str, namespace: dict[str, Any]) -> dict[str, Any]:
    exec(compile(named(path), f"{DOC} ({path})", "exec"), namespace)
    return namespace


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The document's module, importable as txgateway.filters.requireheader, registered as its
    registry block says."""
    module = ModuleType("txgateway.filters.requireheader")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    run_block("txgateway/filters/requireheader.py", module.__dict__)
    filters = run_block("txgateway/config/registry.py", dict(vars(registry)))["FILTERS"]
    monkeypatch.setattr(registry, "FILTERS", filters)
    return module


def forms_config(upstream_url: str = "http://127.0.0.1:9") -> str:
    """The document's YAML usage, with a listener and its `forms` upstream."""
    (usage,) = [code for code in blocks("yaml") if "require_header:" in code]
    return with_defaults(f'upstreams:\n  forms: {{targets: ["{upstream_url}"]}}\n') + usage


def test_every_python_block_of_the_document_compiles():
    for code in blocks("python"):
        compile(code, str(DOC), "exec")
    assert len(blocks("python")) >= 4


def test_the_registry_line_puts_the_filter_first_and_keeps_the_others_in_order(example):
    original = [kind.name for kind in vars(registry)["TERMINALS"]]      # untouched
    assert [kind.name for kind in registry.FILTERS] == ["require_header", "auth", "rate_limit", "header_rules"]
    assert registry.FILTERS[0] is example.REQUIRE_HEADER
    assert "require_header" in registry.route_keys()
    assert [kind.name for kind in registry.TERMINALS] == original


def test_the_documented_yaml_gives_each_route_its_policy(example):
    config = parse_config(forms_config(), "gw.yaml")
    forms, reports = config.routes
    assert forms.policies["require_header"] == example.RequiredHeader(b"X-Requested-With", b"XMLHttpRequest")
    assert reports.policies["require_header"] == example.RequiredHeader(b"X-Client-Id", None)


def test_without_the_registration_the_key_is_unknown():
    errors = config_errors(forms_config(), "gw.yaml")
    assert errors[0].startswith("gw.yaml:8: routes[0].require_header: unknown key (expected one of: ")


def test_mistakes_are_reported_with_file_line_and_key(example):
    text = with_defaults("""
        upstreams:
          forms: {targets: ["http://127.0.0.1:9"]}
        routes:
          - {prefix: /a, upstream: forms, require_header: {name: X Requested With}}
          - {prefix: /b, upstream: forms, require_header: {name: X-Client-Id, vaule: x}}
          - {prefix: /c, upstream: forms, require_header: {value: XMLHttpRequest}}
          - {prefix: /d, upstream: forms, require_header: X-Client-Id}
          - {prefix: /e, upstream: forms, require_header: {name: X-Client-Id, value: "a\\nb"}}
        """)
    assert config_errors(text, "gw.yaml") == [
        'gw.yaml:7: routes[0].require_header.name: expected a header name like "X-Api-Version", got "X Requested With"',
        "gw.yaml:8: routes[1].require_header.vaule: unknown key (expected one of: name, value)",
        "gw.yaml:9: routes[2].require_header.name: missing (required): the header a request must carry",
        "gw.yaml:10: routes[3].require_header: expected a mapping, got 'X-Client-Id'",
        "gw.yaml:11: routes[4].require_header.value: header values must not contain control characters (CR, LF, NUL...)",
    ]


@pytest_twisted.ensureDeferred
async def test_through_a_real_gateway_refused_requests_never_reach_the_upstream(example, gateway, echo):
    gw = await gateway(forms_config(echo.url))
    requests = b"".join([
        b"GET /api/forms/1 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /api/forms/2 HTTP/1.1\r\nHost: a\r\nX-Requested-With: fetch\r\n\r\n",
        b"POST /api/forms/3 HTTP/1.1\r\nHost: a\r\nX-Requested-With: XMLHttpRequest\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /api/reports/4 HTTP/1.1\r\nHost: a\r\nX-Client-Id: ci\r\n\r\n",
        b"GET /api/reports/5 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ])
    missing, wrong, posted, report, unnamed = parse_responses(await raw(gw.port, requests))
    assert assert_envelope(missing, 400, "MISSING_HEADER")["message"] == "this route needs the X-Requested-With header"
    assert_envelope(wrong, 403, "WRONG_HEADER_VALUE")
    assert missing.header("x-content-type-options") == "nosniff"       # the route's response hooks ran
    assert posted.status == 200 and posted.json()["headers"]["X-Requested-With"] == "XMLHttpRequest"
    assert posted.json()["body_bytes"] == 2
    assert report.status == 200 and report.json()["path"] == "/api/reports/4"
    assert_envelope(unnamed, 400, "MISSING_HEADER")
    assert [r.path for r in echo.requests] == [b"/api/forms/3", b"/api/reports/4"]
    assert [(r["status"], r["error"], r.get("required_header")) for r in gw.log] == [
        (400, "MISSING_HEADER", "missing"), (403, "WRONG_HEADER_VALUE", "wrong value"), (200, None, None),
        (200, None, None), (400, "MISSING_HEADER", "missing")]


def test_the_documents_in_memory_tests_pass(example):
    tests = run_block("tests/test_requireheader.py", {"__name__": "tests.test_requireheader"})
    functions = [f for name, f in tests.items() if name.startswith("test_")]
    assert len(functions) == 2
    for function in functions:
        function()


@pytest_twisted.ensureDeferred
async def test_the_documents_socket_test_passes(example, gateway, echo):
    tests = run_block("tests/integration/test_requireheader.py", {"__name__": "tests.integration.test_requireheader"})
    (function,) = [f for name, f in tests.items() if name.startswith("test_")]
    assert list(inspect.signature(function).parameters) == ["gateway", "echo"]
    await function(gateway, echo)
