"""A Moonshot-compatible fake upstream (aiohttp) for tests, benchmarks and local runs.

Answers are deterministic functions of the request body so callers can assert results, and a
``fake_moonshot`` field in the body steers chunking, delays and injected failures per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from moonq import fake_account

JSON = dict[str, Any]

# name -> (status, message); the wire type is the name, or "server_error" for 5xx as Moonshot does.
ERRORS: dict[str, tuple[int, str]] = {
    "rate_limit_reached_error": (429, "Your account reached max RPM: 3, retry after 1 seconds"),
    "engine_overloaded_error": (429, "The engine is currently overloaded, please try again later"),
    "exceeded_current_quota_error": (429, "You exceeded your current token quota"),
    "invalid_request_error": (400, "Invalid request: rejected by the fake"),
    "content_filter": (400, "The request was rejected because it was considered high risk"),
    "invalid_authentication_error": (401, "Invalid Authentication"),
    "permission_denied_error": (403, "The API you are accessing is not open"),
    "resource_not_found_error": (404, "Not found the model or Permission denied"),
    "server_error": (500, "Internal server error"),
    "bad_gateway": (502, "Bad gateway"),
    "unavailable": (503, "Service temporarily unavailable"),
}
_FAULTS = ("drop", "hang")
_WORDS = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor"]
_WORDS += ["indigo", "juniper", "kelp", "lagoon", "meadow", "nectar", "onyx", "prairie"]


@dataclass
class FakeConfig:
    """Server-wide defaults; each may be overridden per request via ``fake_moonshot``."""

    chunks: int = 8
    delay: float = 0.0
    api_key: str | None = None
    usage_style: str = "moonshot"
    first_byte_delay: float = 0.0


@dataclass
class FakeStats:
    """Counters the tests and benchmark read to check what the upstream actually saw."""

    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    errors_injected: int = 0
    completed: int = 0

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` is a live gauge, so it (and the peak) keep it."""
        self.requests = self.errors_injected = self.completed = 0
        self.peak_in_flight = self.in_flight


CONFIG_KEY = web.AppKey("config", FakeConfig)
STATS_KEY = web.AppKey("stats", FakeStats)
FAILS_KEY = web.AppKey[dict[str, int]]("fails")


class _ApiError(Exception):
    """Raised inside the handler to answer with a Moonshot-shaped error body."""

    def __init__(self, name: str, message: str | None = None) -> None:
        self.status, default = ERRORS[name]
        self.type = "server_error" if self.status >= 500 else name
        self.message = message or default
        super().__init__(self.message)


@dataclass(frozen=True)
class _Control:
    """Per-request knobs, config defaults merged with the body's ``fake_moonshot`` field."""

    chunks: int
    delay: float
    first_byte_delay: float
    error: str | None = None
    retry_after: float | None = None
    fail_times: int | None = None
    fail_after: int = 0
    key: str | None = None
    drop_after: int = 2
    parallel_tools: bool = False
    empty_delta_as_list: bool = False
    usage: JSON | None = None
    stamp: bool = False


@dataclass(frozen=True)
class _Call:
    index: int
    id: str
    name: str
    fragments: list[str]


@dataclass(frozen=True)
class _Answer:
    """One deterministic answer; both wire formats are rendered from it so they agree."""

    pieces: list[str]
    calls: list[_Call]
    usage: JSON
    reasoning: tuple[str, ...] = ()  # a thinking model's `reasoning_content`, streamed first

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.calls else "stop"


def _optional(raw: JSON, key: str, kind: type[Any]) -> Any:
    return None if raw.get(key) is None else kind(raw[key])


def _usage_override(raw: JSON) -> JSON | None:
    """`fake_moonshot.usage`: report this usage object instead (absurd values included), to
    test what a misbehaving upstream does to the queue."""
    usage = raw.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise TypeError("usage must be an object")
    return usage


def _control(body: JSON, cfg: FakeConfig) -> _Control:
    raw = body.get("fake_moonshot") or {}
    if not isinstance(raw, dict):
        raise _ApiError("invalid_request_error", "Invalid request: fake_moonshot must be an object")
    if raw.get("error") is not None and raw["error"] not in (*ERRORS, *_FAULTS):
        raise _ApiError("invalid_request_error", f"Invalid request: unknown error {raw['error']!r}")
    try:
        return _Control(
            chunks=max(1, int(raw.get("chunks", cfg.chunks))),
            delay=float(raw.get("delay", cfg.delay)),
            first_byte_delay=float(raw.get("first_byte_delay", cfg.first_byte_delay)),
            error=_optional(raw, "error", str),
            retry_after=_optional(raw, "retry_after", float),
            fail_times=_optional(raw, "fail_times", int),
            fail_after=int(raw.get("fail_after", 0)),
            key=_optional(raw, "key", str),
            drop_after=int(raw.get("drop_after", 2)),
            parallel_tools=bool(raw.get("parallel_tools", False)),
            empty_delta_as_list=bool(raw.get("empty_delta_as_list", False)),
            usage=_usage_override(raw),
            stamp=bool(raw.get("stamp", False)),
        )
    except (TypeError, ValueError) as exc:
        raise _ApiError("invalid_request_error", f"Invalid request: fake_moonshot: {exc}") from exc


