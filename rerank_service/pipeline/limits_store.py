"""The callers' buckets in Redis, so every worker and replica holds each limit together.

A call's check is one round trip: one Lua script refills the caller's buckets from
Redis's own clock, takes the call's costs from all of them or from none, and takes a
lease among its calls in flight, atomically (no read-modify-write from Python, no clock
of ours). What a call settles when it ends (its tokens bucket corrected by what it really
used, its lease given back) rides on the same script as its caller's next check when this
process asks for that in the same turn of the event loop. Else a lease given back is sent
at once (the caller's next call may land on another process, which must not find it still
held), and a token correction alone waits `flush_after` for that next check; what none
takes is then sent for every caller at once. Runs asked for in the same turn of the event
loop, or while MAX_PIPELINES round trips are in flight, go in one pipeline: under load
many calls' checks share one round trip. A check refused for the caller's calls in flight
alone is made once more after `timeout` (that caller's previous call, ended on another
process, may have sent its lease back just now) before the refusal stands. Each caller's
state is one hash (its buckets' levels and when they were set) and one sorted set (its
leases, scored by their expiry), under the caller's hash tag after the key prefix
(`--limits-store-prefix`), each expiring once its bucket would be full again or its last
lease over: a key that is gone is a full bucket.

Redis that fails or does not answer within the timeout raises `StoreUnavailable` (the
limiter falls back, limits.py); the store is then skipped for `retry_after` seconds, so
an outage costs one call the timeout now and then, not every call. The outage is logged
once when it starts and once when it ends. A run that Redis answers with an error (a key
of the wrong type, say) fails its own call alone, which falls back: Redis is not taken for
down for the calls whose runs went in the same pipeline; what such a run settled is
dropped (it would fail again), its leases left to expire. An error of Redis's own state
(READONLY, OOM, MISCONF, NOPERM...) is taken as no answer; a READONLY one (a failover
demoted the primary, which keeps our connections open) also closes them, so the next try
reaches the new primary through the URL's address.

Redis Cluster is not supported: a caller's keys share one hash tag, but the client talks
to one node, which answers MOVED for the slots it does not hold (those callers' calls then
fall back).

A lease is never left behind by a call that did not get its answer: a check skipped while
Redis is taken for down sends nothing, and the settlement it carried waits for the next
try; a check sent and not answered in time may have run, so its lease (and the leases
its settlement gave back) are given back `retry_after` later (giving back a lease twice,
or one never taken, changes nothing); a check whose call was cancelled meanwhile is
settled when its answer comes, its tokens and lease given back.
A token correction sent with a round trip that failed may have been applied, so it is
not sent again: it is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from rerank_service.config.callers import BucketLimit, CallerLimits
from rerank_service.config.settings import DEFAULT_LIMITS_STORE_PREFIX
from rerank_service.observability.logging import get_logger
from rerank_service.pipeline.buckets import CONCURRENT, CONCURRENT_RETRY_AFTER, Refusal
from rerank_service.redis_client import DEFAULT_TIMEOUT, RedisOutage, reconnect_if_read_only, timed_out

_log = get_logger("rerank_service.limits")

KEY_PREFIX = DEFAULT_LIMITS_STORE_PREFIX  # --limits-store-prefix
DEFAULT_RETRY_AFTER = 1.0  # seconds the store is skipped after a failure
DEFAULT_FLUSH_AFTER = 0.05  # seconds a token correction waits for its caller's next check
RUN_ERROR_LOG_EVERY = 60.0  # seconds between two log lines of runs Redis answered with an error
# Pipelines in flight at once: the runs asked for while they are collect into the next one,
# so under load the round trips per call fall well below one.
MAX_PIPELINES = 1

# KEYS: the caller's buckets (a hash), its leases (a sorted set).
# ARGV, first what earlier calls settle: the tokens bucket's name ('' for none), the
# correction (used less taken), its rate per second, its burst, the number of leases to
# give back, those leases; then what this call takes: n, per bucket its name, rate per
# second, burst and cost; concurrent (0: none), the lease in milliseconds, the lease.
# Returns {1} when taken (or nothing to take), else {0, limit, seconds to wait as a string}.
_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

-- Keep `key` at least `ms` milliseconds more. Capped at 2^53 ms (a bucket that refills
-- slower is taken for full some 285,000 years on) and sent as an integer's digits: a Lua
-- number goes as '1e+17' past 14 digits, which PEXPIRE refuses, failing the script.
local function keep_for(key, ms)
  ms = math.min(math.ceil(ms), 9007199254740992)
  if ms > redis.call('PTTL', key) then
    redis.call('PEXPIRE', key, string.format('%d', ms))
  end
end

local settled = ARGV[1]
if settled ~= '' then
  local correction, rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local state = redis.call('HMGET', KEYS[1], settled .. ':level', settled .. ':at')
  local level, at = tonumber(state[1]), tonumber(state[2])
  if level == nil or at == nil then
    level = burst
  else
    level = math.min(burst, level + math.max(0, now - at) * rate)
  end
  level = math.min(burst, level - correction)
  redis.call('HSET', KEYS[1], settled .. ':level', tostring(level), settled .. ':at', tostring(now))
  keep_for(KEYS[1], (burst - level) / rate * 1000 + 1000)
end
local leases = tonumber(ARGV[5])
for i = 1, leases do
  redis.call('ZREM', KEYS[2], ARGV[5 + i])
end

local o = 6 + leases
local n = tonumber(ARGV[o])
local left, refused, wait, keep = {}, false, 0, 0
for i = 1, n do
  local at = o + 4 * i - 3
  local name, rate = ARGV[at], tonumber(ARGV[at + 1])
  local burst, cost = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local state = redis.call('HMGET', KEYS[1], name .. ':level', name .. ':at')
  local level = tonumber(state[1])
  if level == nil then
    level = burst
  else
    level = math.min(burst, level + math.max(0, now - (tonumber(state[2]) or now)) * rate)
  end
  local need = math.min(cost, burst)
  if level < need and (need - level) / rate > wait then
    refused, wait = name, (need - level) / rate
  end
  left[i] = level - cost
  keep = math.max(keep, (burst - left[i]) / rate)
end
local c = o + 4 * n + 1
local concurrent = tonumber(ARGV[c])
if not refused and concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= concurrent then
    refused = 'concurrent'
  end
end
if refused then
  return {0, refused, tostring(wait)}
end
for i = 1, n do
  local name = ARGV[o + 4 * i - 3]
  redis.call('HSET', KEYS[1], name .. ':level', tostring(left[i]), name .. ':at', tostring(now))
end
if n > 0 then
  keep_for(KEYS[1], keep * 1000 + 1000)
end
if concurrent > 0 then
  local lease = tonumber(ARGV[c + 1]) / 1000
  redis.call('ZADD', KEYS[2], now + lease, ARGV[c + 2])
  keep_for(KEYS[2], lease * 1000 + 1000)
end
return {1}
"""


