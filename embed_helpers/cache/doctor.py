"""Explain cache misses (`cache doctor`), for either cache store.

The cache keys the exact text under the exact settings, on purpose. When it misses, the
doctor says why, per text, using the hashes stored beside each vector: the same text
under another model, route or dimension (`text_sha256`), a text that differs only in
case, whitespace or Unicode form (`variant_sha256`), or a cache that is missing, empty,
or not the one the texts were written to.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..config import relative
from ..constants import DOCTOR_SAMPLE, PREVIEW_CHARS, PROJECT_ROOT
from ..identity import Identity
from .file_io import find_caches, scan_records
from .format import digest, text_sha256, variant_sha256

HIT = "hit"
OTHER_SETTINGS = "other_settings"
VARIANT = "variant"
ELSEWHERE = "elsewhere"
CACHE_MISSING = "cache_missing"
CACHE_EMPTY = "cache_empty"
NOT_CACHED = "not_cached"

ADVICE = {
    HIT: "cached under these exact settings: a lookup with them hits.",
    OTHER_SETTINGS: "the same text is cached under another model, route, dimension or "
                    "normalisation. Vectors of different settings are not interchangeable: "
                    "switch back (OLLAMA_EMBED_MODEL / OPENAI_EMBED_MODEL / LOCAL_EMBED_MODEL, "
                    "EMBEDDING_BACKEND, EMBEDDING_DIM) to reuse them, or let these texts be "
                    "embedded again.",
    VARIANT: "a text that differs only in case, whitespace or Unicode form is cached: the "
             "texts are built differently than in the run that filled the cache (check "
             "the cleaning and context steps, or the input file).",
    ELSEWHERE: "the text is in another store: a cache file (point EMBED_CACHE_PATH at it; "
               "relative paths are from the project root, or `cache import FILE` it into the "
               "table: the Ray engine does so with EMBED_CACHE_PATH), or the other of the "
               "JSONL file and the PostgreSQL table.",
    CACHE_MISSING: "the cache file does not exist: a first run, another EMBED_CACHE_PATH, "
                   "or the file was deleted.",
    CACHE_EMPTY: "the cache file holds no valid entry.",
    NOT_CACHED: "never embedded under any settings in this cache: a genuine miss.",
}
# Edits a notebook or a cleaning step may have applied: named for the report.
_EDITS = {
    "surrounding whitespace stripped": str.strip,
    "repeated whitespace collapsed": lambda t: " ".join(t.split()),
    "lowercased": str.lower,
    "case-folded": str.casefold,
    "in Unicode NFC form": lambda t: unicodedata.normalize("NFC", t),
    "in Unicode NFKC form": lambda t: unicodedata.normalize("NFKC", t),
}


@dataclass(frozen=True)
class Verdict:
    text: str      # a preview of the text
    kind: str      # one of the constants above
    detail: str


@dataclass
class Diagnosis:
    path: str                            # the store, as `describe()` says it
    wanted: Identity
    file_state: str                      # "ok", "missing" or "empty"
    entries: int
    bad_lines: int
    other_caches: dict[str, int] = field(default_factory=dict)    # path -> lines
    verdicts: list[Verdict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(v.kind for v in self.verdicts))

    def report(self, limit: int = 10) -> str:
        w = self.wanted
        state = {"missing": "MISSING", "empty": "EMPTY (no valid entry)"}.get(
            self.file_state, f"{self.entries} entries, {self.bad_lines} bad lines")
        lines = [f"cache: {self.path} ({state})", f"looking for: {w.describe()}"]
        for other, n in self.other_caches.items():
            lines.append(f"other cache file: {other} ({n} lines)")
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts().items()))
        lines.append(f"{len(self.verdicts)} texts checked: {counts or 'none'}")
        for v in self.verdicts[:limit]:
            lines.append(f"  [{v.kind}] {v.text!r}: {v.detail}")
        if len(self.verdicts) > limit:
            lines.append(f"  ... and {len(self.verdicts) - limit} more")
        lines.append("What it means:")
        lines += [f"  {kind}: {ADVICE[kind]}" for kind in ADVICE if kind in self.counts()]
        return "\n".join(lines)

    __str__ = report


def diagnose(texts: str | Sequence[str], *, identity: Identity, store,
             sample: int = DOCTOR_SAMPLE, search_roots: Iterable[Path] | None = None,
             also: Sequence = ()) -> Diagnosis:
    """Say, per text, why a lookup under `identity` hits or misses in `store`.

    Args:
        texts: one text, or the missed texts (a sample of `sample` is checked).
        identity: the lookup's settings (`backend.identity(dim)`); dim None = any.
        store: an `EmbeddingCache` or a `PostgresCache`.
        search_roots: where to look for other JSONL cache files; default the project root
            and the current directory.
        also: the other stores the run can see (`tools.visible_stores`), searched
            for the texts `store` lacks.
    """
    chosen = _sample([texts] if isinstance(texts, str) else list(texts), sample)
    edits = {t: {name: text_sha256(edit(t)) for name, edit in _EDITS.items()} for t in chosen}
    exact = {text_sha256(t) for t in chosen} | {h for e in edits.values() for h in e.values()}
    variants = {variant_sha256(t) for t in chosen}
    found = _search(store, exact, variants)
    state = "missing" if found is None else "empty" if found["entries"] == 0 else "ok"
    entries, bad = (found["entries"], found["bad"]) if found else (0, 0)
    diagnosis = Diagnosis(store.describe(), identity, state, entries, bad)
    pending = []
    for text in chosen:
        verdict = _judge(text, identity, found, edits[text]) if state == "ok" else None
        diagnosis.verdicts.append(verdict)
        if verdict is None or verdict.kind == NOT_CACHED:
            pending.append(text)
    others = _elsewhere(store, pending, search_roots, also)
    diagnosis.other_caches.update((name, o["lines"]) for name, o in others.items()
                                  if o["lines"] is not None)
    for i, text in enumerate(chosen):
        verdict = diagnosis.verdicts[i]
        if verdict is not None and verdict.kind != NOT_CACHED:
            continue
        where = [f"{p} ({_describe(s, identity)})" for p, o in others.items()
                 for s in o["exact"].get(text_sha256(text), [])[:1]]
        if where:
            verdict = Verdict(_preview(text), ELSEWHERE, "cached in " + "; ".join(where))
        elif verdict is None:
            kind = CACHE_MISSING if state == "missing" else CACHE_EMPTY
            verdict = Verdict(_preview(text), kind, f"{store.describe()} is {state}")
        diagnosis.verdicts[i] = verdict
    return diagnosis


def _elsewhere(store, pending: list[str], search_roots, also: Sequence) -> dict[str, dict]:
    """Where else the pending texts are: the other stores, then the JSONL files under
    `search_roots`; name as printed -> what `_search` found there."""
    if not pending:
        return {}
    hashes, others = {text_sha256(t) for t in pending}, {}
    seen = {Path(p).resolve() for p in (getattr(s, "path", None) for s in [store, *also])
            if isinstance(p, Path)}
    for extra in also:
        found = _search(extra, hashes, set())
        if found is not None:
            path = getattr(extra, "path", None)
            others[relative(path) if isinstance(path, Path) else extra.describe()] = found
    roots = list(search_roots) if search_roots is not None else [PROJECT_ROOT, Path.cwd()]
    for other in find_caches(roots):
        if other not in seen:
            others[relative(other)] = _scan_file(other, hashes, set())
    return others


def _judge(text: str, wanted: Identity, found: dict, edits: dict[str, str]) -> Verdict:
    key = wanted.key(text) if wanted.dim else None
    same = found["exact"].get(text_sha256(text), [])
    if any(_matches(s, wanted, key) for s in same):
        return Verdict(_preview(text), HIT, "cached under these settings")
    if same:
        return Verdict(_preview(text), OTHER_SETTINGS, "cached with " + "; ".join(
            sorted({_describe(s, wanted) for s in same})))
    named = [name for name, h in edits.items() if h in found["exact"]]
    near = found["variant"].get(variant_sha256(text), [])
    if named or near:
        how = (f"the cache holds this text {' / '.join(named)}" if named else
               "a text equal to it up to case, whitespace and Unicode form is cached "
               "(the cache stores hashes, not texts, so it cannot show which)")
        under = {_describe(s, wanted) for h in edits.values() if h in found["exact"]
                 for s in found["exact"][h]} | {_describe(s, wanted) for s in near}
        return Verdict(_preview(text), VARIANT, f"{how}; {'; '.join(sorted(under))}")
    return Verdict(_preview(text), NOT_CACHED, "no entry for this text or a variant of it")


def _matches(record: dict, wanted: Identity, key: str | None) -> bool:
    if key is not None:
        return record["key"] == key
    return (record["route"], record["model"], record["normalized"]) == \
        (wanted.route, wanted.model, wanted.normalized)


def _describe(record: dict, wanted: Identity) -> str:
    """The settings of a cached entry, with what differs from the lookup's marked."""
    parts = []
    for name in ("model", "route", "dim", "normalized"):
        value, want = record.get(name), getattr(wanted, name)
        differs = want is not None and value != want
        parts.append(f"{name} {value!r}" + (f" (you: {want!r})" if differs else ""))
    return ", ".join(parts)


