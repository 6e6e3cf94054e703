"""The cache file's format: keys, line encoding, fast checks, scanning, locking.

One JSON object per line, fields in this order (the loader relies on the order to skip a
full JSON parse; lines in any other layout still load, through `json.loads`):

    {"key", "model", "route", "dim", "normalized", "text_sha256", "variant_sha256",
     "ts", "vector"}     # vector: base64 of little-endian float32
"""
from __future__ import annotations

import binascii
import hashlib
import json
import unicodedata

import numpy as np

_PREFIX = b'{"key":"'
_DIM = b',"dim":'
_VECTOR = b'"vector":"'
_HEX = frozenset("0123456789abcdef")


def text_sha256(text: str) -> str:
    """sha256 hex of the exact text: finds it cached under other settings."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def variant_text(text: str) -> str:
    """The text up to Unicode compatibility form, case and whitespace.

    >>> variant_text("  Café\\u00a0 ＡＢＣ\\n")
    'café abc'
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def variant_sha256(text: str) -> str:
    """sha256 hex of `variant_text`: finds near misses (case, spaces, Unicode form)."""
    return text_sha256(variant_text(text))


def encode_line(key: str, vector: np.ndarray, *, route: str, model: str, normalized: bool,
                ts: str, text: str | None = None, hashes: tuple[str, str] | None = None) -> bytes:
    """One cache line (with its newline) in the layout the fast loader expects. The text's
    hashes come from `text`, or as given (`hashes`: text_sha256, variant_sha256)."""
    vec = np.ascontiguousarray(vector, dtype="<f4")
    exact, variant = hashes if hashes else (text_sha256(text), variant_sha256(text))
    return b'{"key":"%s","model":%s,"route":%s,"dim":%d,"normalized":%s,"text_sha256":"%s",' \
           b'"variant_sha256":"%s","ts":"%s","vector":"%s"}\n' % (
               key.encode(), json.dumps(model).encode(), json.dumps(route).encode(), vec.size,
               b"true" if normalized else b"false", exact.encode(), variant.encode(), ts.encode(),
               binascii.b2a_base64(vec.tobytes(), newline=False))


