"""`moonq submit | watch | status | cancel | jobs | usage`, called through `job_cli.main(argv)`
in a thread against the in-process API served by uvicorn (fakeredis, the fake upstream)."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Any

import httpx
import pytest

from moonq import cli, job_cli, job_view
from moonq.client_events import Event
from moonq.fake_moonshot import expected_content, expected_usage
from moonq.job_cli import Exit
from moonq.prices import cost
from tests.conftest import Stack
from tests.procs import clean_env
from tests.serving import served, worker_running

KEY = "sk-cli-test"
Run = Callable[..., Awaitable[int]]


@pytest.fixture(autouse=True)
def _terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server settings from the caller's shell; a wide terminal for the tables."""
    monkeypatch.delenv("MOONQ_URL", raising=False)
    monkeypatch.delenv("MOONQ_API_KEY", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
async def server(stack_factory: Any) -> AsyncIterator[tuple[Stack, Run]]:
    """The stack behind a real port, and `moonq(*argv)`: the command's exit code, run in a
    thread (the server runs on this loop) against it with its key."""
    stack, _ = await stack_factory(MOONQ_API_KEYS=f"{KEY}=team-a")
    async with served(stack.app) as url:

        async def moonq(*argv: str) -> int:
            args = [*argv, "--url", url, "--api-key", KEY]
            return await asyncio.to_thread(job_cli.main, args)

        yield stack, moonq


def body_of(prompt: str, model: str = job_cli.DEFAULT_MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


async def submitted(moonq: Run, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert await moonq("submit", *argv) == Exit.OK
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("job_")
    return job_id


# Submitting and watching


async def test_submit_watch_prints_the_answer_as_it_streams_and_the_usage_on_stderr(
    server: tuple[Stack, Run], capsys: pytest.CaptureFixture[str]
) -> None:
    stack, moonq = server
    argv = ["Summarise.", "--model", "moonshot-v1-8k", "--system", "Be brief."]
    argv += ["--max-tokens", "50", "--custom-id", "doc-1", "--watch"]
    async with worker_running(stack):
        assert await moonq("submit", *argv) == Exit.OK
    out, err = capsys.readouterr()
    system = {"role": "system", "content": "Be brief."}
    body = {
        "model": "moonshot-v1-8k",
        "messages": [system, {"role": "user", "content": "Summarise."}],
        "max_tokens": 50,
    }
    assert out == expected_content(body) + "\n"
    usage = expected_usage(body)
    job_id = err.splitlines()[0].removeprefix("moonq: ")
    assert err.splitlines()[1:] == [
        f"usage: {usage['total_tokens']} ({usage['prompt_tokens']} prompt"
        f" + {usage['completion_tokens']} completion) tokens"
    ]

    assert await moonq("status", job_id) == Exit.OK
    shown = capsys.readouterr().out.splitlines()
    assert shown[:4] == [
        f"{job_id}: completed",
        "model: moonshot-v1-8k",
        "custom_id: doc-1",
        "attempts: 1",
    ]
    assert shown[-1] == expected_content(body) and shown[-2] == ""


async def test_submit_prints_the_id_or_the_job_and_watch_json_is_the_jobs_log(
    server: tuple[Stack, Run], capsys: pytest.CaptureFixture[str]
) -> None:
    stack, moonq = server
    job_id = await submitted(moonq, capsys, "hello")
    assert await moonq("submit", "hello", "--custom-id", "c2", "--json") == Exit.OK
    job = json.loads(capsys.readouterr().out)
    assert (job["status"], job["custom_id"], job["model"]) == ("queued", "c2", "kimi-k2.5")
    await stack.run_worker()

    assert await moonq("watch", job_id, "--json") == Exit.OK
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == await stack.events(job_id)

    async with worker_running(stack):
        assert await moonq("submit", "again", "--watch", "--json") == Exit.OK
    first, *events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first["object"] == "job" and events == await stack.events(first["id"])
    assert events[-1]["event"] == "done"


async def test_a_failed_or_cancelled_job_exits_1_from_watch_and_status(
    server: tuple[Stack, Run], capsys: pytest.CaptureFixture[str]
) -> None:
    stack, moonq = server
    failing = json.dumps({"error": "content_filter"})
    async with stack_client(stack) as api:
        body = body_of("x", fake_moonshot=json.loads(failing))
        failed = (await api.post("/v1/jobs", json={"body": body})).json()["id"]
    await stack.run_worker()
    assert await moonq("watch", failed) == Exit.JOB_FAILED
    out, err = capsys.readouterr()
    assert out == "\n" and err.startswith(f"moonq: job {failed} failed: content_filter: ")
    assert await moonq("status", failed) == Exit.JOB_FAILED
    assert "error: content_filter: " in capsys.readouterr().out

    queued = await submitted(moonq, capsys, "never runs")
    assert await moonq("cancel", queued) == Exit.OK
    assert capsys.readouterr().out == f"{queued}: cancelled\n"
    assert await moonq("watch", queued) == Exit.JOB_FAILED
    assert capsys.readouterr().err == f"moonq: job {queued} was cancelled\n"
    assert await moonq("status", queued, "--json") == Exit.JOB_FAILED
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"


def stack_client(stack: Stack) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=stack.app)
    return httpx.AsyncClient(
        transport=transport, base_url="http://moonq", headers={"Authorization": f"Bearer {KEY}"}
    )


class Recorder(io.StringIO):
    """A stream that records each write, a terminal or not."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.tty = tty

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def isatty(self) -> bool:
        return self.tty


def chunk(seq: int, **delta: Any) -> Event:
    return Event(seq=seq, event="chunk", data={"choices": [{"index": 0, "delta": delta}]})


def test_tokens_are_written_as_they_arrive_on_a_terminal_and_reasoning_goes_to_stderr() -> None:
    out, err = Recorder(tty=True), Recorder(tty=True)
    view = job_view.Tokens("job_1", out, err)
    for event in (
        chunk(1, role="assistant", reasoning_content="Thinking"),
        chunk(2, reasoning_content=" hard."),
        chunk(3, content="Hel"),
        Event(seq=4, event="chunk", data={"choices": [{"index": 0, "delta": []}]}),
        chunk(5, content="lo"),
    ):
        view.show(event)
    assert view.end("done", {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) is True
    assert out.writes == ["Hel", "lo", "\n"]
    assert err.writes[:3] == ["\x1b[2mThinking\x1b[0m", "\x1b[2m hard.\x1b[0m", "\n"]
    assert err.getvalue().endswith("usage: 7 (3 prompt + 4 completion) tokens\n")


@pytest.mark.parametrize("tty", [True, False])
def test_a_retried_attempts_text_never_reaches_a_file(tty: bool) -> None:
    """`moonq watch J > answer.txt`: the file holds the last attempt's answer alone; on a
    terminal the text streams, and a notice on stderr says where the answer starts over."""
    out, err = Recorder(tty=tty), Recorder(tty=False)
    view = job_view.Tokens("job_1", out, err)
    retry = {"attempt": 2, "reason": "connection_error: \x1b[31mcut\x1b[0m\nmid-stream"}
    for event in (
        chunk(1, content="Hel"),
        chunk(2, content="l"),
        Event(seq=3, event="retry", data=retry),
        chunk(4, content="Hello"),
        chunk(5, content=" there"),
    ):
        view.show(event)
    assert view.end("done", {}) is True
    if tty:
        assert out.writes == ["Hel", "l", "\n", "Hello", " there", "\n"]
    else:
        assert out.writes == ["Hello there\n"]
    notice = "moonq: attempt 2 starts over (connection_error: cut mid-stream)\n"
    assert err.getvalue().startswith(notice)


async def test_watch_into_a_file_holds_the_final_answer_alone_after_a_retry(
    stack_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, _ = await stack_factory(MOONQ_API_KEYS=f"{KEY}=team-a", MOONQ_RETRY_BASE_DELAY=0)
    drop = {"error": "drop", "drop_after": 3, "fail_times": 1}
    body = body_of("retried", "moonshot-v1-8k", fake_moonshot=drop)
    async with stack_client(stack) as api:
        job_id = (await api.post("/v1/jobs", json={"body": body})).json()["id"]
    await stack.run_worker()
    assert "retry" in [event["event"] for event in await stack.events(job_id)]
    async with served(stack.app) as url:
        argv = ["watch", job_id, "--url", url, "--api-key", KEY]
        assert await asyncio.to_thread(job_cli.main, argv) == Exit.OK
    out, err = capsys.readouterr()
    assert out == expected_content(body) + "\n"  # stdout is not a terminal here
    assert "moonq: attempt 2 starts over (" in err


@pytest.mark.parametrize("tty", [True, False])
def test_chunks_trimmed_from_the_log_never_leave_a_file_with_part_of_the_answer(tty: bool) -> None:
    """A job's log keeps its latest MOONQ_MAX_EVENTS events: `moonq watch J > answer.txt` of
    a job whose first chunks are gone writes the job's result, which is whole; on a terminal a
    notice on stderr says the text shown misses some, and where the whole answer is."""
    out, err = Recorder(tty=tty), Recorder(tty=False)
    view = job_view.Tokens("job_1", out, err)
    gap = {"first_seq": 1, "last_seq": 40, "message": "gone"}
    for event in (Event(seq=40, event="trimmed", data=gap), chunk(41, content=" there")):
        view.show(event)
    done = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}}]}
    assert view.end("done", done) is True
    if tty:
        assert out.writes == ["\n", " there", "\n"]
        notice = "moonq: events 1 to 40 are no longer in the job's log"
        assert err.getvalue().startswith(f"{notice} (the whole answer: moonq status job_1)\n")
    else:
        assert out.writes == ["Hi there\n"]
        assert "no longer" not in err.getvalue()


def test_a_failed_job_whose_log_was_trimmed_leaves_no_partial_answer_in_a_file() -> None:
    out, err = Recorder(tty=False), Recorder(tty=False)
    view = job_view.Tokens("job_1", out, err)
    gap = {"first_seq": 1, "last_seq": 40, "message": "gone"}
    for event in (Event(seq=40, event="trimmed", data=gap), chunk(41, content=" there")):
        view.show(event)
    assert view.end("error", {"type": "server_error", "message": "boom"}) is False
    assert out.writes == ["\n"]  # not " there": an answer without its start
    assert "no longer in the job's log (what the job kept: moonq status job_1)" in err.getvalue()


async def test_watch_into_a_file_of_a_job_whose_log_was_trimmed_writes_the_whole_answer(
    stack_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, _ = await stack_factory(MOONQ_API_KEYS=f"{KEY}=team-a", MOONQ_MAX_EVENTS=100)
    body = body_of("long", "moonshot-v1-8k", fake_moonshot={"chunks": 300})
    async with stack_client(stack) as api:
        job_id = (await api.post("/v1/jobs", json={"body": body})).json()["id"]
    await stack.run_worker()
    assert (await stack.events(job_id))[0]["seq"] > 1  # the log was trimmed
    async with served(stack.app) as url:
        argv = ["watch", job_id, "--url", url, "--api-key", KEY]
        assert await asyncio.to_thread(job_cli.main, argv) == Exit.OK
    out, _ = capsys.readouterr()
    assert out == expected_content(body) + "\n"  # stdout is not a terminal here


def test_submit_sends_the_prompt_from_stdin_with_its_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        job = {"id": "job_1", "status": "queued", "created_at": 1, "model": "m", "channel": "c"}
        return httpx.Response(202, json=job)

    monkeypatch.setattr("sys.stdin", io.StringIO("a prompt\nover two lines"))
    argv = ["submit", "-", "--model", "m", "--system", "S", "--max-tokens", "9", "--custom-id", "x"]
    assert job_cli.main(argv, transport=httpx.MockTransport(handle)) == Exit.OK
    assert capsys.readouterr().out == "job_1\n"
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a prompt\nover two lines"},
    ]
    body = {"model": "m", "messages": messages, "max_tokens": 9}
    assert sent == [{"body": body, "custom_id": "x"}]


@pytest.mark.parametrize("prompt", ["", " \n"])
def test_an_empty_prompt_is_a_usage_error_and_nothing_is_sent(
    prompt: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to queue a job with an empty user message, paid for and answering nothing."""
    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    transport = httpx.MockTransport(handle)
    with pytest.raises(SystemExit) as exited:
        job_cli.main(["submit", prompt], transport=transport)
    assert exited.value.code == Exit.USAGE
    assert "argument prompt: is empty" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", io.StringIO(prompt))
    assert job_cli.main(["submit", "-"], transport=transport) == Exit.USAGE
    assert capsys.readouterr().err == "moonq: the prompt read from stdin is empty: nothing to ask\n"
    assert sent == []


# Listing and usage


async def test_jobs_is_a_table_newest_first_filtered_and_limited(
    server: tuple[Stack, Run],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, moonq = server
    ids = [await submitted(moonq, capsys, f"q{i}", "--custom-id", f"c{i}") for i in range(3)]
    assert await moonq("cancel", ids[0]) == Exit.OK
    capsys.readouterr()

    assert await moonq("jobs") == Exit.OK
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if "job_" in line]
    assert [next(i for i in ids if i in row) for row in rows] == ids[::-1]
    assert "cancelled" in rows[2] and "c0" in rows[2] and "queued" in rows[0]

    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal: the lines wrap, no id is cut
    assert await moonq("jobs", "--limit", "1") == Exit.OK
    assert ids[2] in capsys.readouterr().out

    assert await moonq("jobs", "--status", "queued", "--limit", "1", "--json") == Exit.OK
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == [ids[2]]


async def test_usage_is_a_table_by_day_and_model_with_cost_and_totals(
    server: tuple[Stack, Run], capsys: pytest.CaptureFixture[str]
) -> None:
    stack, moonq = server
    priced, unpriced = body_of("one", "moonshot-v1-8k"), body_of("two", "my-local-model")
    async with stack_client(stack) as api:
        for body in (priced, unpriced):
            assert (await api.post("/v1/jobs", json={"body": body})).status_code == 202
    await stack.run_worker()
    today = str(dt.datetime.now(dt.UTC).date())

    assert await moonq("usage", "--start", today, "--end", today) == Exit.OK
    out = capsys.readouterr().out
    usage = expected_usage(priced)
    price = cost("moonshot-v1-8k", usage["prompt_tokens"], usage["completion_tokens"])
    assert price is not None
    rows = [cells(line) for line in out.splitlines() if line.startswith("│")]
    numbers = [str(usage[name]) for name in ("prompt_tokens", "completion_tokens", "total_tokens")]
    assert [today, "moonshot-v1-8k", "1", *numbers, f"{price:.6f}"] in rows
    assert rows[-1][:3] == ["total", "", "2"] and rows[-1][-1] == f"{price:.6f}"
    both = usage["total_tokens"] + expected_usage(unpriced)["total_tokens"]
    assert rows[-1][-2] == str(both) and [today, "my-local-model"] == rows[1][:2]
    assert "no price known for my-local-model" in out

    assert await moonq("usage", "--json") == Exit.OK
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["jobs"] == 2 and report["end"] == today


def cells(line: str) -> list[str]:
    """The cells of a row of a rich table."""
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


# Failures: one line each, a code each


@pytest.mark.parametrize(
    ("argv", "answer", "code", "message"),
    [
        (["status", "job_1"], (401, "bad key"), Exit.AUTH, "the server refused the API key (401)"),
        (["watch", "job_9"], (404, "gone"), Exit.NOT_FOUND, "no job job_9 on this server"),
        (["cancel", "job_1"], (409, "has ended"), Exit.API_ERROR, "answered 409: has ended"),
        (["jobs"], (503, "store down"), Exit.API_ERROR, "the server answered 503: store down"),
        (["usage"], (200, "not a report"), Exit.UNEXPECTED, "is not a UsageReport"),
        (["status", "job_1"], KeyboardInterrupt(), Exit.INTERRUPTED, "interrupted"),
        (["status", "job_1"], RuntimeError("boom"), Exit.UNEXPECTED, "RuntimeError: boom"),
        (  # the key in an unforeseen error's text is hidden
            ["status", "job_1"],
            RuntimeError("boom sk-secret"),
            Exit.UNEXPECTED,
            "RuntimeError: boom ***)",
        ),
        (  # a route the server lacks is not a job it lacks
            ["status", "job_1"],
            (404, "Not Found"),
            Exit.API_ERROR,
            "the server has no route http://localhost:8000/v1/jobs/job_1 (404 Not Found)",
        ),
        (
            ["status", "job_1"],
            httpx.Response(308, headers={"location": "https://moonq.example/v1/jobs/job_1"}),
            Exit.UNREACHABLE,
            "redirected (308) to https://moonq.example/v1/jobs/job_1: set MOONQ_URL (or --url)"
            " to https://moonq.example",
        ),
        (
            ["jobs"],
            httpx.Response(
                502,
                text="<html>\n<head><title>502 Bad Gateway</title></head>\n<body>...</body>\n",
            ),
            Exit.API_ERROR,
            "the server answered 502: 502 Bad Gateway",
        ),
        (
            ["cancel", "job_1"],
            (409, "\x1b]0;owned\x07has \x1b[31mended\nreally"),
            Exit.API_ERROR,
            "answered 409: has ended really",
        ),
    ],
)
def test_each_failure_is_one_line_with_its_own_exit_code(
    argv: list[str],
    answer: tuple[int, str] | BaseException | httpx.Response,
    code: Exit,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        status, text = answer
        if status == 200:
            return httpx.Response(200, json={"object": text})
        return httpx.Response(status, json={"error": {"type": "x", "message": text}})

    transport = httpx.MockTransport(handle)
    assert job_cli.main([*argv, "--api-key", "sk-secret"], transport=transport) == code
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("moonq: ") and message in err and "\x1b" not in err
    assert len(err.splitlines()) == 1 and "sk-secret" not in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["env", "argument"])
def test_a_key_read_with_its_line_ending_is_a_usage_error_that_never_shows_it(
    where: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(500))
    argv = ["status", "job_1"]
    if where == "env":
        monkeypatch.setenv("MOONQ_API_KEY", "sk-secret\r")
    else:
        argv += ["--api-key", "sk-secret\r\n"]
    assert job_cli.main(argv, transport=transport) == Exit.USAGE
    err = capsys.readouterr().err
    named = "MOONQ_API_KEY" if where == "env" else "--api-key"
    assert err.startswith("moonq: the API key from ") and named in err and "'\\r'" in err
    assert "secret" not in err and len(err.splitlines()) == 1 and sent == []


def _job(**fields: Any) -> dict[str, Any]:
    return {
        "id": "job_1",
        "status": "queued",
        "created_at": 1,
        "model": "m",
        "channel": "c",
    } | fields


def test_server_strings_cannot_drive_the_terminal_and_json_is_ascii(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A custom_id or error message holding escape sequences is shown without them; --json
    is ASCII-escaped, so a stdout that cannot encode the answer (latin-1) still takes it."""
    evil = "\x1b]0;owned\x07doc\x1b[2J-1\x1b[0m"
    error = {"type": "upstream_error", "message": "bad \x1b[31mthing\x1b[0m\nhappened"}
    answer = {"choices": [{"message": {"role": "assistant", "content": "caf\u00e9 \U0001f600"}}]}
    job = _job(status="failed", custom_id=evil, error=error, result=answer)
    page = {"object": "list", "data": [job], "has_more": False}
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json=page if request.url.path == "/v1/jobs" else job)
    )
    assert job_cli.main(["status", "job_1"], transport=transport) == Exit.JOB_FAILED
    shown = capsys.readouterr().out
    assert "custom_id: doc-1" in shown and "error: upstream_error: bad thing happened" in shown
    assert "\x1b" not in shown and "\x07" not in shown
    assert job_cli.main(["jobs"], transport=transport) == Exit.OK
    table = capsys.readouterr().out
    assert "doc-1" in table and "\x1b" not in table

    assert job_cli.main(["status", "job_1", "--json"], transport=transport) == Exit.JOB_FAILED
    printed = capsys.readouterr().out
    assert printed.isascii() and json.loads(printed)["result"] == answer
    assert json.loads(printed)["custom_id"] == evil  # --json keeps the data as it is
    assert job_cli.main(["jobs", "--json"], transport=transport) == Exit.OK
    printed = capsys.readouterr().out
    assert printed.isascii() and json.loads(printed)[0]["result"] == answer


class Closed(io.StringIO):
    """stdout after its reader has gone (`| head`), on a file descriptor of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.open(os.devnull, os.O_WRONLY)

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        return self.fd


@pytest.mark.parametrize("argv", [["status", "job_1"], ["watch", "job_1", "--json"], ["jobs"]])
def test_a_reader_that_stops_reading_ends_the_command_quietly(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            done = {"seq": 1, "event": "done", "data": {}}
            text = f"id: 1\ndata: {json.dumps(done)}\n\n"
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        page = {"object": "list", "data": [_job()], "has_more": False}
        return httpx.Response(200, json=page if request.url.path == "/v1/jobs" else _job())

    monkeypatch.setattr("sys.stdout", closed := Closed())
    try:
        assert job_cli.main(argv, transport=httpx.MockTransport(answer)) == Exit.PIPE_CLOSED == 141
    finally:
        os.close(closed.fd)
    assert capsys.readouterr().err == ""


async def test_moonq_piped_into_head_exits_141_with_nothing_on_stderr(
    stack_factory: Any,
) -> None:
    """The real thing: `moonq status J | head` whose reader has already gone, the output
    written as the command ends."""
    stack, _ = await stack_factory(MOONQ_API_KEYS=f"{KEY}=team-a")
    async with stack_client(stack) as api:
        job_id = (await api.post("/v1/jobs", json={"body": body_of("hi")})).json()["id"]
    read, write = os.pipe()
    os.close(read)  # `head` has read all it wanted
    async with served(stack.app) as url:
        env = clean_env(MOONQ_URL=url, MOONQ_API_KEY=KEY)
        del env["PYTHONUNBUFFERED"]  # stdout buffered, as users run it: written at the end
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "moonq.cli", "status", job_id),
            stdout=write,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        os.close(write)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err.decode()) == (Exit.PIPE_CLOSED, "")


def test_a_url_ending_in_v1_finds_the_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json=_job())

    argv = ["status", "job_1", "--url", "http://moonq.test/v1/"]
    assert job_cli.main(argv, transport=httpx.MockTransport(answer)) == Exit.OK
    assert seen == ["http://moonq.test/v1/jobs/job_1"]


def test_an_unreachable_server_exits_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONQ_URL", "http://127.0.0.1:9")
    assert job_cli.main(["status", "job_1"]) == Exit.UNREACHABLE
    err = capsys.readouterr().err
    assert err.startswith("moonq: cannot reach the moonq server at http://127.0.0.1:9 (")
    assert err.rstrip().endswith("Set MOONQ_URL or pass --url") and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "--limit", "0"],
        ["jobs", "--status", "done"],
        ["usage", "--start", "2026-13-01"],
        ["usage", "--end", "yesterday"],
        ["submit", "hi", "--max-tokens", "-5"],
        ["watch"],
        ["status", ""],  # an id goes into the URL's path: never another route's
        ["cancel", "../jobs"],
        ["watch", "job_1 2"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        job_cli.main(argv)
    assert exited.value.code == Exit.USAGE
    assert "moonq" in capsys.readouterr().err


def test_version_help_and_the_moonq_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        job_cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"moonq {metadata.version('moonq')}\n"

    with pytest.raises(SystemExit):
        job_cli.main(["submit", "--help"])
    shown = capsys.readouterr().out
    assert "(default: kimi-k2.5)" in shown and "(default: $MOONQ_URL, else" in shown
    assert "exit codes:" in shown and "5    no such job (404)" in shown

    for name in ("submit", "watch", "status", "cancel", "jobs", "usage"):
        argv = [name, "x"] if name in ("submit", "watch", "status", "cancel") else [name]
        args = cli.parser().parse_args(argv)
        assert args.run is job_cli.entry and args.url is None
