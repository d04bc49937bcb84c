"""SharedLimits against the real Redis on this machine (127.0.0.1:6379): several instances (each
with its own connection, as separate daemons have) sharing limits, leases of a dead instance
expiring, and a Redis that goes away, stalls and comes back while requests keep being answered.
An unreachable Redis FAILS these tests; nothing is skipped. Each test has its own key namespace,
deleted afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from harness import until
from listening import port_number, stop_listening
from logcapture import keeping
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols import portforward
from twisted.python.failure import Failure
from zope.interface import implementer

from ollamaflow.ratelimits.contracts import Admission, Admitted, Limits, OverLimit
from ollamaflow.ratelimits.redisclient import RedisAddress, RedisClient
from ollamaflow.ratelimits.shared import SharedLimits

REDIS = "redis://127.0.0.1:6379/0"


async def answer(limits: SharedLimits, key: str, which: Limits) -> Admission:
    """``admit``'s answer, waited for when it is a Deferred."""
    admission = limits.admit(key, which)
    return await admission if isinstance(admission, Deferred) else admission


def lease_of(admission: Admission) -> str:
    assert isinstance(admission, Admitted), admission
    return admission.lease


async def admitted(limits: SharedLimits, key: str, which: Limits) -> Admitted | None:
    """One more request of ``key``, if admitted (for polling)."""
    admission = await answer(limits, key, which)
    return admission if isinstance(admission, Admitted) else None


@implementer(IStreamClientEndpoint)
class Counting:
    """A TCP endpoint counting its connection attempts."""

    def __init__(self, port: int) -> None:
        self.attempts = 0
        self._tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts += 1
        return self._tcp.connect(factory)


class Instances:
    """SharedLimits instances on one namespace, stopped (and the namespace deleted) at the end;
    log events kept."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.started: list[SharedLimits] = []
        self.events: list[dict[str, Any]] = []
        self.redis = RedisClient(reactor, RedisAddress.from_url(REDIS))

    async def __call__(self, url: str = REDIS, *, wait: bool = True, **kw: Any) -> SharedLimits:
        kw.setdefault("backoff", (0.05, 0.2))
        limits = SharedLimits(reactor, url, namespace=self.namespace, **kw)
        limits.startService()
        self.started.append(limits)
        if wait:
            await until(lambda: limits.shared, what="connected to Redis")
        return limits

    def logged(self, level: LogLevel) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_level") == level and e.get("log_namespace", "").endswith(".shared")
        ]

    async def call(self, *args: bytes | str | int) -> Any:
        """A command on a connection of the test's own."""
        return await self.redis.call(*args)

    async def keys(self) -> list[bytes]:
        found: list[bytes] = []
        cursor = b"0"
        while True:
            cursor, batch = await self.call("SCAN", cursor, "MATCH", f"{self.namespace}*")
            found.extend(batch)
            if cursor == b"0":
                return found

    async def redis_ms(self) -> int:
        seconds, micros = await self.call("TIME")
        return int(seconds) * 1000 + int(micros) // 1000


@pytest_twisted.async_yield_fixture
async def instances() -> AsyncIterator[Instances]:
    made = Instances(f"ollamaflow:rl:test:{uuid.uuid4().hex}:")
    observer = keeping(made.events)
    globalLogPublisher.addObserver(observer)
    made.redis.start()
    await until(lambda: made.redis.ready, what="the test's own connection to Redis")
    try:
        yield made
        # Nothing failed unseen (an unhandled error in a Deferred, a failure logged).
        assert [e for e in made.events if "log_failure" in e] == []
    finally:
        globalLogPublisher.removeObserver(observer)
        for limits in made.started:
            if limits.running:
                await limits.stopService()
        keys = await made.keys()
        if keys:
            await made.call("DEL", *keys)
        await made.redis.close()


# -- several instances, one limit ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_instances_share_one_requests_per_minute_limit(instances: Instances) -> None:
    first, second = await instances(), await instances()
    rpm = Limits(requests_per_minute=5)
    for limits in [first, second, first, second, first]:
        lease_of(await answer(limits, "key", rpm))
    for limits in [first, second]:
        refused = await answer(limits, "key", rpm)
        assert isinstance(refused, OverLimit), refused
        assert (refused.which, refused.limit) == ("requests per minute", 5)
        assert 1 <= refused.retry_after <= 60
    # Another key has its own count; the windows expire on their own.
    lease_of(await answer(second, "other", rpm))
    window_ttl = await instances.call("PTTL", f"{instances.namespace}{{key}}:w")
    assert 0 < window_ttl <= 120_000
    assert instances.logged(LogLevel.warn) == []


