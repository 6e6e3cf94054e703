"""The Batch API's wire calls (files, batches, their content), through the backend's client.

Every call goes through `http.HttpClient.post_json`, the one retry layer, and is counted
there like an embedding request: the report's bill holds uploads, creates, polls, lists
and downloads too.
"""
from __future__ import annotations

from ..constants import BATCH_COMPLETION_WINDOW, BATCH_JOB_METADATA_KEY, BATCH_LIST_PAGE
from ..errors import ConfigError, WrongRoute
from .jobs import ENDPOINT

#: A batch in one of these will not change any more.
TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchClient:
    """Files and batches of OpenAI's Batch API on the llm_api backend's servers."""

    def __init__(self, http):
        self.http = http

    def upload(self, content: bytes, filename: str) -> str:
        """POST /files (multipart, purpose=batch); the file's id."""
        def send(session, url, timeout):
            return session.post(url, data={"purpose": "batch"}, timeout=timeout,
                                files={"file": (filename, content, "application/jsonl")})
        try:
            return self.http.post_json("/files", None, send=send)["id"]
        except WrongRoute as exc:  # vLLM, TEI, Ollama: /embeddings only
            raise ConfigError("EMBED_HOSTED_MODE", f"batch needs OpenAI's Batch API, and the "
                                                   f"server refused an upload to /files "
                                                   f"(HTTP {exc.status}): set "
                                                   f"EMBED_HOSTED_MODE=sync for this server, "
                                                   f"or point OPENAI_BASE_URL at OpenAI"
                              ) from None

    def create(self, input_file_id: str, job_key: str) -> dict:
        """POST /batches, never twice for one job: when an answer is lost (the batch may
        exist), the retry lists the batches instead, and the one whose metadata carries the
        job's key is taken; only when none does is the batch created again."""
        payload = {"input_file_id": input_file_id, "endpoint": ENDPOINT,
                   "completion_window": BATCH_COMPLETION_WINDOW,
                   "metadata": {BATCH_JOB_METADATA_KEY: job_key}}
        attempts = []

        def send(session, url, timeout):
            attempts.append(1)
            if len(attempts) > 1:  # a retry of a POST that may have created the batch
                return session.get(f"{url}?limit={BATCH_LIST_PAGE}", timeout=timeout)
            return session.post(url, json=payload, timeout=timeout)
        body = self.http.post_json("/batches", payload, send=send)
        if body.get("object") != "list":
            return body
        found = self.find(job_key)
        return found if found is not None else self.http.post_json("/batches", payload)

    def find(self, job_key: str) -> dict | None:
        """The batch whose metadata names `job_key`, or None: GET /batches, page by page."""
        after = None
        while True:
            query = f"/batches?limit={BATCH_LIST_PAGE}" + (f"&after={after}" if after else "")
            page = self.http.post_json(query, None, send=_get)
            for batch in page.get("data", []):
                if (batch.get("metadata") or {}).get(BATCH_JOB_METADATA_KEY) == job_key:
                    return batch
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page.get("last_id") or page["data"][-1]["id"]

    def list(self, limit: int = BATCH_LIST_PAGE) -> list[dict]:
        """The most recent batches of the account (GET /batches), newest first."""
        return self.http.post_json(f"/batches?limit={limit}", None, send=_get).get("data", [])

    def get(self, batch_id: str) -> dict:
        """GET /batches/{id}: its status, request counts and files."""
        return self.http.post_json(f"/batches/{batch_id}", None, send=_get)

    def content(self, file_id: str) -> str:
        """GET /files/{id}/content: an output or error file, as text (JSONL)."""
        return self.http.post_json(f"/files/{file_id}/content", None, send=_get, raw=True)

    def cancel(self, batch_id: str) -> dict:
        """POST /batches/{id}/cancel: it goes to cancelling, then cancelled."""
        return self.http.post_json(f"/batches/{batch_id}/cancel", {})


def _get(session, url, timeout):
    return session.get(url, timeout=timeout)