def _text(message: Any) -> str:
    """Message text whether ``content`` is a string or a list of ``{"type": "text"}`` parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _last_user_text(messages: list[Any]) -> str:
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _text((users or messages)[-1])


def _digest(body: JSON) -> bytes:
    """Hash of what determines the answer (not ``stream``/``fake_moonshot``), so both agree."""
    keyed = {k: body.get(k) for k in ("model", "messages", "tools")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).digest()


def _split(text: str, n: int) -> list[str]:
    """Exactly ``n`` non-empty pieces; callers guarantee ``len(text) >= n``."""
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def _content(body: JSON, chunks: int) -> str:
    words = [_WORDS[b % len(_WORDS)] for b in _digest(body)]
    text = f"Echo: {_last_user_text(body['messages'])} " + " ".join(words[:4])
    extra = 4
    while len(text) < chunks:
        text += " " + words[extra % len(words)]
        extra += 1
    return text


def _arguments(body: JSON, chunks: int) -> str:
    args = json.dumps({"query": _last_user_text(body["messages"])}, ensure_ascii=False)
    missing = max(0, chunks - len(args))
    return args[:-1] + " " * missing + "}"


def _tool_names(body: JSON) -> list[str]:
    tools = body.get("tools") or []
    if body.get("tool_choice") == "none" or not isinstance(tools, list):
        return []
    try:
        return [str(tool["function"]["name"]) for tool in tools]
    except (KeyError, TypeError) as exc:
        raise _ApiError("invalid_request_error", "Invalid request: malformed tools") from exc


def _usage(body: JSON, completion_tokens: int) -> JSON:
    messages = body["messages"]
    prompt = fake_account.prompt_tokens(messages)  # what its tokenizer endpoint counts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _answer(body: JSON, ctl: _Control) -> _Answer:
    answer = _render(body, ctl.chunks, ctl.parallel_tools)
    reasoning = tuple(_split(_reasoning(body, ctl.chunks), ctl.chunks)) if _thinks(body) else ()
    usage = answer.usage
    if reasoning:  # thinking is billed as completion tokens
        usage = _usage(body, usage["completion_tokens"] + len(reasoning))
    return _Answer(
        answer.pieces, answer.calls, usage if ctl.usage is None else ctl.usage, reasoning
    )


def _thinks(body: JSON) -> bool:
    """Moonshot's thinking models: kimi-k2-thinking* always; kimi-k2.5 and kimi-k2.6 unless
    the request says `"thinking": {"type": "disabled"}`."""
    model = str(body.get("model"))
    if model.startswith("kimi-k2-thinking"):
        return True
    thinking = body.get("thinking")
    disabled = isinstance(thinking, dict) and thinking.get("type") == "disabled"
    return model.startswith(("kimi-k2.5", "kimi-k2.6")) and not disabled


def _reasoning(body: JSON, chunks: int) -> str:
    text = f"Thinking about: {_last_user_text(body['messages'])}"
    return text + " ." * max(0, chunks - len(text))


def _render(body: JSON, chunks: int, parallel: bool) -> _Answer:
    names = _tool_names(body)
    if not names:
        return _Answer(_split(_content(body, chunks), chunks), [], _usage(body, chunks))
    hexed = _digest(body).hex()
    fragments = _split(_arguments(body, chunks), chunks)
    count = 2 if parallel and len(names) > 1 else 1
    calls = [
        _Call(i, f"call_{hexed[i * 24 : i * 24 + 24]}", names[i], fragments) for i in range(count)
    ]
    return _Answer([], calls, _usage(body, chunks * count))


def _expected(body: JSON, config: FakeConfig | None) -> _Answer:
    ctl = _control(body, config or FakeConfig())
    return _answer(body, ctl)


def expected_content(body: JSON, config: FakeConfig | None = None) -> str:
    """The assistant text the fake answers ``body`` with ("" when it answers with tool calls)."""
    return "".join(_expected(body, config).pieces)


def expected_usage(body: JSON, config: FakeConfig | None = None) -> JSON:
    """The usage block the fake reports for ``body``, streamed or not."""
    return _expected(body, config).usage


def expected_message(body: JSON, config: FakeConfig | None = None) -> JSON:
    """The full non-streamed ``message`` (tool calls included) the fake answers ``body`` with."""
    return _message(_expected(body, config))


def _call_json(call: _Call, arguments: str, header: bool = True) -> JSON:
    function = {"name": call.name, "arguments": arguments} if header else {"arguments": arguments}
    head = {"id": call.id, "type": "function"} if header else {}
    return {"index": call.index, **head, "function": function}


def _message(answer: _Answer) -> JSON:
    message: JSON = {"role": "assistant", "content": "".join(answer.pieces)}
    if answer.reasoning:
        message["reasoning_content"] = "".join(answer.reasoning)
    if answer.calls:
        message["tool_calls"] = [_call_json(c, "".join(c.fragments)) for c in answer.calls]
    return message


def _deltas(answer: _Answer) -> list[JSON]:
    """Deltas in wire order: a thinking model's reasoning first, then the content or the tool
    calls, a second parallel call interleaving with the first."""
    thoughts: list[JSON] = [{"reasoning_content": p} for p in answer.reasoning]
    if thoughts:
        thoughts[0]["role"] = "assistant"
    return [*thoughts, *_answer_deltas(answer)]


def _answer_deltas(answer: _Answer) -> list[JSON]:
    if not answer.calls:
        return [{"role": "assistant", "content": ""}] + [{"content": p} for p in answer.pieces]
    first, *rest = answer.calls
    deltas: list[JSON] = [
        {"role": "assistant", "content": "", "tool_calls": [_call_json(first, "")]}
    ]
    for i, fragment in enumerate(first.fragments):
        deltas.append({"tool_calls": [_call_json(first, fragment, header=False)]})
        deltas += [{"tool_calls": [_call_json(c, c.fragments[i], header=i == 0)]} for c in rest]
    return deltas


def _events(body: JSON, answer: _Answer, ctl: _Control, usage_style: str) -> list[JSON]:
    base: JSON = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk"}
    base |= {"created": int(time.time()), "model": body["model"]}
    choices = [{"index": 0, "delta": d, "finish_reason": None} for d in _deltas(answer)]
    final: JSON = {"index": 0, "delta": [] if ctl.empty_delta_as_list else {}}
    final["finish_reason"] = answer.finish_reason
    events = [{**base, "choices": [c]} for c in [*choices, final]]
    if usage_style == "openai":
        # Like OpenAI: a streamed answer carries usage only when the request asks for it.
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            return [*events, {**base, "choices": [], "usage": answer.usage}]
        return events
    final["usage"] = answer.usage
    return events


def _sse(event: JSON) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def _payload(event: JSON | None, stamp: bool) -> bytes:
    """One SSE line (None: `[DONE]`). With `fake_moonshot.stamp`, each chunk carries the wall
    clock it is written at (`time.time()`) in a bench-only top-level `x_fake_sent_at`: the
    benchmark's relay latency per chunk, on the same machine and clock."""
    if event is None:
        return b"data: [DONE]\n\n"
    return _sse({**event, "x_fake_sent_at": time.time()} if stamp else event)