def _b64len(dim: int) -> int:
    return 4 * ((4 * dim + 2) // 3)


def locate(buf: bytes, p: int, nl: int) -> tuple[int, int, int, int] | None:
    """(dim, start of the base64, start of `,"dim":`, the comma after the dim) if buf[p:nl]
    has our layout and consistent lengths.

    A torn line, a line cut and continued by another, or a vector whose length does not
    match its `dim` all fail here. `,"dim":` cannot occur inside a JSON string (its quotes
    would be escaped), so the first match is the field.
    """
    if nl - p < 100 or not buf.startswith(_PREFIX, p) or buf[p + 72] != 0x22:
        return None
    d = buf.find(_DIM, p + 73, nl)
    if d < 0:
        return None
    c = buf.find(b",", d + 7, nl)
    try:
        dim = int(buf[d + 7:c])
    except ValueError:
        return None
    v = nl - 2 - _b64len(dim)
    if dim <= 0 or v - 10 <= c or not buf.startswith(_VECTOR, v - 10) \
            or not buf.startswith(b'"}', nl - 2):
        return None
    return dim, v, d, c


def parse_json(line: bytes) -> dict | None:
    """Slow path for lines in another layout: a dict with a valid key, dim and vector."""
    try:
        obj = json.loads(line)
        key, dim, vec = obj["key"], obj["dim"], obj["vector"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(key, str) and len(key) == 64 and set(key) <= _HEX and type(dim) is int \
            and dim > 0 and isinstance(vec, str) and len(vec) == _b64len(dim):
        return obj
    return None


def digest_at(buf: bytes, p: int, nl: int) -> bytes | None:
    """The 32-byte key digest of a well-formed line, else None."""
    if locate(buf, p, nl) is not None:
        try:
            return binascii.a2b_hex(buf[p + 8:p + 72])
        except binascii.Error:
            return None
    obj = parse_json(buf[p:nl])
    return bytes.fromhex(obj["key"]) if obj else None


def vector_at(buf: bytes, p: int, nl: int, key: bytes | None = None) -> np.ndarray | None:
    """Decode and fully check the vector of buf[p:nl] (its key must be `key` if given)."""
    loc = locate(buf, p, nl)
    if loc is not None:
        dim, v = loc[:2]
        line_key, b64 = buf[p + 8:p + 72], buf[v:nl - 2]
    else:
        obj = parse_json(buf[p:nl])
        if obj is None:
            return None
        line_key, dim, b64 = obj["key"].encode(), obj["dim"], obj["vector"].encode()
    if key is not None and line_key != key:
        return None
    try:
        raw = binascii.a2b_base64(b64, strict_mode=True)
    except binascii.Error:
        return None
    if len(raw) != 4 * dim:
        return None
    vec = np.frombuffer(raw, dtype="<f4").copy()
    return vec if np.isfinite(vec).all() else None


def meta_at(buf: bytes, p: int, nl: int) -> dict | None:
    """Every field but the vector, for a line whose layout and lengths are valid."""
    loc = locate(buf, p, nl)
    if loc is None:
        obj = parse_json(buf[p:nl])
        if obj is not None:
            obj.pop("vector")
        return obj
    try:  # the header up to `,"vector":` is itself a JSON object once closed
        return json.loads(buf[p:loc[1] - 11] + b"}")
    except ValueError:
        return None


_UNHEX = np.full(256, 255, dtype=np.uint8)
_UNHEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def _bytes_at(arr: np.ndarray, starts: np.ndarray, pattern: bytes) -> np.ndarray:
    """Which of arr[s:s+len(pattern)], for s in starts, equal pattern."""
    want = np.frombuffer(pattern, np.uint8)
    return (arr[starts[:, None] + np.arange(len(want))] == want).all(axis=1)


def index_chunk(buf: bytes, stop: int) -> tuple[list[bytes], list[int], list[int], int, set]:
    """Index the lines of buf[:stop]: (key digests, their offsets, bad line offsets, longest,
    the (route, model, dim, normalized) settings seen).

    Vectorised over lines of one length (lines of one model, route and dimension have
    one length): the checks of `locate` are made once on the first line of each length,
    then as byte comparisons at the same places on all of them. Lines that fail go
    through `digest_at` one by one. Offsets are relative to buf.
    """
    ends, p, find = [], 0, buf.find
    while (nl := find(b"\n", p, stop)) >= 0:
        ends.append(nl)
        p = nl + 1
    if not ends:
        return [], [], [], 0, set()
    nls = np.array(ends, dtype=np.int64)
    starts = np.concatenate(([0], nls[:-1] + 1))
    lengths = nls - starts
    fast, digests, settings = _index_by_length(buf, starts, lengths)
    raw = digests[fast].tobytes()
    keys = [raw[i:i + 32] for i in range(0, len(raw), 32)]
    offsets = starts[fast].tolist()
    bad, slow = [], []
    for i in np.flatnonzero(~fast).tolist():  # other layouts, and bad lines
        key = digest_at(buf, int(starts[i]), int(nls[i]))
        if key is None:
            bad.append(int(starts[i]))
        else:
            slow.append((int(starts[i]), key))
            settings.add(_settings_of(meta_at(buf, int(starts[i]), int(nls[i]))))
    if slow:  # keep file order: the last line of a key wins
        pairs = sorted(list(zip(offsets, keys)) + slow)
        offsets, keys = [o for o, _ in pairs], [k for _, k in pairs]
    settings.discard(None)
    return keys, offsets, bad, int(lengths.max()) + 1, settings


def _index_by_length(buf: bytes, starts: np.ndarray, lengths: np.ndarray):
    """(lines that pass the fast checks, their key digests, settings seen) for every group
    of lines of one length."""
    arr = np.frombuffer(buf, np.uint8)
    fast = np.zeros(len(starts), dtype=bool)
    digests = np.zeros((len(starts), 32), dtype=np.uint8)
    settings: set = set()
    for length in np.unique(lengths[lengths >= 100]):
        first = int(starts[np.argmax(lengths == length)])
        loc = locate(buf, first, first + int(length))
        if loc is None:
            continue
        _dim, v, d, c = loc
        rows = np.flatnonzero(lengths == length)
        s = starts[rows]
        ok = _bytes_at(arr, s, _PREFIX) & (arr[s + 72] == 0x22) \
            & _bytes_at(arr, s + (d - first), buf[d:c + 1]) \
            & _bytes_at(arr, s + (v - 10 - first), _VECTOR) & _bytes_at(arr, s + length - 2, b'"}')
        nibbles = _UNHEX[arr[s[:, None] + np.arange(8, 72)]]
        ok &= (nibbles != 255).all(axis=1)
        digests[rows] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        fast[rows] = ok
        # Settings: the header between the key and the text hash is the same on every line
        # of one model, route, dim and normalisation; the odd lines out are read one by one.
        head = buf[first + 72:buf.find(b',"text_sha256"', c, v)]
        odd = ok & ~_bytes_at(arr, s + 72, head)
        for start in [first] + s[odd].tolist():
            settings.add(_settings_of(meta_at(buf, start, start + int(length))))
    return fast, digests, settings


def _settings_of(meta: dict | None) -> tuple | None:
    if not meta:
        return None
    return meta.get("route"), meta.get("model"), meta.get("dim"), meta.get("normalized")


def digest(key: str) -> bytes | None:
    """The 32 bytes of a sha256 hex key, or None if `key` is not one."""
    try:
        raw = bytes.fromhex(key)
    except (ValueError, TypeError):
        return None
    return raw if len(raw) == 32 else None
