"""The request and text-unit budgets of every replica together: token buckets in the store.

One Lua script per take (``TAKE``) refills and takes from both buckets atomically, on the
store's clock (``TIME``), so the replicas' own clocks never matter and N replicas together stay
within ``--budget-rps`` and ``--budget-text-units`` whatever N is. The semantics are
``TokenBucket.reserve``'s: the tokens are taken at once (the level may go negative), and the
answer is how long the caller must wait before using them; a reservation the caller will not
use (it would wait too long, or was cancelled) is given back (``refund``, the same script with
negative amounts, sent without waiting for it). Each bucket holds one second's worth.

The script also notes this replica (a random id per process) in a sorted set and answers how
many replicas took budget in the last ``REPLICA_WINDOW_S`` seconds. While the store does not
answer, this process's own buckets serve, at that share of the rates (the rates divided by the
replicas it last saw), so that the replicas together stay near the budget during an outage
too; a replica that never saw the store assumes it is alone. Every shared take is mirrored in
those local buckets, so an outage starts from what the replica spent, not from full buckets;
and the first shared take after an outage also charges the store with what the replica spent
locally beyond its share's refill (the local buckets' deficit, at most what they served), so
that the store's bucket, full again after the outage, does not let a second's worth through on
top.

Keys: ``<prefix>budget:requests``, ``<prefix>budget:text_units`` (hashes: ``tokens``,
``stamp``; they expire once they would be full again) and ``<prefix>budget:replicas``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aredis

from extproc.guardrail.budget import LocalBudget, LocalReservation, Reservation
from extproc.shared.store import SharedState, Unavailable

#: Replicas that took budget within this many seconds count as alive.
REPLICA_WINDOW_S: Final = 10.0

#: KEYS: the buckets, then the replicas set. ARGV: replica id, replica window (s), then per
#: bucket rate, capacity, amount. Answers {wait in seconds (a string: Lua numbers come back as
#: integers), replicas}.
TAKE: Final = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local buckets = #KEYS - 1
local wait = 0
for i = 1, buckets do
  local rate = tonumber(ARGV[3 * i])
  local capacity = tonumber(ARGV[3 * i + 1])
  local amount = tonumber(ARGV[3 * i + 2])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'stamp')
  local tokens = tonumber(state[1])
  local stamp = tonumber(state[2])
  if tokens == nil or stamp == nil then
    tokens = capacity
    stamp = now
  elseif now > stamp then
    tokens = math.min(capacity, tokens + (now - stamp) * rate)
    stamp = now
  end
  tokens = math.min(capacity, tokens - amount)
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tokens),
             'stamp', string.format('%.17g', stamp))
  redis.call('PEXPIRE', KEYS[i], math.ceil((capacity - tokens) / rate * 1000) + 1000)
  if tokens < 0 and -tokens / rate > wait then
    wait = -tokens / rate
  end
end
local replicas = KEYS[buckets + 1]
local window = tonumber(ARGV[2])
redis.call('ZADD', replicas, now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', replicas, '-inf', now - window)
redis.call('PEXPIRE', replicas, math.ceil(window * 1000))
return {string.format('%.17g', wait), redis.call('ZCARD', replicas)}
"""


@dataclass(frozen=True, slots=True)
class SharedReservation:
    budget: SharedBudget
    local: LocalReservation  # the same amounts, mirrored in the fallback buckets
    wait: float

    def refund(self) -> None:
        self.local.refund()
        self.budget.refund(self.local.requests, self.local.units)


class SharedBudget:
    """``Budget`` in the store (see the module docstring); ``rps`` or ``text_units_per_s`` 0:
    that bucket is unlimited. ``clock``: the local fallback buckets'."""

    def __init__(self, state: SharedState, rps: float, text_units_per_s: float, *,
                 replica: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rps or text_units_per_s):
            raise ValueError("a shared budget needs a rate")
        self._state = state
        self._rps = rps
        self._tups = text_units_per_s
        self._keys = [state.key("budget", name) for name, rate in
                      (("requests", rps), ("text_units", text_units_per_s)) if rate]
        self._keys.append(state.key("budget", "replicas"))
        self._rates = [rate for rate in (rps, text_units_per_s) if rate]
        self._local = LocalBudget(rps, text_units_per_s, clock=clock)
        self._script = state.redis.register_script(TAKE)
        self.replica = replica or uuid.uuid4().hex
        self.replicas = 1  # as last seen in the store
        # What the local buckets served since the store last answered (None: nothing).
        self._spent: tuple[float, float] | None = None

    def _args(self, requests: float, units: float) -> list[Any]:
        args: list[Any] = [self.replica, repr(REPLICA_WINDOW_S)]
        amounts = []
        if self._rps:
            amounts.append(requests)
        if self._tups:
            amounts.append(units)
        for rate, amount in zip(self._rates, amounts, strict=True):
            args += [repr(float(rate)), repr(float(rate)), repr(float(amount))]
        return args

    async def _take(self, redis: aredis.Redis, requests: float,
                    units: float) -> tuple[float, int]:
        answer = await self._script(keys=self._keys, args=self._args(requests, units),
                                    client=redis)
        return float(answer[0]), int(answer[1])

    async def reserve(self, requests: int, units: int) -> Reservation:
        # The first take after an outage also charges what this replica spent locally beyond
        # its share's refill (its local buckets' deficit): the store's bucket, full again after
        # the outage, would otherwise let a second's worth through on top.
        debt_requests = debt_units = 0.0
        if self._spent is not None:
            deficit = self._local.deficit()
            debt_requests = min(deficit[0], self._spent[0])
            debt_units = min(deficit[1], self._spent[1])
            self._spent = None
        try:
            wait, replicas = await self._state.run(
                "budget", lambda redis: self._take(redis, requests + debt_requests,
                                                   units + debt_units))
        except Unavailable:
            spent = self._spent or (0.0, 0.0)
            self._spent = (spent[0] + requests + debt_requests, spent[1] + units + debt_units)
            return self._local.take(requests, units)
        if replicas != self.replicas and replicas > 0:
            self.replicas = replicas
            self._local.share(self._rps / replicas, self._tups / replicas)
        # Mirrored locally (its wait unused): when the store goes away, the fallback buckets
        # carry on from what this replica spent, instead of from full.
        return SharedReservation(self, self._local.take(requests, units), wait)

    def refund(self, requests: int, units: int) -> None:
        self._state.spawn("refund", lambda redis: self._take(redis, -requests, -units))
