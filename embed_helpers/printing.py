"""How values are shown: secrets masked, paths from the project root.

Every printout, log line, report and notebook output goes through these, so a key or a
password never shows and committed outputs carry no path of the machine that made them.
"""
from __future__ import annotations

import re
from pathlib import Path

from psycopg2 import ProgrammingError
from psycopg2.extensions import parse_dsn

from .constants import PROJECT_ROOT

#: A password value in a key=value DSN: quoted (backslash escapes), unterminated, or bare.
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|'.*|\S+)", re.DOTALL)
ENCODE_HINT = ("URL-encode the password: @ -> %40, : -> %3A, / -> %2F, # -> %23, ? -> %3F, "
               "% -> %25; e.g. the password s3cr@t/pw is written "
               "postgresql://alice:s3cr%40t%2Fpw@db:5432/x. `python -c \"import urllib.parse; "
               "print(urllib.parse.quote(input('password: '), safe=''))\"` prints yours encoded. "
               "Or use the key=value form: host=db user=alice password='...' dbname=x")


class Secret(str):
    """A string that never shows itself in repr/str-formatting of Settings.

    >>> Secret("sk-test-0000-1234")
    Secret('sk-…1234')
    >>> mask("sk-test-0000-1234")
    'sk-…1234'
    """

    def __repr__(self) -> str:
        shown = mask_url(self) if "://" in self or _KV_PASSWORD.search(self) else mask(self)
        return f"Secret({shown!r})"


def mask(value: str | None) -> str:
    """Show at most a prefix and the last four characters of a secret."""
    if not value:
        return ""
    if len(value) <= 8:
        return "****"
    prefix = value[:3] if value.startswith("sk-") else ""
    return f"{prefix}…{value[-4:]}"


def mask_url(url: str | None) -> str:
    """Hide the password in a connection URL; a URL that cannot be read unambiguously (see
    `dsn_problem`) is hidden whole, since any part of it may be the password.

    >>> mask_url("postgresql://alice:s3cret@db:5432/x")
    'postgresql://alice:****@db:5432/x'
    >>> mask_url("host=db user=alice password=s3cret dbname=x")
    'host=db user=alice password=**** dbname=x'
    >>> mask_url("host=db password = 'it\\\\'s me' dbname=x")
    'host=db password = **** dbname=x'
    >>> mask_url("postgresql://alice:a@b/c@db:5432/x")
    'postgresql://****'
    """
    if not url:
        return ""
    url = str(url)
    if _url_ambiguous(url):
        return url.partition("://")[0] + "://****"
    url = _KV_PASSWORD.sub(r"\1****", url)  # key=value DSNs, and ?password= in a URL
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1****@", url)


def _url_ambiguous(url: str) -> bool:
    """True when libpq would read a URL's password as something else: it ends the user
    and password at the first `@` or `/`, so a second `@`, or an `@` after a `/`, means
    a character of the password was not URL-encoded.

    >>> _url_ambiguous("postgresql://u:p%40ss@h/db"), _url_ambiguous("postgresql://u:p@ss@h/db")
    (False, True)
    >>> _url_ambiguous("postgresql://u:pa/ss@h/db"), _url_ambiguous("http://h:11434")
    (True, False)
    """
    _scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return False
    slash = rest.find("/")
    return rest.count("@") > 1 or -1 < slash < rest.find("@")


def dsn_problem(dsn: str | None) -> str | None:
    """Why a PostgreSQL connection string cannot be used as written, or None. Never quotes
    the string: libpq's own message would show part of the password.

    >>> dsn_problem("postgresql://alice:s3cret@db:5432/x") is None
    True
    >>> dsn_problem("postgresql://alice:a@b@db/x").split(".")[0]
    'it cannot be read unambiguously: a character of its password must be URL-encoded'
    >>> dsn_problem("host=db password='unterminated").split(":")[0]
    'it cannot be read as a key=value connection string'
    """
    if not dsn:
        return None
    dsn = str(dsn)
    if _url_ambiguous(dsn):
        return ("it cannot be read unambiguously: a character of its password must be "
                f"URL-encoded. {ENCODE_HINT}")
    try:
        parse_dsn(dsn)
    except ProgrammingError:
        kind = "URL" if "://" in dsn else "key=value connection string"
        return (f"it cannot be read as a {kind}: quote a value holding spaces or quotes as "
                f"password='it\\'s' (key=value), or in a URL: {ENCODE_HINT}")
    return None


def without_password(message: str, dsn: str) -> str:
    """`message` (libpq's, say) with the DSN's password, as written or URL-encoded, hidden.

    >>> without_password("auth failed for s3cr@t", "postgresql://u:s3cr%40t@h/x")
    'auth failed for ****'
    """
    from urllib.parse import quote
    password = parse_dsn(dsn).get("password") or ""
    for form in {password, quote(password, safe="")} - {""}:
        message = message.replace(form, "****")
    return message


def relative(path: Path | str) -> str:
    """A path as printed: from the project root when inside it, so that outputs carry no
    path of the machine that ran them.

    >>> relative(PROJECT_ROOT / ".cache" / "x.jsonl"), relative("/elsewhere/x")
    ('.cache/x.jsonl', '/elsewhere/x')
    """
    path = Path(path)
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def plural(n: int, one: str, many: str | None = None) -> str:
    """
    >>> plural(1, "request"), plural(2, "retry", "retries")
    ('1 request', '2 retries')
    """
    return f"{n} {one if n == 1 else (many or one + 's')}"
