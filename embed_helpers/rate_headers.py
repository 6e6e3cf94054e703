"""What a hosted API says about its rate budget: the `x-ratelimit-*` headers, parsed.

OpenAI sends, on every answer, `x-ratelimit-limit-requests`, `x-ratelimit-limit-tokens`,
`x-ratelimit-remaining-requests`, `x-ratelimit-remaining-tokens`,
`x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens`, the resets as Go durations
("12ms", "1s", "6m0s", "1h2m3.5s": the time until that budget is back to its initial
state). Azure OpenAI sends some of them (the remaining ones only, or -1 for "unknown",
or a reset in plain seconds), LiteLLM the same names, many servers none. Pure functions:
a value that cannot be read is left out, never guessed (openai-python's rule for
`retry-after`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

#: The two budgets a hosted API keeps per key, named as its headers name them.
LANES = ("requests", "tokens")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


@dataclass(frozen=True)
class LaneHeaders:
    """One budget as a response stated it; None where it said nothing usable."""

    limit: float | None = None       # the most the budget holds
    remaining: float | None = None   # what it held when the server counted this request
    reset_s: float | None = None     # seconds until it is full again

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.limit, self.remaining, self.reset_s))


def parse_duration(raw: str | None) -> float | None:
    """Seconds in a reset header: a Go duration ("1h2m3.5s", "20ms") or plain seconds.

    >>> [parse_duration(v) for v in ("1s", "6m0s", "20ms", "1h2m3.5s", "0.5", "17")]
    [1.0, 360.0, 0.02, 3723.5, 0.5, 17.0]
    >>> [parse_duration(v) for v in ("-1s", "inf", "nan", "soon", "", None, "1x")]
    [None, None, None, None, None, None, None]
    """
    if raw is None:
        return None
    text = raw.strip()
    plain = _count(text)
    if plain is not None:
        return plain
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return round(sum(float(n) * _UNIT_S[u] for n, u in parts), 9)  # to the nanosecond


def _count(raw: str | None) -> float | None:
    """A finite, non-negative number, else None (-1 is Azure's "unknown")."""
    try:
        value = float(str(raw).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def read_lanes(headers: Mapping[str, str] | None) -> dict[str, LaneHeaders]:
    """The budgets a response's headers state, by lane; lanes it says nothing of left out.

    >>> read_lanes({"x-ratelimit-limit-tokens": "150000", "x-ratelimit-remaining-tokens":
    ...             "149984", "x-ratelimit-reset-tokens": "6ms"})
    {'tokens': LaneHeaders(limit=150000.0, remaining=149984.0, reset_s=0.006)}
    >>> read_lanes({"X-RateLimit-Remaining-Requests": "-1"}), read_lanes(None)
    ({}, {})
    """
    if not headers:
        return {}
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    lanes = {}
    for lane in LANES:
        said = LaneHeaders(_count(lower.get(f"x-ratelimit-limit-{lane}")),
                           _count(lower.get(f"x-ratelimit-remaining-{lane}")),
                           parse_duration(lower.get(f"x-ratelimit-reset-{lane}")))
        if said.limit == 0:  # "no limit known", as some proxies say it
            said = LaneHeaders(None, said.remaining, said.reset_s)
        if said:
            lanes[lane] = said
    return lanes

