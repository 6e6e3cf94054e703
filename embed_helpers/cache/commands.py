"""`python -m embed_helpers cache stats | doctor | compact | export | import | setup-sql`."""
from __future__ import annotations

from ..errors import ConfigError

#: `cache` actions and what each does (its own --help).
CACHE_ACTIONS = {
    "stats": "entries, size and settings of the cache",
    "doctor": "why texts miss the cache: the model, dimension or settings that differ",
    "compact": "rewrite the JSONL cache without duplicate keys and torn lines",
    "export": "write the cache's entries to a JSONL file (--to FILE.jsonl)",
    "import": "add the entries of a JSONL file to the configured cache",
    "setup-sql": "print the SQL an administrator runs to create the shared cache tables and "
                 "grant them to a role that has no CREATE on the schema",
}


def add_parser(sub) -> None:
    """Register `cache` and its actions on the CLI's subparsers."""
    p = sub.add_parser("cache", help="inspect, repair or move the embedding cache")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in CACHE_ACTIONS.items():
        a = actions.add_parser(action, help=text, description=text)
        a.set_defaults(func=cmd_cache)
        a.add_argument("--path", help="a JSONL cache file instead of the configured store")
        if action == "import":
            a.add_argument("file", help="the JSONL file to read (a `cache export`)")
        elif action == "export":
            a.add_argument("--to", dest="file", required=True, metavar="FILE.jsonl",
                           help="the JSONL file to write")
        elif action == "doctor":
            a.add_argument("--text", action="append",
                           help="explain why this text misses (repeatable)")
        elif action == "setup-sql":
            a.add_argument("--role", default="embed_user",
                           help="the role that runs ingestions (default embed_user)")


def cmd_cache(args) -> int:
    from ..config import load_settings, replace_settings
    from . import tools as cache_tools
    from .jsonl import EmbeddingCache

    if args.action == "setup-sql":  # needs no settings and no database
        from .postgres import setup_sql
        try:
            print(setup_sql(args.role), end="")
        except ValueError as exc:
            raise ConfigError("--role", str(exc)) from None
        return 0
    settings = load_settings()
    if args.path:
        settings = replace_settings(settings, EMBED_CACHE_PATH=args.path,
                                    EMBED_CACHE_BACKEND="jsonl")
    if args.action == "compact":
        if settings.EMBED_CACHE_BACKEND != "jsonl":
            print("compact: the postgres store needs none (one row per key, nothing torn)")
            return 0
        for key, value in cache_tools.compact(settings.EMBED_CACHE_PATH).items():
            print(f"{key}: {value}")
        return 0
    if args.action == "stats" and settings.EMBED_CACHE_BACKEND == "jsonl":
        print(cache_tools.format_stats(cache_tools.cache_stats(settings.EMBED_CACHE_PATH)))
        return 0
    store = cache_tools.open_cache(settings) if settings.EMBED_CACHE_BACKEND != "jsonl" \
        else EmbeddingCache(settings.EMBED_CACHE_PATH, read_only=True)
    if args.action == "stats":
        print(cache_tools.format_stats(cache_tools.summary(store)))
    elif args.action == "export":
        print(f"exported {cache_tools.export_entries(store, args.file)} entries from "
              f"{store.describe()} to {args.file}")
    elif args.action == "import":
        store = cache_tools.open_cache(settings)
        print(f"imported {cache_tools.import_entries(args.file, store)} new entries from "
              f"{args.file} into {store.describe()}")
    else:
        from ..backends import get_backend
        from .doctor import doctor_report
        with get_backend(settings) as backend:
            print(doctor_report(store, backend.identity(settings.EMBEDDING_DIM),
                                texts=getattr(args, "text", None) or None,
                                also=cache_tools.visible_stores(settings, store)))
    return 0