def _error_response(error: _ApiError, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    body = {"error": {"type": error.type, "message": error.message}}
    return web.json_response(body, status=error.status, headers=headers)


def _check_auth(request: web.Request, cfg: FakeConfig) -> None:
    """With an `api_key`, only `Bearer <api_key>` gets in; without one, any request does (a
    keyless local upstream, as `moonq worker` allows on loopback)."""
    if not cfg.api_key:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() != cfg.api_key:
        raise _ApiError("invalid_authentication_error")


async def _read_body(request: web.Request) -> JSON:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _ApiError("invalid_request_error", "Invalid request: body is not JSON") from exc
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _ApiError("invalid_request_error", "Invalid request: model is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError("invalid_request_error", "Invalid request: messages must not be empty")
    return body


def _should_inject(app: web.Application, body: JSON, ctl: _Control) -> bool:
    """Inject always, or with ``fail_times`` only for N requests sharing a key: the first N,
    or the N after the first ``fail_after`` (which pass)."""
    if ctl.error is None:
        return False
    if ctl.fail_times is None:
        return True
    key = ctl.key if ctl.key is not None else _digest(body).hex()
    fails = app[FAILS_KEY]
    fails[key] = fails.get(key, 0) + 1
    return ctl.fail_after < fails[key] <= ctl.fail_after + ctl.fail_times


async def _stream(
    request: web.Request, events: list[JSON], ctl: _Control, drop_after: int | None = None
) -> web.StreamResponse:
    """Write SSE events; with ``drop_after`` cut the connection after that many, no [DONE]."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    for sent, event in enumerate([*events, None]):
        if sent == drop_after and request.transport is not None:
            request.transport.close()  # mid-body, so the client sees an incomplete chunked read
            return resp
        if sent:
            await asyncio.sleep(ctl.delay)
        await resp.write(_payload(event, ctl.stamp))
    await resp.write_eof()
    return resp


async def _hang(request: web.Request, stream: bool) -> web.StreamResponse:
    """Send headers, then stall until the client gives up (handler cancellation ends us)."""
    kind = "text/event-stream" if stream else "application/json"
    resp = web.StreamResponse(headers={"Content-Type": kind})
    await resp.prepare(request)
    await asyncio.Event().wait()
    return resp


async def _inject(
    request: web.Request, body: JSON, answer: _Answer, ctl: _Control
) -> web.StreamResponse:
    request.app[STATS_KEY].errors_injected += 1
    stream = bool(body.get("stream"))
    if ctl.error == "hang":
        return await _hang(request, stream)
    if ctl.error == "drop" and not stream and request.transport is not None:
        request.transport.close()  # before any response bytes: "server disconnected"
        return web.Response()
    if ctl.error == "drop":
        events = _events(body, answer, ctl, request.app[CONFIG_KEY].usage_style)
        return await _stream(request, events, ctl, drop_after=max(0, ctl.drop_after))
    error = _ApiError(ctl.error or "server_error")
    return _error_response(error, ctl.retry_after)


async def _handle(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG_KEY]
    _check_auth(request, cfg)
    body = await _read_body(request)
    if fake_account.out_of_balance(request.app):
        raise _ApiError("exceeded_current_quota_error", fake_account.SUSPENDED)
    ctl = _control(body, cfg)
    answer = _answer(body, ctl)  # validates tools before faults
    if ctl.first_byte_delay > 0:
        await asyncio.sleep(ctl.first_byte_delay)
    if _should_inject(request.app, body, ctl):
        return await _inject(request, body, answer, ctl)
    if body.get("stream"):
        resp = await _stream(request, _events(body, answer, ctl, cfg.usage_style), ctl)
    else:
        resp = web.json_response(_completion(body, answer))
    request.app[STATS_KEY].completed += 1
    return resp


def _completion(body: JSON, answer: _Answer) -> JSON:
    choice = {"index": 0, "message": _message(answer), "finish_reason": answer.finish_reason}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [choice],
        "usage": answer.usage,  # top-level when not streaming, as Moonshot does
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``; tracks in-flight requests even across disconnects."""
    stats = request.app[STATS_KEY]
    stats.requests += 1
    stats.in_flight += 1
    stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
    try:
        return await _handle(request)
    except _ApiError as exc:
        return _error_response(exc)
    finally:
        stats.in_flight -= 1


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATS_KEY]))


