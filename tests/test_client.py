"""moonq.Client and moonq.AsyncClient against the in-process API (over httpx's ASGI transport,
fakeredis, the fake upstream, workers in burst mode); real sockets, through a proxy that cuts
them, for resuming an event stream."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

import moonq
from moonq import AsyncClient, Client
from moonq import client_calls as calls
from moonq.client_errors import (
    ConfigurationError,
    Redirected,
    RouteNotFound,
    WaitTimeout,
    shown_url,
)
from moonq.client_events import Resume
from moonq.fake_moonshot import expected_content, expected_usage
from tests.conftest import Stack
from tests.serving import CuttingProxy, served, worker_running

KEY = "sk-client-test"


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONQ_URL", raising=False)
    monkeypatch.delenv("MOONQ_API_KEY", raising=False)


@pytest.fixture
async def api(stack_factory: Any) -> AsyncIterator[tuple[Stack, AsyncClient]]:
    """The stack (one tenant, key KEY) and an AsyncClient on it over ASGI."""
    stack, _ = await stack_factory(MOONQ_API_KEYS=f"{KEY}=team-a")
    transport = httpx.ASGITransport(app=stack.app)
    async with AsyncClient("http://moonq", KEY, transport=transport, backoff=0.01) as client:
        yield stack, client


# Jobs


async def test_a_job_is_created_waited_for_listed_and_read_as_typed_models(
    api: tuple[Stack, AsyncClient],
) -> None:
    stack, client = api
    body = chat("summarise this")
    job = await client.create_job(
        body, custom_id="doc-1", metadata={"team": "blue"}, idempotency_key="k-1"
    )
    assert isinstance(job, moonq.Job) and job.status == moonq.Status.QUEUED
    assert (job.custom_id, job.metadata, job.model) == ("doc-1", {"team": "blue"}, body["model"])
    again = await client.create_job(
        body, custom_id="doc-1", metadata={"team": "blue"}, idempotency_key="k-1"
    )
    assert again.id == job.id  # the same key: the first job, nothing new queued
    with pytest.raises(moonq.BadRequest) as reused:  # the same key for another request
        await client.create_job(body, custom_id="doc-2", idempotency_key="k-1")
    assert reused.value.type == "idempotency_error" and reused.value.param == "Idempotency-Key"

    await stack.run_worker()
    done = await client.wait_job(job.id, timeout=5)
    assert done.status == moonq.Status.COMPLETED and done.attempts == 1
    assert done.result is not None and done.usage == expected_usage(body)
    assert done.result["choices"][0]["message"]["content"] == expected_content(body)
    assert (await client.get_job(job.id)).model_dump() == done.model_dump()

    listed = [j.id async for j in client.list_jobs(custom_id="doc-1")]
    assert listed == [job.id]


async def test_lists_page_through_every_job_newest_first_with_filters(
    api: tuple[Stack, AsyncClient],
) -> None:
    _, client = api
    ids = [(await client.create_job(chat(f"q{i}"))).id for i in range(5)]
    pages = [page async for page in client.list_job_pages(limit=2)]
    assert [len(p.data) for p in pages] == [2, 2, 1]
    assert [p.has_more for p in pages] == [True, True, False]
    assert [j.id async for j in client.list_jobs(limit=2)] == ids[::-1]
    cancelled = await client.cancel_job(ids[1])
    assert cancelled.status == moonq.Status.CANCELLED
    assert [j.id async for j in client.list_jobs(status="cancelled")] == [ids[1]]
    assert [j.id async for j in client.list_jobs(status=moonq.Status.QUEUED, limit=1)] == [
        ids[4],
        ids[3],
        ids[2],
        ids[0],
    ]


async def test_waiting_gives_up_after_its_timeout_with_the_job_as_last_seen(
    api: tuple[Stack, AsyncClient],
) -> None:
    _, client = api
    job = await client.create_job(chat())  # no worker: it stays queued
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(moonq.WaitTimeout) as caught:
        await client.wait_job(job.id, timeout=0.3, poll=0.1)
    assert 0.3 <= loop.time() - started < 2
    assert caught.value.job.id == job.id and caught.value.job.status == moonq.Status.QUEUED
    assert f"job {job.id} is still queued after 0.3 s" in str(caught.value)


def _queued(request: httpx.Request) -> httpx.Response:
    job = {"id": "job_1", "status": "queued", "created_at": 1, "model": "m", "channel": "c"}
    return httpx.Response(200, json=job)


async def test_waiting_on_a_server_that_answers_at_once_pauses_between_polls() -> None:
    """MOONQ_MAX_WAIT=0, or a proxy that drops `?wait`: each long-poll answers at once; the
    client still asks at most about once a second, not hundreds of times."""
    asked: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(float(request.url.params.get("wait", 0)))
        return _queued(request)

    transport = httpx.MockTransport(answer)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with Client("http://moonq.test", transport=transport) as client, pytest.raises(WaitTimeout):
        await asyncio.to_thread(client.wait_job, "job_1", timeout=0.25)
    async with AsyncClient("http://moonq.test", transport=transport) as aclient:
        with pytest.raises(WaitTimeout):
            await aclient.wait_job("job_1", timeout=0.25)
    assert 0.45 <= loop.time() - started < 3
    assert 2 <= len(asked) <= 6 and asked[0] == pytest.approx(0.25, abs=0.05)


def test_the_pause_between_polls_is_a_second_at_most_and_never_past_the_deadline() -> None:
    now = [100.0]
    forever = calls.Deadline(None, clock=lambda: now[0])
    assert forever.next_wait(30) == 30
    now[0] += 0.25  # answered early
    assert forever.rest() == pytest.approx(0.75)
    forever.next_wait(30)
    now[0] += 12  # the server held it (its own cap): no pause
    assert forever.rest() == 0
    short = calls.Deadline(0.5, clock=lambda: now[0])
    assert short.next_wait(30) == pytest.approx(0.5)
    assert short.rest() == pytest.approx(0.5)


async def test_the_servers_refusals_are_typed_errors_with_its_error_object(
    api: tuple[Stack, AsyncClient],
) -> None:
    stack, client = api
    missing = "job_" + "0" * 32
    with pytest.raises(moonq.NotFound) as not_found:
        await client.get_job(missing)
    assert not_found.value.status == 404 and not_found.value.type == "not_found_error"
    assert missing in not_found.value.message

    with pytest.raises(moonq.BadRequest) as bad:
        await client.create_job({"model": "m", "messages": []})
    assert bad.value.status == 422 and bad.value.param == "body.messages"

    job = await client.create_job(chat())
    await stack.run_worker()
    with pytest.raises(moonq.Conflict) as ended:
        await client.cancel_job(job.id)
    assert ended.value.status == 409 and "has already ended" in ended.value.message

    transport = httpx.ASGITransport(app=stack.app)
    async with AsyncClient("http://moonq", "sk-wrong", transport=transport) as wrong:
        with pytest.raises(moonq.AuthenticationError) as refused:
            await wrong.get_job(job.id)
    assert refused.value.status == 401 and "sk-wrong" not in str(refused.value)
    assert isinstance(refused.value, moonq.APIError) and isinstance(refused.value, moonq.MoonqError)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpx.ConnectError("refused"), moonq.ConnectionError),
        (httpx.ConnectTimeout("slow"), moonq.Timeout),
        (httpx.ReadTimeout("slow"), moonq.Timeout),
        (httpx.WriteTimeout("slow"), moonq.Timeout),
        (httpx.PoolTimeout("full"), moonq.Timeout),
        (httpx.ReadError("reset"), moonq.ConnectionError),
        (httpx.WriteError("reset"), moonq.ConnectionError),
        (httpx.CloseError("reset"), moonq.ConnectionError),
        (httpx.RemoteProtocolError("cut"), moonq.ConnectionError),
        (httpx.LocalProtocolError("bad"), moonq.ConnectionError),
        (httpx.ProxyError("proxy"), moonq.ConnectionError),
        (httpx.UnsupportedProtocol("ftp"), moonq.ConnectionError),
        (httpx.DecodingError("gzip"), moonq.InvalidResponse),
        (httpx.TooManyRedirects("loop"), moonq.InvalidResponse),
        (httpx.InvalidURL("bad url"), moonq.ConnectionError),
    ],
)
async def test_every_httpx_error_is_mapped_and_chained(
    raised: Exception, expected: type[moonq.MoonqError]
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    with Client("http://moonq.test", transport=httpx.MockTransport(fail)) as client:
        with pytest.raises(expected) as sync_caught:
            client.get_job("job_1")
        with pytest.raises(expected):
            list(client.job_events("job_1"))
    assert sync_caught.value.__cause__ is raised
    assert type(sync_caught.value) is expected  # the most specific class, not just a base

    async with AsyncClient("http://moonq.test", transport=httpx.MockTransport(fail)) as client:
        with pytest.raises(expected) as async_caught:
            await client.get_job("job_1")
        with pytest.raises(expected):
            [e async for e in client.job_events("job_1")]
    assert async_caught.value.__cause__ is raised


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, moonq.BadRequest),
        (401, moonq.AuthenticationError),
        (403, moonq.PermissionDenied),
        (404, moonq.NotFound),
        (409, moonq.Conflict),
        (413, moonq.BadRequest),
        (418, moonq.APIError),
        (422, moonq.BadRequest),
        (429, moonq.RateLimited),
        (500, moonq.ServerError),
        (503, moonq.ServerError),
    ],
)
def test_every_error_status_is_its_own_class_with_the_error_object(
    status: int, expected: type[moonq.APIError]
) -> None:
    error = {"message": "m", "type": "t", "param": "p", "code": "c", "extra": 1}
    headers = {"Retry-After": "2.5"}
    transport = httpx.MockTransport(
        lambda request: httpx.Response(status, json={"error": error}, headers=headers)
    )
    with (
        Client("http://moonq.test", transport=transport) as client,
        pytest.raises(moonq.APIError) as caught,
    ):
        client.cancel_job("job_1")
    found = caught.value
    assert type(found) is expected
    assert (found.status, found.message, found.type, found.param, found.code) == (
        status,
        "m",
        "t",
        "p",
        "c",
    )
    assert found.body == {"error": error} and str(found) == f"{status} t: m"
    if isinstance(found, moonq.RateLimited):
        assert found.retry_after == 2.5


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (  # nginx's error page: its title, not the page
            httpx.Response(
                502,
                text="<html><head><title>502 Bad Gateway</title></head>\n<body><center>"
                "<h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n" * 3,
                headers={"content-type": "text/html"},
            ),
            "502 Bad Gateway",
        ),
        (httpx.Response(502, text="<h1>Bad gateway"), "Bad Gateway"),  # no title: the reason
        (httpx.Response(500, text="Internal\n  Server\tError\n"), "Internal Server Error"),
        (httpx.Response(503, text="\x1b[31mdown\x1b[0m\x07"), "down"),
        (httpx.Response(500, text=""), "Internal Server Error"),
        (httpx.Response(400, json={"detail": "Malformed\nbody"}), "Malformed body"),
    ],
)
def test_an_error_answer_that_is_not_a_json_error_is_one_short_line(
    answer: httpx.Response, message: str
) -> None:
    transport = httpx.MockTransport(lambda request: answer)
    with (
        Client("http://moonq.test", transport=transport) as client,
        pytest.raises(moonq.APIError) as caught,
    ):
        client.get_job("job_1")
    assert caught.value.message == message and caught.value.type is None


def test_a_long_error_text_is_cut_short() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="word " * 2000))
    with (
        Client("http://moonq.test", transport=transport) as client,
        pytest.raises(moonq.ServerError) as caught,
    ):
        client.get_job("job_1")
    assert len(caught.value.message) <= 200 and caught.value.message.endswith("…")


def test_an_unreachable_server_is_a_connection_error_naming_it() -> None:
    with (
        Client("http://127.0.0.1:9", "sk-secret") as client,
        pytest.raises(moonq.ConnectionError) as caught,
    ):
        client.get_job("job_1")
    message = str(caught.value)
    assert message.startswith("cannot reach the moonq server at http://127.0.0.1:9 (")
    assert "sk-secret" not in message and isinstance(caught.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("key", ["sk-secret\r", "sk-secret\n", "sk-secret ", "sk-s\u00e9cret"])
async def test_a_key_that_cannot_be_a_header_is_refused_before_anything_is_sent(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file with Windows line endings: a clear error naming where the key came from,
    never the key (h11's own error quotes the whole header)."""
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200))
    with pytest.raises(ConfigurationError) as given:
        Client("http://moonq.test", key, transport=transport)
    monkeypatch.setenv("MOONQ_API_KEY", key)
    with pytest.raises(ConfigurationError) as from_env:
        AsyncClient(
            "http://moonq.test", transport=httpx.MockTransport(lambda r: httpx.Response(200))
        )
    assert "--api-key" in str(given.value) and "MOONQ_API_KEY" in str(from_env.value)
    for caught in (given, from_env):
        assert "secret" not in str(caught.value) and len(str(caught.value).splitlines()) == 1
    assert sent == []


