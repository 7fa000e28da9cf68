"""The account: token counts from the upstream (or a local fallback), and a pause instead of
thousands of failed jobs when the balance runs out, resumed by itself once topped up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from api.estimates import EstimateGuard
from moonq.account import Account, read_pause
from moonq.fake_account import ACCOUNT_KEY, FakeAccount
from moonq.fake_moonshot import FakeConfig, FakeServer, expected_usage, start_fake
from moonq.keys import Keys
from moonq.limits import UpstreamLimiter, completion_budget, estimate_tokens, local_prompt_tokens
from tests.conftest import Stack, chat, submit
from worker.upstream import MoonshotClient

FAST_CHECKS = {"MOONQ_BALANCE_CHECK_MIN": 0.1, "MOONQ_BALANCE_CHECK_MAX": 0.2}
PAUSED_REASON = "the upstream account is out of balance; moonq resumes when it is topped up"


def account_of(fake: FakeServer) -> FakeAccount:
    return fake.runner.app[ACCOUNT_KEY]


async def steer(fake: FakeServer, **values: Any) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{fake.origin}/_fake/balance", json=values)
        answer.raise_for_status()


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Await until `check()` (sync or async) is truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


# --- token counts -----------------------------------------------------------------------------


def test_the_estimate_is_the_prompt_plus_the_completion_budget() -> None:
    body = chat("count me", max_tokens=300)["body"]
    assert completion_budget(body) == 300
    assert estimate_tokens(body, prompt_tokens=42) == 342  # the upstream's count
    assert estimate_tokens(body) == local_prompt_tokens(body) + 300  # moonq's own
    assert estimate_tokens(chat("x", max_completion_tokens=7)["body"], 10) == 17


async def test_the_client_gets_the_upstreams_exact_prompt_count(fake: FakeServer) -> None:
    body = chat("a prompt of some length " * 20)["body"]
    client = MoonshotClient(fake.url, "sk-any")
    try:
        counted = await client.estimate_prompt_tokens(body)
    finally:
        await client.aclose()
    assert counted == expected_usage(body)["prompt_tokens"]  # what its usage will report
    assert counted < local_prompt_tokens(body)  # the local guess is the cautious one
    assert account_of(fake).token_estimates == 1


async def test_an_upstream_without_the_endpoints_is_asked_once() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(404, json={"error": {"message": "no such route"}})

    client = MoonshotClient("http://upstream.test/v1", "sk", transport=httpx.MockTransport(handler))
    body = chat()["body"]
    for _ in range(3):
        assert await client.estimate_prompt_tokens(body) is None
        assert await client.available_balance() is None
    await client.aclose()
    assert asked == ["/v1/tokenizers/estimate-token-count", "/v1/users/me/balance"]


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, json={"error": {"type": "server_error"}}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"data": {"total_tokens": True, "available_balance": "9"}}),
        httpx.Response(200, json={"data": {"total_tokens": -1, "available_balance": None}}),
        httpx.Response(200, json=["data"]),
        httpx.ConnectError("refused"),
        RuntimeError("a transport bug"),
    ],
)
async def test_a_failing_account_endpoint_is_none_never_an_exception(answer: Any) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = MoonshotClient("http://upstream.test/v1", "sk", transport=httpx.MockTransport(handler))
    assert await client.estimate_prompt_tokens(chat()["body"]) is None
    assert await client.available_balance() is None
    assert await client.estimate_prompt_tokens(chat()["body"]) is None
    await client.aclose()
    assert calls == 3  # a failure is not a missing endpoint: asked again next time


async def test_the_api_counts_with_the_upstream_or_falls_back(
    real_stack: Any, fake: FakeServer
) -> None:
    _, client = await real_stack()
    body = chat("how many tokens is this")["body"]
    exact = (await client.post("/v1/tokenizers/estimate-token-count", json=body)).json()
    assert exact == {
        "data": {"total_tokens": expected_usage(body)["prompt_tokens"]},
        "source": "upstream",
    }
    await steer(fake, account_endpoints=False)  # an OpenAI-style upstream
    other = chat("and how many is this")["body"]  # (the first one's count is cached)
    local = (await client.post("/v1/tokenizers/estimate-token-count", json=other)).json()
    assert local == {"data": {"total_tokens": local_prompt_tokens(other)}, "source": "local"}
    bad = await client.post("/v1/tokenizers/estimate-token-count", json={"model": "m"})
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request_error"


async def test_the_worker_budgets_tpm_with_the_upstreams_count(
    real_stack: Any, fake: FakeServer
) -> None:
    """A request that fits TPM by its exact count runs; counted by moonq's cautious guess it
    could never fit, which is what an upstream without a tokenizer gets."""
    stack, client = await real_stack(MOONQ_UPSTREAM_TPM=0)
    payload = chat("z" * 3000, max_tokens=100)
    exact = estimate_tokens(payload["body"], expected_usage(payload["body"])["prompt_tokens"])
    tpm = (exact + estimate_tokens(payload["body"])) // 2
    assert exact < tpm < estimate_tokens(payload["body"])
    limited = Stack(stack.settings.model_copy(update={"upstream_tpm": tpm}), stack.redis)
    fits = await submit(client, payload)
    await limited.run_worker()
    assert (await client.get(f"/v1/jobs/{fits}")).json()["status"] == "completed"

    await steer(fake, account_endpoints=False)
    guessed = await submit(client, payload)
    await limited.run_worker()
    job = (await client.get(f"/v1/jobs/{guessed}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "request_too_large"


# --- limits and the pause ---------------------------------------------------------------------


async def test_the_account_shows_its_tier_limits_and_what_is_in_use(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_MOONSHOT_TIER=0, MOONQ_UPSTREAM_RPM=10)
    limiter = UpstreamLimiter(
        stack.redis, Keys(stack.settings.key_prefix), concurrency=1, rpm=10, tpm=500_000
    )
    async with limiter.permit(1234):
        account = (await client.get("/v1/account")).json()
    await limiter.close()
    assert account["object"] == "account" and account["paused"] is False
    assert account["limits"] == {"tier": 0, "concurrency": 1, "rpm": 10, "tpm": 500_000}
    assert account["in_use"] == {
        "permits": 1,
        "requests_last_minute": 1,
        "tokens_last_minute": 1234,
    }
    after = (await client.get("/v1/account")).json()["in_use"]
    assert after["permits"] == 0 and after["requests_last_minute"] == 1
    ready = (await client.get("/readyz")).json()
    assert ready == {"status": "ok", "account": {"paused": False, "reason": None}}


async def _jobs(client: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]]:
    return [(await client.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]


async def _paused(client: httpx.AsyncClient) -> bool:
    paused: bool = (await client.get("/v1/account")).json()["paused"]
    return paused


async def test_an_account_out_of_balance_pauses_and_resumes_by_itself(
    real_stack: Any, fake: FakeServer
) -> None:
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=1, **FAST_CHECKS)
    await steer(fake, available_balance=0)
    ids = [await submit(client, chat(f"job {n}")) for n in range(4)]
    worker = asyncio.create_task(stack.run_worker())
    try:
        await eventually(lambda: _paused(client))
        refused = fake.stats.requests
        assert refused >= 1  # the first attempt's 429
        checks = account_of(fake).balance_checks
        await asyncio.sleep(1.0)  # several balance checks' worth

        assert fake.stats.requests == refused  # no chat call while paused
        assert account_of(fake).balance_checks > checks  # but the balance is checked
        jobs = await _jobs(client, ids)
        assert [j["status"] for j in jobs] == ["queued"] * 4  # none failed
        assert sum(j["attempts"] for j in jobs) == refused  # refused, handed back
        assert all(j["waiting_reason"] == PAUSED_REASON for j in jobs)
        account = (await client.get("/v1/account")).json()
        assert "out of balance" in account["paused_reason"]
        assert account["paused_since"] <= time.time() and account["next_check_at"] > 0
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["account"]["paused"] is True

        await steer(fake, available_balance=25)
        await asyncio.wait_for(worker, 15)
    finally:
        worker.cancel()
    jobs = await _jobs(client, ids)
    assert [j["status"] for j in jobs] == ["completed"] * 4
    assert all(j["waiting_reason"] is None and j["error"] is None for j in jobs)
    assert fake.stats.requests == refused + 4
    assert (await client.get("/readyz")).json()["account"] == {"paused": False, "reason": None}
    assert not await _paused(client)


async def test_without_a_balance_endpoint_one_job_probes_the_account(
    real_stack: Any, fake: FakeServer
) -> None:
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=2, **FAST_CHECKS)
    await steer(fake, available_balance=0, account_endpoints=False)
    ids = [await submit(client, chat(f"probe {n}")) for n in range(3)]
    worker = asyncio.create_task(stack.run_worker())
    try:
        await eventually(lambda: _paused(client))
        before = fake.stats.requests
        await asyncio.sleep(0.6)
        # a probe per due check (every 0.1-0.2 s), not every job as fast as it is retried
        assert fake.stats.requests - before <= 6
        assert await _paused(client)
        assert [j["status"] for j in await _jobs(client, ids)] == ["queued"] * 3
        await steer(fake, available_balance=5)
        await asyncio.wait_for(worker, 15)
    finally:
        worker.cancel()
    assert [j["status"] for j in await _jobs(client, ids)] == ["completed"] * 3
    assert account_of(fake).balance_checks == 0  # it never had the endpoint to ask
    assert not await _paused(client)


async def test_a_probe_whose_resume_redis_fails_keeps_its_paid_answer(
    real_stack: Any, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's answer came back whole; a Redis blip as the account is resumed must not
    send the job round again (the upstream would be called, and paid, twice): the account
    stays paused until its next check, which resumes it."""
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=2, **FAST_CHECKS)
    await steer(fake, available_balance=0, account_endpoints=False)
    original, failed = Account.resume, []

    async def resume(self: Account, why: str, *, probed: bool = False) -> None:
        if probed and not failed:
            failed.append(why)
            raise RedisConnectionError("Connection reset by peer")
        await original(self, why, probed=probed)

    monkeypatch.setattr(Account, "resume", resume)
    ids = [await submit(client, chat(f"probe {n}")) for n in range(3)]
    worker = asyncio.create_task(stack.run_worker())
    try:
        await eventually(lambda: _paused(client))
        await steer(fake, available_balance=5)
        await asyncio.wait_for(worker, 15)
    finally:
        worker.cancel()
    assert failed and [j["status"] for j in await _jobs(client, ids)] == ["completed"] * 3
    for job_id in ids:  # no attempt's answer was streamed and then thrown away
        kinds = [e["event"] for e in await stack.events(job_id)]
        assert "retry" not in kinds[kinds.index("chunk") :], kinds
    assert not await _paused(client)


