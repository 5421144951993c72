"""Shared state on a real redis-server (issue 18): the Lua token bucket, the shared verdict
cache, and what happens when the store is slow, down and back.

The store is the OS package's ``redis-server`` on a unix socket in a temporary directory
(``testkit.redisserver``). A store that times out is a TCP listener that accepts and never
answers (``blackhole``), or the real server blocked by ``DEBUG SLEEP``. The reconnection loop's
sleeps are injected: the test releases them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aredis
from prometheus_client import generate_latest

from extproc.domain.cache import MemoryVerdictCache, verdict_key
from extproc.domain.values import GuardrailRef, Source
from extproc.guardrail.budget import LocalReservation
from extproc.observe.metrics import PrometheusRecorder
from extproc.settings.values import ClientSettings
from extproc.shared import open_shared_state
from extproc.shared.budget import TAKE, SharedBudget, SharedReservation
from extproc.shared.cache import SharedVerdictCache, shared_verdict_cache
from extproc.shared.store import RETRY_MAX_S, RETRY_MIN_S, SharedState, connect
from testkit.redisserver import RedisServer
from tests.support import eventually

G = GuardrailRef("g1", "1")
TIMEOUT_S = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    store = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield store
    store.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aredis.Redis]:
    """A plain client of the test's own, the store emptied first."""
    redis = aredis.Redis(connection_pool=aredis.BlockingConnectionPool.from_url(
        server.url, max_connections=8))
    await redis.flushall()
    yield redis
    await redis.aclose(close_connection_pool=True)


async def started(url: str, prefix: str = "t:", **kwargs: object) -> SharedState:
    state = SharedState(connect(url, password=None, timeout_s=TIMEOUT_S), name="store",
                        prefix=prefix, timeout_s=TIMEOUT_S, **kwargs)  # type: ignore[arg-type]
    await state.start()
    return state


class Gate:
    """An injected sleep that records each delay and waits until the test opens it."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._open = asyncio.Event()

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        await self._open.wait()
        self._open.clear()

    def release(self) -> None:
        self._open.set()


@pytest.fixture
async def blackhole() -> AsyncIterator[str]:
    """A TCP listener on a free port that accepts and never answers: a store that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    listener.close()
    await listener.wait_closed()


# -- the Lua bucket ------------------------------------------------------------------------------


async def store_time(redis: aredis.Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) + micros / 1e6


async def test_concurrent_takes_never_exceed_capacity_plus_refill(client: aredis.Redis) -> None:
    script = client.register_script(TAKE)
    rate, takes = 50.0, 400
    keys = ["t:budget:requests", "t:budget:replicas"]

    async def take(replica: int) -> float:
        answer = await script(keys=keys, args=[f"r{replica % 4}", "10", rate, rate, 1],
                              client=client)
        return float(answer[0])

    before = await store_time(client)
    waits = await asyncio.gather(*(take(i) for i in range(takes)))
    elapsed = await store_time(client) - before
    free = sum(1 for wait in waits if wait == 0)
    # Atomic refill-and-take: no take is lost or counted twice, whatever the interleaving.
    assert rate <= free <= rate + rate * elapsed + 1
    # The reservations queue up: the last one waits for every token taken before it.
    assert max(waits) == pytest.approx((takes - rate) / rate, abs=elapsed + 0.05)
    tokens = float((await client.hget(keys[0], "tokens")) or 0)
    assert tokens == pytest.approx(rate - takes, abs=rate * elapsed + 1)
    assert await client.zcard(keys[1]) == 4


async def test_refill_follows_the_stores_clock(client: aredis.Redis) -> None:
    script = client.register_script(TAKE)
    keys = ["t:budget:text_units", "t:budget:replicas"]
    first = float((await script(keys=keys, args=["r", "10", 10, 10, 30], client=client))[0])
    assert first == pytest.approx(2.0, abs=0.01)  # 30 taken from 10: 20 short at 10/s
    # Move the bucket's stamp one second into the store's past: the next take finds one
    # second's refill, though no replica's clock said anything.
    stamp = float((await client.hget(keys[0], "stamp")) or 0)
    await client.hset(keys[0], "stamp", repr(stamp - 1.0))
    second = float((await script(keys=keys, args=["r", "10", 10, 10, 0], client=client))[0])
    assert second == pytest.approx(first - 1.0, abs=0.01)
    # A full bucket does not grow past its capacity.
    await client.hset(keys[0], mapping={"tokens": "10", "stamp": repr(stamp - 100.0)})
    third = float((await script(keys=keys, args=["r", "10", 10, 10, 11], client=client))[0])
    assert third == pytest.approx(0.1, abs=0.01)


