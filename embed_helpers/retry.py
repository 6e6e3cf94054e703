"""When to retry and how long to wait: two pure functions, the one retry policy.

The policy is openai-python's: retry connection errors, timeouts, 408, 409, 429
and 5xx (not 501 and 505, which say the route will never work); wait what the server asks (`retry-after-ms`, `Retry-After` in seconds or
as an HTTP date) up to a cap, else an exponential backoff with jitter. Only
`embed_helpers.http` calls these, so there is one retry layer.
"""
from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from typing import Mapping

import requests

from .constants import (JITTER, MAX_RETRY_AFTER_S, MAX_RETRY_DELAY_S, NEVER_RETRIED_STATUSES,
                        RETRYABLE_STATUSES)

log = logging.getLogger(__name__)

# Transport failures worth repeating. SSLError is a ConnectionError in requests,
# but a certificate problem does not fix itself, so it is excluded below.
_RETRYABLE_EXCEPTIONS = (requests.ConnectionError, requests.Timeout,
                         requests.exceptions.ChunkedEncodingError)


def should_retry(outcome: int | BaseException) -> bool:
    """Whether a status code or a transport exception is worth another attempt.

    >>> [should_retry(s) for s in (200, 400, 401, 404, 408, 409, 413, 429, 500, 501, 503)]
    [False, False, False, False, True, True, False, True, True, False, True]
    >>> should_retry(requests.ConnectTimeout()), should_retry(ValueError())
    (True, False)
    """
    if isinstance(outcome, BaseException):
        decision = (isinstance(outcome, _RETRYABLE_EXCEPTIONS)
                    and not isinstance(outcome, requests.exceptions.SSLError))
        what = type(outcome).__name__
    else:
        decision = outcome in RETRYABLE_STATUSES or (outcome >= 500
                                                     and outcome not in NEVER_RETRIED_STATUSES)
        what = f"HTTP {outcome}"
    log.debug("retry decision: %s -> %s", what, "retry" if decision else "give up")
    return decision


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, or None when it did not say (usably).

    `retry-after-ms` wins over `Retry-After`; `Retry-After` may be seconds or an
    HTTP date. Negative, NaN, infinite, past and unparsable values are ignored.

    >>> parse_retry_after({"Retry-After": "2"}), parse_retry_after({"retry-after-ms": "1500"})
    (2.0, 1.5)
    >>> parse_retry_after({"Retry-After": "-1"}) is None, parse_retry_after({}) is None
    (True, True)
    """
    if not headers:
        return None
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    candidates = []
    if "retry-after-ms" in lower:
        candidates.append(_number(lower["retry-after-ms"], scale=0.001))
    if "retry-after" in lower:
        raw = lower["retry-after"]
        seconds = _number(raw)
        if seconds is None:
            seconds = _http_date(raw, time.time() if now is None else now)
        candidates.append(seconds)
    for seconds in candidates:
        if seconds is not None:
            return seconds
    return None


def _number(raw: str, *, scale: float = 1.0) -> float | None:
    try:
        value = float(raw.strip()) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _http_date(raw: str, now: float) -> float | None:
    parsed = email.utils.parsedate_tz(raw.strip())
    if parsed is None:
        return None
    seconds = email.utils.mktime_tz(parsed) - now
    return seconds if seconds >= 0 else None


def retry_delay(attempt: int, headers: Mapping[str, str] | None, backoff_ms: float,
                rng: random.Random | None = None, *, now: float | None = None) -> float:
    """Seconds to sleep before retry number `attempt` (0 = the first retry).

    The server's wish is honoured exactly (never shortened by jitter) up to
    MAX_RETRY_AFTER_S; otherwise min(backoff * 2**attempt, MAX_RETRY_DELAY_S),
    jittered down by up to JITTER so that parallel clients spread out.

    >>> retry_delay(0, {"Retry-After": "3"}, 500)
    3.0
    >>> retry_delay(10, None, 500, random.Random(0)) <= 8.0
    True
    """
    asked = parse_retry_after(headers, now=now)
    if asked is not None:
        delay = min(asked, MAX_RETRY_AFTER_S)
        log.debug("retry %d: server asked for %.3fs, waiting %.3fs", attempt + 1, asked, delay)
        return delay
    base = min(max(backoff_ms, 0) / 1000.0 * 2 ** min(max(attempt, 0), 32),
               MAX_RETRY_DELAY_S)  # the exponent is clamped: 2**1100 overflows a float
    delay = base * (1 - JITTER * (rng or random).random())
    log.debug("retry %d: backoff %.3fs (base %.3fs)", attempt + 1, delay, base)
    return delay