async def test_a_quota_refusal_with_a_positive_balance_fails_only_its_job(
    real_stack: Any, fake: FakeServer
) -> None:
    """The balance says the account is fine: the refusal is that request's own."""
    stack, client = await real_stack(**FAST_CHECKS)
    refused = await submit(
        client, chat("no", fake_moonshot={"error": "exceeded_current_quota_error"})
    )
    fine = await submit(client, chat("yes"))
    await asyncio.wait_for(stack.run_worker(), 15)
    refused_job, fine_job = await _jobs(client, [refused, fine])
    assert refused_job["status"] == "failed"
    assert refused_job["error"]["type"] == "exceeded_current_quota_error"
    assert fine_job["status"] == "completed"
    assert not await _paused(client)
    assert refused_job["attempts"] == 1


async def test_the_fake_refuses_chat_while_out_of_balance_until_reset(fake: FakeServer) -> None:
    body = chat("anyone there")["body"]
    async with httpx.AsyncClient(base_url=fake.origin) as http:
        await steer(fake, available_balance=-2.5)
        refused = await http.post("/v1/chat/completions", json=body)
        balance = (await http.get("/v1/users/me/balance")).json()
        await http.post("/_fake/reset")
        answered = await http.post("/v1/chat/completions", json=body)
        bad = await http.post("/_fake/balance", json={"available_balance": "lots"})
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "exceeded_current_quota_error"
    assert "suspended" in refused.json()["error"]["message"]
    assert balance["data"] == {
        "available_balance": -2.5,
        "voucher_balance": 0,
        "cash_balance": -2.5,
    }
    assert answered.status_code == 200 and account_of(fake).available_balance > 0
    assert bad.status_code == 400 and account_of(fake).available_balance > 0


