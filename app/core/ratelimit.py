"""Per-API-key rate limits: a token bucket per key, kept in Redis so that every API process shares it.

Each key has a bucket of `burst` tokens that refills at `per_s` tokens a second; a request takes one
token, and a request that finds the bucket empty is answered 429 `rate_limited` with `Retry-After`
(whole seconds until a token is back). The bucket lives in one Redis hash per key
(`gatt:ratelimit:<key prefix>`: tokens and the time they were counted), updated by a Lua script, so a
check is one atomic round trip and API processes on several hosts see the same bucket. The clock is
Redis's own (`TIME`), not each host's, so hosts with skewed clocks neither mint nor lose tokens. An
idle bucket expires once it would be full again, so Redis holds only the keys used lately.

The limit is checked after authentication (`app.auth.dependencies.current_team`): only a valid key
has a bucket, so a client cannot fill Redis with buckets of made-up keys, nor spend another team's
tokens by naming its key prefix.

**Fail open.** When Redis does not answer (down, restarting, unreachable), requests are let through and
a warning is logged (at most once every `warn_every_s`). The limit protects capacity; it is not an
authorisation check (the key was already verified against Postgres), and Redis is otherwise only the
job queue, whose outage merely delays job starts (the reaper sends queued jobs again). Failing closed
would turn a broker blip into a full API outage, job status reads included. After a failure the
limiter does not ask Redis again for `retry_after_error_s`, so an outage adds no connect timeout to
every request; short socket timeouts bound the cost of the request that finds Redis gone.

The embedded mode has no Redis and one process: `LocalRateLimiter` keeps the same buckets in memory.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "gatt:ratelimit:"

# KEYS[1]: the bucket. ARGV: rate (tokens/s), burst (tokens), cost (tokens).
# Returns {allowed (0/1), milliseconds until `cost` tokens are there (0 when allowed), tokens left}.
# Numbers travel as strings: Lua numbers returned to Redis are truncated to integers.
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = math.max(0, now - ts)
tokens = math.min(burst, tokens + elapsed * rate / 1000)
local allowed = 0
local wait_ms = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
return {allowed, wait_ms, tostring(tokens)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int  # whole seconds until a request would be allowed; 0 when allowed
    remaining: float  # tokens left in the bucket (inf when Redis was not asked)


class RateLimiter:
    """A token bucket per key in Redis: `per_s` tokens a second, at most `burst` saved up."""

    def __init__(
        self,
        client: redis.Redis,
        per_s: float,
        burst: int,
        *,
        retry_after_error_s: float = 5.0,
        warn_every_s: float = 60.0,
    ) -> None:
        if per_s <= 0 or burst < 1:
            raise ValueError("per_s must be > 0 and burst >= 1")
        self.client, self.per_s, self.burst = client, per_s, burst
        self.retry_after_error_s, self.warn_every_s = retry_after_error_s, warn_every_s
        self._script = client.register_script(_TOKEN_BUCKET)
        self._lock = threading.Lock()
        self._skip_until = 0.0  # monotonic time until which Redis is not asked (after a failure)
        self._last_warning = -math.inf

    @classmethod
    def from_url(
        cls, url: str, per_s: float, burst: int, *, timeout_s: float = 0.25, **kwargs: float
    ) -> RateLimiter:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=30
        )
        return cls(client, per_s, burst, **kwargs)

    def check(self, key: str, cost: int = 1) -> Decision:
        """Take `cost` tokens from `key`'s bucket if it has them. Never raises: see fail open."""
        if time.monotonic() < self._skip_until:
            return Decision(True, 0, math.inf)
        try:
            allowed, wait_ms, remaining = self._script(
                keys=[KEY_PREFIX + key], args=[repr(float(self.per_s)), self.burst, cost]
            )
        except redis.RedisError as exc:
            self._failed(exc)
            return Decision(True, 0, math.inf)
        if allowed:
            return Decision(True, 0, float(remaining))
        return Decision(False, max(1, math.ceil(int(wait_ms) / 1000)), float(remaining))

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self._skip_until = now + self.retry_after_error_s
            if now - self._last_warning < self.warn_every_s:
                return
            self._last_warning = now
        log.warning(
            "rate limiting is off for now: Redis did not answer (%s: %s); requests are let through "
            "(fail open) and Redis is asked again in %g s",
            type(exc).__name__,
            exc,
            self.retry_after_error_s,
        )

    def close(self) -> None:
        self.client.close()


class LocalRateLimiter:
    """The same token bucket per key, in this process's memory: for the embedded mode (one process,
    no Redis). Keys reach it only after authentication, so it holds at most one bucket per real key,
    and buckets that have refilled are dropped (a full bucket is the same as none)."""

    def __init__(self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_s <= 0 or burst < 1:
            raise ValueError("per_s must be > 0 and burst >= 1")
        self.per_s, self.burst, self._clock = per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when they were counted)
        self._lock = threading.Lock()
        self._refill_s = burst / per_s  # an untouched bucket is full again after this long
        self._swept = clock()

    def check(self, key: str, cost: int = 1) -> Decision:
        now = self._clock()
        with self._lock:
            if now - self._swept > self._refill_s:
                self._swept = now
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < self._refill_s}
            tokens, when = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.per_s)
            allowed = tokens >= cost
            if allowed:
                tokens -= cost
            self._buckets[key] = (tokens, now)
        if allowed:
            return Decision(True, 0, tokens)
        return Decision(False, max(1, math.ceil((cost - tokens) / self.per_s)), tokens)

    def close(self) -> None:
        pass


Limiter = RateLimiter | LocalRateLimiter
