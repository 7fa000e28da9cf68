"""The job record in Redis: create (and enqueue) atomically, read, and move between states."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq import scripts
from moonq.assemble import Assembler
from moonq.keys import Keys, queue_fair, queue_fair_clock, queue_fair_waiting
from moonq.models import Job, JobCreate, Status
from moonq.serde import arq_serialize, dump_bytes, dumps
from moonq.settings import Settings

log = logging.getLogger("moonq.store")

JOB_FUNCTION = "run_completion"
# `JobStore.start`'s answer when the upstream permit it was to start under is not held.
NOT_GRANTED = -4
# A tenant's index forgets ids older than MOONQ_RESULT_TTL + this: such jobs have long expired
# (unless one waited in the queue for a month).
INDEX_SLACK = 30 * 24 * 3600
IDEMPOTENCY_TTL = 24 * 3600
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
# Larger than any real count, small enough for a JSON number and Redis's 64-bit totals.
MAX_USAGE = 2**53 - 1
_JSON_FIELDS = ("metadata", "result", "usage", "error")
_FLOAT_FIELDS = ("created_at", "started_at", "completed_at")
# What a job response shows: never the stored request, which may be megabytes.
_SHOWN = ["id", "status", "model", "custom_id", "tenant", "attempts", "batch_id"]
_SHOWN += [*_FLOAT_FIELDS, *_JSON_FIELDS]


def usage_counts(usage: Any) -> dict[str, int]:
    """The token counts of a usage object, as its tenant's totals add them.

    Raises `InvalidUsage` for anything but non-negative integers (booleans are not counts) up
    to `MAX_USAGE`: checked before any write, so an absurd upstream answer cannot leave a job
    half-finished or a tenant's totals corrupt.
    """
    if usage is None:
        return {}
    if not isinstance(usage, dict):
        raise InvalidUsage(f"usage is a {type(usage).__name__}, not an object")
    counts = {}
    for name in USAGE_FIELDS:
        value = usage.get(name) if name != "cached_tokens" else cached_tokens(usage)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_USAGE:
            raise InvalidUsage(f"usage.{name} is not a token count: {str(value)[:40]}")
        counts[name] = value
    return counts


def cached_tokens(usage: dict[str, Any]) -> Any:
    """Prompt tokens served from the upstream's cache: Moonshot says `cached_tokens`, OpenAI
    `prompt_tokens_details.cached_tokens`; None when the upstream does not say."""
    if usage.get("cached_tokens") is not None:
        return usage["cached_tokens"]
    details = usage.get("prompt_tokens_details")
    return details.get("cached_tokens") if isinstance(details, dict) else None


def utc_day(timestamp: float) -> str:
    """The UTC day (YYYY-MM-DD) usage is counted under."""
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def arq_payload(job_id: str, enqueued_ms: int) -> bytes:
    """arq's job entry for a moonq job: the job function with the job id, as JSON."""
    return serialize_job(JOB_FUNCTION, (job_id,), {}, None, enqueued_ms, serializer=arq_serialize)


def new_record(
    job_id: str, tenant: str, model: str, request: dict[str, Any], now: float
) -> dict[str, str]:
    """A queued job's record, as every way of creating a job writes it."""
    return {
        "id": job_id,
        "tenant": tenant,
        "status": Status.QUEUED.value,
        "created_at": repr(now),
        "attempts": "0",
        "seq": "0",
        "model": model,
        "request": dumps(request),
    }


def new_job_id() -> str:
    """128 random bits: a job id is the only thing guarding another client's results."""
    return "job_" + secrets.token_hex(16)


