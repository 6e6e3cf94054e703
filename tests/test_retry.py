"""The retry policy: which outcomes are retried, and how long each wait is."""
import doctest
import email.utils
import logging
import random

import pytest
import requests

from embed_helpers import retry
from embed_helpers.constants import JITTER, MAX_RETRY_AFTER_S, MAX_RETRY_DELAY_S
from embed_helpers.retry import parse_retry_after, retry_delay, should_retry

NOW = 1_700_000_000.0
FUTURE = email.utils.formatdate(NOW + 7, usegmt=True)
PAST = email.utils.formatdate(NOW - 7, usegmt=True)


@pytest.mark.parametrize("outcome, expected", [
    (200, False), (400, False), (401, False), (403, False), (404, False), (413, False),
    (422, False), (408, True), (409, True), (429, True), (500, True), (502, True),
    (503, True), (504, True), (599, True),
    (requests.ConnectionError(), True), (requests.ConnectTimeout(), True),
    (requests.ReadTimeout(), True), (requests.exceptions.ChunkedEncodingError(), True),
    (requests.exceptions.SSLError(), False), (requests.exceptions.InvalidURL(), False),
    (ValueError("not transport"), False),
])
def test_should_retry(outcome, expected):
    assert should_retry(outcome) is expected


@pytest.mark.parametrize("headers, expected", [
    (None, None),
    ({}, None),
    ({"Retry-After": "2"}, 2.0),
    ({"Retry-After": "0"}, 0.0),
    ({"Retry-After": "1.5"}, 1.5),
    ({"retry-after": " 3 "}, 3.0),
    ({"RETRY-AFTER": "4"}, 4.0),
    ({"Retry-After": "-1"}, None),
    ({"Retry-After": "nan"}, None),
    ({"Retry-After": "inf"}, None),
    ({"Retry-After": "-inf"}, None),
    ({"Retry-After": ""}, None),
    ({"Retry-After": "soon"}, None),
    ({"Retry-After": FUTURE}, 7.0),
    ({"Retry-After": PAST}, None),
    ({"Retry-After": "Fri, 99 Foo 2024 25:61:00 GMT"}, None),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "0"}, 0.0),
    ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
    ({"retry-after-ms": "nan", "Retry-After": "9"}, 9.0),
    ({"retry-after-ms": "-5", "Retry-After": "3"}, 3.0),
    ({"retry-after-ms": "inf"}, None),
    ({"retry-after-ms": "x"}, None),
])
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers, now=NOW) == expected


def test_server_wait_is_honoured_exactly_and_capped():
    assert retry_delay(0, {"Retry-After": "3"}, 500, random.Random(0)) == 3.0
    assert retry_delay(4, {"Retry-After": "0.25"}, 500, random.Random(0)) == 0.25
    assert retry_delay(0, {"Retry-After": "3600"}, 500) == MAX_RETRY_AFTER_S
    assert retry_delay(0, {"Retry-After": FUTURE}, 500, now=NOW) == 7.0


@pytest.mark.parametrize("attempt", range(8))
def test_backoff_doubles_with_jitter_and_cap(attempt):
    base = min(0.5 * 2 ** attempt, MAX_RETRY_DELAY_S)
    for seed in range(20):
        delay = retry_delay(attempt, None, 500, random.Random(seed))
        assert base * (1 - JITTER) <= delay <= base


@pytest.mark.parametrize("headers", [None, {"Retry-After": "nan"}, {"Retry-After": "-3"}])
def test_unusable_header_falls_back_to_backoff(headers):
    assert 0.375 <= retry_delay(0, headers, 500, random.Random(1)) <= 0.5


def test_extreme_inputs():
    assert retry_delay(10_000, None, 500, random.Random(0)) <= MAX_RETRY_DELAY_S
    assert retry_delay(3, None, 0, random.Random(0)) == 0.0
    assert retry_delay(-1, None, 500, random.Random(0)) <= 0.5


def test_every_decision_is_logged_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="embed_helpers.retry"):
        should_retry(503)
        should_retry(400)
        retry_delay(0, {"Retry-After": "2"}, 500)
        retry_delay(1, None, 500)
    messages = [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert "retry decision: HTTP 503 -> retry" in messages
    assert "retry decision: HTTP 400 -> give up" in messages
    assert any("server asked for 2.000s" in m for m in messages)
    assert any(m.startswith("retry 2: backoff") for m in messages)


def test_doctests():
    assert doctest.testmod(retry).failed == 0
