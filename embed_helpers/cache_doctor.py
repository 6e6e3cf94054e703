"""Explain cache misses (`cache doctor`) and summarise a cache file (`cache stats`).

The cache keys the exact text under the exact settings, on purpose. When it misses, the
doctor says why, per text, using the hashes stored beside each vector: the same text
under another model, route or dimension (`text_sha256`), a text that differs only in
case, whitespace or Unicode form (`variant_sha256`), or a cache file that is missing,
empty, or not the one the texts were written to.
"""
from __future__ import annotations

import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .cache_format import cache_key, digest, scan_records, text_sha256, variant_sha256
from .config import _path
from .constants import PROJECT_ROOT, PREVIEW_CHARS

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
    ELSEWHERE: "the text is in another cache file: EMBED_CACHE_PATH points elsewhere than "
               "in the run that wrote it (relative paths are taken from the project root).",
    CACHE_MISSING: "the cache file does not exist: a first run, another EMBED_CACHE_PATH, "
                   "or the file was deleted.",
    CACHE_EMPTY: "the cache file holds no valid entry.",
    NOT_CACHED: "never embedded under any settings in this cache: a genuine miss.",
}
#: Texts the doctor checks at most, evenly spread over the ones it is given.
DOCTOR_SAMPLE = 20
#: Folders never searched for other cache files.
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".pgdata",
             ".ipynb_checkpoints", ".pytest_cache", ".tox", "site-packages"}
_MAX_DEPTH, _MAX_OTHERS = 4, 20
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
    path: Path
    wanted: dict
    file_state: str                      # "ok", "missing" or "empty"
    entries: int
    bad_lines: int
    other_caches: dict[Path, int] = field(default_factory=dict)   # path -> lines
    verdicts: list[Verdict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(v.kind for v in self.verdicts))

    def report(self, limit: int = 10) -> str:
        w = self.wanted
        state = {"missing": "MISSING", "empty": "EMPTY (no valid entry)"}.get(
            self.file_state, f"{self.entries} entries, {self.bad_lines} bad lines")
        lines = [f"cache file: {self.path} ({state})",
                 f"looking for: route={w['route']!r} model={w['model']!r} dim={w['dim']} "
                 f"normalized={w['normalized']}"]
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


def diagnose(texts: str | Sequence[str], *, route: str, model: str, dim: int | None,
             normalized: bool, path: Path | str, sample: int = DOCTOR_SAMPLE,
             search_roots: Iterable[Path] | None = None) -> Diagnosis:
    """Say, per text, why a lookup under these settings hits or misses.

    Args:
        texts: one text, or the missed texts (a sample of `sample` is checked).
        route, model, dim, normalized: the settings of the lookup (`backend.route`,
            `backend.model`, the dimension, `backend.normalized`); dim None = any.
        path: the cache file (relative = from the project root).
        search_roots: where to look for other cache files; default the project root
            and the current directory.
    """
    path = _path(path)
    chosen = _sample([texts] if isinstance(texts, str) else list(texts), sample)
    wanted = {"route": route, "model": model, "dim": dim, "normalized": normalized}
    edits = {t: {name: text_sha256(edit(t)) for name, edit in _EDITS.items()} for t in chosen}
    exact = {text_sha256(t) for t in chosen} | {h for e in edits.values() for h in e.values()}
    variants = {variant_sha256(t) for t in chosen}
    found = _search(path, exact, variants) if path.is_file() else None
    entries, bad = (found["entries"], found["bad"]) if found else (0, 0)
    state = "missing" if found is None else "empty" if entries == 0 else "ok"
    diagnosis = Diagnosis(path, wanted, state, entries, bad)
    pending = []
    for text in chosen:
        verdict = _judge(text, wanted, found, edits[text]) if state == "ok" else None
        diagnosis.verdicts.append(verdict)
        if verdict is None or verdict.kind == NOT_CACHED:
            pending.append(text)
    others = {}
    if pending:
        roots = list(search_roots) if search_roots is not None else [PROJECT_ROOT, Path.cwd()]
        hashes = {text_sha256(t) for t in pending}
        for other in find_caches(roots, exclude=path):
            others[other] = _search(other, hashes, set())
            diagnosis.other_caches[other] = others[other]["lines"]
    for i, text in enumerate(chosen):
        verdict = diagnosis.verdicts[i]
        if verdict is not None and verdict.kind != NOT_CACHED:
            continue
        where = [f"{p} ({_describe(s, wanted)})" for p, o in others.items()
                 for s in o["exact"].get(text_sha256(text), [])[:1]]
        if where:
            verdict = Verdict(_preview(text), ELSEWHERE, "cached in " + "; ".join(where))
        elif verdict is None:
            kind = CACHE_MISSING if state == "missing" else CACHE_EMPTY
            verdict = Verdict(_preview(text), kind, f"{path} is {state}")
        diagnosis.verdicts[i] = verdict
    return diagnosis


def _judge(text: str, wanted: dict, found: dict, edits: dict[str, str]) -> Verdict:
    key = cache_key(wanted["route"], wanted["model"], wanted["dim"], wanted["normalized"],
                    text) if wanted["dim"] else None
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


def _matches(record: dict, wanted: dict, key: str | None) -> bool:
    if key is not None:
        return record["key"] == key
    return all(record[f] == wanted[f] for f in ("route", "model", "normalized"))


def _describe(record: dict, wanted: dict) -> str:
    """The settings of a cached entry, with what differs from the lookup's marked."""
    parts = []
    for name in ("model", "route", "dim", "normalized"):
        value = record.get(name)
        differs = wanted[name] is not None and value != wanted[name]
        parts.append(f"{name} {value!r}" + (f" (you: {wanted[name]!r})" if differs else ""))
    return ", ".join(parts)