class JobStore:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        queue_name: str,
        result_ttl: int,
        max_events: int,
        usage_ttl: int = 400 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.usage_ttl = usage_ttl
        self.keys = keys
        self.queue_name = queue_name
        self.result_ttl = result_ttl
        self.max_events = max_events
        self.clock = clock
        self._start = redis.register_script(scripts.START)
        self._abort = redis.register_script(scripts.ABORT)
        self._append = redis.register_script(scripts.APPEND)
        self._finish = redis.register_script(scripts.FINISH)
        self._end_lines = redis.register_script(scripts.END_LINES)
        self._requeue = redis.register_script(scripts.REQUEUE)
        self._create = redis.register_script(scripts.CREATE)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> JobStore:
        return cls(
            redis,
            Keys(settings.key_prefix),
            queue_name=settings.queue_name,
            result_ttl=settings.result_ttl,
            max_events=settings.max_events,
            usage_ttl=settings.usage_retention_days * 24 * 3600,
        )

    async def create(
        self,
        tenant: str,
        request: JobCreate,
        idempotency_key: str | None = None,
        hold: str | None = None,
    ) -> tuple[Job, bool]:
        """Write the record and arq's queue entry atomically, so a failure leaves neither.

        Returns the job and whether it is an earlier job replayed for the same
        `idempotency_key`. This is `ArqRedis.enqueue_job`'s write (minus its uniqueness WATCH:
        ids are random) plus our record and the idempotency key, in one script.
        """
        job_id, now = new_job_id(), self.clock()
        fields = self._new_record(job_id, tenant, request, now)
        if hold is not None:  # what it holds against its tenant's budgets (moonq/budgets.py)
            fields["hold"] = hold
        now_ms = int(now * 1000)
        arq_job = arq_payload(job_id, now_ms)
        fingerprint = hashlib.sha256(request.model_dump_json().encode()).hexdigest()[:32]
        idem_key = self.keys.idempotency(tenant, digest(idempotency_key or ""))
        custom = request.custom_id
        keys = [
            self.keys.job(job_id),
            self.keys.tenant_jobs(tenant),
            job_key_prefix + job_id,
            self.queue_name,
            idem_key,
            self.keys.tenant_status(tenant, Status.QUEUED.value),
            "" if custom is None else self.keys.tenant_custom_id(tenant, digest(custom)),
            self.keys.wake(),
            queue_fair(self.queue_name),
            queue_fair_clock(self.queue_name),
            queue_fair_waiting(self.queue_name, tenant),
            self.keys.limit_waiting(),
        ]
        ttl = IDEMPOTENCY_TTL if idempotency_key else 0
        job_prefix = self.keys.job("")
        args: list[Any] = [job_id, repr(now), job_prefix, arq_job, ttl, fingerprint]
        args += [repr(self._horizon(now)), tenant]
        for pair in fields.items():
            args += pair
        first = await self._create(keys=keys, args=args)
        if not first:
            return self._to_job(fields), False
        first_id, _, first_fingerprint = first.decode().partition(" ")
        if first_fingerprint != fingerprint:
            raise IdempotencyConflict(first_id)
        job = await self.get(first_id)
        if job is None:
            raise IdempotencyConflict(first_id)
        return job, True

    def _new_record(
        self, job_id: str, tenant: str, request: JobCreate, now: float
    ) -> dict[str, str]:
        fields = new_record(job_id, tenant, request.body.model, request.body.upstream_body(), now)
        if request.custom_id is not None:
            fields["custom_id"] = request.custom_id
        if request.metadata is not None:
            fields["metadata"] = dumps(request.metadata)
        return fields

    def _horizon(self, now: float) -> float:
        """Index entries created before this have long expired."""
        return now - self.result_ttl - INDEX_SLACK

    async def replayed_job(self, tenant: str, idempotency_key: str) -> str | None:
        """The live job an Idempotency-Key already made, if any: its replay is no new work."""
        first = await self.redis.get(self.keys.idempotency(tenant, digest(idempotency_key)))
        if first is None:
            return None
        job_id = first.decode().partition(" ")[0]
        return job_id if await self.redis.exists(self.keys.job(job_id)) else None

    async def raw(self, job_id: str) -> dict[str, str] | None:
        """The whole record, the request included: for the worker."""
        data = await self.redis.hgetall(self.keys.job(job_id))  # type: ignore[misc]
        if not data:
            return None
        return {k.decode(): v.decode() for k, v in data.items()}

    async def state(self, job_id: str) -> tuple[Status, str] | None:
        """The job's status and tenant, or None when it does not exist."""
        status, tenant = await self.redis.hmget(self.keys.job(job_id), ["status", "tenant"])  # type: ignore[misc]
        return None if status is None else (Status(status.decode()), tenant.decode())

    async def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job, or None when it does not exist or belongs to another tenant."""
        job = (await self.read_many([job_id]))[0]
        if job is None or (tenant is not None and job[1] != tenant):
            return None
        return job[0]

    async def read_many(self, job_ids: list[str]) -> list[tuple[Job, str] | None]:
        """Each job (with its tenant) or None, reading only the fields a response shows."""
        if not job_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.keys.job(job_id), _SHOWN)
            rows = await pipe.execute()
        out: list[tuple[Job, str] | None] = []
        for row in rows:
            fields = {k: v.decode() for k, v in zip(_SHOWN, row, strict=True) if v is not None}
            out.append((self._to_job(fields), fields["tenant"]) if "status" in fields else None)
        return out

    async def start_attempt(
        self, job_id: str, worker: str = "", lock_token: str = "", lock_ttl: float = 0.0
    ) -> int:
        """Mark the job in progress; the new attempt number, or -1 (over), -2 (missing), -3
        (arq's lock on the job is another run's: this run lost it) if it must not run.

        With a `lock_token`, the attempt starts only under that lock, taking it if it is free.
        """
        number, _ = await self.start(job_id, worker, lock_token, lock_ttl)
        return number

    async def start(
        self,
        job_id: str,
        worker: str = "",
        lock_token: str = "",
        lock_ttl: float = 0.0,
        lease: str = "",
    ) -> tuple[int, dict[str, str]]:
        """`start_attempt`, with what earlier attempts left in the record as of the start
        (`seq`, `failures`, `pauses`, `last_error`, where set): a record read before it may
        be stale, as a stalled run may have written since. With a `lease`, only if the
        limiter holds that upstream permit: else -4, and nothing is written."""
        args: list[str | int] = [self.keys.tenant_status_base(), repr(self.clock()), worker]
        args.append(lock_token)
        args.append(int(lock_ttl * 1000))
        keys = [self.keys.job(job_id), in_progress_key_prefix + job_id]
        keys.append(queue_fair_clock(self.queue_name))
        if lease:
            keys.append(self.keys.limit_leases())
            args.append(lease)
        reply = await self._start(keys=keys, args=args)
        if not isinstance(reply, list):
            return int(reply), {}
        names = ("seq", "failures", "pauses", "last_error")
        past = {name: value.decode() for name, value in zip(names, reply[1:], strict=True) if value}
        return int(reply[0]), past

    async def append(self, job_id: str, attempt: int, events: list[dict[str, Any]]) -> int:
        """Append and publish events for a live attempt; -1 means the attempt lost the job."""
        (seq,) = await self.append_many([(job_id, attempt, [dump_bytes(e) for e in events])])
        if isinstance(seq, RedisError):
            raise seq
        return seq

    async def append_many(
        self, writes: list[tuple[str, int, list[bytes]]]
    ) -> list[int | RedisError]:
        """`append` for many attempts in one script call, their events already encoded (JSON
        objects). For each, its last seq; -1 if the attempt lost its job; or the error Redis
        gave its events, as redis-py raises it (the others are written all the same)."""
        keys: list[str] = []
        args: list[str | bytes | int] = [self.max_events]
        for job_id, attempt, bodies in writes:
            keys += self._event_keys(job_id)
            args += [str(attempt), len(bodies), *bodies]
        results = await self._append(keys=keys, args=args)
        return [int(seq) if isinstance(seq, int) else _redis_error(seq) for seq in results]

    async def requeue(
        self, job_id: str, attempt: int, reason: str, budget: int = 0, *, paused: bool = False
    ) -> int:
        """Hand a live attempt's job back to the queue.

        With a `budget`, this is a failure of the job's and counts against it: 0 means the
        budget is spent (fail the job instead). `paused`: the account is paused, which counts
        (in `pauses`) neither as a failure nor as an interruption. Otherwise an interruption,
        counted by `attempts` alone. 1 = requeued, -1 = the attempt lost the job.
        """
        counter = "failures" if budget > 0 else "pauses" if paused else ""
        args: list[str | int] = [
            self.keys.tenant_status_base(),
            str(attempt),
            reason,
            budget,
            counter,
        ]
        return int(await self._requeue(keys=[self.keys.job(job_id)], args=args))

    async def finish(
        self,
        job_id: str,
        status: Status,
        event: dict[str, Any],
        fields: Mapping[str, Any],
        attempt: int | None = None,
        *,
        tenant: str,
        expected_seq: int | None = None,
        outcome: str = "",
    ) -> int:
        """Move a live job to a terminal status with its terminal event, atomically; a
        completed job's usage is added to its tenant's totals in the same step.

        A batch line is counted into its batch in the same step, as `outcome` ('' = the
        status; `expired` for a line whose batch's window ended before it ran).
        Raises `InvalidUsage` (before writing anything) for a usage that is not token counts.
        """
        keys, args = self._finish_call(
            job_id, status, event, fields, attempt, tenant, expected_seq, outcome
        )
        return int(await self._finish(keys=keys, args=args))

    async def end_lines(
        self,
        lines_key: str,
        tenant: str,
        first: int,
        count: int,
        ending: tuple[Status, dict[str, Any], str],
        keep_running: bool,
    ) -> tuple[int, list[str], list[str]]:
        """End the not-started jobs of a slice of a batch's lines in one call (`END_LINES`),
        as `ending` = (status, error, outcome for the batch) says. Returns how many lines
        were read, the ended ones a worker had been handed, and the running ones."""
        status, error, outcome = ending
        kind = status.value if status == Status.CANCELLED else "error"
        event: dict[str, Any] = {"event": kind, "attempt": 0, "data": error}
        fields = {} if status == Status.CANCELLED else {"error": error}
        keys, template = self._finish_call("", status, event, fields, None, tenant, None, outcome)
        k = self.keys
        args: list[Any] = [k.job(""), k.log(""), k.channel(""), keys[3], *keys[4:8], lines_key]
        args += [first, count, "1" if keep_running else "0", len(template), *template]
        read, handed, running = await self._end_lines(args=args)
        return int(read), [i.decode() for i in handed], [i.decode() for i in running]

    def _finish_call(
        self,
        job_id: str,
        status: Status,
        event: dict[str, Any],
        fields: Mapping[str, Any],
        attempt: int | None,
        tenant: str,
        expected_seq: int | None,
        outcome: str,
    ) -> tuple[list[str], list[Any]]:
        counts = usage_counts(fields.get("usage")) if status == Status.COMPLETED else {}
        now = self.clock()
        pairs: list[Any] = ["completed_at", repr(now)]
        for name, value in fields.items():
            pairs += [name, value if isinstance(value, str) else dumps(value)]
        args: list[Any] = [self.keys.tenant_status_base(), "" if attempt is None else str(attempt)]
        args += [status.value, self.result_ttl, self.max_events, dumps(event)]
        args += ["" if expected_seq is None else expected_seq, repr(self._horizon(now))]
        args += [self.keys.batch_base(), outcome, len(pairs) // 2, self.usage_ttl]
        args += [_reported_model(fields.get("result")), self.keys.budget_hold_base(), *pairs]
        if status == Status.COMPLETED:
            args += ["jobs", 1, *(x for pair in counts.items() for x in pair)]
        k = self.keys
        keys = [*self._event_keys(job_id), k.usage(tenant, utc_day(now))]
        keys += [k.sched_inflight(), k.sched_vtime(), k.sched_active(), k.metrics()]
        keys.append(queue_fair_waiting(self.queue_name, tenant) if job_id else "")
        return keys, args

    async def cancel(self, job_id: str, tenant: str) -> Job | None:
        """Cancel a queued or running job; None if it is not the tenant's.

        Raises `AlreadyFinished`. What the job had published is kept, assembled, as its
        (partial) result, written with the `cancelled` event so a reader woken by the event
        finds it. A worker holding the job is told through arq's abort set and stops within
        a poll, whether it is streaming or still waiting for an upstream permit.
        """
        partial = _Partial(self, job_id)
        for tries_left in reversed(range(CANCEL_TRIES)):
            owner, attempts, last = await self.redis.hmget(  # type: ignore[misc]
                self.keys.job(job_id), ["tenant", "attempts", "seq"]
            )
            if owner is None or owner.decode() != tenant:
                return None
            attempt, seq = int(attempts or 0), int(last or 0)
            await partial.read(attempt, seq)
            event = {"event": "cancelled", "attempt": attempt, "data": {"reason": "cancelled"}}
            done = await self.finish(
                job_id,
                Status.CANCELLED,
                event,
                partial.fields(),
                tenant=tenant,
                # The log may grow between reading and finishing; past a few tries, cancel
                # with what was read rather than keep chasing a fast stream.
                expected_seq=seq if tries_left else None,
            )
            if done == -1:
                raise AlreadyFinished(job_id)
            if done == -2:
                return None
            if done >= 0:
                if not tries_left:  # cancelled with a stale read: now the log is still
                    await self._complete_partial(partial, attempt, done - 1)
                await self.withdraw(job_id)
                return await self.get(job_id)
        raise AssertionError("unreachable: the last try does not check the seq")

    async def _complete_partial(self, partial: _Partial, attempt: int, upto: int) -> None:
        before = partial.assembler.chunks
        await partial.read(attempt, upto)
        if partial.assembler.chunks != before:
            fields = {k: dumps(v) for k, v in partial.fields().items()}
            await self.redis.hset(self.keys.job(partial.job_id), mapping=fields)  # type: ignore[misc]

    async def withdraw(self, job_id: str) -> None:
        """Take a cancelled job out of arq: off the queue, its entry deleted, and aborted where
        a worker holds it. Best effort: a worker that still starts it finds it cancelled."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.queue_name, job_id)
                pipe.delete(job_key_prefix + job_id)
                pipe.exists(in_progress_key_prefix + job_id)
                *_, held = await pipe.execute()
            if held:  # and the workers polled at once: the holder stops the job now
                await self._abort(keys=[abort_jobs_ss, self.keys.wake()], args=[job_id])
        except (RedisError, OSError):
            log.warning(
                "job %s was cancelled but arq could not be told; it stops at its next write", job_id
            )

    def _event_keys(self, job_id: str) -> list[str]:
        k = self.keys
        return [k.job(job_id), k.log(job_id), k.channel(job_id)]

    def _to_job(self, fields: Mapping[str, str]) -> Job:
        data: dict[str, Any] = {
            name: fields[name] for name in ("id", "status", "model", "custom_id") if name in fields
        }
        for name in _FLOAT_FIELDS:
            if name in fields:
                data[name] = float(fields[name])
        for name in _JSON_FIELDS:
            if name in fields:
                data[name] = json.loads(fields[name])
        data["attempts"] = int(fields.get("attempts", 0))
        data["batch_id"] = fields.get("batch_id")
        data["channel"] = self.keys.channel(fields["id"])
        return Job.model_validate(data)


def _reported_model(result: Any) -> str:
    """The model the upstream says answered (moonshot-v1-auto picks one), which is what it
    bills; '' to count the usage under the model the job asked for."""
    model = result.get("model") if isinstance(result, dict) else None
    return model[:256] if isinstance(model, str) and model else ""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was first used for a different request."""


class InvalidUsage(ValueError):
    """A usage object whose counts are not non-negative integers."""


CANCEL_TRIES = 8


class _Partial:
    """What one attempt of a job published, assembled, read from the log a little at a time."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.attempt, self.seq, self.assembler = -1, 0, Assembler()

    async def read(self, attempt: int, upto: int) -> None:
        if attempt != self.attempt:
            self.attempt, self.seq, self.assembler = attempt, 0, Assembler()
        if upto <= self.seq:
            return
        log_key = self.store.keys.log(self.job_id)
        for _, fields in await self.store.redis.xrange(log_key, f"0-{self.seq + 1}", f"0-{upto}"):
            event = json.loads(fields[b"e"])
            if event.get("event") == "chunk" and event.get("attempt") == attempt:
                self.assembler.add(event["data"])
        self.seq = upto

    def fields(self) -> dict[str, Any]:
        if not self.assembler.chunks:
            return {}
        result = self.assembler.result()
        return {"result": result, **({"usage": result["usage"]} if result.get("usage") else {})}


class AlreadyFinished(Exception):
    """The job already ended; it cannot be cancelled."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _redis_error(reply: Any) -> RedisError:
    """An error reply a script returned as text, as redis-py would raise it (`ReadOnlyError`
    for a failover's READONLY, and so on), so `moonq.redis.transient` judges it rightly."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    error: RedisError = BaseParser.parse_error(text)  # type: ignore[no-untyped-call]
    return error
