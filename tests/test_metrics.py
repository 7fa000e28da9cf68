"""`GET /metrics`: what every worker did, the same through every API process, as valid
Prometheus text; the live gauges read at scrape time."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from moonq.keys import Keys
from moonq.limits import UpstreamLimiter
from moonq.metrics import OTHER, Recorder
from tests.conftest import chat, submit
from tests.serving import worker_running
from tests.test_batches import create, line

Families = dict[str, list[Sample]]
MODEL_A, MODEL_B = "moonshot-v1-8k", "kimi-k2-turbo-preview"


async def scrape(client: httpx.AsyncClient, **headers: str) -> Families:
    """The samples of /metrics, by metric; the parser fails on anything but valid text."""
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def total(families: Families, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` whose labels include `labels`."""
    return sum(
        s.value
        for samples in families.values()
        for s in samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def series(families: Families, sample: str, label: str) -> set[str]:
    return {s.labels[label] for f in families.values() for s in f if s.name == sample}


async def usage_of(client: httpx.AsyncClient, job_id: str) -> dict[str, int]:
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "completed", job
    usage: dict[str, int] = job["usage"]
    return usage


def model(name: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    payload = chat(text, **extra)
    payload["body"]["model"] = name
    return payload


@pytest.mark.redis
async def test_every_api_shows_what_every_worker_did(real_stack: Any) -> None:
    """Two workers run the jobs, two API apps read them: both show the combined numbers."""
    stack_a, api_a = await real_stack()
    stack_b, api_b = await real_stack()
    first = [await submit(api_a, model(MODEL_A, f"a{i}")) for i in range(2)]
    await stack_a.run_worker()
    second = [await submit(api_b, model(MODEL_B, "b"))]
    bad = await submit(api_b, model(MODEL_A, "x", fake_moonshot={"error": "invalid_request_error"}))
    await stack_b.run_worker()

    seen_a, seen_b = await scrape(api_a), await scrape(api_b)
    assert seen_a == seen_b
    m = seen_a
    assert total(m, "moonq_jobs_finished_total", status="completed") == 3
    assert total(m, "moonq_jobs_finished_total", status="failed") == 1
    assert total(m, "moonq_job_duration_seconds_count") == 4
    assert total(m, "moonq_job_duration_seconds_bucket", le="+Inf") == 4
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    assert total(m, ttft, gen_ai_request_model=MODEL_A) == 2
    assert total(m, ttft, gen_ai_request_model=MODEL_B) == 1
    calls = "gen_ai_client_operation_duration_seconds_count"
    assert total(m, calls) == 4
    assert total(m, calls, error_type="invalid_request_error", gen_ai_request_model=MODEL_A) == 1
    errors = "moonq_upstream_errors_total"
    assert total(m, errors, error_type="invalid_request_error", retryable="false") == 1
    assert total(m, errors) == 1

    for name, jobs in ((MODEL_A, first), (MODEL_B, second)):
        usages = [await usage_of(api_a, job) for job in jobs]
        for kind, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            labels = {"gen_ai_request_model": name, "gen_ai_token_type": kind}
            assert total(m, "gen_ai_client_token_usage_sum", **labels) == sum(
                u[field] for u in usages
            )
            assert total(m, "gen_ai_client_token_usage_count", **labels) == len(jobs)
    assert (await api_b.get(f"/v1/jobs/{bad}")).json()["status"] == "failed"
    # nothing left running or waiting once the workers are gone
    assert total(m, "moonq_jobs") == 0 and total(m, "moonq_queue_depth") == 0
    assert total(m, "moonq_jobs_in_flight") == 0 and total(m, "moonq_workers") == 0


@pytest.mark.redis
async def test_a_retried_upstream_error_is_counted_and_the_job_completes(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_RETRY_BASE_DELAY=0)
    flaky = {"error": "rate_limit_reached_error", "fail_times": 1, "key": "flaky-metrics"}
    job = await submit(client, chat("again", fake_moonshot=flaky))
    await stack.run_worker()
    m = await scrape(client)
    assert (await usage_of(client, job))["total_tokens"] > 0
    errors = "moonq_upstream_errors_total"
    assert total(m, errors, error_type="rate_limit_reached_error", retryable="true") == 1
    assert total(m, "moonq_jobs_finished_total", status="completed") == 1
    calls = "gen_ai_client_operation_duration_seconds_count"
    assert total(m, calls, error_type="rate_limit_reached_error") == 1
    assert total(m, calls, error_type="") == 1
    assert total(m, "gen_ai_server_time_to_first_token_seconds_count") == 1


@pytest.mark.redis
async def test_queue_depth_counts_waiting_jobs_and_batch_lines_apart(real_stack: Any) -> None:
    stack, client = await real_stack()
    for i in range(3):
        await submit(client, chat(f"wait {i}"))
    await create(client, [line(f"l{i}") for i in range(4)])
    m = await scrape(client)
    assert total(m, "moonq_queue_depth", queue="interactive") == 3
    assert total(m, "moonq_queue_depth", queue="batch") == 4
    assert total(m, "moonq_jobs", status="queued") == 7
    assert total(m, "moonq_jobs", status="in_progress") == 0
    await stack.run_worker()
    m = await scrape(client)
    assert total(m, "moonq_queue_depth") == 0 and total(m, "moonq_jobs") == 0
    assert total(m, "moonq_jobs_finished_total", status="completed") == 7


@pytest.mark.redis
async def test_jobs_in_flight_and_workers_while_a_worker_runs(real_stack: Any) -> None:
    stack, client = await real_stack()
    await submit(client, chat("slow", fake_moonshot={"chunks": 40, "delay": 0.1}))
    async with worker_running(stack):
        for _ in range(100):
            m = await scrape(client)
            if total(m, "moonq_jobs_in_flight") == 1:
                break
            await asyncio.sleep(0.05)
        assert total(m, "moonq_jobs_in_flight") == 1 and total(m, "moonq_workers") == 1
        assert total(m, "moonq_jobs", status="in_progress") == 1
        assert total(m, "moonq_queue_depth", queue="interactive") == 0
    m = await scrape(client)
    assert total(m, "moonq_workers") == 0 and total(m, "moonq_jobs_in_flight") == 0


@pytest.mark.redis
async def test_limiter_permits_and_waiters(real_stack: Any, real_redis: ArqRedis) -> None:
    stack, client = await real_stack()
    limiter = UpstreamLimiter(
        real_redis, Keys(stack.settings.key_prefix), concurrency=1, rpm=0, tpm=0
    )
    release = asyncio.Event()

    async def wait_for_a_permit() -> None:
        async with limiter.permit(10):
            await release.wait()

    async with limiter.permit(10):
        waiting = asyncio.create_task(wait_for_a_permit())
        await asyncio.sleep(0.2)
        m = await scrape(client)
    # Not a cancel of the waiter: redis-py can lose one, and then it waits for ever. The
    # waiter gets the permit freed above and gives it back.
    release.set()
    async with asyncio.timeout(10):
        await waiting
    await limiter.close()
    assert total(m, "moonq_limiter_permits_in_use") == 1
    assert total(m, "moonq_limiter_waiters") == 1
    m = await scrape(client)
    assert total(m, "moonq_limiter_permits_in_use") == 0


async def test_models_past_the_cap_are_other_across_workers(
    stack_factory: Any, fake_redis: ArqRedis
) -> None:
    """The first models to complete a job keep their names, cluster-wide; a model that only
    ever failed (a typo) takes no place."""
    stack, client = await stack_factory()
    keys = Keys(stack.settings.key_prefix)
    one, two = Recorder(fake_redis, keys, max_models=2), Recorder(fake_redis, keys, max_models=2)
    one.call_ended("typo-model", 0.2, "resource_not_found_error")
    await one.flush()
    for name in ("m-1", "m-2", "m-3"):
        one.completed(name, 0.1, {"prompt_tokens": 5, "completion_tokens": 7}, "t")
    await one.flush()
    for name in ("m-4", "m-1"):
        two.completed(name, 0.1, {"prompt_tokens": 5, "completion_tokens": 7}, "t")
    two.call_ended("m-2", 0.3, "server_error")  # known to the cluster, not to this worker
    await two.flush()
    m = await scrape(client)
    usage = "gen_ai_client_token_usage_count"
    assert series(m, usage, "gen_ai_request_model") == {"m-1", "m-2", OTHER}
    assert total(m, usage, gen_ai_request_model=OTHER, gen_ai_token_type="input") == 2
    assert total(m, usage, gen_ai_request_model="m-1", gen_ai_token_type="output") == 2
    calls = "gen_ai_client_operation_duration_seconds_count"
    assert series(m, calls, "gen_ai_request_model") == {"m-2", OTHER}


async def test_unknown_upstream_error_types_are_bounded(
    stack_factory: Any, fake_redis: ArqRedis
) -> None:
    stack, client = await stack_factory()
    recorder = Recorder(fake_redis, Keys(stack.settings.key_prefix))
    recorder.upstream_error("rate_limit_reached_error", True)
    for i in range(5):
        recorder.upstream_error(f"invented_by_the_upstream_{i}", False)
    await recorder.flush()
    m = await scrape(client)
    assert series(m, "moonq_upstream_errors_total", "error_type") == {
        "rate_limit_reached_error",
        OTHER,
    }
    assert total(m, "moonq_upstream_errors_total", error_type=OTHER) == 5


async def test_metrics_key_protects_the_route(stack_factory: Any) -> None:
    _, client = await stack_factory(
        MOONQ_METRICS_KEY="scrape-secret-123", MOONQ_API_KEYS="tenant-key-456=acme"
    )
    for headers in ({}, {"Authorization": "Bearer tenant-key-456"}):
        response = await client.get("/metrics", headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and "MOONQ_METRICS_KEY" in error["message"]
    assert await scrape(client, Authorization="Bearer scrape-secret-123")
    _, open_client = await stack_factory()
    assert "moonq_jobs" in await scrape(open_client)  # no key set: open, like /healthz


async def test_a_metrics_key_set_with_its_line_ending_still_opens_the_route(
    stack_factory: Any,
) -> None:
    """A key pasted from a file with `\\r\\n`: the token sent is stripped, so must the key be."""
    _, client = await stack_factory(MOONQ_METRICS_KEY=" scrape-secret-123\r\n")
    assert await scrape(client, Authorization="Bearer scrape-secret-123")


async def test_jobs_ended_by_a_cancel_or_a_batch_are_counted_too(real_stack: Any) -> None:
    """Endings that no worker sees (a cancel, a cancelled batch's lines) count by status."""
    _, client = await real_stack()
    job_id = await submit(client, chat("never runs"))
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    batch = await create(client, [line(f"r{i}") for i in range(3)])
    assert (await client.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 200
    families = await scrape(client)
    assert total(families, "moonq_jobs_finished_total", status="cancelled") == 4