def _search(store, exact: set[str], variants: set[str]) -> dict | None:
    """The store's records whose hashes are asked for, and its counts; None: no store."""
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return _scan_file(path, exact, variants) if path.is_file() else None
    found = {"entries": len(store), "bad": 0, "lines": None, "exact": {}, "variant": {}}
    for record in store.find(exact, variants):
        if record["text_sha256"] in exact:
            found["exact"].setdefault(record["text_sha256"], []).append(record)
        if record["variant_sha256"] in variants:
            found["variant"].setdefault(record["variant_sha256"], []).append(record)
    return found


def _scan_file(path: Path, exact: set[str], variants: set[str]) -> dict:
    """One pass over a cache file: counts, and the records whose hashes are asked for."""
    found = {"entries": 0, "bad": 0, "lines": 0, "exact": {}, "variant": {}}
    keys = set()
    for _offset, meta in scan_records(path):
        found["lines"] += 1
        if meta is None:
            found["bad"] += 1
            continue
        keys.add(digest(meta["key"]))
        if meta.get("text_sha256") in exact:
            found["exact"].setdefault(meta["text_sha256"], []).append(meta)
        if meta.get("variant_sha256") in variants:
            found["variant"].setdefault(meta["variant_sha256"], []).append(meta)
    found["entries"] = len(keys)
    return found


