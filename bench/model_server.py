"""A silently truncating embedding server on 127.0.0.1, as infinity serves a small model.

`POST /v1/embeddings` embeds with a backend of this process (the bundled all-MiniLM-L6-v2:
sentence-transformers reads 256 word pieces of each input and drops the rest without a word,
as infinity and TEI do); `GET /v1/models` lists the model and no length. Nothing tells a
client the window: `windows.settle` has to measure it.
"""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


class ModelServer:
    """Context manager: `url` is the OpenAI-compatible base URL (ending in /v1)."""

    def __init__(self, backend):
        self.backend, self.lock = backend, threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.model = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "ModelServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, body: dict) -> dict:
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self.lock:  # one model, one request at a time
            vectors = np.asarray(self.backend.embed_batch(texts), dtype="<f4")
        b64 = body.get("encoding_format") == "base64"
        return {"object": "list", "model": MODEL_ID, "data": [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.tobytes()).decode() if b64 else v.tolist()}
            for i, v in enumerate(vectors)], "usage": {"prompt_tokens": 0, "total_tokens": 0}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            return self._reply(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "owned_by": "infinity"}]})
        self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/embeddings":
            return self._reply(404, {"error": "not found"})
        self._reply(200, self.server.model.answer(json.loads(raw)))