async def test_the_fakes_account_endpoints_check_the_key() -> None:
    fake = await start_fake(config=FakeConfig(api_key="sk-right"))
    try:
        async with httpx.AsyncClient(base_url=fake.url) as http:
            wrong = await http.get("/users/me/balance", headers={"Authorization": "Bearer sk-no"})
            right = await http.post(
                "/tokenizers/estimate-token-count",
                json=chat("x")["body"],
                headers={"Authorization": "Bearer sk-right"},
            )
    finally:
        await fake.close()
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "invalid_authentication_error"
    assert (
        right.json()["data"]["total_tokens"] == expected_usage(chat("x")["body"])["prompt_tokens"]
    )


async def test_a_job_waiting_on_a_paused_account_is_never_taken_for_lost(
    real_stack: Any, fake: FakeServer
) -> None:
    """Each probe that finds the account still dry hands the job back: a pause, neither a
    failure nor an interruption, however often it happens (past MAX_INTERRUPTIONS here)."""
    checks = {"MOONQ_BALANCE_CHECK_MIN": 0.02, "MOONQ_BALANCE_CHECK_MAX": 0.02}
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=1, **checks)
    await steer(fake, available_balance=0, account_endpoints=False)
    job_id = await submit(client, chat("patient"))
    worker = asyncio.create_task(stack.run_worker())

    async def probed_often_or_over() -> bool:
        job = (await _jobs(client, [job_id]))[0]
        return job["attempts"] > 30 or job["status"] not in ("queued", "in_progress")

    try:
        await eventually(probed_often_or_over, timeout=15)
        job = (await _jobs(client, [job_id]))[0]
        assert job["status"] in ("queued", "in_progress"), job["error"]
        assert await _paused(client)
        await steer(fake, available_balance=5)
        await asyncio.wait_for(worker, 15)
    finally:
        worker.cancel()
    job = (await _jobs(client, [job_id]))[0]
    assert job["status"] == "completed" and job["attempts"] > 30
    assert not await _paused(client)


