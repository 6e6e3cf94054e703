"""A fake of OpenAI's Batch API for `/v1/embeddings`, mounted in `fake_server.py`.

Speaks POST /v1/files (multipart, purpose=batch), POST /v1/batches, GET /v1/batches (a
page, newest first), GET /v1/batches/{id}, POST /v1/batches/{id}/cancel and GET
/v1/files/{id}/content, with OpenAI's objects and line formats. A batch moves one state
on each GET of it: validating -> in_progress -> finalizing -> completed (`hold` keeps it
in_progress). It validates the input file as OpenAI documents (50,000 requests, 200 MB,
50,000 embedding inputs, the enqueued-token cap) and fails the batch when one is broken.
Faults: chosen lines fail (error file), expiry after N lines, a lost answer to a
create, vectors of another dimension, a line that is not ours. Vectors are the fake
server's own, so they equal the synchronous route's.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP

TERMINAL = ("completed", "failed", "expired", "cancelled")
FLOW = {"validating": "in_progress", "in_progress": "finalizing", "finalizing": "completed"}


class FakeBatchAPI:
    """Files and batches in memory; `counts` per route, so tests can say "created once"."""

    def __init__(self, vector, count_tokens):
        self.vector, self.count_tokens = vector, count_tokens
        self.lock = threading.Lock()
        self.files: dict[str, dict] = {}
        self.content: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.counts: Counter = Counter()
        self.hold = False                   # batches stay in_progress until released
        self.fail_lines: set[int] = set()    # these lines of each file fail (400, error file)
        self.expire_after: int | None = None  # the batch expires after this many lines
        self.drop_create_replies = 0         # create the batch, then lose the answer
        self.foreign_line = False            # the output holds a custom_id we never sent
        self.absent = False                  # a server without it (vLLM, TEI): 404 everywhere
        self.max_requests, self.max_bytes, self.max_inputs = 50_000, 200 * 1024 * 1024, 50_000
        self.enqueued_token_limit = 3_000_000
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n:06d}"

    # --- the routes ----------------------------------------------------------------------
    def handle(self, req, method: str, raw: bytes) -> None:
        path = req.path.split("?")[0]
        route = re.sub(r"/(file|batch)-\d+", r"/{id}", path)
        with self.lock:
            self.counts[f"{method} {route}"] += 1
            answer = self.route(req, method, route, path, raw)
        if answer is None:  # the answer is lost: the client sees the connection drop
            req.close_connection = True
            return
        status, body = answer
        if isinstance(body, bytes):
            return req.reply(status, body, "application/octet-stream")
        req.reply(status, json.dumps(body).encode())

    def route(self, req, method, route, path, raw):
        parts = path.strip("/").split("/")
        if self.absent:
            return 404, {"detail": "Not Found"}
        if (method, route) == ("POST", "/v1/files"):
            return self.upload(req, raw)
        if (method, route) == ("POST", "/v1/batches"):
            return self.create(json.loads(raw))
        if (method, route) == ("GET", "/v1/batches"):
            return self.list_page(req.path)
        if route == "/v1/batches/{id}" and parts[2] in self.batches:
            return 200, self.advance(self.batches[parts[2]])
        if route == "/v1/batches/{id}/cancel" and parts[2] in self.batches:
            batch = self.batches[parts[2]]
            if batch["status"] not in TERMINAL:
                batch.update(status="cancelling", cancelling_at=int(time.time()))
            return 200, batch
        if route == "/v1/files/{id}/content" and parts[2] in self.content:
            return 200, self.content[parts[2]]
        return 404, {"error": {"message": f"No such object: {path}", "type":
                               "invalid_request_error", "param": None, "code": None}}

    def upload(self, req, raw: bytes):
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {req.headers['Content-Type']}\r\n\r\n".encode() + raw)
        fields = {part.get_param("name", header="content-disposition"): part
                  for part in message.iter_parts()}
        if "file" not in fields or fields.get("purpose") is None \
                or fields["purpose"].get_content().strip() != "batch":
            return 400, {"error": {"message": "'file' and purpose 'batch' are required",
                                   "type": "invalid_request_error", "param": None, "code": None}}
        data = fields["file"].get_payload(decode=True)
        file_id = self._id("file")
        self.content[file_id] = data
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data),
                               "created_at": int(time.time()), "purpose": "batch",
                               "filename": fields["file"].get_filename()}
        return 200, self.files[file_id]

    def create(self, body: dict):
        if body.get("input_file_id") not in self.files or body.get("endpoint") != "/v1/embeddings" \
                or body.get("completion_window") != "24h":
            return 400, {"error": {"message": "invalid batch request", "type":
                                   "invalid_request_error", "param": None, "code": None}}
        batch_id = self._id("batch")
        now = int(time.time())
        batch = {"id": batch_id, "object": "batch", "endpoint": "/v1/embeddings", "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": "24h",
                 "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
                 "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": body.get("metadata")}
        self.batches[batch_id] = batch
        if self.drop_create_replies > 0:
            self.drop_create_replies -= 1
            return None
        return 200, batch

    def list_page(self, path: str):
        query = dict(p.split("=", 1) for p in path.partition("?")[2].split("&") if "=" in p)
        ordered = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        if "after" in query:
            ordered = [b for b in ordered if b["id"] < query["after"]]
        page = ordered[:int(query.get("limit", 20))]
        return 200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                     "last_id": page[-1]["id"] if page else None,
                     "has_more": len(ordered) > len(page)}

    # --- the state machine -------------------------------------------------------------------
    def requests_of(self, batch: dict) -> list[dict]:
        return [json.loads(line) for line in self.content[batch["input_file_id"]].splitlines()
                if line.strip()]

    def advance(self, batch: dict) -> dict:
        status = batch["status"]
        if status == "cancelling":
            self.finish(batch, "cancelled", keep=len(self.requests_of(batch)) // 2)
        elif status == "validating":
            problem = self.validate(batch)
            if problem:
                batch.update(status="failed", failed_at=int(time.time()),
                             errors={"object": "list", "data": [problem]})
            else:
                batch.update(status="in_progress", in_progress_at=int(time.time()))
                batch["request_counts"]["total"] = len(self.requests_of(batch))
        elif status == "in_progress" and not self.hold:
            batch.update(status="finalizing", finalizing_at=int(time.time()))
        elif status == "finalizing":
            lines = len(self.requests_of(batch))
            expired = self.expire_after is not None and self.expire_after < lines
            self.finish(batch, "expired" if expired else "completed",
                        keep=self.expire_after if expired else lines)
        return batch

    def validate(self, batch: dict) -> dict | None:
        data = self.content[batch["input_file_id"]]
        lines = self.requests_of(batch)
        inputs = sum(len(r["body"]["input"]) for r in lines)
        tokens = sum(self.count_tokens(t) for r in lines for t in r["body"]["input"])
        enqueued = sum(b.get("_tokens", 0) for b in self.batches.values()
                       if b["status"] in ("in_progress", "finalizing"))
        ids = [r.get("custom_id") for r in lines]
        batch["_tokens"] = tokens
        if len(lines) > self.max_requests or len(data) > self.max_bytes:
            return {"code": "too_many_requests", "message": "file over 50,000 requests or 200 MB"}
        if inputs > self.max_inputs:
            return {"code": "too_many_inputs", "message": f"{inputs} embedding inputs, max "
                                                          f"{self.max_inputs} per batch"}
        if len(set(ids)) != len(ids) or any(r.get("url") != "/v1/embeddings" for r in lines):
            return {"code": "invalid_request", "message": "duplicate custom_id or wrong url"}
        if enqueued + tokens > self.enqueued_token_limit:
            return {"code": "token_limit_exceeded", "message": f"Enqueued token limit reached "
                    f"for the model: limit {self.enqueued_token_limit}, enqueued {enqueued}"}
        return None

    def finish(self, batch: dict, status: str, keep: int) -> None:
        """Output (in reverse order: the API promises none) and error files, the counts."""
        out, errors = [], []
        for n, request in enumerate(self.requests_of(batch)):
            cid = request["custom_id"]
            if n >= keep:
                errors.append({"id": f"batch_req_{n}", "custom_id": cid, "response": None,
                               "error": {"code": f"batch_{status}", "message": f"This request "
                                         f"could not be executed before the batch was {status}."}})
            elif n in self.fail_lines:
                errors.append({"id": f"batch_req_{n}", "custom_id": cid, "error": None,
                               "response": {"status_code": 400, "request_id": f"req_{n}", "body": {
                                   "error": {"message": "forbidden content", "type":
                                             "invalid_request_error", "param": None,
                                             "code": None}}}})
            else:
                out.append(self.answered(n, cid, request["body"]))
        if self.foreign_line:
            out.append(self.answered(len(out), "not-ours", {"input": ["x"], "model": "m"}))
        now = int(time.time())
        batch.update({"status": status, f"{status}_at": now, "request_counts": {
            "total": len(out) + len(errors), "completed": len(out), "failed": len(errors)}})
        for name, lines in (("output_file_id", out), ("error_file_id", errors)):
            if lines:
                file_id = self._id("file")
                self.content[file_id] = "".join(json.dumps(x) + "\n" for x in reversed(lines)).encode()
                batch[name] = file_id

    def answered(self, n: int, custom_id: str, body: dict) -> dict:
        texts = body["input"]
        tokens = sum(self.count_tokens(t) for t in texts)
        data = [{"object": "embedding", "index": i, "embedding": self.vector(t).tolist()}
                for i, t in enumerate(texts)]
        return {"id": f"batch_req_{n}", "custom_id": custom_id, "error": None, "response": {
            "status_code": 200, "request_id": f"req_{n}", "body": {
                "object": "list", "data": data, "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}}}

    def stats(self) -> dict:
        """Requests per route, and the batches by status."""
        with self.lock:
            statuses = Counter(b["status"] for b in self.batches.values())
            return {"counts": dict(self.counts), "statuses": dict(statuses),
                    "batches": len(self.batches)}

    def creates(self) -> int:
        return self.counts["POST /v1/batches"]

    def requests(self) -> int:
        return sum(self.counts.values())
