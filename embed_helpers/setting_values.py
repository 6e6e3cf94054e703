"""The parsers of setting values: each takes what a user wrote (a string from `.env`, a
notebook parameter) and returns the typed value, or raises ValueError saying what is
allowed; `config.load_settings` names the variable.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from .constants import project_path
from .printing import Secret, dsn_problem, mask_url

def whole_number(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a whole number >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise ValueError(f"expected a whole number >= {minimum}, got {number}")
        return number
    return parse


def number(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a number >= {minimum}, got {value!r}") from None
        if not number >= minimum or number == float("inf"):
            raise ValueError(f"expected a finite number >= {minimum}, got {value!r}")
        return number
    return parse


def one_of(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return text
    return parse


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false (1/0, yes/no), got {value!r}")


def url(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"expected an http(s):// URL, got {mask_url(str(value))!r}")
    return text


def url_list(value: Any) -> str:
    """One URL or a list of servers that serve the same model, separated by commas or spaces.

    >>> url_list(" http://a:1/ , http://b:2")
    'http://a:1,http://b:2'
    >>> url_list("http://a:1 http://b:2/v1")
    'http://a:1,http://b:2/v1'
    """
    parts = [p for p in re.split(r"[,\s]+", str(value)) if p]
    if not parts:
        raise ValueError("expected one or more http(s):// URLs separated by commas or spaces")
    return ",".join(url(p.strip()) for p in parts)


def urls(value: str) -> list[str]:
    """The servers of a URL-list setting (OLLAMA_HOST, OPENAI_BASE_URL)."""
    return [u for u in value.split(",") if u]




def text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def codec(value: Any) -> str:
    """A text encoding Python knows (utf-8, cp1252, latin-1...), by its canonical name."""
    import codecs
    try:
        return codecs.lookup(text(value)).name
    except LookupError:
        raise ValueError(f"expected a text encoding such as utf-8, cp1252 or latin-1, got "
                         f"{value!r}") from None


def path_value(value: Any) -> Path:
    return project_path(value)


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        if value is None or str(value).strip() == "":
            return None
        return parse(value)
    return wrapped


secret = optional(lambda v: Secret(text(v)))


def connection(value: Any) -> Secret:
    """A PostgreSQL URL or key=value string that libpq reads as written (never echoed)."""
    dsn = Secret(text(value))
    problem = dsn_problem(dsn)
    if problem:
        raise ValueError(f"{problem} (the value is not shown: it holds a password)")
    return dsn


dsn = optional(connection)


def share(value: Any) -> float:
    """A fraction from 0 to 1 (EMBED_SYNC_MAX_DELETE).

    >>> share("0.5"), share(1)
    (0.5, 1.0)
    """
    fraction = number(0)(value)
    if fraction > 1:
        raise ValueError(f"expected a fraction from 0 to 1 (0.5 = half), got {value!r}")
    return fraction


def column_names(value: Any) -> tuple[str, ...]:
    """Column names separated by commas (KEEP_COLS); spaces around each are dropped.

    >>> column_names("title, year,journal"), column_names("")
    (('title', 'year', 'journal'), ())
    """
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(name.strip() for name in str(value).split(",") if name.strip())