@dataclass
class _Settlement:
    """What a caller's ended calls give back, not sent yet."""

    tokens: BucketLimit | None = None
    correction: float = 0.0
    leases: list[str] = field(default_factory=list)

    def merge(self, other: _Settlement) -> None:
        """Add what `other` settles to this one."""
        if other.tokens is not None and other.correction:
            self.tokens = other.tokens
            self.correction += other.correction
        self.leases += other.leases

    def args(self) -> list[str | float]:
        tokens = self.tokens
        if tokens is None or not self.correction:
            head: list[str | float] = ["", 0, 1, 1]
        else:
            head = [tokens.name, self.correction, tokens.per_second, tokens.burst]
        return [*head, len(self.leases), *self.leases]


_NOTHING = _Settlement()
_NO_TAKE: list[str | float] = [0, 0, 0, ""]  # no bucket, no concurrent limit


class StoreUnavailable(Exception):
    """Redis failed, did not answer within the timeout, or is skipped after a failure."""


# Errors Redis answers a run with because of that caller's own keys (a key of another type;
# a cluster's node that does not hold them): every later run of that caller fails alike.
# Any other error of a run (READONLY, MISCONF, OOM, BUSY, LOADING...) is Redis's, and passes.
_KEYS_AT_FAULT = ("WRONGTYPE", "MOVED", "ASK", "CROSSSLOT")