def _search(path: Path, exact: set[str], variants: set[str]) -> dict:
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


def find_caches(roots: Iterable[Path], exclude: Path | None = None) -> list[Path]:
    """Cache files (`*.jsonl` whose first line is a cache entry) under `roots`."""
    seen, result = set(), []
    for root in roots:
        root = Path(root).resolve()
        for folder, dirs, files in os.walk(root):
            depth = len(Path(folder).relative_to(root).parts)
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and depth < _MAX_DEPTH)
            for name in sorted(files):
                candidate = Path(folder, name).resolve()
                if name.endswith(".jsonl") and candidate != exclude \
                        and candidate not in seen and _looks_like_cache(candidate):
                    seen.add(candidate)
                    result.append(candidate)
                    if len(result) >= _MAX_OTHERS:
                        return result
    return result


def _looks_like_cache(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return head.startswith(b'{"key":"') or (b'"key"' in head and b'"dim"' in head)


def _sample(texts: list[str], n: int) -> list[str]:
    unique = list(dict.fromkeys(texts))
    if len(unique) <= n:
        return unique
    return [unique[i * len(unique) // n] for i in range(n)]


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"


def cache_stats(path: Path | str) -> dict:
    """Size, entries, duplicates, bad lines and entries per settings of a cache file."""
    path = _path(path)
    stats = {"path": str(path), "exists": path.is_file(), "bytes": 0, "lines": 0,
             "entries": 0, "duplicates": 0, "bad_lines": 0, "by_settings": [],
             "oldest": None, "newest": None}
    if not stats["exists"]:
        return stats
    stats["bytes"] = path.stat().st_size
    keys, groups = set(), Counter()
    for _offset, meta in scan_records(path):
        stats["lines"] += 1
        if meta is None:
            stats["bad_lines"] += 1
            continue
        key = digest(meta["key"])
        if key in keys:
            stats["duplicates"] += 1
            continue
        keys.add(key)
        groups[(meta.get("route"), meta.get("model"), meta["dim"], meta.get("normalized"))] += 1
        ts = meta.get("ts")
        if isinstance(ts, str):  # ISO 8601 UTC: string order is time order
            stats["oldest"] = min(stats["oldest"] or ts, ts)
            stats["newest"] = max(stats["newest"] or ts, ts)
    stats["entries"] = len(keys)
    stats["by_settings"] = [{"route": r, "model": m, "dim": d, "normalized": n, "entries": c}
                            for (r, m, d, n), c in groups.most_common()]
    return stats


def format_stats(stats: dict) -> str:
    """A printable summary of `cache_stats`."""
    if not stats["exists"]:
        return f"cache file: {stats['path']} (missing)"
    lines = [f"cache file: {stats['path']} ({stats['bytes'] / 1e6:.1f} MB)",
             f"entries: {stats['entries']}  duplicates: {stats['duplicates']}  "
             f"bad lines: {stats['bad_lines']}  written: {stats['oldest']} .. {stats['newest']}"]
    for g in stats["by_settings"]:
        lines.append(f"  {g['entries']:>9}  route={g['route']!r} model={g['model']!r} "
                     f"dim={g['dim']} normalized={g['normalized']}")
    return "\n".join(lines)


def wanted_from_settings(settings) -> dict:
    """The lookup settings a run with `settings` would use, without starting a backend.

    Ollama's route is the current one; an old server falls back to the legacy
    `ollama:/api/embeddings` (not normalised), which the report then shows as a difference.
    """
    route = {"ollama": "ollama:/api/embed"}.get(settings.EMBEDDING_BACKEND,
                                                 settings.EMBEDDING_BACKEND)
    return {"route": route, "model": settings.model, "dim": settings.EMBEDDING_DIM,
            "normalized": True}


def doctor_report(settings, texts: Sequence[str] | None = None, path: Path | str | None = None,
                  search_roots: Iterable[Path] | None = None) -> str:
    """`cache doctor`: the file, its entries per settings against yours, and, given texts,
    a verdict per text (`diagnose`)."""
    path = _path(path or settings.EMBED_CACHE_PATH)
    wanted = wanted_from_settings(settings)
    stats = cache_stats(path)
    lines = format_stats(stats).splitlines()
    if texts:  # the diagnosis names the file itself; keep the entries per settings
        diagnosis = diagnose(texts, path=path, search_roots=search_roots, **wanted)
        return "\n".join([diagnosis.report()] + lines[2:])
    lines.append(f"your settings: {', '.join(f'{k} {v!r}' for k, v in wanted.items())}")
    mine = sum(g["entries"] for g in stats["by_settings"]
               if all(g[k] == v for k, v in wanted.items() if v is not None))
    if stats["entries"]:
        lines.append(f"{mine} of {stats['entries']} entries were made with your settings"
                     + ("" if mine else ": " + ADVICE[OTHER_SETTINGS]))
    else:
        lines.append(ADVICE[CACHE_MISSING if not stats["exists"] else CACHE_EMPTY])
    roots = list(search_roots) if search_roots is not None else [PROJECT_ROOT, Path.cwd()]
    for other in find_caches(roots, exclude=path):
        lines.append(f"other cache file: {other} ({other.stat().st_size / 1e6:.1f} MB): "
                     f"set EMBED_CACHE_PATH to use it")
    lines.append("Give texts (--text) to explain why they miss.")
    return "\n".join(lines)