def test_an_httpx_error_that_may_quote_the_headers_is_not_shown() -> None:
    leak = httpx.LocalProtocolError("Illegal header value b'Bearer sk-secret\\r'")

    def fail(request: httpx.Request) -> httpx.Response:
        raise leak

    with Client("http://moonq.test", "sk-ok", transport=httpx.MockTransport(fail)) as client:
        with pytest.raises(moonq.ConnectionError) as caught:
            client.get_job("job_1")
        with pytest.raises(moonq.ConnectionError) as streamed:
            list(client.job_events("job_1"))
    for found in (caught.value, streamed.value):
        assert "sk-secret" not in str(found) and "LocalProtocolError" in str(found)
        assert found.__cause__ is leak
    dropped = Resume("http://moonq.test", "job job_1", after=1, tries=0, backoff=0)
    dropped.connected = True
    with pytest.raises(moonq.StreamDropped) as gave_up:
        dropped.retry_in(leak)
    assert "sk-secret" not in str(gave_up.value)


def test_a_password_in_the_url_is_never_shown() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    url = "http://admin:pw-secret@moonq.test:8000"
    with (
        Client(url, transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(moonq.ConnectionError) as caught,
    ):
        client.get_job("job_1")
    message = str(caught.value)
    assert "pw-secret" not in message and "admin:***@moonq.test:8000" in message
    assert shown_url("https://user@h/x") == "https://user@h/x" and shown_url("h:1") == "h:1"


def test_answers_not_shaped_as_the_api_promises_are_invalid_responses() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, json={"not": "a stream"})
        return httpx.Response(200, json={"id": "job_1", "status": "no such status"})

    with Client("http://moonq.test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(moonq.InvalidResponse, match=r"not a Job \(status: "):
            client.get_job("job_1")
        with pytest.raises(moonq.InvalidResponse, match="did not come as an event stream"):
            list(client.job_events("job_1"))


def test_the_server_and_key_come_from_the_environment_unless_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json={"error": {"type": "not_found_error", "message": "no"}})

    transport = httpx.MockTransport(record)
    with Client(transport=transport) as client, pytest.raises(moonq.NotFound):
        client.get_job("job_1")
    monkeypatch.setenv("MOONQ_URL", "http://env.example:1234/")
    monkeypatch.setenv("MOONQ_API_KEY", "sk-env")
    with Client(transport=transport) as client, pytest.raises(moonq.NotFound):
        client.get_job("job/../x")
    with (
        Client("http://arg.example", "sk-arg", transport=transport) as client,
        pytest.raises(moonq.NotFound),
    ):
        client.get_job("job_1")
    urls = [str(r.url) for r in seen]
    assert urls == [
        "http://localhost:8000/v1/jobs/job_1",
        "http://env.example:1234/v1/jobs/job%2F..%2Fx",  # an id is one path segment
        "http://arg.example/v1/jobs/job_1",
    ]
    assert [r.headers.get("authorization") for r in seen] == [
        None,
        "Bearer sk-env",
        "Bearer sk-arg",
    ]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_reported_with_where_to_point_the_client_not_followed(
    status: int,
) -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(status, headers={"location": f"https://new.test{request.url.path}"})

    transport = httpx.MockTransport(answer)
    with Client("http://admin:pw@old.test", "sk-secret", transport=transport) as client:
        tries = [
            lambda: client.get_job("job_1"),
            lambda: list(client.job_events("job_1")),
            lambda: client.stream_file_content("file-1").__enter__(),
        ]
        for call in tries:
            with pytest.raises(Redirected) as caught:
                call()
            message = str(caught.value)
            assert caught.value.base == "https://new.test" and "pw" not in message
            assert message.startswith(
                f"the server at http://admin:***@old.test redirected ({status})"
            )
            assert message.endswith("set MOONQ_URL (or --url) to https://new.test")
    async with AsyncClient("http://old.test", transport=transport) as aclient:
        with pytest.raises(Redirected):
            await aclient.get_job("job_1")
        with pytest.raises(Redirected):
            [e async for e in aclient.job_events("job_1")]
    assert all(url.startswith("http://admin:pw@old.test/") for url in seen[:3])
    assert not any("new.test" in url for url in seen)


def test_a_redirect_elsewhere_or_without_a_location() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("job_1"):
            return httpx.Response(302, headers={"location": "/login?next=x"})
        return httpx.Response(303)

    with Client("http://moonq.test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(Redirected) as caught:
            client.get_job("job_1")
        assert caught.value.base is None and caught.value.location == "http://moonq.test/login"
        assert str(caught.value).endswith("point MOONQ_URL (or --url) at it")
        with pytest.raises(moonq.InvalidResponse, match="303 with no Location"):
            client.get_job("job_2")


async def test_a_url_ending_in_v1_is_the_servers_root_and_a_missing_route_is_told_apart(
    api: tuple[Stack, AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OpenAI SDK's base_url (…/v1) works as MOONQ_URL; a 404 for the route itself is
    RouteNotFound, not the job's NotFound."""
    stack, _ = api
    transport = httpx.ASGITransport(app=stack.app)
    async with AsyncClient("http://moonq/v1/", KEY, transport=transport) as client:
        job = await client.create_job(chat())
        assert (await client.get_job(job.id)).id == job.id
        with pytest.raises(moonq.NotFound) as missing:
            await client.get_job("job_" + "0" * 32)
        assert type(missing.value) is moonq.NotFound
        with pytest.raises(RouteNotFound) as no_route:
            await client.request("GET", "/v1/v1/jobs")
        assert no_route.value.url == "http://moonq/v1/v1/jobs" and no_route.value.status == 404
    monkeypatch.setenv("MOONQ_URL", "http://env.test/v1")
    assert Client(transport=httpx.MockTransport(_queued)).url == "http://env.test"
    bare = httpx.MockTransport(lambda request: httpx.Response(404, text="<h1>Not Found</h1>"))
    with Client("http://moonq.test", transport=bare) as client, pytest.raises(RouteNotFound):
        client.get_job("job_1")


# Events


async def test_events_are_the_jobs_log_and_resume_after_a_seq(
    api: tuple[Stack, AsyncClient],
) -> None:
    stack, client = api
    job = await client.create_job(chat("stream me"))
    await stack.run_worker()
    log = await stack.events(job.id)
    events = [e async for e in client.job_events(job.id)]
    assert [e.model_dump(exclude_none=True) for e in events] == log
    assert events[-1].event == "done" and events[-1].terminal
    text = "".join(e.delta.get("content") or "" for e in events)
    assert text == expected_content(chat("stream me"))

    tail = [e.seq async for e in client.job_events(job.id, after=3)]
    assert tail == [e["seq"] for e in log[3:]]
    # after the last event of a job that has ended the server answers 204: nothing, at once
    assert [e async for e in client.job_events(job.id, after=log[-1]["seq"])] == []


def _sse(*events: dict[str, Any], tail: str = "") -> httpx.Response:
    text = "".join(f"id: {e['seq']}\ndata: {json.dumps(e)}\n\n" for e in events) + tail
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_a_stream_error_or_an_early_close_is_resumed_from_the_last_event() -> None:
    log = [{"seq": n, "event": "chunk", "data": {"n": n}} for n in range(1, 6)]
    log.append({"seq": 6, "event": "done", "data": {}})
    asked: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        if len(asked) == 1:  # two events, then the server loses its store
            return _sse(*log[:2], tail="event: stream_error\ndata: {}\n\n")
        if len(asked) == 2:  # the replay repeats one event, then closes early
            return _sse(*log[1:4])
        return _sse(*log[3:])

    client = Client("http://moonq.test", transport=httpx.MockTransport(answer), backoff=0)
    with client:
        seqs = [e.seq for e in client.job_events("job_1")]
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert asked == [None, "2", "4"]


def test_reconnections_are_bounded_and_then_the_stream_is_given_up() -> None:
    asked = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal asked
        asked += 1
        if asked == 1:
            return _sse({"seq": 1, "event": "chunk", "data": {}})
        return httpx.Response(503, json={"error": {"type": "service_unavailable", "message": "x"}})

    transport = httpx.MockTransport(answer)
    with Client("http://moonq.test", transport=transport, reconnects=3, backoff=0) as client:
        seen: list[int] = []
        with pytest.raises(moonq.StreamDropped) as caught:
            seen.extend(e.seq for e in client.job_events("job_1"))
    assert seen == [1] and asked == 1 + 3
    assert "event stream of job job_1 broke off after event 1" in str(caught.value)
    assert isinstance(caught.value, moonq.ConnectionError)


def test_the_backoff_stays_a_number_after_thousands_of_failed_reconnections() -> None:
    resume = Resume("http://moonq.test", "job job_1", after=0, tries=10_000, backoff=0.5)
    resume.connected = True
    delays = [resume.retry_in(httpx.ConnectError("refused")) for _ in range(2_000)]
    assert delays[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and delays[-1] == 8.0


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_events_through_connections_cut_mid_stream_arrive_once_each_in_order(
    stack_factory: Any, kind: str
) -> None:
    """A real socket cut every ~700 bytes while the job streams live: every event exactly
    once, in order, however often the client had to reconnect with Last-Event-ID."""
    stack, _ = await stack_factory()
    body = chat("a long answer", fake_moonshot={"chunks": 24, "delay": 0.01})
    async with served(stack.app) as url, CuttingProxy(_port(url), cut_after=700) as proxy:
        async with AsyncClient(url) as submitter:
            job = await submitter.create_job(body)
        async with worker_running(stack):
            seen = await _read_events(kind, proxy.url, job.id)
    log = await stack.events(job.id)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1)) and len(log) > 24
    assert log[-1]["event"] == "done"
    assert seen == log
    # (the last connection is cut too, if the cut falls after the terminal event)
    assert proxy.cuts >= 10 and len(proxy.last_event_ids) - proxy.cuts in (0, 1)
    resumed = [int(i) for i in proxy.last_event_ids[1:] if i]
    assert resumed == sorted(resumed) and proxy.last_event_ids[0] is None


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _read_events(kind: str, url: str, job_id: str) -> list[dict[str, Any]]:
    if kind == "async":
        async with AsyncClient(url, backoff=0.01, reconnects=3) as client:
            return [e.model_dump(exclude_none=True) async for e in client.job_events(job_id)]

    def read() -> list[dict[str, Any]]:
        with Client(url, backoff=0.01, reconnects=3) as client:
            return [e.model_dump(exclude_none=True) for e in client.job_events(job_id)]

    return await asyncio.to_thread(read)


async def test_a_server_that_goes_away_mid_stream_ends_in_stream_dropped(
    stack_factory: Any,
) -> None:
    stack, _ = await stack_factory()
    body = chat("slow", fake_moonshot={"chunks": 20, "delay": 0.05})
    seen: list[int] = []
    async with (
        served(stack.app) as url,
        CuttingProxy(_port(url), cut_after=None) as proxy,
        AsyncClient(proxy.url, backoff=0.01, reconnects=2) as client,
    ):
        job = await client.create_job(body)
        async with worker_running(stack):
            with pytest.raises(moonq.StreamDropped) as caught:
                async for event in client.job_events(job.id):
                    seen.append(event.seq)
                    if event.seq == 3:  # the server goes away: cut, then refuse
                        proxy.refuse, proxy.cut_after = True, 0
                        proxy.server.close()
    assert seen == [1, 2, 3]
    assert "broke off after event 3, and 2 reconnections failed" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.TransportError)


# Usage


async def test_usage_reports_the_completed_jobs_tokens_by_day_and_model(
    api: tuple[Stack, AsyncClient],
) -> None:
    stack, client = api
    bodies = [chat("one"), chat("two", model="kimi-k2.5")]
    for body in bodies:
        await client.create_job(body)
    await stack.run_worker()
    today = dt.datetime.now(dt.UTC).date()
    report = await client.usage(today, today.isoformat())
    assert isinstance(report, moonq.UsageReport)
    assert (report.start, report.end) == (str(today), str(today))
    assert sorted((r.day, r.model, r.jobs) for r in report.data) == [
        (str(today), "kimi-k2.5", 1),
        (str(today), "moonshot-v1-8k", 1),
    ]
    tokens = sum(expected_usage(b)["total_tokens"] for b in bodies)
    assert report.total.jobs == 2 and report.total.total_tokens == tokens
    assert (await client.usage()).total.total_tokens == tokens  # the server's default range
    with pytest.raises(moonq.BadRequest) as bad:
        await client.usage(today, today - dt.timedelta(days=1))
    assert bad.value.param == "start"


# Files and batches


async def test_the_batch_calls_upload_run_follow_and_read_a_batch(
    api: tuple[Stack, AsyncClient],
) -> None:
    stack, client = api
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions"} for i in (1, 2)
    ]
    jsonl = "".join(json.dumps({**line, "body": chat(line["custom_id"])}) + "\n" for line in lines)
    uploaded = await client.upload_file(jsonl.encode(), filename="in.jsonl")
    assert isinstance(uploaded, moonq.FileObject) and uploaded.bytes == len(jsonl.encode())
    assert await client.file_content(uploaded.id) == jsonl.encode()

    batch = await client.create_batch(uploaded.id, metadata={"project": "q3"})
    assert isinstance(batch, moonq.Batch) and batch.request_counts.total == 2
    await stack.run_worker()
    events = [e async for e in client.batch_events(batch.id)]
    assert [e.event for e in events] == ["line", "line", "done"]
    assert {e.data["custom_id"] for e in events[:2]} == {"c1", "c2"}
    done = await client.get_batch(batch.id)
    assert done.status == "completed" and done.metadata == {"project": "q3"}
    assert [b.id async for b in client.list_batches()] == [batch.id]

    assert done.output_file_id is not None
    async with client.stream_file_content(done.output_file_id) as pieces:
        output = b"".join([piece async for piece in pieces])
    answers = [json.loads(line) for line in output.splitlines()]
    assert sorted(a["custom_id"] for a in answers) == ["c1", "c2"]
    with pytest.raises(moonq.Conflict):
        await client.cancel_batch(batch.id)
    with pytest.raises(moonq.NotFound):
        await client.get_batch("batch_" + "0" * 24)


def test_the_sync_client_speaks_the_same_calls(tmp_path: Any) -> None:
    """Every call of `Client` sends what `AsyncClient`'s does (both send moonq.client_calls),
    checked here on the request each makes."""
    seen: list[tuple[str, str, bytes]] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), request.read()))
        return httpx.Response(404, json={"error": {"type": "not_found_error", "message": "x"}})

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"x": 1}\n')
    with Client("http://m", transport=httpx.MockTransport(record)) as client:
        calls = [
            lambda: client.create_job(chat(), custom_id="c", idempotency_key="k"),
            lambda: client.get_job("job_1", wait=2),
            lambda: client.cancel_job("job_1"),
            lambda: list(client.list_jobs(status="queued", batch_id="b", limit=5)),
            lambda: client.usage("2026-01-01", dt.date(2026, 1, 31)),
            lambda: client.upload_file(path),
            lambda: client.create_batch("file-1", completion_window="1h"),
            lambda: client.get_batch("batch_1"),
            lambda: client.cancel_batch("batch_1"),
            lambda: list(client.list_batches(limit=3, after="batch_0")),
            lambda: client.file_content("file-1"),
            lambda: client.delete_file("file-1"),
        ]
        for call in calls:
            with pytest.raises(moonq.NotFound):
                call()
    assert [(m, u) for m, u, _ in seen] == [
        ("POST", "http://m/v1/jobs"),
        ("GET", "http://m/v1/jobs/job_1?wait=2"),
        ("POST", "http://m/v1/jobs/job_1/cancel"),
        ("GET", "http://m/v1/jobs?limit=5&status=queued&batch_id=b"),
        ("GET", "http://m/v1/usage?start=2026-01-01&end=2026-01-31"),
        ("POST", "http://m/v1/files"),
        ("POST", "http://m/v1/batches"),
        ("GET", "http://m/v1/batches/batch_1"),
        ("POST", "http://m/v1/batches/batch_1/cancel"),
        ("GET", "http://m/v1/batches?limit=3&after=batch_0"),
        ("GET", "http://m/v1/files/file-1/content"),
        ("DELETE", "http://m/v1/files/file-1"),
    ]
    assert json.loads(seen[0][2]) == {"body": chat(), "custom_id": "c"}
    assert b'filename="in.jsonl"' in seen[5][2] and b'{"x": 1}\n' in seen[5][2]
    assert json.loads(seen[6][2]) == {
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "1h",
    }