def _keys_at_fault(error: ResponseError) -> bool:
    """Whether Redis refused a run for its caller's keys (WRONGTYPE...), not for a state of
    its own that passes; a script's error says the command's after its own prefix."""
    words = str(error).replace(":", " ").split()
    return any(word in _KEYS_AT_FAULT for word in words)


class RunFailed(StoreUnavailable):
    """Redis answered this call's run of the script with an error (its caller's keys are at
    fault, not Redis). The run took no lease: the lease's ZADD is the script's last write,
    and nothing after it can fail."""


def _add(settlements: dict[str, _Settlement], caller: str, settlement: _Settlement) -> None:
    """`settlement` added to what `settlements` holds for `caller` (a copy: a settlement passed
    in may be another's, or the shared empty one)."""
    kept = settlements.get(caller)
    if kept is None:
        kept = settlements[caller] = _Settlement()
    kept.merge(settlement)


class RedisLimits:
    """`take` and `settle` of the callers' buckets on `client`."""

    def __init__(
        self,
        client: Redis,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
        flush_after: float = DEFAULT_FLUSH_AFTER,
        key_prefix: str = KEY_PREFIX,
        on_error: Callable[[], None] = lambda: None,
        on_round_trip: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._clock = clock
        self._sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names a script by its SHA-1
        self.timeout = timeout
        self._flush_after = flush_after
        self._prefix = key_prefix
        self._on_error = on_error
        self._on_round_trip = on_round_trip
        self._outage = RedisOutage(retry_after, clock)
        self._pending: dict[str, _Settlement] = {}  # by caller
        self._flush: asyncio.TimerHandle | None = None
        # Sent again after a round trip that got no answer, by caller: kept apart from
        # `_pending` (which a caller's settle flushes at once) until `retry_after` has passed.
        self._again: dict[str, _Settlement] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        # Script runs asked for in this turn of the event loop, sent together (`_send`).
        self._batch: list[tuple[str, list[str], list[str | float], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._run_error_logged_at: float | None = None
        self.errors = 0
        self.round_trips = 0

    @property
    def up(self) -> bool:
        return self._outage.up

    def keys(self, caller: str) -> list[str]:
        """The caller's two keys, under one hash tag (one Redis Cluster slot)."""
        bucket = f"{self._prefix}{{{caller}}}"
        return [bucket, bucket + ":calls"]

    async def take(
        self,
        caller: str,
        limits: CallerLimits,
        costs: Sequence[float],
        lease: str,
        lease_seconds: float,
        *,
        deadline: float | None = None,
    ) -> Refusal | None:
        """Take `costs` from the caller's buckets and a lease named `lease` among its calls
        in flight (with a concurrent limit), or nothing: the refusal. What the caller's
        ended calls settle goes first, in the same script. StoreUnavailable when Redis does
        not answer.

        A check refused for the concurrent limit alone is made once more after `timeout`
        seconds, unless `deadline` (time.monotonic()'s) comes first: the caller's previous
        call may have ended on another process a moment ago, its lease sent back as it ended
        but not yet applied (its answer reached the caller first). A second refusal stands."""
        refusal = await self._check(caller, limits, costs, lease, lease_seconds)
        if refusal is None or refusal.limit != CONCURRENT:
            return refusal
        if deadline is not None and time.monotonic() + self.timeout >= deadline:
            return refusal  # no time left to check again
        await asyncio.sleep(self.timeout)  # a cancelled call holds nothing: the check was refused
        return await self._check(caller, limits, costs, lease, lease_seconds)

    async def _check(
        self, caller: str, limits: CallerLimits, costs: Sequence[float], lease: str, lease_seconds: float
    ) -> Refusal | None:
        """One check of `take`, one run of the script."""
        settlement = self._pending.pop(caller, _NOTHING)
        args = settlement.args()
        args.append(len(limits.buckets))
        for bucket, cost in zip(limits.buckets, costs, strict=True):
            args += [bucket.name, bucket.per_second, bucket.burst, cost]
        args += [limits.concurrent or 0, max(1, math.ceil(lease_seconds * 1000)), lease]
        try:
            pending = self._submit("take", self.keys(caller), args)
        except StoreUnavailable:  # skipped: nothing was sent, so nothing of it was applied
            self._keep(caller, settlement, again=True)
            raise
        try:
            # Shielded: a call cancelled while its check is out leaves the answer to come.
            answer = await asyncio.shield(pending)
        except asyncio.CancelledError:
            tokens_taken = costs[-1] if limits.tokens is not None else 0.0  # the last bucket's
            pending.add_done_callback(
                partial(self._abandoned, caller, limits, tokens_taken, lease, settlement.leases)
            )
            raise
        except RunFailed:  # Redis ran it and refused it: nothing taken, its settlement dropped
            raise
        except StoreUnavailable:  # sent and not answered: it may have run
            self._give_back_leases(caller, limits, lease, settlement.leases)
            raise
        if answer[0] == 1:
            return None
        limit = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
        if limit == CONCURRENT:
            return Refusal(CONCURRENT, CONCURRENT_RETRY_AFTER)
        return Refusal(limit, float(answer[2]))

    def _abandoned(
        self,
        caller: str,
        limits: CallerLimits,
        tokens_taken: float,
        lease: str,
        given_back: list[str],
        pending: asyncio.Future[Any],
    ) -> None:
        """The answer to the check of a call cancelled meanwhile: what it took, given back."""
        if pending.cancelled() or pending.exception() is not None:
            if pending.cancelled() or not isinstance(pending.exception(), RunFailed):
                self._give_back_leases(caller, limits, lease, given_back)
        elif pending.result()[0] == 1:  # taken, for a call that has gone
            self.settle(caller, limits, -tokens_taken, lease)

    def _give_back_leases(self, caller: str, limits: CallerLimits, lease: str, given_back: list[str]) -> None:
        """A check that may or may not have run: its lease, and the leases its settlement
        gave back, are given back (again) once Redis may be tried again."""
        leases = [*given_back, lease] if limits.concurrent is not None else list(given_back)
        if leases:
            self._keep(caller, _Settlement(leases=leases), again=True)

    def _keep(self, caller: str, settlement: _Settlement, *, again: bool = False) -> None:
        """Settle `settlement` with the caller's next check, or with a flush: at once when it
        gives back leases (the caller's next call may be checked by another process, which
        must find them given back), within `flush_after` when it corrects tokens alone, and
        once Redis may be tried again while it is down. `again`: sent again after a round
        trip that got no answer, `retry_after` later and no sooner (kept apart: another
        settlement's flush at once must not take it along). After aclose nothing is kept:
        the leases expire."""
        if self._closed or (not settlement.leases and not settlement.correction):
            return
        if again:
            _add(self._again, caller, settlement)
            if self._retry is None:
                loop = asyncio.get_running_loop()
                self._retry = loop.call_later(self._outage.retry_after, self._retry_due)
            return
        _add(self._pending, caller, settlement)
        if not self._outage.up:
            self._schedule_flush(self._outage.retry_after)
        else:
            self._schedule_flush(0.0 if settlement.leases else self._flush_after)

    def _retry_due(self) -> None:
        """`retry_after` has passed: what is to be sent again joins the pending settlements,
        flushed now."""
        self._retry = None
        self._requeue()
        self._schedule_flush(0.0)

    def _requeue(self) -> None:
        """What is to be sent again, moved to the pending settlements."""
        again, self._again = self._again, {}
        for caller, settlement in again.items():
            _add(self._pending, caller, settlement)

    def _schedule_flush(self, delay: float) -> None:
        """A flush in `delay` seconds, unless one is due by then already."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._flush is not None:
            if self._flush.when() <= loop.time() + delay:
                return
            self._flush.cancel()
        # Settlements of this turn of the event loop go in one flush, so one pipeline.
        self._flush = loop.call_later(delay, self._start_flush)

    def settle(self, caller: str, limits: CallerLimits, token_correction: float, lease: str) -> None:
        """A call admitted by `take` ended: its tokens bucket is to be corrected by
        `token_correction` (used less taken) and its lease given back, with the caller's next
        check in this turn of the event loop, else its lease at once and its correction within
        `flush_after` (while Redis is down, once it may be tried again)."""
        tokens = limits.tokens if token_correction else None
        leases = [lease] if limits.concurrent is not None else []
        self._keep(caller, _Settlement(tokens, token_correction if tokens is not None else 0.0, leases))

    def _start_flush(self) -> None:
        self._flush = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Send every caller's pending settlement now, together (one round trip). What cannot
        be sent now is kept for later (`_keep`)."""
        pending, self._pending = self._pending, {}
        sent: list[tuple[str, _Settlement, asyncio.Future[Any]]] = []
        for caller, settlement in pending.items():
            try:
                sent.append(
                    (
                        caller,
                        settlement,
                        self._submit("settle", self.keys(caller), [*settlement.args(), *_NO_TAKE]),
                    )
                )
            except StoreUnavailable:  # skipped: sent later
                self._keep(caller, settlement, again=True)
        outcomes = await asyncio.gather(*(answer for *_, answer in sent), return_exceptions=True)
        for (caller, settlement, _), outcome in zip(sent, outcomes, strict=True):
            # Not answered: it may have run, its leases go again. Refused by Redis (RunFailed:
            # the caller's keys are at fault): it would fail again, each time counted an
            # error, so it is dropped and its leases expire in their lease time.
            if isinstance(outcome, BaseException) and not isinstance(outcome, RunFailed):
                self._keep(caller, _Settlement(leases=settlement.leases), again=True)

    async def aclose(self) -> None:
        """Send what is pending, then close the connections."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._requeue()  # the last chance to send them
        self._closed = True  # what the last flush cannot send is left to expire
        await self.flush()
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self._client.aclose()

    def _submit(self, operation: str, keys: list[str], args: list[str | float]) -> asyncio.Future[Any]:
        """One run of the script, sent with every other run asked for in the same turn of
        the event loop (under load, many calls' checks share one round trip): the future of
        its answer. StoreUnavailable at once, with nothing sent, while Redis is skipped."""
        if not self._outage.may_try():
            raise StoreUnavailable("skipped after a failure")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._batch.append((operation, keys, args, answer))
        if len(self._batch) == 1 and len(self._sending) < MAX_PIPELINES:
            loop.call_soon(self._send)
        return answer

    def _send(self) -> None:
        """Send the runs asked for so far in one pipeline; with MAX_PIPELINES in flight, the
        next one goes when one of them is answered, with every run asked for meanwhile."""
        if not self._batch or len(self._sending) >= MAX_PIPELINES:
            return
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._send_batch(batch))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._batch:
            self._send()

    async def _send_batch(
        self, batch: list[tuple[str, list[str], list[str | float], asyncio.Future[Any]]]
    ) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                answers = await self._pipelined([(keys, args) for _, keys, args, _ in batch])
        except Exception as error:  # any failure of the store: each call falls back
            self._failed(batch[0][0], error)
            for *_, answer in batch:
                if not answer.done():
                    answer.set_exception(StoreUnavailable(type(error).__name__))
            return
        failed: tuple[str, ResponseError] | None = None
        refusing: tuple[str, ResponseError] | None = None
        answered = False  # a run answered for itself (taken, refused, or its keys at fault)
        for (operation, *_, answer), result in zip(batch, answers, strict=True):
            if isinstance(result, ResponseError) and _keys_at_fault(result):
                # This run's own failure: its call alone falls back, its settlement dropped.
                failed = failed or (operation, result)
                answered = True
                if not answer.done():
                    answer.set_exception(RunFailed(type(result).__name__))
            elif isinstance(result, ResponseError):
                # Redis refusing every write for now (a failover's READONLY, MISCONF on a
                # full disk, OOM, BUSY...): as if it did not answer, what was to be settled
                # goes again once it may be tried again.
                refusing = refusing or (operation, result)
                if not answer.done():
                    answer.set_exception(StoreUnavailable(type(result).__name__))
            else:
                answered = True
                if not answer.done():  # a call cancelled meanwhile has gone
                    answer.set_result(result)
        # Up again only for a real answer: a round trip whose every run Redis refused for its
        # own state is an outage going on, not one ending (else "answers again", then
        # "unreachable" again, would be logged at each try).
        if answered:
            self._answered()
        if refusing is not None:
            self._failed(*refusing)
            # Behind one address, a demoted primary's connections lead to it for good: the
            # next try connects again, to the new primary. Before the next pipeline goes.
            await reconnect_if_read_only(self._client, *answers)
        if failed is not None:
            self._run_failed(*failed)

    async def _pipelined(self, runs: list[tuple[list[str], list[str | float]]]) -> list[Any]:
        """The runs in one pipeline, by the script's SHA-1: their answers, a run that Redis
        answered with an error as that ResponseError. The runs answered NOSCRIPT (the
        script's first use, or after a restart or a SCRIPT FLUSH) are sent once more, after
        the script is loaded: those alone, for a pipeline is not atomic: a SCRIPT FLUSH landing
        while Redis works through it leaves the runs before it run, which must not run twice
        (their costs taken, their tokens given back, twice)."""
        answers = await self._pipeline(runs)
        missed = [index for index, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if missed:
            await self._client.script_load(_SCRIPT)
            again = await self._pipeline([runs[index] for index in missed])
            for index, answer in zip(missed, again, strict=True):
                answers[index] = answer  # NOSCRIPT again: Redis's state, that run is unavailable
        return answers

    async def _pipeline(self, runs: list[tuple[list[str], list[str | float]]]) -> list[Any]:
        """One round trip: the runs by the script's SHA-1, each answer or ResponseError."""
        pipe = self._client.pipeline(transaction=False)
        for keys, args in runs:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        self.round_trips += 1
        self._on_round_trip()
        answers: list[Any] = await pipe.execute(raise_on_error=False)
        return answers

    def _failed(self, operation: str, error: Exception) -> None:
        self.errors += 1
        self._on_error()
        if self._outage.failed():
            _log.warning(
                "limits store: redis unreachable; limits fall back (--limits-store-failure) until it answers",
                operation=operation,
                error=type(error).__name__,
                detail=f"no answer within {self.timeout:g} s" if timed_out(error) else str(error)[:200],
            )

    def _run_failed(self, operation: str, error: ResponseError) -> None:
        """Redis answered some runs of a round trip with an error: counted, and logged at most
        once every RUN_ERROR_LOG_EVERY seconds (a caller's key of the wrong type errs on each
        of its calls)."""
        self.errors += 1
        self._on_error()
        now = self._clock()
        logged = self._run_error_logged_at
        if logged is None or now - logged >= RUN_ERROR_LOG_EVERY:
            self._run_error_logged_at = now
            _log.warning(
                "limits store: redis refused a caller's check; its limits fall back (--limits-store-failure)",
                operation=operation,
                error=type(error).__name__,
                detail=str(error)[:200],
            )

    def _answered(self) -> None:
        if self._outage.answered():
            _log.warning("limits store: redis answers again; limits are shared again")
