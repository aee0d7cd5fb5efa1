"""The per-address budget of HTTP/2 stream resets (transport/h2.py's ResetBudget), on task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from txgateway.transport.h2 import ResetBudget, request_problem


def test_an_address_that_overdraws_is_refused_for_the_penalty_then_admitted():
    clock = Clock()
    budget = ResetBudget(clock, per_second=10.0, burst=20, penalty=5.0)
    assert all(budget.spend("10.0.0.1") for _ in range(20))
    assert budget.admits("10.0.0.1")
    assert not budget.spend("10.0.0.1")               # the 21st within the same instant
    assert not budget.admits("10.0.0.1")              # its new connections are refused...
    assert budget.admits("10.0.0.2") and budget.spend("10.0.0.2")   # ...not another address's
    clock.advance(4.9)
    assert not budget.admits("10.0.0.1")
    clock.advance(0.2)
    assert budget.admits("10.0.0.1")
    assert all(budget.spend("10.0.0.1") for _ in range(20))         # a fresh budget after the penalty


def test_resets_at_the_sustained_rate_never_run_out():
    clock = Clock()
    budget = ResetBudget(clock, per_second=10.0, burst=20)
    for _ in range(1000):
        assert budget.spend("10.0.0.1")
        clock.advance(0.1)


def test_the_table_of_addresses_is_bounded():
    clock = Clock()
    budget = ResetBudget(clock, per_second=10.0, burst=20, max_addresses=100)
    for i in range(1000):
        budget.spend(f"10.0.{i // 256}.{i % 256}")
        clock.advance(0.01)
    assert len(budget.buckets) <= 100
    for i in range(1000):
        address = f"10.1.{i // 256}.{i % 256}"
        while budget.spend(address):
            pass
    assert len(budget.banned) <= 100


def test_request_lines_that_http1_cannot_carry_are_named():
    assert request_problem(b"GET", b"/a/b?c=d") is None
    assert request_problem(b"OPTIONS", b"*") is None
    assert request_problem(b"GET", b"*") is not None
    for path in (b"/a b", b"/a\tb", b"/a\r\nX: y", b"/\x00", b"/\xc3\xa9", b"a/b", b""):
        assert request_problem(b"GET", path) is not None, path
    for method in (b"G ET", b"GET\r\n", b"", b"G\x00T", b"G(T"):
        assert request_problem(method, b"/") is not None, method