def _sample(texts: list[str], n: int) -> list[str]:
    unique = list(dict.fromkeys(texts))
    if len(unique) <= n:
        return unique
    return [unique[i * len(unique) // n] for i in range(n)]


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"


def doctor_report(store, identity: Identity, texts: Sequence[str] | None = None,
                  search_roots: Iterable[Path] | None = None, also: Sequence = ()) -> str:
    """`cache doctor`: the store, its entries per settings against yours, and, given texts,
    a verdict per text (`diagnose`)."""
    from .tools import format_stats, summary
    stats = summary(store)
    lines = format_stats(stats).splitlines()
    if texts:  # the diagnosis names the store itself; keep the entries per settings
        diagnosis = diagnose(texts, identity=identity, store=store, search_roots=search_roots,
                             also=also)
        return "\n".join([diagnosis.report()] + lines[2:])
    lines.append(f"your settings: {identity.describe()}")
    mine = sum(g["entries"] for g in stats["by_settings"]
               if (g["route"], g["model"], g["normalized"]) ==
               (identity.route, identity.model, identity.normalized)
               and identity.dim in (None, g["dim"]))
    if stats["entries"]:
        lines.append(f"{mine} of {stats['entries']} entries were made with your settings"
                     + ("" if mine else ": " + ADVICE[OTHER_SETTINGS]))
    else:
        lines.append(ADVICE[CACHE_MISSING if not stats["exists"] else CACHE_EMPTY])
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        roots = list(search_roots) if search_roots is not None else [PROJECT_ROOT, Path.cwd()]
        for other in find_caches(roots, exclude=path.resolve()):
            lines.append(f"other cache file: {relative(other)} "
                         f"({other.stat().st_size / 1e6:.1f} MB): set EMBED_CACHE_PATH to use it")
    lines.append("Give texts (--text) to explain why they miss.")
    return "\n".join(lines)
