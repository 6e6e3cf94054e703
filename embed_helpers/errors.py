"""One small hierarchy of errors, each carrying what the user needs to act.

Transport and server failures are translated into these at one boundary
(`embed_helpers.http`), so notebook cells and the CLI never see a raw
`requests` exception.
"""
from __future__ import annotations


class EmbedHelpersError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(EmbedHelpersError, ValueError):
    """A setting has a value we cannot use; names the variable and what is allowed."""

    def __init__(self, variable: str, message: str):
        self.variable = variable
        super().__init__(f"{variable}: {message}")


class ModelMismatch(ConfigError):
    """The server lists, or answers with, another model than the configured one: its vectors
    would be cached under a name that did not make them. Raised before anything is stored."""


class TableOfAnotherModel(ModelMismatch):
    """The table's vectors were made by another identity than this run's (`provenance`):
    stopped before any request, with the two ways on (another table, or `--reembed`).
    `stored` and `current` are the two `provenance.Provenance` records, `fields` what differs."""

    def __init__(self, table: str, stored, current, fields: list[str], hint: str = ""):
        self.table, self.stored, self.current, self.fields = table, stored, current, fields
        hint = hint or ("Choose another table (--table NAME, or TABLE_NAME), or replace every "
                        "vector of this one with --reembed (EMBED_REEMBED=1): paid once, resumable, "
                        "and searches keep the old vectors until the new table is swapped in.")
        super().__init__("TABLE_NAME", f"table {table} was made by {stored.describe()}; this run "
                                       f"is {current.describe()}: {', '.join(fields)} differ"
                                       f"{'s' if len(fields) == 1 else ''}. Its stored vectors and "
                                       f"this run's would come from different models, so the run "
                                       f"stops before writing anything. {hint}")


class DataError(EmbedHelpersError, ValueError):
    """The input data cannot be ingested as given (missing column, no rows...)."""


class BackendError(EmbedHelpersError):
    """The embedding server failed in a way retries did not fix.

    Attributes:
        backend: backend name (``ollama``, ``llm_api``, ``local``).
        status: HTTP status, or None for transport failures.
        server_message: the server's own error text, when it sent one.
        hint: what to do about it.
    """

    def __init__(self, message: str, *, backend: str = "", status: int | None = None,
                 server_message: str = "", hint: str = ""):
        self.backend = backend
        self.status = status
        self.server_message = server_message
        self.hint = hint
        text = message
        if server_message and server_message not in message:
            text += f" Server said: {server_message}"
        if hint:
            text += f" {hint}"
        super().__init__(text)


class BackendUnreachable(BackendError):
    """No connection could be made (refused, DNS, timeout on every attempt)."""


class AuthenticationError(BackendError):
    """401/403: the key is missing, wrong or lacks access."""


class ModelNotFound(BackendError):
    """The server does not know the model."""


class BatchTooLarge(BackendError):
    """413, or a 400 saying too many inputs / too long: split and retry."""


class InputTooLong(BatchTooLarge):
    """A 400/413/422/500 saying that one input is longer than the model reads.

    Attributes:
        limit: the window the server stated, in its tokens (its special tokens included),
            or None when its message gave no figure. `windows.from_refusal` turns it into a
            `Window`, so that the refused text can be chunked and sent again.
    """

    def __init__(self, message: str, *, limit: int | None = None, **kw):
        self.limit = limit
        super().__init__(message, **kw)


class BadInput(BackendError):
    """A non-retryable 4xx caused by the content of the inputs."""


class WrongRoute(BackendError):
    """404, 405 or 501 to our POST: the URL or the route is not an embedding server's."""


class SomeInputsFailed(BadInput):
    """A backend that sends one request per text (Ollama's legacy route) knows which texts
    failed: `vectors` holds the good ones (NaN rows elsewhere), `errors` the failed
    positions and their error, so nobody bisects or pays for the good texts again."""

    def __init__(self, vectors, errors: dict, **kw):
        self.vectors, self.errors = vectors, errors
        first = next(iter(errors.values()))
        super().__init__(f"{len(errors)} of {len(vectors)} texts failed: {first}",
                         backend=first.backend, status=first.status, **kw)


class EmbeddingValidationError(EmbedHelpersError, ValueError):
    """Vectors that must not be written: wrong count, dimension, NaN, empty."""

    def __init__(self, message: str, *, positions: list[int] | None = None):
        self.positions = positions or []
        super().__init__(message)


class EmbeddingFailures(EmbedHelpersError):
    """Some inputs got no vector; `failures` lists them (position, preview, reason)."""

    def __init__(self, failures: list, total: int):
        self.failures = failures
        lines = [f"{len(failures)} of {total} texts could not be embedded:"]
        for f in failures[:10]:
            lines.append(f"  #{f.position} {f.preview!r}: {f.reason}")
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more")
        super().__init__("\n".join(lines))


class DatabaseError(EmbedHelpersError):
    """PostgreSQL failed or went away; the message says what happened, where the server's
    log is, and what to do. Every batch is one transaction, so nothing is half-written."""

    def __init__(self, message: str, *, log_path: str = "", signal: int | None = None):
        self.log_path, self.signal = log_path, signal
        super().__init__(message)
