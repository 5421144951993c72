"""The connection to the shared store, and what happens when it is slow or down.

``SharedState.run(operation, call)`` runs one store operation within ``timeout_s``. While the
store is up, a call that fails (no answer in time, a refused or dropped connection, an error
reply) marks it down and raises ``Unavailable``: the caller serves the operation from this
process's own state. While it is down, every operation raises ``Unavailable`` at once (no
stream waits for a store that is known not to answer) and one background task pings it, the
first time at once and then after a backoff doubling from ``RETRY_MIN_S`` up to
``RETRY_MAX_S``; the first answer marks it up again. So a stream waits at most ``timeout_s``
per operation, and only for operations already under way when the store went away.

Every operation served locally is counted per operation (``budget``, ``cache_get``,
``cache_put``) in ``stats["fallbacks"]``; ``stats["up"]`` is 1 when the last operation
succeeded. Going down is logged once at WARNING with the reason, then at most once per
``LOG_INTERVAL_S`` while it stays down with the count served locally; coming back is logged at
INFO. The store's URL appears in logs only with its password replaced by ``***``.

``spawn`` runs an operation nobody waits for (a verdict cache write, a refund): the task is
kept until it ends, at most ``MAX_PENDING`` at a time (more are dropped and counted).

One event loop: the state is plain attributes, changed only from the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: The operations counted when the local state serves them.
OPERATIONS: Final = ("budget", "cache_get", "cache_put")
#: The gRPC health service name that reports the store (SERVING while it answers).
HEALTH_SERVICE: Final = "guardrail_extproc.shared_state"
RETRY_MIN_S: Final = 0.1
RETRY_MAX_S: Final = 2.0
LOG_INTERVAL_S: Final = 30.0
MAX_PENDING: Final = 1000
#: Connections to the store per process; an operation waits for a free one within its time.
MAX_CONNECTIONS: Final = 32


class Unavailable(Exception):
    """The store did not serve this operation: serve it locally."""


def connect(url: str, *, password: str | None, timeout_s: float) -> aredis.Redis:
    """A redis.asyncio client for ``url`` (not connected yet): no retries of its own (the
    caller falls back instead), connections and replies bounded by ``timeout_s``."""
    extra: dict[str, Any] = {}
    if password is not None:
        extra["password"] = password
    pool = aredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=timeout_s,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), client_name="guardrail-extproc", **extra)
    return aredis.Redis(connection_pool=pool)


def _reason(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g}s"
    # The class and redis-py's message (which names no password), never the URL.
    return f"{type(exc).__name__}: {exc}"[:200]


class SharedState:
    """One store, its health and its counters (see the module docstring). ``redis`` is the
    client (``connect``); ``name`` is how logs name the store (the redacted URL); ``prefix``
    starts every key. ``clock`` and ``sleep`` are for tests."""

    def __init__(self, redis: aredis.Redis, *, name: str, prefix: str, timeout_s: float,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.redis = redis
        self.name = name
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._clock = clock
        self._sleep = sleep
        self.up = False
        self._started = False
        self._recovery: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self._fallbacks = dict.fromkeys(OPERATIONS, 0)
        self._failures = 0
        self._down_since = 0.0
        self._served_locally = 0  # since the last log line
        self._next_log = 0.0
        #: Called with the new state when the store goes down or comes back.
        self.on_change: Callable[[bool], None] | None = None

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: ``up`` (0/1), ``fallbacks`` per operation, ``failures`` (operations and
        pings the store did not answer)."""
        return {"up": 1 if self.up else 0, "fallbacks": dict(self._fallbacks),
                "failures": self._failures}

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def start(self) -> None:
        """Ping the store once (within the timeout): up, or down with the reconnection loop
        started. Never raises: a store that is down at start-up is a fallback like any."""
        self._started = True
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failures += 1
            log.warning("shared state %s: unavailable at start-up (%s); budgets and the verdict "
                        "cache are this process's own until it answers", self.name,
                        _reason(exc, self.timeout_s))
            self._went_down()
            return
        self._set_up(True)
        log.info("shared state %s: connected (key prefix %r)", self.name, self.prefix)

    async def drain(self) -> None:
        """Wait for the operations ``spawn`` started (each ends within the timeout)."""
        while self._pending:
            await asyncio.wait(tuple(self._pending))

    async def close(self) -> None:
        """Stop reconnecting, give pending writes their time, close the connections."""
        self._started = False
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
            self._recovery = None
        if self._pending:
            await asyncio.wait(tuple(self._pending), timeout=self.timeout_s * 2)
            for task in tuple(self._pending):
                task.cancel()
        try:
            await self.redis.aclose(close_connection_pool=True)
        except (RedisError, OSError):
            pass

    async def run(self, operation: str, call: Callable[[aredis.Redis], Awaitable[T]]) -> T:
        """``call(redis)`` within the timeout, or ``Unavailable`` (counted under
        ``operation``) when the store is down or does not serve it."""
        if not self.up:
            self.fallback(operation)
            raise Unavailable
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call(self.redis)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failures += 1
            if self.up:
                log.warning("shared state %s: unavailable (%s); budgets and the verdict cache "
                            "are this process's own until it answers again", self.name,
                            _reason(exc, self.timeout_s))
                self._went_down()
            self.fallback(operation)
            raise Unavailable from None

    def spawn(self, operation: str, call: Callable[[aredis.Redis], Awaitable[Any]]) -> None:
        """``run`` in a task nobody waits for (its ``Unavailable`` is counted and dropped)."""
        if not self.up or len(self._pending) >= MAX_PENDING:
            self.fallback(operation)
            return
        task = asyncio.get_running_loop().create_task(self._quietly(operation, call))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _quietly(self, operation: str,
                       call: Callable[[aredis.Redis], Awaitable[Any]]) -> None:
        try:
            await self.run(operation, call)
        except Unavailable:
            pass

    def fallback(self, operation: str) -> None:
        """Count one ``operation`` served locally; log a summary now and then while down."""
        if operation in self._fallbacks:
            self._fallbacks[operation] += 1
        self._served_locally += 1
        now = self._clock()
        if not self.up and now >= self._next_log:
            self._next_log = now + LOG_INTERVAL_S
            log.warning("shared state %s: still unavailable after %.0fs; %d operations served "
                        "locally since the last report", self.name, now - self._down_since,
                        self._served_locally)
            self._served_locally = 0

    # -- up and down

    def _set_up(self, up: bool) -> None:
        changed = up != self.up
        self.up = up
        if changed and self.on_change is not None:
            self.on_change(up)

    def _went_down(self) -> None:
        now = self._clock()
        self._down_since = now
        self._next_log = now + LOG_INTERVAL_S
        self._served_locally = 0
        self._set_up(False)
        if self._started and (self._recovery is None or self._recovery.done()):
            # Its own context: the stream whose operation failed is not the loop's business.
            self._recovery = asyncio.get_running_loop().create_task(
                self._reconnect(), context=contextvars.Context())

    async def _reconnect(self) -> None:
        """Ping until the store answers: at once, then after a growing backoff."""
        delay = 0.0
        while True:
            if delay:
                await self._sleep(delay)
            # Connections from before the outage may be dead: new ones for what follows.
            try:
                await self.redis.connection_pool.disconnect()
            except (RedisError, OSError):
                pass
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.redis.ping()
            except (TimeoutError, RedisError, OSError):
                self._failures += 1
                delay = min(RETRY_MAX_S, max(RETRY_MIN_S, delay * 2))
                continue
            break
        down_for = self._clock() - self._down_since
        self._set_up(True)
        log.info("shared state %s: available again after %.1fs (%d operations served locally "
                 "since the last report)", self.name, down_for, self._served_locally)
        self._served_locally = 0