async def test_two_replicas_share_one_budget_and_see_each_other(
        server: RedisServer, client: aredis.Redis) -> None:
    a, b = await started(server.url), await started(server.url)
    try:
        one = SharedBudget(a, 0, 20, replica="a")
        two = SharedBudget(b, 0, 20, replica="b")
        granted = []
        before = await store_time(client)
        for budget in (one, two) * 10:
            reservation = await budget.reserve(1, 4)
            assert isinstance(reservation, SharedReservation)
            granted.append(reservation.wait == 0)
        elapsed = await store_time(client) - before
        # 20 text units a second for both together: five calls of 4 (and what the store's
        # clock refilled meanwhile), not five each.
        assert 5 <= sum(granted) <= 5 + (20 * elapsed) // 4
        assert (one.replicas, two.replicas) == (2, 2)
        assert a.stats["fallbacks"] == {"budget": 0, "cache_get": 0, "cache_put": 0}
    finally:
        await a.close()
        await b.close()


async def test_a_refund_gives_the_tokens_back(server: RedisServer, client: aredis.Redis) -> None:
    state = await started(server.url)
    try:
        budget = SharedBudget(state, 5, 0, replica="a")
        for _ in range(5):
            assert (await budget.reserve(1, 1)).wait == 0
        short = await budget.reserve(1, 1)
        assert short.wait > 0
        short.refund()
        await state.drain()
        tokens = float((await client.hget("t:budget:requests", "tokens")) or 0)
        assert tokens == pytest.approx(0.0, abs=0.1)
    finally:
        await state.close()


# -- the verdict cache ---------------------------------------------------------------------------


async def test_a_pass_one_replica_learnt_is_known_to_another(
        server: RedisServer, client: aredis.Redis) -> None:
    a, b = await started(server.url), await started(server.url)
    try:
        first = SharedVerdictCache(a, MemoryVerdictCache(100, 60.0), 60.0)
        second = SharedVerdictCache(b, MemoryVerdictCache(100, 60.0), 60.0)
        text = "my secret prompt text"
        key = verdict_key(G, Source.INPUT, text)
        other = verdict_key(G, Source.INPUT, "never checked")
        assert await second.lookup([key, other]) == [False, False]
        first.remember([key], 3)
        await a.drain()
        assert await second.lookup([key, other]) == [True, False]
        assert second.hits == 1 and second.local.passed(key)
        names = [name.decode() for name in await client.keys("t:verdict:*")]
        assert names == [f"t:verdict:g1:1:INPUT:{key[3].hex()}"]
        value = await client.get(names[0])
        assert value is not None and json.loads(value) == {"outcome": "pass", "text_units": 3}
        assert text.encode() not in value and b"secret" not in value
        assert 0 < await client.pttl(names[0]) <= 60_000
    finally:
        await a.close()
        await b.close()


async def test_a_pass_learnt_from_the_store_keeps_the_time_it_has_left(
        server: RedisServer, client: aredis.Redis) -> None:
    state = await started(server.url)
    now = [0.0]
    try:
        cache = SharedVerdictCache(state, MemoryVerdictCache(100, 3600.0, clock=lambda: now[0]),
                                   3600.0)
        key = verdict_key(G, Source.INPUT, "t")
        await client.set(cache.store_key(key), json.dumps({"outcome": "pass"}), px=5000)
        assert await cache.lookup([key]) == [True]
        now[0] = 4.0
        assert cache.local.passed(key)
        now[0] = 5.01
        assert not cache.local.passed(key)
    finally:
        await state.close()


async def test_zero_entries_is_no_cache_even_when_shared(server: RedisServer) -> None:
    state = await started(server.url)
    try:
        cache = shared_verdict_cache(state, 0, 60.0)
        key = verdict_key(G, Source.INPUT, "t")
        cache.remember([key])
        assert await cache.lookup([key]) == [False]
    finally:
        await state.close()


# -- slow, down, back ----------------------------------------------------------------------------


