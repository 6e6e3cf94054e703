"""Stay under a hosted API's rate budget instead of running into its 429s.

`http.HttpClient.post_json` asks `RateGovernor.acquire` before each request (it waits
until the budget allows it) and tells `observe` what came back. Each budget (requests,
tokens) is paced like a token bucket refilled continuously (GCRA: a theoretical arrival
time advanced by cost / rate, a small burst allowed) at RATE_PACE_SHARE of what the
server states (`x-ratelimit-limit-*` over the window its reset headers show) or of
EMBED_MAX_TPM / EMBED_MAX_RPM; and gated by what the server last said remains
(`x-ratelimit-remaining-*` less what was granted since), until its reset. The pace keeps
a minute's budget spread (Azure counts it per 1-10 s); the gate keeps a budget counted in
fixed windows, or spent by someone else, from being overrun. Nothing known, no headers:
no pacing, today's behaviour.

The state lives in a ledger (`rate_ledger`) keyed by a hash of (servers, API key), shared
by the processes on the same cache: two machines then pace one budget together. The
state functions here are pure (a dict in, the dict changed), so every store runs them
inside its own lock or transaction.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .constants import (RATE_BURST_MAX_S, RATE_BURST_SHARE, RATE_FORGET_WINDOWS, RATE_MAX_WAIT_S,
                        RATE_PACE_SHARE, RATE_SETTING_WINDOW_S, RATE_UNKNOWN_RESET_S)
from .rate_headers import LANES, LaneHeaders, read_lanes
from .rate_ledger import MemoryLedger, open_ledger
from .tokens import EstimatedTokens

log = logging.getLogger(__name__)


def new_lane() -> dict:
    """What is known of one budget. `granted` counts every grant (all processes), so a
    snapshot of the server's `remaining` holds as `base - granted` until the next one."""
    return {"limit": None, "window": None, "seen_at": None, "tat": 0.0, "granted": 0.0,
            "base": None, "g_snap": 0.0, "reset_at": None}


def pace(lane: dict, cap: float | None) -> float | None:
    """Units per second to pace to: the stated limit over its window, capped by the
    setting (per minute); None when neither is known."""
    rates = [lane["limit"] / lane["window"]] if lane["limit"] and lane["window"] else []
    if cap:
        rates.append(cap / RATE_SETTING_WINDOW_S)
    return min(rates) * RATE_PACE_SHARE if rates else None


def refresh(lane: dict, now: float) -> None:
    """Forget a budget no header has confirmed for a while; past the stated reset, the
    server's budget is whole again, less what was granted after the last snapshot."""
    window = lane["window"] or RATE_SETTING_WINDOW_S
    if lane["seen_at"] is not None and now - lane["seen_at"] > RATE_FORGET_WINDOWS * window:
        lane.update(new_lane(), granted=lane["granted"])
    if lane["reset_at"] is not None and now >= lane["reset_at"]:
        lane["base"] = lane["limit"] + lane["g_snap"] if lane["limit"] else None
        lane["reset_at"] = now + window if lane["limit"] else None


def grant(state: dict, costs: dict[str, float], caps: dict[str, float | None],
          now: float) -> tuple[float, dict | None]:
    """(seconds to wait, the grant's positions) for a request costing `costs`; positions
    None when the gate holds it: wait, then ask again. Changes `state`."""
    lanes = {name: state.setdefault(name, new_lane()) for name in costs}
    held_until = None
    for name, lane in lanes.items():
        refresh(lane, now)
        headroom = lane["base"] - lane["granted"] if lane["base"] is not None else None
        never_fits = lane["limit"] is not None and costs[name] > lane["limit"]  # let the server say
        if headroom is not None and headroom < costs[name] and not never_fits:
            held_until = max(held_until or now, lane["reset_at"] or now + RATE_UNKNOWN_RESET_S)
    if held_until is not None:
        return held_until - now, None
    start, rates = now, {}
    for name, lane in lanes.items():
        rates[name] = pace(lane, caps.get(name))
        if rates[name]:
            burst = min(RATE_BURST_SHARE * (lane["window"] or RATE_SETTING_WINDOW_S),
                        RATE_BURST_MAX_S)
            start = max(start, lane["tat"] - burst)
    positions = {}
    for name, lane in lanes.items():
        positions[name] = lane["granted"]
        lane["granted"] += costs[name]
        if rates[name]:
            lane["tat"] = max(lane["tat"], start) + costs[name] / rates[name]
    return start - now, positions


