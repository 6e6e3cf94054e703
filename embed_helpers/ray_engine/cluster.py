"""Joining a Ray cluster as it comes, and keeping Ray's own reports of our errors quiet.

Ray 2.60 turns token authentication on for `ray start --head` whenever a token exists (the
file ~/.ray/auth_token, which any local `ray.init()` writes, or RAY_AUTH_TOKEN /
RAY_AUTH_TOKEN_PATH). A driver that joins it by an explicit address does not send its token
unless RAY_AUTH_MODE=token: Ray looks for one only for `address="auto"`. `join` does what
Ray does there, so the guide's recipe works as typed, and says what to do when no token
fits.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..errors import ConfigError, EmbedHelpersError

log = logging.getLogger(__name__)

TOKEN_HELP = ("Copy the head node's token to this machine: ~/.ray/auth_token (or any file, "
              "named by RAY_AUTH_TOKEN_PATH), or set RAY_AUTH_TOKEN; `ray get-auth-token` on "
              "the head prints it. Or start the cluster with RAY_AUTH_MODE=disabled on a "
              "network only you can reach.")


def use_cluster_token() -> bool:
    """Send this machine's Ray token, if it has one, when RAY_AUTH_MODE is unset; True
    when token mode is on."""
    if os.environ.get("RAY_AUTH_MODE") is not None:  # the user's choice stands
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def join(ray, address: str) -> None:
    """`ray.init` on the cluster at `address`, shipping this package to it."""
    token = use_cluster_token()
    log.info("joining the Ray cluster at %s (token authentication %s)", address,
             "on" if token else "off")
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"py_modules": [str(Path(__file__).parent.parent)]})  # the package
    except ConnectionError as exc:  # the reason (InvalidAuthToken...) is only in Ray's log
        raise ConfigError("RAY_ADDRESS", f"cannot join the Ray cluster at {address} ({exc}). "
                          "If Ray's log above says InvalidAuthToken, the cluster uses token "
                          f"authentication and this driver {'sent a token it refuses' if token else 'found no token'}: "
                          f"{TOKEN_HELP} Otherwise check the address (`ray status --address "
                          f"{address}` on this machine).") from None


class OursOnly(logging.Filter):
    """Drops Ray's log records that carry one of our errors (Ray Data logs a worker's
    exception with its whole traceback before the driver re-raises it): the driver shows
    ours once, with its fix, and nothing else."""

    def __init__(self, find):
        super().__init__()
        self.find = find  # exception -> our error under Ray's wrappers, or None

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("ray"):
            return True
        # Ray Data logs from inside its `except` block: the exception being handled counts.
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if exc is not None and self.find(exc) is not None:
            return False
        return not any(name in record.getMessage() for name in _OUR_ERRORS)


def _names(cls) -> list[str]:
    return [cls.__name__] + [n for sub in cls.__subclasses__() for n in _names(sub)]


_OUR_ERRORS = tuple(_names(EmbedHelpersError))


def without_rays_note(ours: EmbedHelpersError) -> EmbedHelpersError:
    """Our error without the retry note Ray Data appends to its message ("Failed to apply
    UDF transform after 1/1 attempts ... configure `ray.data.DataContext`"): a setting of
    Ray's is not the fix.

    >>> from embed_helpers.errors import DataError
    >>> str(without_rays_note(DataError("row 3 has no id\\nFailed to apply UDF transform")))
    'row 3 has no id'
    """
    if ours.args and isinstance(ours.args[0], str) and _RAY_NOTE in ours.args[0]:
        ours.args = (ours.args[0].split(_RAY_NOTE)[0],) + ours.args[1:]
    return ours


_RAY_NOTE = "\nFailed to "


def quiet_our_errors(find) -> None:
    """Install `OursOnly` on the handlers of Ray's loggers and the root's (a logger's own
    filters do not see its children's records), once."""
    for name in ("ray", "ray.data", None):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, OursOnly) for f in handler.filters):
                handler.addFilter(OursOnly(find))
