"""How values are shown: secrets masked, paths from the project root.

Every printout, log line, report and notebook output goes through these, so a key or a
password never shows and committed outputs carry no path of the machine that made them.
"""
from __future__ import annotations

import re
from pathlib import Path

from .constants import PROJECT_ROOT


class Secret(str):
    """A string that never shows itself in repr/str-formatting of Settings.

    >>> Secret("sk-test-0000-1234")
    Secret('sk-…1234')
    >>> mask("sk-test-0000-1234")
    'sk-…1234'
    """

    def __repr__(self) -> str:
        return f"Secret({mask(self)!r})"


def mask(value: str | None) -> str:
    """Show at most a prefix and the last four characters of a secret."""
    if not value:
        return ""
    if len(value) <= 8:
        return "****"
    prefix = value[:3] if value.startswith("sk-") else ""
    return f"{prefix}…{value[-4:]}"


def mask_url(url: str | None) -> str:
    """Hide the password in a connection URL.

    >>> mask_url("postgresql://alice:s3cret@db:5432/x")
    'postgresql://alice:****@db:5432/x'
    >>> mask_url("host=db user=alice password=s3cret dbname=x")
    'host=db user=alice password=**** dbname=x'
    """
    if not url:
        return ""
    url = re.sub(r"(\bpassword=)('[^']*'|\S+)", r"\1****", url)  # key=value DSNs
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1****@", url)


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
