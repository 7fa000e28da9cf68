"""Cluster-wide metrics: what the workers measure, added to counters and histogram buckets in
Redis, so that every API process's `/metrics` (api/metrics.py) shows the same numbers for
all workers, wherever they run (prometheus_client's multiprocess mode only covers processes
that share a directory).

A worker adds up its observations in memory and writes them every `FLUSH_EVERY` seconds in
one MULTI/EXEC round trip (one HINCRBY per sample that changed, one HSET of its jobs in
flight): nothing per chunk, nothing per job at load. A crash loses at most that second.
Names follow OpenTelemetry's GenAI semantic conventions where they have one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq import timeline
from moonq.keys import Keys

log = logging.getLogger("moonq.metrics")

FLUSH_EVERY = 1.0
# A worker re-says its jobs in flight at least this often; the API ignores a worker silent for
# STALE_AFTER (it died) and forgets it after FORGET_AFTER.
REPORT_EVERY = 5.0
STALE_AFTER = 15.0
FORGET_AFTER = 600.0
# Models come from clients: past this many distinct ones (cluster-wide), the rest are "other".
MAX_MODELS = 20
OTHER = "other"
MAX_CACHED = 1000  # models a worker remembers to be "other"
MODEL_CHARS = 64
OPERATION = "chat"

MODEL = "gen_ai_request_model"
OPERATION_NAME = "gen_ai_operation_name"
TOKEN_TYPE = "gen_ai_token_type"

# Error types a label may carry: Moonshot's and moonq's own; any other is "other".
ERROR_TYPES = frozenset(
    {
        "rate_limit_reached_error",
        "engine_overloaded_error",
        "exceeded_current_quota_error",
        "invalid_request_error",
        "content_filter",
        "invalid_authentication_error",
        "permission_denied_error",
        "resource_not_found_error",
        "server_error",
        "timeout",
        "connection_error",
        "configuration_error",
        "stream_interrupted",
        "upstream_error",
        "job_timeout",
        "upstream_invalid_usage",
    }
)


@dataclass(frozen=True)
class Spec:
    """One metric: its Prometheus name (a counter's without `_total`), kind, help and labels."""

    name: str
    kind: str  # counter | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


# Bucket boundaries are OpenTelemetry's advice for the GenAI metrics.
_TTFT = timeline.TTFT_BOUNDS
_CALL = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TOKENS = tuple(float(4**n) for n in range(14))  # 1 .. 67,108,864
_JOB: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_JOB += (600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
_GENAI = (OPERATION_NAME, MODEL)

JOBS_FINISHED = Spec(
    "moonq_jobs_finished",
    "counter",
    "Jobs ended, by final status (by a worker, a cancel or a batch's end).",
    ("status",),
)
UPSTREAM_ERRORS = Spec(
    "moonq_upstream_errors",
    "counter",
    "Upstream call failures, by error type (moonq.errors), retried ones included.",
    ("error_type", "retryable"),
)
JOB_DURATION = Spec(
    "moonq_job_duration_seconds",
    "histogram",
    "Seconds from a job's creation to its end (queue and retries included), by final status.",
    ("status",),
    _JOB,
)
TTFT = Spec(
    "gen_ai_server_time_to_first_token_seconds",
    "histogram",
    "Seconds from the upstream request to its first chunk, for completed jobs.",
    _GENAI,
    _TTFT,
)
CALL_DURATION = Spec(
    "gen_ai_client_operation_duration_seconds",
    "histogram",
    "Seconds each upstream call took (every attempt); error_type is empty for a success.",
    (*_GENAI, "error_type"),
    _CALL,
)
TOKEN_USAGE = Spec(
    "gen_ai_client_token_usage",
    "histogram",
    "Tokens per completed job, by model and type (input = prompt, output = completion).",
    (*_GENAI, TOKEN_TYPE),
    _TOKENS,
)
SPECS = (JOBS_FINISHED, UPSTREAM_ERRORS, JOB_DURATION, TTFT, CALL_DURATION, TOKEN_USAGE)

N = TypeVar("N", int, float)

# A sample in memory: (sample name, ((label, value), ...)), its label pairs in the spec's order.
Sample = tuple[str, tuple[tuple[str, str], ...]]

# KEYS: 1 the models recorded. ARGV: 1 the cap, 2 how many of the models that follow have
# completed a job, 3.. models. Returns, per model, 1 (recorded by its name) or 0 ("other"): a
# model is added while there is room, but only once it completed a job, so that typos in failed
# requests cannot fill the set for good. Writes only SADD of a string: cannot fail.
_ADMIT = """
local out = {}
local cap, real = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1 then
    out[#out + 1] = 1
  elseif i - 2 <= real and redis.call('SCARD', KEYS[1]) < cap then
    redis.call('SADD', KEYS[1], ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


def field(sample: Sample) -> str:
    """The Redis hash field of a sample: `["name", {"label": "value", ...}]`."""
    return json.dumps([sample[0], dict(sample[1])], separators=(",", ":"), sort_keys=True)


def parse_field(raw: str) -> tuple[str, dict[str, str]] | None:
    """A hash field back as (sample name, labels); None for one this version cannot read."""
    try:
        name, labels = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(name, str) or not isinstance(labels, dict):
        return None
    return name, {str(k): str(v) for k, v in labels.items()}


def error_type(kind: str) -> str:
    """A bounded label for an upstream error's type: upstreams may invent any."""
    return kind if kind in ERROR_TYPES else OTHER


@functools.lru_cache(maxsize=256)  # a few names, each cleaned a few times a job
def model_name(model: str) -> str:
    """A model name as a label value: printable and short (the cap bounds how many)."""
    cleaned = "".join(c if c.isprintable() else "_" for c in model[:MODEL_CHARS])
    return cleaned or OTHER


def bucket_of(value: float, buckets: tuple[float, ...]) -> str:
    """The `le` of the first bucket holding `value`; buckets are stored non-cumulative."""
    for bound in buckets:
        if value <= bound:
            return repr(bound)
    return "+Inf"


class Recorder:
    """A worker's metrics, added up in memory and flushed to Redis by `run()` (and `close()`).

    Recording never touches Redis, so it costs the job nothing; a flush that fails keeps its
    numbers for the next one.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        max_models: int = MAX_MODELS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.max_models = max_models
        self.clock = clock
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.in_flight = 0
        self._counts: dict[Sample, int] = {}
        self._sums: dict[Sample, float] = {}
        self.timeline = timeline.Tally()  # the dashboard's charts, by tenant
        self._models: dict[str, str] = {}  # a model -> its label ("other" past the cap)
        self._said: tuple[int, float] = (-1, 0.0)  # in flight last written, and when
        self._admit = redis.register_script(_ADMIT)
        self._failing = False

    def count(self, spec: Spec, labels: Mapping[str, str], amount: int = 1) -> None:
        sample = (spec.name + "_total", _pairs(spec, labels))
        self._counts[sample] = self._counts.get(sample, 0) + amount

    def observe(self, spec: Spec, labels: Mapping[str, str], value: float) -> None:
        pairs = _pairs(spec, labels)
        bucket = (spec.name + "_bucket", (*pairs, ("le", bucket_of(value, spec.buckets))))
        self._counts[bucket] = self._counts.get(bucket, 0) + 1
        total = (spec.name + "_sum", pairs)
        self._sums[total] = self._sums.get(total, 0.0) + value

    def job_ended(self, status: str, created_at: float, tenant: str) -> None:
        """A job ended by this worker: its duration. Its ending is counted by FINISH itself
        (moonq/scripts.py), which also counts the jobs cancels and batch ends finish."""
        labels = {"status": status}
        self.observe(JOB_DURATION, labels, max(0.0, self.clock() - created_at))
        self.timeline.add(timeline.DONE if status == "completed" else timeline.FAILED, tenant)

    def call_ended(self, model: str, seconds: float, error: str | None) -> None:
        """An upstream call ended, in `seconds`; `error` is its error's type if it failed."""
        labels = {MODEL: model, OPERATION_NAME: OPERATION}
        labels["error_type"] = "" if error is None else error_type(error)
        self.observe(CALL_DURATION, labels, seconds)

    def upstream_error(self, kind: str, retryable: bool) -> None:
        labels = {"error_type": error_type(kind), "retryable": "true" if retryable else "false"}
        self.count(UPSTREAM_ERRORS, labels)

    def completed(
        self, model: str, ttft: float | None, usage: Mapping[str, int], tenant: str
    ) -> None:
        """A completed job's time to first token and its tokens (`store.usage_counts`)."""
        labels = {MODEL: model, OPERATION_NAME: OPERATION}
        if ttft is not None:
            self.observe(TTFT, labels, ttft)
            self.timeline.add(timeline.ttft_kind(ttft), tenant)
        if usage.get("total_tokens"):
            self.timeline.add(timeline.TOKENS, tenant, usage["total_tokens"])
        for kind, name in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            if name in usage:
                self.observe(TOKEN_USAGE, {**labels, TOKEN_TYPE: kind}, usage[name])

    async def run(self, every: float = FLUSH_EVERY) -> None:
        """Flush every `every` seconds until cancelled; Redis failures are ridden out."""
        while True:
            await asyncio.sleep(every)
            await self.flush_quietly()

    async def flush_quietly(self) -> None:
        try:
            await self.flush()
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("could not write metrics (%s); kept for later", type(exc).__name__)
            self._failing = True
        else:
            self._failing = False

    async def flush(self) -> None:
        """Write what was recorded since the last flush, in one transaction."""
        counts, sums = self._counts, self._sums
        now = self.clock()
        said = self.in_flight != self._said[0] or now - self._said[1] >= REPORT_EVERY
        if not counts and not sums and not said and not self.timeline.counts:
            return
        self._counts, self._sums = {}, {}
        steps = self.timeline.take()
        try:
            await self._write(counts, sums, steps, now, said)
        except BaseException:
            _merge(self._counts, counts)
            _merge(self._sums, sums)
            self.timeline.put_back(steps)
            raise

    async def close(self) -> None:
        """The last flush, and this worker's jobs in flight taken out of the total."""
        self.in_flight = 0
        with contextlib.suppress(RedisError, OSError):
            await self.flush()
            await self.redis.hdel(self.keys.metrics_workers(), self.worker)  # type: ignore[misc]

    async def _write(
        self,
        counts: dict[Sample, int],
        sums: dict[Sample, float],
        steps: dict[str, int],
        now: float,
        said: bool,
    ) -> None:
        await self._learn_models([*counts, *sums])
        key = self.keys.metrics()
        async with self.redis.pipeline(transaction=True) as pipe:
            for sample, amount in _relabel(counts, self._models).items():
                pipe.hincrby(key, field(sample), amount)
            for sample, value in _relabel(sums, self._models).items():
                pipe.hincrbyfloat(key, field(sample), value)
            if steps:
                slot = self.keys.metrics_slot(timeline.step_of(now))
                for name, amount in steps.items():
                    pipe.hincrby(slot, name, amount)
                pipe.expire(slot, timeline.KEEP)
            if said:
                state = f"{self.in_flight} {now:.3f}"
                pipe.hset(self.keys.metrics_workers(), self.worker, state)
            await pipe.execute()
        if said:
            self._said = (self.in_flight, now)

    async def _learn_models(self, samples: list[Sample]) -> None:
        """Ask Redis about models this worker has no label for: its own name (under the
        cap, once it completed a job) or "other". Only final answers are kept, and a bounded
        number of "other"s."""
        seen = {(name, v) for name, pairs in samples for k, v in pairs if k == MODEL}
        real = {v for name, v in seen if name.startswith(TOKEN_USAGE.name)}
        completed = sorted(real - set(self._models))
        asked = completed + sorted({v for _, v in seen} - real - set(self._models))
        if not asked:
            return
        key = self.keys.metrics_models()
        admitted = await self._admit(keys=[key], args=[self.max_models, len(completed), *asked])
        if len(self._models) > MAX_CACHED:
            self._models = {m: label for m, label in self._models.items() if label != OTHER}
        for model, ok in zip(asked, admitted, strict=True):
            if int(ok) or model in real:
                self._models[model] = model if int(ok) else OTHER


def _pairs(spec: Spec, labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name in spec.labels:
        value = labels.get(name, "")
        pairs.append((name, model_name(value) if name == MODEL else value))
    return tuple(pairs)


def _relabel(samples: dict[Sample, N], models: dict[str, str]) -> dict[Sample, N]:
    """Samples with each model replaced by its label (merging those that became "other")."""
    out: dict[Sample, N] = {}
    for (name, pairs), amount in samples.items():
        shown = tuple((k, models.get(v, OTHER) if k == MODEL else v) for k, v in pairs)
        out[(name, shown)] = out.get((name, shown), 0) + amount
    return out


def _merge(into: dict[Sample, N], more: dict[Sample, N]) -> None:
    for sample, amount in more.items():
        into[sample] = into.get(sample, 0) + amount
