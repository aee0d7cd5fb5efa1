"""The config file's human units: durations, sizes, rates."""

from __future__ import annotations

import dataclasses

import pytest

from txgateway.config.units import Rate, parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25),
    ("0ms", 0.0),
    ("5s", 5.0),
    ("1.5s", 1.5),
    ("1m", 60.0),
    ("2h", 7200.0),
    ("1d", 86400.0),
    (" 10s ", 10.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "10", 10, "5 s", "5S", "-1s", "1.s", "s", "1w", "5sec", "1e3s", "abc", "None"])
def test_bad_durations_name_the_expected_form(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f'expected a duration like "250ms", "5s" or "1m", got "{text}"'


@pytest.mark.parametrize(("text", "size"), [
    ("512", 512),
    (512, 512),
    (0, 0),
    ("100B", 100),
    ("16KiB", 16 * 1024),
    ("10MiB", 10 * 1024 * 1024),
    ("1GiB", 1024**3),
    ("16KB", 16_000),
    ("10MB", 10_000_000),
    ("2GB", 2_000_000_000),
    (" 1KiB ", 1024),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5MiB", "10 MiB", "10mib", "10kb", "10K", "-1", "MiB", "10TiB", "abc", "1.5"])
def test_bad_sizes_name_the_expected_form(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f'expected a size like "512", "16KiB" or "10MiB", got "{text}"'


@pytest.mark.parametrize(("text", "count", "window", "per_second"), [
    ("1/second", 1, 1, 1.0),
    ("100/minute", 100, 60, 100 / 60),
    ("5000/hour", 5000, 3600, 5000 / 3600),
    ("86400/day", 86400, 86400, 1.0),
    (" 10/second ", 10, 1, 10.0),
])
def test_rates(text, count, window, per_second):
    rate = Rate.parse(text)
    assert (rate.count, rate.window, rate.text) == (count, window, text.strip())
    assert rate.per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["abc", "", "100", "100/min", "100/minutes", "100 / minute", "-1/second",
                                  "1.5/second", "/second", "100/Minute"])
def test_bad_rates_name_the_expected_form(text):
    with pytest.raises(ValueError) as info:
        Rate.parse(text)
    assert str(info.value) == f'expected "N/second|minute|hour|day", got "{text}"'


@pytest.mark.parametrize("text", ["0/minute", "0/second", "000/day"])
def test_zero_rate_is_refused_naming_the_expected_form(text):
    with pytest.raises(ValueError) as info:
        Rate.parse(text)
    message = str(info.value)
    assert message == f'expected "N/second|minute|hour|day" with N above zero, got "{text}"'
    assert "N/second|minute|hour|day" in message


def test_rate_is_frozen():
    rate = Rate.parse("100/minute")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rate.count = 1  # type: ignore[misc]