async def test_a_store_that_never_answers_is_a_fallback_within_the_timeout(
        blackhole: str) -> None:
    gate = Gate()
    changes: list[bool] = []
    state = SharedState(connect(blackhole, password=None, timeout_s=TIMEOUT_S), name="hole",
                        prefix="t:", timeout_s=TIMEOUT_S, sleep=gate.sleep)
    state.on_change = changes.append
    await state.start()
    try:
        assert state.stats["up"] == 0 and state.stats["failures"] >= 1
        budget = SharedBudget(state, 0, 10, replica="a")
        reservation = await budget.reserve(1, 4)
        assert isinstance(reservation, LocalReservation) and reservation.wait == 0
        cache = SharedVerdictCache(state, MemoryVerdictCache(10, 60.0), 60.0)
        key = verdict_key(G, Source.INPUT, "t")
        assert await cache.lookup([key]) == [False]
        cache.remember([key])
        assert await cache.lookup([key]) == [True]  # the local cache answers
        assert state.stats["fallbacks"] == {"budget": 1, "cache_get": 1, "cache_put": 1}
        assert changes == []  # it was never up
    finally:
        await state.close()


async def test_an_operation_waits_at_most_the_timeout_then_the_store_is_down(
        server: RedisServer, client: aredis.Redis) -> None:
    gate = Gate()
    changes: list[bool] = []
    state = await started(server.url, sleep=gate.sleep)
    state.on_change = changes.append
    budget = SharedBudget(state, 0, 10, replica="a")
    blocker = aredis.Redis.from_url(server.url)
    try:
        assert state.up
        # The real store, blocked: it answers nothing for 0.5 s.
        sleeping = asyncio.ensure_future(blocker.execute_command("DEBUG", "SLEEP", "0.5"))
        await eventually(lambda: sleeping.done() or _blocked(server), what="store blocked")
        reservation = await budget.reserve(1, 1)
        assert isinstance(reservation, LocalReservation)
        assert not state.up and changes == [False]
        assert state.stats["fallbacks"]["budget"] == 1
        # While down, nothing waits on the store: answered at once, counted.
        assert isinstance(await budget.reserve(1, 1), LocalReservation)
        assert state.stats["fallbacks"]["budget"] == 2
        await sleeping
        # The reconnection loop pinged at once (the store was still blocked), then sleeps its
        # backoff: released, it pings the store, which answers again.
        await eventually(lambda: state.up or gate.delays, what="the first ping")
        gate.release()
        await eventually(lambda: state.up, what="the store back up")
        assert changes == [False, True]
        assert isinstance(await budget.reserve(1, 1), SharedReservation)
    finally:
        await blocker.aclose()
        await state.close()


