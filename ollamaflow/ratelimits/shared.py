"""Limits enforced by every instance together, through Redis; this instance's counts when
Redis does not answer.

Per API key, Redis holds two keys, both expiring on their own:

- ``<namespace>{<key>}:w``, a hash: the fixed minute ``m`` its counts are of, and the requests
  (``rp``, ``rc``) and tokens (``tp``, ``tc``) of the previous and current minute, read as a
  sliding window by :mod:`.window`'s arithmetic (the Lua below is the same, in integers);
- ``<namespace>{<key>}:l``, a sorted set: the leases of requests in flight, scored by when they
  expire (milliseconds, Redis's clock). Each instance renews the leases it holds every
  ``renew_seconds``; those of an instance that died expire ``lease_seconds`` later.

A request takes one round trip (:data:`ADMIT` checks the three limits and counts it, atomically),
its tokens one (:data:`SPEND`), its end one (ZREM of its lease). The key's name in braces is a
Redis Cluster hash tag: both keys of an API key are in one slot.

**Degrade, never block.** Every answer is also counted in a :class:`.LocalLimits`. When Redis is
down, being reconnected to, slow (past the call timeout) or answers with an error, the call is
answered from those counts at once: requests keep flowing, limits become per instance. The
outage is logged once, its end once; while it lasts, the client reconnects with a growing
delay, never once per request. A request this instance alone would refuse is refused without
asking Redis: every instance together has counted at least what this one has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaflow.ratelimits import window
from ollamaflow.ratelimits.contracts import Admission, Admitted, Limits, OverLimit
from ollamaflow.ratelimits.local import LocalLimits
from ollamaflow.ratelimits.redisclient import (
    BACKOFF,
    CALL_TIMEOUT,
    CONNECT_TIMEOUT,
    RedisAddress,
    RedisClient,
    RedisUnavailable,
    Script,
    one_line,
)

log = Logger()

#: Where the limits' keys live in Redis, by default.
NAMESPACE = "ollamaflow:rl:"
#: Seconds a lease lives in Redis unless renewed, and between two renewals, by default.
LEASE_SECONDS = 30.0
RENEW_SECONDS = 10.0
#: How long a window hash outlives its last write (ms): two minutes on, its counts are zero.
WINDOW_TTL_MS = 2 * window.MINUTE_MS
#: Leases renewed per script call at most.
RENEW_BATCH = 500
#: Seconds between two warnings about Redis's error replies.
ERROR_LOG_SECONDS = 60.0

# The shared preamble: Redis's time in ms, and the key's window hash rolled to its minute.
_WINDOW = """
local W = 60000
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local minute = math.floor(now / W)
local elapsed = now - minute * W
local h = redis.call('HMGET', KEYS[1], 'm', 'rp', 'rc', 'tp', 'tc')
local m = tonumber(h[1]) or minute
local rp, rc = tonumber(h[2]) or 0, tonumber(h[3]) or 0
local tp, tc = tonumber(h[4]) or 0, tonumber(h[5]) or 0
if minute < m then
  minute, elapsed = m, 0 -- Redis's clock went back: go on counting in the newer minute
elseif minute == m + 1 then
  rp, rc, tp, tc = rc, 0, tc, 0
elseif minute > m + 1 then
  rp, rc, tp, tc = 0, 0, 0, 0
end
"""

#: Admit one request, or not, in one step. KEYS: the window hash, the lease set. ARGV: requests
#: per minute, tokens per minute, concurrent requests (0: no limit), the lease, its lifetime
#: (ms), the window's lifetime (ms). Admitted when one more request fits the requests' window,
#: the tokens' window is below its limit and fewer than the limit of unexpired leases are held;
#: then the request is counted (and its lease added). Returns ``{admitted (1/0), ms into the
#: minute, rp, rc, tp, tc, leases held}``, counts as of now, so the caller can say which limit
#: refused and for how long.
ADMIT = Script(
    _WINDOW
    + """
local rpm, tpm, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ok = 1
if rpm > 0 and rp * (W - elapsed) + rc * W + W > rpm * W then ok = 0 end
if tpm > 0 and tp * (W - elapsed) + tc * W + 1 > tpm * W then ok = 0 end
local held = 0
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  held = redis.call('ZCARD', KEYS[2])
  if held >= most then ok = 0 end
