"""Duplicate ids across the blocks of a distributed run: the last one in input order wins.

The local engine sees the whole input and keeps the last row of a repeated id before
anything is sent. Ray workers see one block each, so every row carries its input position
and the claims table keeps, per run and id, the latest position seen. A block claims its
rows before it embeds (losers are dropped early) and claims again inside its write
transaction (holding the claims' row locks until the commit): an earlier duplicate can
never overwrite a later one, whatever the order the blocks finish in, retries included.
"""
from __future__ import annotations

from typing import Sequence

from .db_guard import create_racing, guarded

CLAIMS_TABLE = "embed_helpers_claims"


@guarded("creating the claims table")
def create_claims_table(conn) -> None:
    """Which input position of each id is the latest, per distributed run: duplicate ids
    spread over blocks on several workers still resolve to the last one in input order."""
    create_racing(conn, f"CREATE TABLE IF NOT EXISTS {CLAIMS_TABLE} (run text NOT NULL, "
                        f"id text NOT NULL, seq bigint NOT NULL, "
                        f"claimed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run, id))")


def claim_in_transaction(cur, run: str, ids: Sequence[str], seqs: Sequence[int]) -> set[str]:
    """Record (run, id, position) keeping the latest position; the ids whose position is
    the latest. Ids in sorted order, so concurrent claimers lock rows in one order."""
    cur.execute(f"INSERT INTO {CLAIMS_TABLE} (run, id, seq) SELECT %s, i, s "
                f"FROM unnest(%s::text[], %s::bigint[]) AS u(i, s) ORDER BY i "
                f"ON CONFLICT (run, id) DO UPDATE SET seq = GREATEST({CLAIMS_TABLE}.seq, "
                f"EXCLUDED.seq) RETURNING id, seq", (run, list(ids), [int(s) for s in seqs]))
    mine = dict(zip(ids, seqs))
    return {row_id for row_id, seq in cur.fetchall() if seq == mine[row_id]}


def keep_latest(cur, claim: tuple[str, dict], ids, texts, vectors, chunks):
    """Inside a write transaction: the rows (ids, texts, vectors, chunks) whose position is
    still the latest claimed for their id; the claims stay locked until the commit."""
    run, positions = claim
    latest = claim_in_transaction(cur, run, ids, [positions[i] for i in ids])
    if len(latest) == len(ids):
        return ids, texts, vectors, chunks
    keep = [k for k, i in enumerate(ids) if i in latest]
    return ([ids[k] for k in keep], [texts[k] for k in keep], vectors[keep],
            [c for c in chunks if c[0] in latest])


@guarded("claiming rows")
def claim_rows(conn, run: str, ids: Sequence[str], seqs: Sequence[int]) -> set[str]:
    """Claim the rows of a block (its own transaction); the ids whose input position is
    the latest seen so far. Losers are duplicates a later block already holds."""
    if not len(ids):
        return set()
    with conn.cursor() as cur:
        latest = claim_in_transaction(cur, run, ids, seqs)
    conn.commit()
    return latest


@guarded("cleaning up the claims of a run")
def release_claims(conn, run: str, older_than_days: int = 7) -> None:
    """Forget a finished run's claims, and those of runs that died long ago."""
    with conn.cursor() as cur:
        cur.execute(f"DELETE FROM {CLAIMS_TABLE} WHERE run = %s OR claimed_at < now() - "
                    f"make_interval(days => %s)", (run, older_than_days))
    conn.commit()


@guarded("counting the rows of a run")
def claimed(conn, run: str) -> int:
    """Distinct ids this run has seen (with a text): the rows read less empty texts,
    invalid texts and duplicate ids, whichever blocks the duplicates were in."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {CLAIMS_TABLE} WHERE run = %s", (run,))
        count = cur.fetchone()[0]
    conn.rollback()
    return count