def _blocked(server: RedisServer) -> bool:
    """True once the server is inside DEBUG SLEEP (a fresh ping gets no answer)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.02)
        sock.connect(str(server.socket_path))
        sock.sendall(b"PING\r\n")
        try:
            sock.recv(16)
        except TimeoutError:
            return True
        return False


async def test_reconnection_backs_off_and_recovers_when_the_store_returns(
        tmp_path: Path) -> None:
    store = RedisServer(tmp_path / "late")
    gate = Gate()
    changes: list[bool] = []
    state = SharedState(connect(store.unix_url, password=None, timeout_s=TIMEOUT_S),
                        name="late", prefix="t:", timeout_s=TIMEOUT_S, sleep=gate.sleep)
    state.on_change = changes.append
    await state.start()  # nothing listens yet
    try:
        assert not state.up
        for count in range(1, 8):
            await eventually(lambda count=count: len(gate.delays) >= count,  # type: ignore[misc]
                             what=f"backoff sleep {count}")
            gate.release()
        await eventually(lambda: len(gate.delays) >= 8, what="backoff sleep 8")
        delays = gate.delays
        assert delays[0] == RETRY_MIN_S
        assert all(b == min(RETRY_MAX_S, a * 2) for a, b in zip(delays, delays[1:]))
        assert delays[-1] == RETRY_MAX_S
        store.start()
        gate.release()
        await eventually(lambda: state.up, what="reconnected")
        assert changes == [True]
        budget = SharedBudget(state, 1, 0, replica="a")
        assert isinstance(await budget.reserve(1, 0), SharedReservation)
    finally:
        await state.close()
        store.stop()


# -- configuration and reporting -----------------------------------------------------------------


async def test_a_password_file_authenticates(tmp_path: Path) -> None:
    store = RedisServer(tmp_path / "auth", password="s3cret-pw").start()
    try:
        password_file = tmp_path / "pw"
        password_file.write_text("s3cret-pw\n")
        settings = ClientSettings(shared_state_url=f"unix://{store.socket_path}",
                                  shared_state_password_file=str(password_file),
                                  shared_state_prefix="p:")
        state = open_shared_state(settings)
        assert state is not None
        await state.start()
        try:
            assert state.up and state.prefix == "p:"
        finally:
            await state.close()
        wrong = ClientSettings(shared_state_url=f"unix://:wrong@{store.socket_path}")
        assert wrong.shared_state_redacted == f"unix://:***@{store.socket_path}"
        denied = open_shared_state(wrong)
        assert denied is not None
        await denied.start()
        try:
            assert not denied.up
        finally:
            await denied.close()
    finally:
        store.stop()


def test_the_metrics_have_the_names_the_dashboards_use() -> None:
    recorder = PrometheusRecorder()
    stats = {"up": 1, "fallbacks": {"budget": 2, "cache_get": 0, "cache_put": 5}}
    recorder.watch_shared_state(lambda: stats)
    text = generate_latest(recorder.registry).decode()
    assert "guardrail_extproc_shared_state_up 1.0" in text
    assert 'guardrail_extproc_shared_state_fallbacks_total{operation="budget"} 2.0' in text
    assert 'guardrail_extproc_shared_state_fallbacks_total{operation="cache_get"} 0.0' in text
    assert 'guardrail_extproc_shared_state_fallbacks_total{operation="cache_put"} 5.0' in text


async def test_an_outage_starts_from_what_the_replica_spent_at_its_share(
        server: RedisServer, client: aredis.Redis) -> None:
    state = await started(server.url)
    try:
        one = SharedBudget(state, 0, 20, replica="a")
        two = SharedBudget(state, 0, 20, replica="b")
        await two.reserve(1, 1)
        for _ in range(3):
            await one.reserve(1, 4)
        assert one.replicas == 2
        # The store goes away: the local buckets serve at half the rate (two replicas), and
        # start from the 12 units this replica took, not from a full bucket.
        state.up = False
        reservation = await one.reserve(1, 4)
        assert isinstance(reservation, LocalReservation)
        assert reservation.wait == pytest.approx((12 + 4 - 10) / 10, abs=0.05)
    finally:
        await state.close()


async def test_the_first_take_after_an_outage_charges_what_was_spent_locally(
        server: RedisServer, client: aredis.Redis) -> None:
    state = await started(server.url)
    try:
        budget = SharedBudget(state, 0, 10, replica="a")
        state.up = False
        for _ in range(3):
            assert isinstance(await budget.reserve(1, 4), LocalReservation)  # 12 of 10 local
        await client.flushall()  # the store comes back empty: a full bucket of 10
        state.up = True
        reservation = await budget.reserve(1, 1)
        assert isinstance(reservation, SharedReservation)
        # The local bucket is at -2: 12 short of full, all of it spent locally. The store's
        # fresh bucket of 10 pays 1 + 12: -3 at 10/s.
        assert reservation.wait == pytest.approx(0.3, abs=0.02)
        # Charged once: the next take pays only for itself.
        assert (await budget.reserve(1, 1)).wait == pytest.approx(0.4, abs=0.02)
    finally:
        await state.close()


async def test_rediss_with_the_ca_from_the_url_and_a_password(tmp_path: Path) -> None:
    from tests.grpc.test_tls import key_pem, make_cert, pem

    ca = make_cert("redis-test-ca", None, ca=True)
    cert = make_cert("localhost", ca, ca=False)
    files = {"ca": pem(ca[0]), "cert": pem(cert[0]), "key": key_pem(cert[1])}
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    store = RedisServer(tmp_path / "tls", password="pw-over-tls",
                        tls=(tmp_path / "cert.pem", tmp_path / "key.pem")).start()
    try:
        url = f"{store.url}?ssl_ca_certs={tmp_path / 'ca.pem'}"
        state = open_shared_state(ClientSettings(shared_state_url=url, shared_state_timeout_s=1))
        assert state is not None and "pw-over-tls" not in state.name
        await state.start()
        try:
            assert state.up
            assert isinstance(await SharedBudget(state, 1, 0).reserve(1, 0), SharedReservation)
        finally:
            await state.close()
        # Without the CA the server's certificate is not trusted: never up.
        untrusted = open_shared_state(ClientSettings(shared_state_url=store.url,
                                                     shared_state_timeout_s=1))
        assert untrusted is not None
        await untrusted.start()
        try:
            assert not untrusted.up
        finally:
            await untrusted.close()
    finally:
        store.stop()