@pytest_twisted.ensureDeferred
async def test_two_instances_share_one_concurrency_limit(instances: Instances) -> None:
    first, second = await instances(), await instances()
    two = Limits(max_concurrent=2)
    held = lease_of(await answer(first, "key", two))
    lease_of(await answer(second, "key", two))
    assert await answer(first, "key", two) == OverLimit("concurrent requests", 2, 1)
    assert await answer(second, "key", two) == OverLimit("concurrent requests", 2, 1)
    lease_ttl = await instances.call("PTTL", f"{instances.namespace}{{key}}:l")
    assert 0 < lease_ttl <= 30_000
    first.release("key", held)
    first.release("key", held)  # twice: harmless
    second.release("key", held)  # not its lease: harmless
    # The release reaches Redis on the first instance's connection: the second sees it soon.
    await until(lambda: admitted(second, "key", two), what="the released slot is free")
    assert await answer(first, "key", two) == OverLimit("concurrent requests", 2, 1)


@pytest_twisted.ensureDeferred
async def test_tokens_per_minute_are_shared(instances: Instances) -> None:
    first, second = await instances(), await instances()
    tpm = Limits(tokens_per_minute=100)
    lease_of(await answer(first, "key", tpm))
    lease_of(await answer(second, "key", tpm))
    first.spend("key", tpm, 60)
    second.spend("key", tpm, 60)

    async def refused() -> OverLimit | None:
        admission = await answer(first, "key", tpm)
        return admission if isinstance(admission, OverLimit) else None

    over = await until(refused, what="the tokens spent on both instances refuse the next")
    assert (over.which, over.limit) == ("tokens per minute", 100)
    assert 1 <= over.retry_after <= 60
    assert isinstance(await answer(second, "key", tpm), OverLimit)


@pytest_twisted.ensureDeferred
async def test_a_dead_instance_lease_expires_a_live_one_is_renewed(instances: Instances) -> None:
    short: dict[str, Any] = {"lease_seconds": 0.6, "renew_seconds": 0.15}
    doomed, survivor = await instances(**short), await instances(**short)
    one = Limits(max_concurrent=1)
    lease = lease_of(await answer(doomed, "key", one))
    key = f"{instances.namespace}{{key}}:l"
    first_expiry = int(await instances.call("ZSCORE", key, lease))

    # Past the lease's first expiry, it is still there: renewed.
    async def past(moment: int) -> bool:
        return await instances.redis_ms() > moment

    await until(lambda: past(first_expiry + 100), what="the first expiry is past")
    assert int(await instances.call("ZSCORE", key, lease)) > first_expiry
    assert await answer(survivor, "key", one) == OverLimit("concurrent requests", 1, 1)

    # The instance dies with its request in flight: its lease expires, the slot is free again.
    await doomed.stopService()
    await until(lambda: admitted(survivor, "key", one), what="the dead instance's lease expired")
    assert await instances.call("ZSCORE", key, lease) is None


# -- Redis away, stalled, back ------------------------------------------------------------------


class _ToRedis(portforward.ProxyClient):
    def dataReceived(self, data: bytes) -> None:
        proxy: Proxy = self.peer.factory.proxy  # type: ignore[union-attr]
        if not proxy.stalled:
            super().dataReceived(data)


class _ToRedisFactory(portforward.ProxyClientFactory):
    protocol = _ToRedis


class _FromClient(portforward.ProxyServer):
    clientProtocolFactory = _ToRedisFactory
    noisy = False

    def connectionMade(self) -> None:
        self.factory.proxy.accepted.add(self)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.proxy.accepted.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)


class Proxy:
    """A TCP proxy to Redis that can be stopped (its connections cut), started again on the
    same port, and stalled (Redis's replies held back)."""

    def __init__(self) -> None:
        self.stalled = False
        self.accepted: set[_FromClient] = set()
        self.port = 0
        self._listening: IListeningPort | None = None

    def start(self) -> int:
        factory = portforward.ProxyFactory("127.0.0.1", 6379)
        factory.protocol = _FromClient
        factory.noisy = False
        factory.proxy = self  # type: ignore[attr-defined]
        self._listening = reactor.listenTCP(
            self.port,
            factory,  # type: ignore[arg-type]
            interface="127.0.0.1",
        )
        self.port = port_number(self._listening)
        return self.port

    @property
    def listening(self) -> bool:
        return self._listening is not None

    async def stop(self) -> None:
        assert self._listening is not None
        listening, self._listening = self._listening, None
        await stop_listening(listening)
        for accepted in list(self.accepted):
            accepted.transport.abortConnection()  # type: ignore[attr-defined]
        await until(lambda: not self.accepted, what="the proxied connections are closed")


