"""The dashboard's data: what each viewer's feed shows (and never shows), the charts' steps
the workers write, and the page's own routes. The page in a real browser:
tests/test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from redis.exceptions import RedisError

from api.auth import Viewer
from api.board import ENDED_FOR, EVERY, Board
from moonq import timeline
from moonq.keys import Keys
from moonq.metrics import Recorder
from moonq.models import Status
from moonq.redis import connect
from moonq.settings import Settings
from tests.conftest import _stacks, chat, submit
from tests.serving import served, worker_running
from tests.test_batches import create, line

pytestmark = pytest.mark.redis

KEYS = "key-of-acme-3f9a=acme,key-of-beta-77c1=beta"
ADMIN = "admin-key-0d2e"
ACME = {"Authorization": "Bearer key-of-acme-3f9a"}
BETA = {"Authorization": "Bearer key-of-beta-77c1"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def board_of(stack: Any) -> Board:
    """The app's Board, as the first dashboard request makes it."""
    found: Board | None = getattr(stack.app.state, "board", None)
    if found is None:
        found = stack.app.state.board = Board(stack.app.state.services)
    return found


async def snapshot(stack: Any, viewer: Viewer, status: str | None = None) -> dict[str, Any]:
    raw = await board_of(stack).snapshot(viewer, Status(status) if status else None)
    found: dict[str, Any] = json.loads(raw)
    return found


