"""txgateway.ops.logs: how twistd's options decide where the log goes, the journal's priority
prefixes, and how a stream is recognised as the journal. The daemon itself is in
tests/integration/test_process_log.py."""

from __future__ import annotations

import io
import os
import sys

import pytest
from twisted.logger import LoggingFile, LogLevel
from twisted.scripts.twistd import ServerOptions

from txgateway.ops.logs import TwistdLog, journal_priority_format, writes_to_journal


def from_twistd(*argv: str) -> TwistdLog:
    """TwistdLog for `twistd ARGV txgateway --demo`, parsed as twistd parses it."""
    options = ServerOptions()
    options.parseOptions([*argv, "txgateway", "--demo"])
    return TwistdLog.from_options(options.subOptions)


@pytest.mark.parametrize(("argv", "expected"), [
    (["-n"], TwistdLog(daemon=False, to_stdout=True, rotates_on_usr1=False)),
    (["-n", "--logfile=-"], TwistdLog(daemon=False, to_stdout=True, rotates_on_usr1=False)),
    (["-n", "--logfile=gw.log"], TwistdLog(daemon=False, to_stdout=False, rotates_on_usr1=True)),
    ([], TwistdLog(daemon=True, to_stdout=False, rotates_on_usr1=True)),               # twistd.log
    (["--logfile=gw.log"], TwistdLog(daemon=True, to_stdout=False, rotates_on_usr1=True)),
    (["--syslog"], TwistdLog(daemon=True, to_stdout=False, rotates_on_usr1=False)),
    (["-n", "--syslog"], TwistdLog(daemon=False, to_stdout=False, rotates_on_usr1=False)),
    (["-n", "--logger=twisted.logger.jsonFileLogObserver"],
     TwistdLog(daemon=False, to_stdout=False, rotates_on_usr1=False)),
])
def test_reads_where_twistd_logs_from_its_options(argv, expected):
    assert from_twistd(*argv) == expected


def test_outside_twistd_nothing_is_taken_over():
    from txgateway.service.tap import Options
    options = Options()
    options.parseOptions(["--demo"])
    log = TwistdLog.from_options(options)
    assert log == TwistdLog()
    assert log.observer(sys.stdout, {}) is None
    assert log.stdout_stream() is sys.stdout


def test_daemonised_the_access_log_stdout_is_twistds_log():
    stream = from_twistd("--logfile=gw.log").stdout_stream()
    assert isinstance(stream, LoggingFile) and stream.log.namespace == "txgateway.access"
    assert from_twistd("-n").stdout_stream() is sys.stdout


def test_only_a_log_on_stdout_gets_the_gateways_observer():
    assert from_twistd("-n").observer(sys.stdout, {}) is not None
    assert from_twistd("-n", "--logfile=gw.log").observer(sys.stdout, {}) is None
    assert from_twistd().observer(sys.stdout, {}) is None


def event(level: LogLevel, text: str) -> dict[str, object]:
    return {"log_level": level, "log_format": text, "log_namespace": "t", "log_time": 0.0}


@pytest.mark.parametrize(("level", "prefix"), [
    (LogLevel.debug, "<7>"), (LogLevel.info, "<6>"), (LogLevel.warn, "<4>"),
    (LogLevel.error, "<3>"), (LogLevel.critical, "<3>"),
])
def test_every_line_of_an_event_carries_its_priority(level, prefix):
    text = journal_priority_format(lambda e: str(e["log_format"]) + "\n")
    assert text(event(level, "one\n\ttwo")) == f"{prefix}one\n{prefix}\ttwo\n"


def test_an_event_without_text_stays_without():
    assert journal_priority_format(lambda e: None)(event(LogLevel.warn, "")) is None


def test_the_journal_is_the_stream_whose_device_and_inode_journal_stream_names(tmp_path):
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert writes_to_journal(a, environ)
        assert not writes_to_journal(b, environ)           # stderr may be the journal, stdout a file
        assert not writes_to_journal(a, {})
        assert not writes_to_journal(io.StringIO(), environ)   # no file descriptor at all


def test_a_workers_lines_carry_its_number_after_the_time():
    out = io.StringIO()
    observer = TwistdLog(to_stdout=True, worker="3").observer(out, {})
    observer(event(LogLevel.info, "hello"))
    assert out.getvalue().endswith(" [worker 3] [t#info] hello\n"), out.getvalue()