def learn(state: dict, said: dict[str, LaneHeaders], positions: dict | None,
          costs: dict[str, float], accepted: bool, now: float) -> None:
    """What a response's headers say, into `state`: the limit, a lower bound of the window
    (a reset is never longer than it), and the server's remaining count as of this
    request, which is taken to include every grant before it and none after."""
    for name, lane_said in said.items():
        lane = state.setdefault(name, new_lane())
        cost = costs.get(name, 0.0)
        if not accepted and positions is not None:  # refused: the server did not count it
            lane["granted"] -= cost
        if lane_said.limit:
            lane["limit"], lane["seen_at"] = lane_said.limit, now
        if lane_said.reset_s:
            lane["window"] = max(lane["window"] or 0.0, lane_said.reset_s)
        if lane_said.remaining is None:
            continue
        counted = lane["granted"] if positions is None else \
            positions[name] + (cost if accepted else 0.0)
        if counted >= lane["g_snap"] or lane["base"] is None:  # the newest word wins
            reset = lane_said.reset_s if lane_said.reset_s is not None else RATE_UNKNOWN_RESET_S
            lane.update(base=lane_said.remaining + counted, g_snap=counted, reset_at=now + reset)
            lane["seen_at"] = now


def key_hash(urls: list[str], secret: str | None) -> str:
    """Whose budget: the servers and the key, hashed (the key itself is never stored)."""
    return hashlib.sha256(("\n".join(sorted(urls)) + "\n" + (secret or "")).encode()).hexdigest()


@dataclass
class Ticket:
    """One request's grant: what it costs, and where it stood among all grants."""

    costs: dict[str, float]
    positions: dict | None = None
    estimate: float = 0.0   # our own estimate of its tokens, before calibration


@dataclass
class GovernorStats:
    waits: int = 0          # requests that waited on the budget
    wait_s: float = 0.0     # seconds they waited in all
    rate_limited: int = 0   # 429s received
    lock: Any = field(default_factory=threading.Lock, repr=False)


