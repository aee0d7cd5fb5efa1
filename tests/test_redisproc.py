"""The real-Redis test infrastructure (tests/redisproc.py) does what the rate-limit tests rely on."""

from __future__ import annotations

import os
import time

import pytest

from tests.redisproc import HOST, RedisReplyError, RedisServer, SentinelSetup, command, wait_for


def assert_gone(pid: int) -> None:
    """The process is dead and reaped: no such pid any more."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_set_get_stop() -> None:
    server = RedisServer()
    server.start()
    try:
        assert server.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.command("SET", "k", "v") == "OK"
        assert server.command("GET", "k") == "v"
        assert command(server.port, "GET", "k") == "v"  # the module-level client, same server
    finally:
        pid = server.proc.pid if server.proc else -1
        server.stop()
    assert not server.running
    assert_gone(pid)
    assert not os.path.exists(server.dir)
    with pytest.raises(ConnectionRefusedError):
        server.command("PING")


def test_replies_of_every_resp_type(redis_server: RedisServer) -> None:
    r = redis_server
    assert r.command("PING") == "PONG"                                  # simple string
    assert r.command("INCRBY", "n", 41) == 41                           # integer
    assert r.command("INCR", "n") == 42
    assert r.command("GET", "missing") is None                          # nil bulk
    assert r.command("RPUSH", "l", "a", "", "c") == 3
    assert r.command("LRANGE", "l", 0, -1) == ["a", "", "c"]            # array of bulks, empty bulk
    assert r.command("LRANGE", "missing", 0, -1) == []                  # empty array
    assert r.command("SET", "bin", b"\x00\xff\r\n") == "OK"
    assert r.command("GET", "bin", decode=False) == b"\x00\xff\r\n"     # binary-safe bulk
    with pytest.raises(RedisReplyError) as err:                         # error reply
        r.command("INCR", "l")
    assert err.value.code == "WRONGTYPE"
    assert r.command("MULTI") == "OK"
    assert r.command("PING") == "PONG"  # each command is its own connection: no transaction state leaks


def test_error_nested_in_an_array_is_returned_not_raised(redis_server: RedisServer) -> None:
    # EVAL returning a table holding an error reply: the array comes back, the error is an element.
    reply = redis_server.command("EVAL", "return {1, redis.error_reply('MY boom')}", 0)
    assert reply[0] == 1
    assert isinstance(reply[1], RedisReplyError) and reply[1].code == "MY"


def test_kill_then_restart_on_the_same_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.command("SET", "k", "before")
    pid = redis_server.proc.pid if redis_server.proc else -1
    redis_server.kill()
    assert not redis_server.running
    assert_gone(pid)
    with pytest.raises(ConnectionRefusedError):
        redis_server.command("PING")

    redis_server.restart()
    assert redis_server.running and redis_server.port == port
    assert redis_server.url.endswith(f":{port}/0")
    assert redis_server.command("GET", "k") is None  # no persistence: a crash loses the data
    assert redis_server.command("SET", "k", "after") == "OK"
    assert redis_server.command("GET", "k") == "after"

    redis_server.restart()  # restarting a running server stops it first
    assert redis_server.running and redis_server.port == port
    assert redis_server.command("PING") == "PONG"


def test_requirepass() -> None:
    with RedisServer(password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        with pytest.raises(RedisReplyError) as err:
            server.command("SET", "k", "v", auth=False)
        assert err.value.code == "NOAUTH"
        assert server.command("SET", "k", "v") == "OK"
        assert command(server.port, "GET", "k", password="s3cret") == "v"
        with pytest.raises(RedisReplyError) as err:
            command(server.port, "GET", "k", password="wrong")
        assert err.value.code == "WRONGPASS"
    assert not server.running


def test_a_server_that_cannot_start_raises_with_its_log_and_leaves_nothing_running() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError) as err:
        server.start()
    assert "no-such-directive" in str(err.value)  # redis's own complaint, from its log
    assert not server.running
    server.stop()


def test_waits_are_bounded_and_say_what_they_awaited() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for the moon"):
        wait_for("the moon", lambda: None, 0.2)
    assert time.monotonic() - started < 1.0


def test_sentinel_setup_and_failover(redis_sentinel_setup: SentinelSetup) -> None:
    setup = redis_sentinel_setup
    master, replica, sentinel = setup.master, setup.replica, setup.sentinel
    assert sentinel.master_addr() == (HOST, master.port)
    assert setup.current_master() is master

    # A real replica: it has the master's data and refuses writes.
    master.command("SET", "k", "from-master")
    wait_for("k to replicate", lambda: replica.command("GET", "k") == "from-master", 5.0)
    with pytest.raises(RedisReplyError) as err:
        replica.command("SET", "k", "x")
    assert err.value.code == "READONLY"

    started = time.monotonic()
    assert sentinel.failover() == (HOST, replica.port)
    assert time.monotonic() - started < 10.0
    assert sentinel.master_addr() == (HOST, replica.port)
    assert setup.current_master() is replica
    assert replica.info("replication")["role"] == "master"
    assert replica.command("SET", "k", "from-new-master") == "OK"
    assert replica.command("GET", "k") == "from-new-master"