def free_port() -> int:
    """A port nothing listens on (it did a moment ago)."""
    listening = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
    port = port_number(listening)
    listening.stopListening()
    return port


@pytest_twisted.async_yield_fixture
async def proxy() -> AsyncIterator[Proxy]:
    made = Proxy()
    made.start()
    yield made
    if made.listening:
        await made.stop()


RPM3 = Limits(requests_per_minute=3)


@pytest_twisted.ensureDeferred
async def test_nothing_listening_requests_flow_on_local_counts(instances: Instances) -> None:
    port = free_port()
    endpoint = Counting(port)
    limits = await instances(f"redis://:sekret@127.0.0.1:{port}/0", wait=False, endpoint=endpoint)
    await until(lambda: endpoint.attempts >= 3, what="several connection attempts")
    # Answered at once, from this instance's counts: no Deferred, no connection per request.
    attempts = endpoint.attempts
    answers = [limits.admit("key", RPM3) for _ in range(50)]
    assert endpoint.attempts <= attempts + 1
    assert [type(a) for a in answers[:4]] == [Admitted, Admitted, Admitted, OverLimit]
    assert isinstance(answers[3], OverLimit) and answers[3].which == "requests per minute"
    [warning] = instances.logged(LogLevel.warn)
    assert warning["redis"] == f"redis://127.0.0.1:{port}/0"
    assert "refused" in warning["why"]
    assert "sekret" not in repr(instances.events)


@pytest_twisted.ensureDeferred
async def test_redis_away_then_back(instances: Instances, proxy: Proxy) -> None:
    endpoint = Counting(proxy.port)
    limits = await instances(f"redis://127.0.0.1:{proxy.port}/0", endpoint=endpoint)
    other = await instances()  # straight to Redis, throughout
    asked = limits.admit("key", RPM3)
    assert isinstance(asked, Deferred)
    lease_of(await asked)

    await proxy.stop()
    await until(lambda: not limits.shared, what="the outage is noticed")
    await until(lambda: endpoint.attempts >= 4, what="reconnections, refused")
    # Answered at once, by this instance's counts: it counted 1 of 3, so 2 more fit (the
    # other instance's requests, counted in Redis, are not seen).
    lease_of(await answer(other, "key", RPM3))
    assert [type(limits.admit("key", RPM3)) for _ in range(3)] == [Admitted, Admitted, OverLimit]
    assert len(instances.logged(LogLevel.warn)) == 1
    assert instances.logged(LogLevel.info) == []

    proxy.start()
    await until(lambda: limits.shared, what="Redis is back")
    assert len(instances.logged(LogLevel.warn)) == 1
    [recovered] = instances.logged(LogLevel.info)
    assert recovered["redis"] == f"redis://127.0.0.1:{proxy.port}/0"
    # Shared again: another key asks Redis.
    asked = limits.admit("fresh", RPM3)
    assert isinstance(asked, Deferred)
    lease_of(await asked)


@pytest_twisted.ensureDeferred
async def test_a_stalled_redis_costs_one_timeout_then_none(
    instances: Instances, proxy: Proxy
) -> None:
    endpoint = Counting(proxy.port)
    limits = await instances(
        f"redis://127.0.0.1:{proxy.port}/0", timeout=0.25, connect_timeout=0.5, endpoint=endpoint
    )
    proxy.stalled = True
    started = reactor.seconds()
    lease_of(await answer(limits, "key", RPM3))
    waited = reactor.seconds() - started
    assert 0.2 <= waited < 1.0, waited
    assert not limits.shared
    [warning] = instances.logged(LogLevel.warn)
    assert warning["why"] == "no answer within 0.25 s"
    # Not waited on again: answered at once while reconnections are tried (and stall too).
    for _ in range(2):
        assert isinstance(limits.admit("key", RPM3), Admitted)
    # Reconnecting logs in, and that stalls too, until its own timeout: still one warning.
    await until(lambda: endpoint.attempts >= 3, what="a log-in timed out")
    assert isinstance(limits.admit("key", RPM3), OverLimit)  # 3 of 3, counted here
    proxy.stalled = False
    await until(lambda: limits.shared, what="Redis answers again")
    assert len(instances.logged(LogLevel.warn)) == 1
    assert len(instances.logged(LogLevel.info)) == 1