class RateGovernor:
    """The budget of one set of servers and key, for every thread of a client.

    Args:
        ledger: where the state lives (`rate_ledger.open_ledger`); opened when needed.
        caps: EMBED_MAX_RPM / EMBED_MAX_TPM by lane (per minute), None where unset.
        sleep: injectable, as the retry layer's is.
    """

    def __init__(self, ledger, caps: dict[str, float | None], *,
                 sleep: Callable[[float], None] = time.sleep):
        self.ledger, self.caps, self.sleep = ledger, caps, sleep
        self.stats = GovernorStats()
        self._counter = EstimatedTokens()
        self._billed = self._estimated = 0.0
        self._active = any(caps.values()) or None  # None: not looked in the ledger yet

    def active(self) -> bool:
        """Whether any budget is known: from a setting, a header, or the shared ledger."""
        if self._active is None:
            self._active = self._transact(None)
        return bool(self._active)

    def _transact(self, change):
        """`change` in the ledger (None: whether it knows a budget). A shared ledger that
        fails (a role that may not create its table, a file it may not write) must not
        stop a run: this process then paces the budget alone, and says so."""
        ledger = self.ledger
        try:
            return ledger.knows_budget() if change is None else ledger.transact(change)
        except Exception as exc:
            if isinstance(ledger, MemoryLedger):
                raise
            with self.stats.lock:
                if self.ledger is ledger:  # said once, whichever thread met it first
                    log.warning("the rate budget cannot be shared through the %s ledger (%s): "
                                "this process paces it alone (its table: what `python -m "
                                "embed_helpers cache setup-sql` prints)", ledger.kind,
                                str(exc).strip()[:200])
                    self.ledger = MemoryLedger(ledger.key)
            ledger.close()
            return self._transact(change)

    def estimate(self, payload: dict | None) -> tuple[float, float]:
        """(our byte estimate of the tokens a request carries, the same in the server's
        count): scaled by what the server billed so far (`usage`) against our estimate.
        A request without a JSON body (the Batch API's uploads and polls) carries none."""
        payload = payload or {}
        texts = payload.get("input", payload.get("prompt", []))
        texts = [texts] if isinstance(texts, str) else [t for t in texts if isinstance(t, str)]
        raw = float(sum(self._counter.count(texts)))
        with self.stats.lock:
            ratio = self._billed / self._estimated if self._billed and self._estimated else 1.0
        return raw, raw * ratio

    def acquire(self, payload: dict | None) -> Ticket:
        """Wait until the budget allows this request; its ticket goes to `observe`."""
        raw, tokens = self.estimate(payload)
        ticket = Ticket({"requests": 1.0, "tokens": tokens}, estimate=raw)
        if not self.active():
            return ticket
        waited = 0.0
        while ticket.positions is None:
            wait, ticket.positions = self._transact(
                lambda state, now: grant(state, ticket.costs, self.caps, now))
            if wait > 0:
                wait = min(wait, RATE_MAX_WAIT_S)
                log.debug("rate budget: waiting %.3fs (%s)", wait,
                          "paced" if ticket.positions is not None else "spent until its reset")
                self.sleep(wait)
                waited += wait
        if waited:
            with self.stats.lock:
                self.stats.waits += 1
                self.stats.wait_s += waited
        return ticket

    def observe(self, ticket: Ticket, status: int, headers) -> None:
        """A response came: learn what its headers say of the budget."""
        said = {k: v for k, v in read_lanes(headers).items() if k in LANES}
        with self.stats.lock:
            self.stats.rate_limited += status == 429
            if status < 300:
                self._estimated += ticket.estimate
        if not said:
            return
        if not self._active:
            log.info("the server states its rate budget (%s): pacing requests to it",
                     ", ".join(f"{k} {v.limit:g}" for k, v in said.items() if v.limit) or "remaining")
            self._active = True
        self._transact(lambda state, now: learn(state, said, ticket.positions,
                                                      ticket.costs, status != 429, now))

    def billed(self, tokens: int) -> None:
        """Tokens the server said it counted for a request (`usage`): calibrates `estimate`."""
        with self.stats.lock:
            self._billed += tokens

    def counters(self) -> dict:
        with self.stats.lock:
            return {"budget_waits": self.stats.waits,
                    "budget_wait_s": round(self.stats.wait_s, 3),
                    "rate_limited": self.stats.rate_limited}

    def close(self) -> None:
        self.ledger.close()


def for_client(settings, urls: list[str], secret: str | None, *, sleep=time.sleep) -> RateGovernor:
    """The governor of an HTTP client: its ledger beside the configured cache."""
    caps = {"requests": settings.EMBED_MAX_RPM, "tokens": settings.EMBED_MAX_TPM}
    return RateGovernor(open_ledger(settings, key_hash(urls, secret)), caps, sleep=sleep)


def budget_status(backend) -> str:
    """What the progress bar says of the budget: the time waited so far, or ""."""
    governor = getattr(getattr(backend, "http", None), "governor", None)
    waited = governor.counters() if governor is not None else {}
    return f"waited {waited['budget_wait_s']:.0f} s on the rate budget" \
        if waited.get("budget_wait_s", 0) >= 1 else ""


def budget_since(stats: dict, before: dict, so_far: dict) -> dict:
    """The report's budget figures: `so_far` plus what a client's counters gained since
    `before` (`HttpClient.stats`)."""
    return {k: round(so_far.get(k, 0) + stats.get(k, 0) - before.get(k, 0), 3)
            for k in ("budget_waits", "budget_wait_s", "rate_limited")}


def budget_note(stats: dict) -> str:
    """The report's words for the budget, "" when nothing waited and nothing was refused.

    >>> budget_note({"budget_waits": 3, "budget_wait_s": 1.5, "rate_limited": 1})
    '; waited 1.5 s on the rate budget (3 requests), 1 429 received'
    """
    if not stats.get("budget_waits") and not stats.get("rate_limited"):
        return ""
    return (f"; waited {stats.get('budget_wait_s', 0):g} s on the rate budget "
            f"({stats.get('budget_waits', 0)} requests), {stats.get('rate_limited', 0)} 429"
            f"{'' if stats.get('rate_limited') == 1 else 's'} received")