async def test_a_tenant_sees_only_its_own_and_an_admin_sees_everyone(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    mine = await submit(client, chat("acme's secret prompt"), headers=ACME)
    theirs = await submit(client, chat("beta's"), headers=BETA)

    acme = await snapshot(stack, Viewer("acme"))
    assert [job["id"] for job in acme["jobs"]] == [mine]
    assert acme["mine"] == {"queued": 1, "in_progress": 0}
    assert acme["viewer"] == {"tenant": "acme", "admin": False}
    # The account's load would tell of other tenants: only the admin sees it.
    assert acme["account"]["queue"] is None and acme["account"]["in_flight"] is None

    admin = await snapshot(stack, Viewer(None))
    assert {job["id"]: job["tenant"] for job in admin["jobs"]} == {mine: "acme", theirs: "beta"}
    assert admin["mine"]["queued"] == 2
    assert admin["account"]["queue"]["interactive"] == 2

    raw = await board_of(stack).snapshot(Viewer("acme"), None)
    for secret in (b"key-of-acme", b"key-of-beta", ADMIN.encode(), b"sk-test-upstream-key"):
        assert secret not in raw
    assert b"prompt" not in raw  # rows never carry a request or a result

    # The job's own routes: the owner and the admin, nobody else.
    for headers, code in ((ACME, 200), (BETA, 404), (AS_ADMIN, 200)):
        assert (await client.get(f"/dashboard/jobs/{mine}", headers=headers)).status_code == code
    assert (await client.get(f"/dashboard/jobs/{theirs}/events", headers=ACME)).status_code == 404
    # An admin key is the dashboard's: the API's routes do not take it.
    assert (await client.get(f"/v1/jobs/{mine}", headers=AS_ADMIN)).status_code == 401


async def test_finished_jobs_show_their_tokens_duration_and_usage(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    ids = [await submit(client, chat(f"n{i}"), headers=ACME) for i in range(3)]
    await submit(client, chat("other", fake_moonshot={"error": "server_error"}), headers=BETA)
    await stack.run_worker()
    acme = await snapshot(stack, Viewer("acme"))
    rows = {job["id"]: job for job in acme["jobs"]}
    assert set(rows) == set(ids)
    for job_id in ids:
        job = (await client.get(f"/v1/jobs/{job_id}", headers=ACME)).json()
        row = rows[job_id]
        assert row["status"] == "completed"
        assert row["tokens"] == job["usage"]["total_tokens"] > 0
        assert row["duration"] == pytest.approx(job["completed_at"] - job["started_at"], abs=1e-3)
    assert acme["usage"]["total"]["jobs"] == 3
    assert acme["usage"]["rows"][0]["model"] == "moonshot-v1-8k"
    assert acme["usage"]["total"]["cost"] > 0  # moonshot-v1-8k has a published price

    failed = await snapshot(stack, Viewer(None), status="failed")
    assert failed["filter"] == "failed"
    assert [job["tenant"] for job in failed["jobs"]] == ["beta"]


async def test_the_charts_count_what_workers_saw_end_by_tenant(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    for i in range(4):
        await submit(client, chat(f"c{i}"), headers=ACME)
    await submit(client, chat("b", fake_moonshot={"error": "server_error"}), headers=BETA)
    await stack.run_worker()  # a burst worker flushes its metrics as it closes
    later = time.time() + timeline.STEP  # the step they ended in is over
    steps = await timeline.TimelineReader(stack.redis, stack.app.state.services.keys).read(later)
    acme = timeline.series(steps, ["acme"], later)
    everyone = timeline.series(steps, None, later)
    assert sum(acme["jobs"]) * timeline.STEP == pytest.approx(4)  # type: ignore[arg-type]
    assert sum(acme["failed"]) == 0  # type: ignore[arg-type]
    assert sum(everyone["failed"]) * timeline.STEP == pytest.approx(1)  # type: ignore[arg-type]
    assert sum(acme["tokens"]) > 0  # type: ignore[arg-type]
    assert any(p is not None and p > 0 for p in acme["ttft_p50"])  # type: ignore[attr-defined]
    assert len(acme["t"]) == timeline.SPAN // timeline.STEP  # type: ignore[arg-type]


async def test_a_batch_shows_its_progress_and_is_cancelled_from_the_dashboard(
    real_stack: Any,
) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    client.headers.update(ACME)
    batch = await create(client, [line(f"l{i}") for i in range(6)])
    board = await snapshot(stack, Viewer("acme"))
    (row,) = board["batches"]
    assert (row["id"], row["total"], row["completed"], row["cancellable"]) == (
        batch["id"],
        6,
        0,
        True,
    )
    assert (await snapshot(stack, Viewer("beta")))["batches"] == []
    path = f"/dashboard/batches/{batch['id']}/cancel"
    assert (await client.post(path, headers=BETA)).status_code == 404
    cancelled = await client.post(path, headers=ACME)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] in ("cancelling", "cancelled")
    again = await client.post(path, headers=AS_ADMIN)  # the admin may cancel any; it is over
    assert again.status_code in (200, 409)
    assert (await client.get(f"/v1/batches/{batch['id']}")).json()["status"] == "cancelled"


async def test_the_feed_sends_one_snapshot_a_second_however_many_watch(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    await submit(client, chat("x"), headers=ACME)
    builds = 0
    async with served(stack.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.get("/dashboard/feed")).status_code == 401
        assert (await http.get("/dashboard/feed?status=x", headers=ACME)).status_code == 422
        bad = await http.get("/dashboard/feed", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["message"]
        board = board_of(stack)
        real_build = board._build

        async def counted(*args: Any) -> bytes:
            nonlocal builds
            builds += 1
            built: bytes = await real_build(*args)
            return built

        board._build = counted
        started = time.monotonic()
        counts = await asyncio.gather(*(_read(http, 3) for _ in range(10)))
        took = time.monotonic() - started
    assert all(len(found) == 3 for found in counts)
    assert all(found[0]["viewer"]["tenant"] == "acme" for found in counts)
    # The first snapshot is whole; the next carry what changed (usage is read every 10 s).
    assert {"account", "jobs", "usage", "series"} <= set(counts[0][0])
    assert "usage" not in counts[0][1] and counts[0][1]["viewer"]["tenant"] == "acme"
    assert took >= 2 * EVERY * 0.9  # three snapshots: at least two intervals apart
    assert builds <= 5  # ten dashboards of one view: one build a second between them


async def _read(http: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    async with http.stream("GET", "/dashboard/feed", headers=ACME) as response:
        assert response.status_code == 200
        event = ""
        async for text in response.aiter_lines():
            if text.startswith("event:"):
                event = text[6:].strip()
            elif text.startswith("data:") and event == "snapshot":
                found.append(json.loads(text[5:]))
                if len(found) == count:
                    return found
    return found


async def test_a_job_streams_to_the_dashboard_as_to_the_api(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    job_id = await submit(client, chat("stream me"), headers=ACME)
    async with worker_running(stack):
        done = await client.get(f"/v1/jobs/{job_id}?wait=10", headers=ACME)
    assert done.json()["status"] == "completed"
    api = await client.get(f"/v1/jobs/{job_id}/events", headers=ACME)
    board = await client.get(f"/dashboard/jobs/{job_id}/events", headers=AS_ADMIN)
    assert board.status_code == 200 and board.text == api.text
    detail = await client.get(f"/dashboard/jobs/{job_id}", headers=AS_ADMIN)
    assert detail.json()["result"] == done.json()["result"]


async def test_the_page_is_served_whole_and_offline(stack_factory: Any) -> None:
    _, client = await stack_factory()
    page = await client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js"):
        assert f"/dashboard/static/{name}" in page.text
        asset = await client.get(f"/dashboard/static/{name}")
        assert asset.status_code == 200 and asset.content
        if not name.startswith("vendor/"):
            assert "http://" not in asset.text and "https://" not in asset.text
    assert "http://" not in page.text and "https://" not in page.text


def test_an_admin_key_must_not_be_a_tenant_key() -> None:
    with pytest.raises(ValidationError, match="MOONQ_ADMIN_KEYS repeats a key") as caught:
        Settings(_env_file=None, MOONQ_API_KEYS="same-key=acme", MOONQ_ADMIN_KEYS="same-key")  # type: ignore[call-arg]
    shown = str(caught.value.errors(include_input=False))  # as `moonq` prints them
    assert "MOONQ_ADMIN_KEYS" in shown and "same-key" not in shown


async def test_the_recorder_writes_the_step_it_flushes_in(fake_redis: Any) -> None:
    now = [1_000_000.0]
    keys = Keys("tl")
    recorder = Recorder(fake_redis, keys, clock=lambda: now[0])
    recorder.job_ended("completed", now[0] - 1, "acme")
    recorder.completed("m", 0.3, {"total_tokens": 40}, "acme")
    recorder.job_ended("failed", now[0] - 1, "be:ta")
    await recorder.flush()
    step = timeline.step_of(now[0])
    raw = await fake_redis.hgetall(keys.metrics_slot(step))
    expected = {b"done:acme": b"1", b"tokens:acme": b"40", b"t9:acme": b"1"}
    assert raw == {**expected, b"failed:be:ta": b"1"}
    assert 0 < await fake_redis.ttl(keys.metrics_slot(step)) <= timeline.KEEP


def test_quantiles_interpolate_within_a_bucket_as_prometheus_does() -> None:
    buckets = [0] * (len(timeline.TTFT_BOUNDS) + 1)
    buckets[8] = 10  # ten in (0.1, 0.25]
    assert timeline.quantile(0.5, buckets) == pytest.approx(0.175)
    assert timeline.quantile(0.95, buckets) == pytest.approx(0.2425)
    buckets[-1] = 90  # most past the last bound: that bound is all there is to say
    assert timeline.quantile(0.95, buckets) == timeline.TTFT_BOUNDS[-1]
    assert timeline.quantile(0.5, [0] * len(buckets)) is None


async def test_a_tenant_named_like_the_admin_view_gets_its_own(real_stack: Any) -> None:
    keys = "key-of-acme-3f9a=acme,key-of-star-77c1=*,key-of-adm-5b0e=admin"
    stack, client = await real_stack(MOONQ_API_KEYS=keys, MOONQ_ADMIN_KEYS=ADMIN)
    acme_job = await submit(client, chat("acme's"), headers=ACME)
    await board_of(stack).snapshot(Viewer(None), None)  # an admin's dashboard is open
    for name in ("*", "admin"):
        seen = await snapshot(stack, Viewer(name))
        assert seen["viewer"] == {"tenant": name, "admin": False}
        assert acme_job not in [job["id"] for job in seen["jobs"]]
        assert seen["account"]["queue"] is None


async def test_each_snapshot_of_a_feed_is_new(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS)
    await submit(client, chat("x"), headers=ACME)
    async with served(stack.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        found = await _read(http, 5)
    times = [snap["at"] for snap in found]
    assert len(set(times)) == 5, times  # built again for each, not served twice


async def test_a_batch_rate_is_over_the_last_minute_whatever_else_is_open(
    real_stack: Any,
) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS)
    client.headers.update(ACME)
    batch = await create(client, [line(f"l{i}") for i in range(3)])
    key = stack.app.state.services.keys.batch(batch["id"])
    t0, now = 2_000_000_000.0, [2_000_000_000.0]
    fields = {"status": "in_progress", "in_progress_at": int(t0), "total": 100_000}
    await stack.redis.hset(key, mapping=fields)
    board = Board(stack.app.state.services, clock=lambda: now[0], ticks=lambda: now[0])
    rows = []
    # 600 s at 1 line/s, then 2 minutes at 10 lines/s; another tenant's dashboard open too.
    for second in range(0, 720, 2):
        now[0] = t0 + second
        await stack.redis.hset(key, "completed", second if second <= 600 else 10 * second - 5400)
        rows.append(json.loads(await board.snapshot(Viewer("acme"), None))["batches"][0])
        await board.snapshot(Viewer("beta"), None)
    assert rows[-1]["rate"] == pytest.approx(10, rel=0.1)  # the average since start is ~3
    assert rows[-1]["eta"] == pytest.approx((100_000 - 1800) / 10, rel=0.1)
    assert rows[200]["rate"] == pytest.approx(1, rel=0.1)


async def test_dashboards_of_a_view_share_one_wait_for_a_redis_that_hangs(
    fake: Any, prefix: str
) -> None:
    flowing = asyncio.Event()
    flowing.set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/13"
    redis = connect(url, socket_timeout=1)
    try:
        async for build in _stacks(redis, url, fake.url, prefix):
            stack, _ = await build(MOONQ_API_KEYS=KEYS)
            board = Board(stack.app.state.services)
            await board.snapshot(Viewer("acme"), None)  # connections open
            await asyncio.sleep(EVERY)  # the view is due again
            flowing.clear()
            started = time.monotonic()
            took = await asyncio.gather(*(_failed_after(board, started) for _ in range(6)))
            flowing.set()
    finally:
        await redis.aclose()
        server.close()
    assert max(took) < 2.5, took  # one timeout for all, not one each in turn


async def _failed_after(board: Board, started: float) -> float:
    with contextlib.suppress(RedisError, OSError):
        await board.snapshot(Viewer("acme"), None)
    return time.monotonic() - started


async def test_an_ended_job_row_is_read_once_a_minute_not_every_second(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS)
    done = await submit(client, chat("one"), headers=ACME)
    await stack.run_worker()
    waiting = await submit(client, chat("two"), headers=ACME)
    ticks = [1000.0]
    board = Board(stack.app.state.services, ticks=lambda: ticks[0])
    first = json.loads(await board.snapshot(Viewer("acme"), None))["jobs"]
    assert [(row["id"], row["status"]) for row in first] == [
        (waiting, "queued"),
        (done, "completed"),
    ]
    keys = stack.app.state.services.keys
    await stack.redis.hset(keys.job(waiting), "status", "in_progress")  # as a worker would
    await stack.redis.delete(keys.job(done))  # as expiry would
    ticks[0] += EVERY
    rows = json.loads(await board.snapshot(Viewer("acme"), None))["jobs"]
    # The live job is read again; the ended one, from memory.
    assert [(row["id"], row["status"]) for row in rows] == [
        (waiting, "in_progress"),
        (done, "completed"),
    ]
    ticks[0] += ENDED_FOR
    rows = json.loads(await board.snapshot(Viewer("acme"), None))["jobs"]
    assert [row["id"] for row in rows] == [waiting]  # read again: it is gone


async def test_the_dashboard_works_on_the_embedded_redis_of_moonq_dev(stack_factory: Any) -> None:
    stack, client = await stack_factory()  # open, as `moonq dev` runs by default
    job_id = await submit(client, chat("dev"))
    await stack.run_worker()
    seen = await snapshot(stack, Viewer(None))
    assert [(job["id"], job["status"]) for job in seen["jobs"]] == [(job_id, "completed")]
    assert seen["account"]["queue"] == {"interactive": 0, "batch": 0}
    assert seen["usage"]["total"]["jobs"] == 1


async def test_a_job_detail_says_why_its_last_attempt_was_retried(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    flaky = {"error": "server_error", "fail_times": 1, "key": f"detail-{uuid.uuid4().hex}"}
    job_id = await submit(client, chat("again", fake_moonshot=flaky), headers=ACME)
    await stack.run_worker()
    detail = (await client.get(f"/dashboard/jobs/{job_id}", headers=AS_ADMIN)).json()
    assert (detail["status"], detail["attempts"], detail["tenant"]) == ("completed", 2, "acme")
    assert detail["last_error"].startswith("server_error")


async def test_bad_ids_and_event_ids_are_4xx_with_a_json_error(real_stack: Any) -> None:
    _, client = await real_stack(MOONQ_API_KEYS=KEYS, MOONQ_ADMIN_KEYS=ADMIN)
    job_id = await submit(client, chat("x"), headers=ACME)
    odd = ["nope", "job_" + "A" * 32, "job_" + "0" * 31 + "%0A", "x" * 5000, "batch_../../etc"]
    for headers in (ACME, AS_ADMIN):
        for bad in odd:
            for method, path in (
                ("GET", f"/dashboard/jobs/{bad}"),
                ("GET", f"/dashboard/jobs/{bad}/events"),
                ("POST", f"/dashboard/batches/{bad}/cancel"),
            ):
                answer = await client.request(method, path, headers=headers)
                assert answer.status_code == 404, (path, answer.text)
                assert answer.json()["error"]["message"].startswith("No ")
    for last in ("abc", "-1", "99"):
        answer = await client.get(
            f"/dashboard/jobs/{job_id}/events", headers={**ACME, "Last-Event-ID": last}
        )
        assert answer.status_code in (400, 422) and answer.json()["error"]["message"], last