async def reset(request: web.Request) -> web.Response:
    request.app[STATS_KEY].reset()
    request.app[FAILS_KEY].clear()
    request.app[fake_account.ACCOUNT_KEY].reset()
    return web.json_response(asdict(request.app[STATS_KEY]))


def create_app(config: FakeConfig | None = None) -> web.Application:
    """Build the fake's application; config, stats and fail counters live on the app."""
    app = web.Application()
    app[CONFIG_KEY] = config or FakeConfig()
    app[STATS_KEY] = FakeStats()
    app[FAILS_KEY] = {}
    app.router.add_post("/v1/chat/completions", chat_completions)
    fake_account.install(app, app[CONFIG_KEY])
    from moonq import fake_files, fake_models  # they import this module

    fake_files.install(app)
    fake_models.install(app)
    app.router.add_get("/_fake/stats", get_stats)
    app.router.add_post("/_fake/reset", reset)
    return app


# Cancel handlers of disconnected clients (ends hangs, keeps in_flight true); don't wait on them.
_SERVER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "shutdown_timeout": 1.0}


@dataclass
class FakeServer:
    """A running fake; ``url`` is the OpenAI-style base URL ending in ``/v1``."""

    runner: web.AppRunner
    origin: str
    stats: FakeStats
    config: FakeConfig

    @property
    def url(self) -> str:
        return f"{self.origin}/v1"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_fake(
    host: str = "127.0.0.1", port: int = 0, config: FakeConfig | None = None
) -> FakeServer:
    """Start on ``host:port`` (0 picks a free port) inside the running event loop."""
    app = create_app(config)
    runner = web.AppRunner(app, **_SERVER_OPTIONS)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return FakeServer(runner, f"http://{shown}:{bound}", app[STATS_KEY], app[CONFIG_KEY])


def run(sock: socket.socket, config: FakeConfig) -> None:
    """Serve on `sock` until interrupted; for ``moonq fake-moonshot``, which binds it first
    so that a taken port is a one-line error."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def announce(*_: Any) -> None:
        print(f"fake Moonshot listening on http://{shown}:{port}/v1", flush=True)

    app = create_app(config)
    web.run_app(app, sock=sock, print=announce, **_SERVER_OPTIONS)
