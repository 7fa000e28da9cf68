"""Logs: JSON lines on request, the running job's id, tenant and attempt on every line logged
while it runs, no access lines unless asked, and never a secret."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moonq.logs import Formatter, JobFilter, job_context, secrets_of
from tests.conftest import chat, submit
from tests.procs import clean_env, real_env, start, wait_http, wait_log

API_KEY = "sk-tenant-known-key-0001"
UPSTREAM_KEY = "sk-upstream-known-key-0002"
METRICS_KEY = "metrics-known-key-0003"
ADMIN_KEY = "admin-known-key-0004"
SECRETS = {
    "MOONQ_ADMIN_KEYS": ADMIN_KEY,
    "MOONQ_API_KEYS": f"{API_KEY}=acme",
    "MOONSHOT_API_KEY": UPSTREAM_KEY,
    "MOONQ_METRICS_KEY": METRICS_KEY,
    "MOONQ_RETRY_BASE_DELAY": 0,
}
# "job <id> attempt <n>: ..." and "job <id> failed on attempt <n>: ..."
ABOUT_JOB = re.compile(r"job (job_[0-9a-f]{32}) (?:failed on )?attempt (\d+)")
UVICORN = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every record of every logger, DEBUG up, as the JSON lines a process writes (without
    the formatter's redaction: what must not appear must not be logged in the first place)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(Formatter("json"))
    handler.addFilter(JobFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(row) for row in out.getvalue().splitlines()]


async def test_no_secret_is_ever_logged(stack_factory: Any, captured: io.StringIO) -> None:
    stack, client = await stack_factory(**SECRETS)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    wrong = {"Authorization": "Bearer wrong"}
    assert (await client.get("/v1/jobs", headers=wrong)).status_code == 401
    await submit(client, chat("fine"), headers=auth)
    await submit(
        client,
        chat("denied", fake_moonshot={"error": "invalid_authentication_error"}),
        headers=auth,
    )
    flaky = {"error": "server_error", "fail_times": 1, "key": "logs-flaky"}
    await submit(client, chat("again", fake_moonshot=flaky), headers=auth)
    await stack.run_worker()
    assert (await client.get("/metrics")).status_code == 401
    assert (
        await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    ).is_success
    jobs = (await client.get("/v1/jobs", headers=auth)).json()["data"]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await client.get(f"/dashboard/jobs/{jobs[0]['id']}", headers=admin)).is_success
    text = captured.getvalue()
    assert "failed on attempt 1: invalid_authentication_error" in text  # the capture works
    assert secrets_of(stack.settings).count(ADMIN_KEY) == 1  # what the formatter redacts
    for secret in (API_KEY, UPSTREAM_KEY, METRICS_KEY, ADMIN_KEY):
        assert secret not in text


async def test_lines_logged_while_a_job_runs_name_it(
    stack_factory: Any, captured: io.StringIO
) -> None:
    stack, client = await stack_factory(**SECRETS)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    flaky = {"error": "server_error", "fail_times": 1, "key": "logs-context"}
    retried = await submit(client, chat("again", fake_moonshot=flaky), headers=auth)
    failed = await submit(
        client, chat("no", fake_moonshot={"error": "invalid_request_error"}), headers=auth
    )
    await stack.run_worker()
    said = []
    for row in lines(captured):
        found = ABOUT_JOB.search(row["message"])
        if row["logger"].startswith("moonq") and found:
            job_id, attempt = found.group(1), int(found.group(2))
            said.append((job_id, attempt))
            assert (row.get("job_id"), row.get("tenant"), row.get("attempt")) == (
                job_id,
                "acme",
                attempt,
            ), row
    assert {(retried, 1), (failed, 1)} <= set(said)


async def test_a_job_started_says_no_absurd_delay(
    stack_factory: Any, captured: io.StringIO
) -> None:
    """arq's start line says how long a job was due by reading its queue score as a time; a
    job scored by its turn was said to be "delayed=1795772900.00s"."""
    stack, client = await stack_factory()
    await submit(client, chat("fine"))
    await stack.run_worker()
    started = [row["message"] for row in lines(captured) if row["logger"] == "arq.worker"]
    started = [text for text in started if "→" in text]
    assert started, "arq's start line was captured"
    for text in started:
        delayed = re.search(r"delayed=([\d.]+)s", text)
        assert delayed is None or float(delayed.group(1)) < 3600, text


def test_a_genuine_delay_stays_in_arqs_start_line() -> None:
    """A job due at a time (a retry) that waited keeps what arq says of it."""
    args = (0.5, "job_1:run_completion", "'job_1'", " try=2 delayed=3.50s")
    record = logging.LogRecord(
        "arq.worker", logging.INFO, __file__, 1, "%6.2fs → %s(%s)%s", args, None
    )
    JobFilter().filter(record)
    assert record.getMessage().endswith("try=2 delayed=3.50s")


def test_the_formatter_redacts_known_secrets_and_adds_the_job() -> None:
    record = logging.LogRecord(
        "moonq.worker", logging.WARNING, __file__, 1, "upstream said %s", (UPSTREAM_KEY,), None
    )
    with job_context("job_1") as context:
        context.tenant, context.attempt = "acme", 2
        JobFilter().filter(record)
    for style in ("text", "json"):
        shown = Formatter(style, secrets=[UPSTREAM_KEY]).format(record)
        assert UPSTREAM_KEY not in shown and "upstream said ***" in shown
        assert "job_1" in shown and "acme" in shown
    row = json.loads(Formatter("json").format(record))
    assert (row["job_id"], row["tenant"], row["attempt"], row["level"]) == (
        "job_1",
        "acme",
        2,
        "WARNING",
    )


def _json_lines(text: str) -> list[dict[str, Any]]:
    rows = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in rows]  # fails on any line that is not JSON


@pytest.mark.e2e
@pytest.mark.parametrize("access_log", ["false", "true"])
def test_the_api_logs_json_lines_and_access_lines_only_when_asked(
    tmp_path: Path, access_log: str
) -> None:
    env = clean_env(
        REDIS_URL="redis://127.0.0.1:1/0", MOONQ_LOG_FORMAT="json", MOONQ_ACCESS_LOG=access_log
    )
    proc = start("api", ["api", "--port", "0"], env, tmp_path)
    try:
        base = f"http://127.0.0.1:{wait_log(proc, UVICORN).group(1)}"
        wait_http(f"{base}/healthz", proc)
        httpx.get(f"{base}/healthz?from=test")
    finally:
        proc.stop(signal.SIGTERM)
    rows = _json_lines(proc.output())
    assert any(row["logger"] == "uvicorn.error" for row in rows)
    access = [row for row in rows if "/healthz?from=test" in row["message"]]
    assert len(access) == (1 if access_log == "true" else 0)


@pytest.mark.e2e
def test_the_worker_logs_json_lines(tmp_path: Path, real_redis_url: str, prefix: str) -> None:
    env = real_env(
        real_redis_url,
        prefix,
        MOONSHOT_BASE_URL="http://127.0.0.1:9/v1",
        MOONQ_LOG_FORMAT="json",
    )
    proc = start("worker", ["worker", "--burst"], env, tmp_path)
    proc.popen.wait(20)
    rows = _json_lines(proc.output())
    assert proc.popen.returncode == 0, rows
    assert any("Starting worker" in row["message"] for row in rows)
