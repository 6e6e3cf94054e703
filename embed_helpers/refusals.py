"""What a server's refusal says, read from any of the JSON shapes in use.

`http.HttpClient` turns a refusal into one of our errors; this module only reads it: the
server's own message, its error code, and the window it states when an input is too long.
"""
from __future__ import annotations

import re

import requests

# A 400/422 with one of these means "send fewer or shorter inputs", not "bad content".
TOO_LARGE = re.compile(
    r"too many inputs|batch size|too large|too long|maximum context length|"
    r"must have less than|exceeds? (the )?(max|limit)|max(imum)? (number of )?inputs|"
    r"tokens per request|too many tokens|max_tokens_per_request",
    re.IGNORECASE)
# One input over the model's window, with the window where the server states it: OpenAI and
# vLLM ("maximum context length is N tokens"), OpenAI's newer "maximum input length is N
# tokens", TEI ("must have less than N tokens"), llama.cpp's 400 ("exceeds the available
# context size (N tokens)") and 500 ("too large to process ... (current batch size: N)").
WINDOW_SAID = re.compile(
    r"maximum (?:context|input) length is (\d+) tokens|must have less than (\d+) tokens|"
    r"available context size \((\d+) tokens\)|too large to process.*?current batch size: (\d+)",
    re.IGNORECASE | re.DOTALL)
INPUT_TOO_LONG = re.compile(r"too large to process|exceeds the available context size|"
                             r"maximum (context|input) length", re.IGNORECASE)
MODEL_MISSING = re.compile(r"model.*(not found|does not exist|not exist)", re.IGNORECASE)


def server_message(response: requests.Response) -> str:
    """The server's own error text from any of the JSON shapes in use, else the body.

    OpenAI {"error": {"message"}}, Ollama and TEI {"error": "..."}, vLLM {"message"}.
    """
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
    return str(body)[:300]


def stated_window(response: requests.Response, said: str) -> int | None:
    """The window a refusal states: llama.cpp's `n_ctx` field, else a figure in the message
    (`WINDOW_SAID`); None when it states none."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("n_ctx"), int) and error["n_ctx"] > 0:
        return error["n_ctx"]
    match = WINDOW_SAID.search(said)
    return int(next(g for g in match.groups() if g)) if match else None


def error_code(response: requests.Response) -> str:
    """OpenAI's `error.code` (such as `model_not_found`), else ""."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    return str(error.get("code") or "") if isinstance(error, dict) else ""
