"""Leases of the shared cache: which run embeds a text right now, and whether it still lives.

A lease row's `owner` names its holder, `host pid token`, and its `until` is a heartbeat: the
holder renews the leases it took every CACHE_LEASE_HEARTBEAT_S while it waits for their
vectors, so a lease outlives its holder by CACHE_LEASE_S at most. A run on the same host
sees at once that the holder's process is gone (`pid_alive`) and takes its texts over; a run
on another host takes them when the heartbeat stops. A text whose vector never comes (its
request failed) is renewed up to `max_hold` seconds after it was leased, then let go.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from ..constants import CACHE_LEASE_HEARTBEAT_S, CACHE_LEASE_S
from ..db_guard import guarded
from ..pg_embedded import pid_alive

log = logging.getLogger(__name__)

HOST = socket.gethostname()
TABLE = "embedding_cache_leases"
# Texts a run is embedding right now: another run leaves them to it until the lease ends,
# or takes them at once when their holder is dead.
LEASE_SQL = f"""
INSERT INTO {TABLE} (key, owner, until)
SELECT k, %(o)s, now() + make_interval(secs => %(s)s) FROM unnest(%(k)s::bytea[]) AS u(k) ORDER BY k
ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, until = EXCLUDED.until
WHERE {TABLE}.until < now() OR {TABLE}.owner = EXCLUDED.owner OR {TABLE}.owner = ANY(%(dead)s)
RETURNING key
"""
HOLDERS_SQL = f"""
SELECT owner, count(*), extract(epoch FROM max(until) - now()) FROM {TABLE}
WHERE key = ANY(%(k)s::bytea[]) AND owner <> %(o)s AND until >= now() GROUP BY owner
"""
RENEW_SQL = f"""
UPDATE {TABLE} SET until = now() + make_interval(secs => %(s)s)
WHERE owner = %(o)s AND key = ANY(%(k)s::bytea[])
"""


def new_owner() -> str:
    """`host pid token`: who holds a lease, enough for another run to see it died."""
    return f"{HOST} {os.getpid()} {uuid.uuid4().hex}"


def holder(owner: str) -> tuple[str, int | None]:
    """(host, pid) of an owner; ("", None) for an owner of an older version (a bare token).

    >>> holder("box 4242 0f3a"), holder("0f3a9c")
    (('box', 4242), ('', None))
    """
    parts = owner.split(" ")
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return "", None


def is_dead(owner: str) -> bool:
    """True when the owner ran on this host and its process is gone."""
    host, pid = holder(owner)
    return host == HOST and pid is not None and not pid_alive(pid)


class Leases:
    """The leases one store takes: granting, taking over from dead runs, the heartbeat,
    and why the last call had to leave texts to another run (`wait_reason`)."""

    def __init__(self, conn, lock: threading.RLock, max_hold: float):
        self.conn, self.lock, self.max_hold = conn, lock, max_hold
        self.owner = new_owner()
        self.held: dict[bytes, float] = {}  # key -> when this run leased it (monotonic)
        self.wait_reason: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def take(self, keys: list[bytes]) -> set[bytes]:
        """The keys this run may embed now: free ones, its own, and a dead run's."""
        params = {"o": self.owner, "s": CACHE_LEASE_S, "k": keys, "dead": []}
        with self.lock:
            got = {bytes(r[0]) for r in _run(self.conn, LEASE_SQL, params, True)}
            held_by = _run(self.conn, HOLDERS_SQL, params, False) if len(got) < len(keys) else []
            dead = [owner for owner, _n, _left in held_by if is_dead(owner)]
            if dead:
                got |= {bytes(r[0]) for r in _run(self.conn, LEASE_SQL, dict(params, dead=dead),
                                                  True)}
                log.warning("cache: took over the texts of %s, which is no longer running",
                            ", ".join(_name(o) for o in dead))
            now = time.monotonic()
            self.held.update((k, now) for k in got)
        self._explain([h for h in held_by if h[0] not in dead])
        if got:
            self._start()
        return got

    def done(self, keys) -> None:
        """Their vectors are stored (which deleted the lease rows): stop renewing them."""
        with self.lock:
            for key in keys:
                self.held.pop(key, None)

    def renew(self) -> int:
        """One heartbeat: extend the leases held less than `max_hold`; returns how many."""
        now = time.monotonic()
        with self.lock:  # the heartbeat's thread and the run's share `held`
            for key in [k for k, at in self.held.items() if now - at > self.max_hold]:
                del self.held[key]  # its vector never came: let another run try it
            if not self.held:
                return 0
            return _run(self.conn, RENEW_SQL, {"o": self.owner, "s": CACHE_LEASE_S,
                                               "k": list(self.held)}, True, count=True)

    def close(self) -> None:
        self._stop.set()

    def _explain(self, alive: list[tuple]) -> None:
        reason = None
        if alive:
            texts = sum(n for _o, n, _left in alive)
            reason = (f"waiting for {texts} texts that {', '.join(_name(o) for o, _n, _l in alive)} "
                      f"is embedding now (alive: its lease ends in "
                      f"{max(left for _o, _n, left in alive):.0f} s unless it renews it)")
        if reason and reason != self.wait_reason:
            log.info("cache: %s", reason)
        self.wait_reason = reason

    def _start(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._loop, name="cache-lease-heartbeat",
                                          daemon=True)
            self._beat.start()

    def _loop(self) -> None:
        while not self._stop.wait(CACHE_LEASE_HEARTBEAT_S):
            try:
                self.renew()
            except Exception as exc:  # a lost connection: the lease just runs out
                log.debug("cache: lease heartbeat failed: %s", exc)


def _name(owner: str) -> str:
    host, pid = holder(owner)
    return f"run {pid} on {host}" if pid is not None else "a run of an older version"


@guarded("leasing texts in the cache table")
def _run(conn, query: str, params: dict, commit: bool, count: bool = False):
    with conn.cursor() as cur:
        cur.execute(query, params)
        result = cur.rowcount if count else cur.fetchall()
    conn.commit() if commit else conn.rollback()
    return result