def _balance_reads(values: list[float | None]) -> tuple[Any, list[int]]:
    """A balance check answering `values` in turn (the last one from then on), counting calls;
    each call takes a moment, as a request does."""
    calls = [0]

    async def balance() -> float | None:
        calls[0] += 1
        await asyncio.sleep(0.02)
        return values[min(calls[0], len(values)) - 1]

    return balance, calls


async def test_refusals_at_once_share_one_balance_read(real_redis: Any, prefix: str) -> None:
    """The balance reads positive, yet chat answers quota to four requests at once: each
    refusal is its request's own (the account stays open), and they share one balance read."""
    keys = Keys(prefix)
    balance, calls = _balance_reads([10.0])
    account = Account(real_redis, keys, balance, check_min=5.0, check_max=5.0)
    refused = await asyncio.gather(*(account.refused_for_quota() for _ in range(4)))
    assert refused == [False] * 4
    assert calls[0] == 1  # one balance read for the four
    assert await read_pause(real_redis, keys) is None
    await asyncio.sleep(0.1)
    assert await account.refused_for_quota() is False
    assert calls[0] == 1  # within BALANCE_TTL: the first read is reused


# --- the token-count route's bound -----------------------------------------------------------


def test_the_estimate_guard_bounds_each_tenant_per_second() -> None:
    now = [0.0]
    guard = EstimateGuard(per_second=2, size=2, clock=lambda: now[0])
    assert [guard.allow("a"), guard.allow("a"), guard.allow("a")] == [True, True, False]
    assert guard.allow("b")  # another tenant's bound is its own
    now[0] += 1.0
    assert guard.allow("a")
    for n, key in enumerate("xyz"):
        guard.remember(key, n)
    assert (guard.cached("x"), guard.cached("y"), guard.cached("z")) == (None, 1, 2)


async def test_the_api_caches_token_counts_and_bounds_each_tenants_upstream_calls(
    real_stack: Any, fake: FakeServer
) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS="ka=alpha,kb=beta")
    stack.app.state.estimates = EstimateGuard(per_second=2, clock=lambda: 0.0)  # one second
    route = "/v1/tokenizers/estimate-token-count"

    async def count(text: str, key: str = "ka") -> Any:
        body = chat(text)["body"]
        answer = await client.post(route, json=body, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        return answer.json()["source"], answer.json()["data"]["total_tokens"], body

    sources = [(await count(text))[0] for text in ("one", "one", "two", "three", "one")]
    assert sources == ["upstream", "upstream", "upstream", "local", "upstream"]  # cached twice
    assert account_of(fake).token_estimates == 2
    source, counted, body = await count("three", key="kb")  # beta's bound is its own
    assert (source, counted) == ("upstream", expected_usage(body)["prompt_tokens"])
    assert account_of(fake).token_estimates == 3
