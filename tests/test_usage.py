"""Usage and cost (`GET /v1/usage`) and per-tenant budgets (MOONQ_BUDGETS) at the door."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import json
import time
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis

from moonq.budgets import Budget, Budgets, OverBudget
from moonq.keys import Keys
from moonq.models import JobCreate, Status
from moonq.prices import Price
from moonq.store import JobStore, utc_day
from moonq.usage import UsageLedger
from tests.conftest import chat, submit
from tests.test_batches import jsonl, line, upload

KEYS = "key-acme=acme,key-beta=beta"
ACME = {"Authorization": "Bearer key-acme"}
BETA = {"Authorization": "Bearer key-beta"}


def _usage(prompt: int, completion: int, **extra: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **extra,
    }


def _steered(text: str, model: str = "moonshot-v1-8k", **fake: Any) -> dict[str, Any]:
    payload = chat(text, fake_moonshot=fake)
    payload["body"]["model"] = model
    return payload


async def _report(client: httpx.AsyncClient, headers: dict[str, str], **params: str) -> Any:
    response = await client.get("/v1/usage", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def test_usage_by_model_with_cost_counts_each_job_once(real_stack: Any) -> None:
    prices = {"moonshot-v1-8k": {"input": 1.0, "output": 2.0, "cached_input": 0.5}}
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_PRICES=json.dumps(prices))
    usage_a = _usage(1000, 500, cached_tokens=400)  # Moonshot's way of saying cached
    usage_b = _usage(3000, 100, prompt_tokens_details={"cached_tokens": 1000})  # OpenAI's
    await submit(client, _steered("a", usage=usage_a), headers=ACME)
    # fails once with a retryable error, then completes: still one job's usage
    retried = _steered("b", usage=usage_b, error="engine_overloaded_error", fail_times=1)
    await submit(client, retried, headers=ACME)
    await submit(client, _steered("c", "my-own-model", usage=_usage(7, 3)), headers=ACME)
    await submit(client, _steered("d", usage=_usage(50, 50)), headers=BETA)
    await stack.run_worker()

    report = await _report(client, ACME)
    today = utc_day(time.time())
    assert report["end"] == today and report["currency"] == "USD"
    rows = {(row["day"], row["model"]): row for row in report["data"]}
    assert set(rows) == {(today, "moonshot-v1-8k"), (today, "my-own-model")}
    v1 = rows[(today, "moonshot-v1-8k")]
    assert (v1["jobs"], v1["prompt_tokens"], v1["completion_tokens"]) == (2, 4000, 600)
    assert (v1["total_tokens"], v1["cached_tokens"]) == (4600, 1400)
    # (4000 - 1400) at 1.0 + 1400 at 0.5 + 600 at 2.0, per 1M tokens: MOONQ_PRICES wins
    assert v1["cost"] == pytest.approx((2600 * 1.0 + 1400 * 0.5 + 600 * 2.0) / 1e6)
    own = rows[(today, "my-own-model")]
    assert own["jobs"] == 1 and own["total_tokens"] == 10 and own["cost"] is None
    assert report["unpriced_models"] == ["my-own-model"]
    assert report["total"]["jobs"] == 3 and report["total"]["total_tokens"] == 4610
    assert report["total"]["cost"] == pytest.approx(v1["cost"])  # the unpriced model apart
    assert [m["model"] for m in report["by_model"]] == ["moonshot-v1-8k", "my-own-model"]
    # the other tenant sees only its own
    beta = await _report(client, BETA)
    assert beta["total"]["jobs"] == 1 and beta["total"]["total_tokens"] == 100


async def test_usage_outlives_its_jobs(real_stack: Any) -> None:
    stack, client = await real_stack()
    job_id = await submit(client, _steered("kept", usage=_usage(10, 20)))
    await stack.run_worker()
    prefix = stack.settings.key_prefix
    await stack.redis.delete(f"{prefix}:job:{job_id}", f"{prefix}:log:{job_id}")  # expired
    assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404
    report = await _report(client, {})
    assert report["total"]["jobs"] == 1 and report["total"]["total_tokens"] == 30
    day_key = f"{prefix}:usage:default:{utc_day(time.time())}"
    retention = stack.settings.usage_retention_days * 24 * 3600
    assert stack.settings.result_ttl < await stack.redis.ttl(day_key) <= retention


async def test_usage_is_grouped_by_utc_day(real_redis: ArqRedis, prefix: str) -> None:
    midnight = calendar.timegm((2026, 11, 26, 0, 0, 0))
    now = [midnight - 1.0]
    keys = Keys(prefix)
    store = JobStore(
        real_redis,
        keys,
        queue_name=f"{prefix}:q",
        result_ttl=60,
        max_events=100,
        clock=lambda: now[0],
    )
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "x"}]}
    for at, tokens in ((midnight - 1.0, 10), (midnight + 1.0, 20), (midnight + 2.0, 30)):
        now[0] = at
        job, _ = await store.create("t", JobCreate(body=body))  # type: ignore[arg-type]
        attempt = await store.start_attempt(job.id)
        fields = {"result": {"model": "kimi-k2.5"}, "usage": _usage(tokens, 0)}
        await store.finish(job.id, Status.COMPLETED, {"event": "done"}, fields, attempt, tenant="t")
    ledger = UsageLedger(real_redis, keys, clock=lambda: now[0])
    report = await ledger.report("t", dt.date(2026, 11, 25), dt.date(2026, 11, 26))
    by_day = {row.day: (row.jobs, row.prompt_tokens) for row in report.data}
    assert by_day == {"2026-11-25": (1, 10), "2026-11-26": (2, 50)}
    assert report.data[0].cost == pytest.approx(10 * 0.60 / 1e6)  # Moonshot's published price
    only_first = await ledger.report("t", dt.date(2026, 11, 25), dt.date(2026, 11, 25))
    assert only_first.total.jobs == 1


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "2026-13-01"}, "start"),
        ({"end": "yesterday"}, "end"),
        ({"start": "2026-11-20", "end": "2026-11-10"}, "start"),
        ({"start": "2024-01-01", "end": "2026-01-01"}, "start"),
        ({"from": "2026-11-01"}, "from"),
        ({"end": "0001-01-05"}, "start"),
    ],
)
async def test_bad_usage_ranges_are_400s(
    stack_factory: Any, params: dict[str, str], param: str
) -> None:
    _, client = await stack_factory()
    response = await client.get("/v1/usage", params=params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


async def test_a_spent_token_budget_refuses_with_429_until_it_resets(real_stack: Any) -> None:
    budgets = {"acme": {"tokens_per_day": 5000}}
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_BUDGETS=json.dumps(budgets))
    # a request whose own estimate can never fit is a 400: no wait would help
    big = await client.post("/v1/jobs", json=chat("x", max_tokens=6000), headers=ACME)
    assert big.status_code == 400 and big.json()["error"]["code"] == "tokens_per_day"
    # runs, uses 4,000 tokens; its hold (13 + 100 estimated) is given back as it completes
    spend = _steered("spend", usage=_usage(3000, 1000))
    spend["body"]["max_tokens"] = 100
    await submit(client, spend, headers=ACME)
    await stack.run_worker()
    # 12 + 980 estimated: fits beside the 4,000 spent only if the first job's hold is gone
    fits = await client.post("/v1/jobs", json=chat("x", max_tokens=980), headers=ACME)
    assert fits.status_code == 202, fits.text
    # accepted work not yet over counts: the same again does not fit beside it
    refused = await client.post("/v1/jobs", json=chat("x", max_tokens=980), headers=ACME)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    tomorrow = dt.date.fromisoformat(utc_day(time.time())) + dt.timedelta(days=1)
    assert error["code"] == "tokens_per_day" and error["type"] == "insufficient_quota"
    assert "tokens_per_day" in error["message"] and f"{tomorrow}T00:00:00Z" in error["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 24 * 3600
    assert error["resets_at"] == calendar.timegm(tomorrow.timetuple())
    # the other tenant has no budget
    assert (await client.post("/v1/jobs", json=chat("free"), headers=BETA)).status_code == 202
    listed = (await client.get("/v1/jobs", headers=ACME)).json()["data"]
    assert len(listed) == 2  # nothing refused was queued


async def test_an_idempotent_replay_is_answered_whatever_the_budget(real_stack: Any) -> None:
    budgets = {"acme": {"requests_per_minute": 1, "tokens_per_day": 2000}}
    _, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_BUDGETS=json.dumps(budgets))
    if time.time() % 60 > 55:  # the budget counts clock minutes: stay inside one
        await asyncio.sleep(60.5 - time.time() % 60)
    headers = {**ACME, "Idempotency-Key": "doc-1"}
    first = await client.post("/v1/jobs", json=chat("x", max_tokens=1500), headers=headers)
    assert first.status_code == 202, first.text
    again = await client.post("/v1/jobs", json=chat("x", max_tokens=1500), headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    # the replay held nothing more: a new request is refused by the rate, not by tokens
    other = await client.post("/v1/jobs", json=chat("y", max_tokens=100), headers=ACME)
    assert other.status_code == 429 and other.json()["error"]["code"] == "requests_per_minute"


async def test_a_request_rate_budget_applies_to_every_tenant_by_default(real_stack: Any) -> None:
    budgets = {"*": {"requests_per_minute": 2}, "beta": {"requests_per_minute": 5}}
    _, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_BUDGETS=json.dumps(budgets))
    if time.time() % 60 > 55:  # the budget counts clock minutes: stay inside one
        await asyncio.sleep(60.5 - time.time() % 60)
    answers = [(await client.post("/v1/jobs", json=chat(), headers=ACME)) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]
    error = answers[2].json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "requests_per_minute"
    assert int(answers[2].headers["Retry-After"]) <= 60
    betas = [
        (await client.post("/v1/jobs", json=chat(), headers=BETA)).status_code for _ in range(3)
    ]
    assert betas == [202, 202, 202]


async def test_a_batch_over_budget_is_refused_whole(real_stack: Any) -> None:
    budgets = {"acme": {"tokens_per_day": 1000}}
    _, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_BUDGETS=json.dumps(budgets))
    client.headers.update(ACME)
    waiting = await submit(client, chat("x", max_tokens=500))  # holds 512 while queued
    rows = [line(f"r{i}", max_tokens=100) for i in range(5)]  # about 5 x 112 estimated
    file_id = await upload(client, jsonl(rows))
    payload = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    response = await client.post("/v1/batches", json=payload)
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "tokens_per_day"
    assert (await client.get("/v1/batches")).json()["data"] == []
    assert [job["id"] for job in (await client.get("/v1/jobs")).json()["data"]] == [waiting]
    # a cancelled job gives its hold back: now the batch fits
    assert (await client.post(f"/v1/jobs/{waiting}/cancel")).status_code == 200
    accepted = await client.post("/v1/batches", json=payload)
    assert accepted.status_code == 200, accepted.text
    # and cancelling the batch gives every line's hold back
    batch_id = accepted.json()["id"]
    assert (await client.post(f"/v1/batches/{batch_id}/cancel")).status_code == 200
    assert (await client.post("/v1/jobs", json=chat("x", max_tokens=900))).status_code == 202


async def test_month_budgets_count_earlier_days_and_reset_with_the_month(
    real_redis: ArqRedis, prefix: str
) -> None:
    keys = Keys(prefix)
    day_start = calendar.timegm((2026, 11, 29, 12, 0, 0))
    now = [day_start]
    await real_redis.hset(keys.usage("t", "2026-11-29"), mapping={"kimi-k2.5|total_tokens": 700})
    ledger = UsageLedger(real_redis, keys, clock=lambda: now[0])
    budgets = Budgets(
        real_redis, keys, {"t": Budget(tokens_per_month=1000)}, ledger, clock=lambda: now[0]
    )
    await budgets.admit("t", 300, 0.0)  # 700 + 300 fits exactly
    now[0] = calendar.timegm((2026, 11, 30, 9, 0, 0))  # the next day, same month
    with pytest.raises(OverBudget) as refused:
        await budgets.admit("t", 301, 0.0)
    assert refused.value.budget == "tokens_per_month"
    assert refused.value.resets_at == calendar.timegm((2026, 12, 1, 0, 0, 0))
    now[0] = calendar.timegm((2026, 12, 1, 0, 0, 1))
    await budgets.admit("t", 999, 0.0)  # a new month


def test_price_cost_bills_cached_tokens_at_their_rate() -> None:
    price = Price(input=1.0, output=4.0, cached_input=0.25)
    assert price.cost(1_000_000, 1_000_000, 400_000) == pytest.approx(0.6 + 0.1 + 4.0)
    assert Price(1.0, 4.0).cost(1_000_000, 0, 400_000) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="per 1M"):
        Price(input=-1.0, output=1.0)


@pytest.mark.parametrize("name", ["MOONQ_BUDGETS", "MOONQ_PRICES"])
def test_bad_json_in_the_environment_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from pydantic import ValidationError

    from moonq.settings import Settings

    monkeypatch.setenv(name, '{"acme": ')
    with pytest.raises(ValidationError, match="must be a JSON object"):
        Settings(_env_file=None)  # type: ignore[call-arg]