end
if ok == 1 then
  if rpm > 0 or tpm > 0 then
    if rpm > 0 then rc = rc + 1 end
    redis.call('HSET', KEYS[1], 'm', minute, 'rp', rp, 'rc', rc, 'tp', tp, 'tc', tc)
    redis.call('PEXPIRE', KEYS[1], ARGV[6])
  end
  if most > 0 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[5])
    held = held + 1
  end
end
return {ok, elapsed, rp, rc, tp, tc, held}
"""
)

#: Count tokens. KEYS: the window hash. ARGV: the tokens, the window's lifetime (ms). Returns
#: the tokens of the current minute.
SPEND = Script(
    _WINDOW
    + """
tc = tc + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'm', minute, 'rp', rp, 'rc', rc, 'tp', tp, 'tc', tc)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return tc
"""
)

#: Renew leases: KEYS[i] is the lease set of ARGV[i + 1]; ARGV[1] their lifetime (ms). A lease
#: that expired meanwhile (Redis was out of reach) is added again: its request is in flight.
RENEW = Script(
    """
local time = redis.call('TIME')
local expiry = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], expiry, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return #KEYS
"""
)

SCRIPTS = (ADMIT, SPEND, RENEW)


class SharedLimits(Service):
    """A :class:`~.contracts.RateLimiter` whose counts every instance shares through Redis at
    ``address`` (a :class:`RedisAddress` or a ``redis://`` URL). A service: it connects when
    started and closes its connection when stopped. ``endpoint`` replaces the TCP connection."""

    def __init__(
        self,
        reactor: IReactorTime,
        address: RedisAddress | str,
        *,
        endpoint: IStreamClientEndpoint | None = None,
        namespace: str = NAMESPACE,
        timeout: float = CALL_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        backoff: tuple[float, float] = BACKOFF,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
    ) -> None:
        if isinstance(address, str):
            address = RedisAddress.from_url(address)
        self.redis = RedisClient(
            reactor,
            address,
            endpoint=endpoint,
            timeout=timeout,
            connect_timeout=connect_timeout,
            backoff=backoff,
            scripts=SCRIPTS,
        )
        self.redis.watch(self._redis_up, self._redis_down)
        self.local = LocalLimits(reactor)
        self._clock = reactor
        self._namespace = namespace
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._renew_seconds = renew_seconds
        self._renewing = LoopingCall(self._renew)
        self._renewing.clock = reactor
        #: Leases of this instance's requests in flight under a concurrency limit → their key.
        self._held: dict[str, str] = {}
        self._outage = False
        self._error_logged_at: float | None = None

    # -- the service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.redis.start()
        self._renewing.start(self._renew_seconds, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._renewing.running:
            self._renewing.stop()
        return self.redis.close()

    @property
    def shared(self) -> bool:
        """Whether calls go to Redis now (rather than to this instance's counts alone)."""
        return self.redis.ready

    # -- the RateLimiter protocol -------------------------------------------------------------

    def admit(self, key_id: str, limits: Limits) -> Admission | Deferred[Admission]:
        """Count one request against ``key_id`` if every limit allows it: a Deferred (which
        never fails) when Redis is asked, else the answer of this instance's counts."""
        if not self.redis.ready:
            return self._admit_here(key_id, limits)
        refused = self.local.check(key_id, limits)
        if refused is not None:
            return refused
        # A lease only where there is a concurrency limit to hold it against.
        lease = self.local.new_lease() if limits.max_concurrent > 0 else ""
        asked = self.redis.run(
            ADMIT,
            (self._window_key(key_id), self._lease_key(key_id)),
            (
                limits.requests_per_minute,
                limits.tokens_per_minute,
                limits.max_concurrent,
                lease,
                self._lease_ms,
                WINDOW_TTL_MS,
            ),
        )
        asked.addCallback(self._answered, key_id, limits, lease)
        asked.addErrback(self._unanswered, key_id, limits)
        return asked

    def release(self, key_id: str, lease: str) -> None:
        """The request holding ``lease`` ended: free its slot here and in Redis."""
        self.local.release(key_id, lease)
        if self._held.pop(lease, None) is not None and self.redis.ready:
            self.redis.call("ZREM", self._lease_key(key_id), lease).addErrback(self._failed)

    def spend(self, key_id: str, limits: Limits, tokens: int) -> None:
        """Count ``tokens`` against ``key_id``'s tokens per minute, here and in Redis."""
        self.local.spend(key_id, limits, tokens)
        if limits.tokens_per_minute > 0 and tokens > 0 and self.redis.ready:
            spent = self.redis.run(SPEND, (self._window_key(key_id),), (tokens, WINDOW_TTL_MS))
            spent.addErrback(self._failed)

    def finish(self, key_id: str, limits: Limits, lease: str, tokens: int) -> None:
        """:meth:`release` then :meth:`spend`."""
        if lease:
            self.release(key_id, lease)
        self.spend(key_id, limits, tokens)

    # -- answers --------------------------------------------------------------------------------

    def _answered(self, reply: Any, key_id: str, limits: Limits, lease: str) -> Admission:
        """Redis's verdict, counted here too when it admits."""
        admitted, elapsed, rp, rc, tp, tc, held = _integers(reply, 7)
        if admitted:
            self.local.record(key_id, limits, lease)
            if limits.max_concurrent > 0:
                self._held[lease] = key_id
            return Admitted(lease)
        refused = window.refusal(limits, elapsed, (rp, rc), (tp, tc), held)
        # Redis and window.refusal agree by construction; should they not, Redis's word holds.
        return refused or OverLimit(window.REQUESTS_PER_MINUTE, limits.requests_per_minute, 1)

    def _unanswered(self, failure: Failure, key_id: str, limits: Limits) -> Admission:
        """No verdict from Redis: this instance's counts decide."""
        self._failed(failure)
        return self._admit_here(key_id, limits)

    def _admit_here(self, key_id: str, limits: Limits) -> Admission:
        """This instance's counts decide; a lease it admits under a concurrency limit is held
        (and so put in Redis at the next renewal)."""
        answer = self.local.admit(key_id, limits)
        if isinstance(answer, Admitted) and answer.lease:
            self._held[answer.lease] = key_id
        return answer

    def _failed(self, failure: Failure) -> None:
        """A call went unanswered. Outages are told by the client's watch (a timeout drops the
        connection too); an error reply (or one we cannot read), which keeps the connection,
        is logged at most once a minute."""
        if failure.check(RedisUnavailable):
            return
        now = self._clock.seconds()
        if self._error_logged_at is None or now - self._error_logged_at >= ERROR_LOG_SECONDS:
            self._error_logged_at = now
            log.warn(
                "Redis at {redis} answered a rate-limit call with an error ({why}): answered "
                "from this instance's counts (logged at most once a minute)",
                redis=self.redis.address.describe(),
                why=one_line(failure),
            )

    # -- Redis's ups and downs ------------------------------------------------------------------

    def _redis_down(self, why: str) -> None:
        if not self._outage:
            self._outage = True
            log.warn(
                "Redis at {redis} cannot be used ({why}): rate limits are counted by each "
                "instance alone until it answers again",
                redis=self.redis.address.describe(),
                why=why,
            )

    def _redis_up(self) -> None:
        if self._outage:
            self._outage = False
            log.info(
                "Redis at {redis} answers again: rate limits are shared again",
                redis=self.redis.address.describe(),
            )
        # Leases taken while it was away (or that expired there meanwhile) count again.
        self._renew()

    def _renew(self) -> None:
        """Push back the expiry of this instance's leases in Redis, in a call per batch."""
        if not self._held or not self.redis.ready:
            return
        held = list(self._held.items())
        for start in range(0, len(held), RENEW_BATCH):
            batch = held[start : start + RENEW_BATCH]
            keys = [self._lease_key(key_id) for _, key_id in batch]
            leases = [lease for lease, _ in batch]
            self.redis.run(RENEW, keys, (self._lease_ms, *leases)).addErrback(self._failed)

    # -- Redis's keys -------------------------------------------------------------------------

    def _window_key(self, key_id: str) -> str:
        return f"{self._namespace}{{{key_id}}}:w"

    def _lease_key(self, key_id: str) -> str:
        return f"{self._namespace}{{{key_id}}}:l"


def _integers(reply: Any, count: int) -> Sequence[int]:
    """``reply`` checked to be ``count`` integers (ValueError if not)."""
    if (
        not isinstance(reply, list)
        or len(reply) != count
        or not all(isinstance(value, int) for value in reply)
    ):
        raise ValueError(f"unexpected reply from a rate-limit script: {reply!r:.100}")
    return reply
