"""moonq's Redis client: commands issued together by many tasks share one round trip, each
caller still getting its own reply, its own error, and nothing sent once it gave up."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import hiredis
import pytest
import redis as sync_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from moonq.redis import connect
from tests.procs import free_port


def _connections_named(url: str, name: str) -> int:
    client = sync_redis.Redis.from_url(url)
    try:
        return sum(1 for row in client.client_list() if row.get("name") == name)
    finally:
        client.close()


@pytest.mark.redis
async def test_commands_issued_together_share_a_connection_each_with_its_reply(
    real_redis_url: str, prefix: str
) -> None:
    """200 tasks asking at once: each gets its own answer, and the pool (64 connections,
    each of which redis-py would have taken) opens one or two."""
    name = f"moonq-test-{uuid.uuid4().hex[:8]}"
    client = connect(real_redis_url, client_name=name)
    try:
        keys = [f"{prefix}:n{i % 20}" for i in range(200)]
        counts = await asyncio.gather(*(client.incr(key) for key in keys))
        # the 10 INCRs of each key counted 1..10 between them: none lost, none doubled
        by_key: dict[str, list[int]] = {}
        for key, count in zip(keys, counts, strict=True):
            by_key.setdefault(key, []).append(count)
        assert all(sorted(seen) == list(range(1, 11)) for seen in by_key.values())
        await client.hset(f"{prefix}:h", mapping={f"f{i}": i for i in range(50)})
        fields = await asyncio.gather(*(client.hget(f"{prefix}:h", f"f{i}") for i in range(50)))
        assert fields == [str(i).encode() for i in range(50)]
        assert 1 <= _connections_named(real_redis_url, name) <= 2
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_an_error_reply_is_its_callers_alone(real_redis: Any, prefix: str) -> None:
    await real_redis.hset(f"{prefix}:hash", "f", "v")
    answers = await asyncio.gather(
        real_redis.set(f"{prefix}:a", "1"),
        real_redis.incr(f"{prefix}:hash"),  # WRONGTYPE: a hash is not a number
        real_redis.get(f"{prefix}:a"),
        real_redis.hget(f"{prefix}:hash", "f"),
        real_redis.set(f"{prefix}:b", None),  # refused before it is sent: not a Redis value
        real_redis.exists(f"{prefix}:a"),
        return_exceptions=True,
    )
    assert answers[0] is True
    assert isinstance(answers[1], ResponseError) and "WRONGTYPE" in str(answers[1])
    assert answers[2:4] == [b"1", b"v"]
    assert isinstance(answers[4], DataError)
    assert answers[5] == 1


@pytest.mark.redis
async def test_a_script_unknown_to_redis_loads_itself_though_its_calls_go_together(
    real_redis: Any, prefix: str
) -> None:
    """EVALSHA of a script Redis has not seen answers NOSCRIPT to each caller of the round
    trip; each loads it and runs, as when each went alone."""
    body = f"-- {uuid.uuid4().hex}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    script = real_redis.register_script(body)
    key = f"{prefix}:scripted"
    totals = await asyncio.gather(*(script(keys=[key], args=[n]) for n in range(1, 11)))
    assert len(set(totals)) == 10 and max(totals) == sum(range(1, 11))
    assert int(await real_redis.get(key)) == 55


@pytest.mark.redis
async def test_a_caller_that_gives_up_before_its_turn_sends_nothing(
    real_redis: Any, prefix: str
) -> None:
    key = f"{prefix}:never"
    kept = asyncio.create_task(real_redis.incr(f"{prefix}:kept"))
    dropped = asyncio.create_task(real_redis.incr(key))
    await asyncio.sleep(0)  # both are queued; the round trip goes out on the loop's next turn
    dropped.cancel()
    assert await kept == 1
    with pytest.raises(asyncio.CancelledError):
        await dropped
    await asyncio.sleep(0.05)
    assert await real_redis.get(key) is None


class _Stub:
    """A Redis stand-in. On its first connection it `hangs` (reads, never answers), `stalls`
    (answers only redis-py's handshake on connecting: `CLIENT SETINFO` and a `PING`) or
    `drops` (answers the first command of a round trip of several, then hangs up); later
    connections answer every command (PING with PONG, for redis-py's health check, anything
    else with OK)."""

    def __init__(self, first: str) -> None:
        self.first = first
        self.port = free_port()
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> _Stub:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                commands = []
                while (command := parser.gets()) is not False:
                    commands.append(command)
                if first and self.first == "hangs":
                    continue
                if first and self.first == "stalls":
                    commands = [c for c in commands if c[0].upper() in (b"CLIENT", b"PING")]
                if first and self.first == "drops" and len(commands) > 1:
                    writer.write(b"+OK\r\n")
                    await writer.drain()
                    break
                for command in commands:
                    writer.write(b"+PONG\r\n" if command[0].upper() == b"PING" else b"+OK\r\n")
                await writer.drain()
        finally:
            writer.close()


async def test_a_connection_lost_mid_round_trip_fails_only_the_callers_left_unanswered() -> None:
    """The first caller had its reply before the connection dropped: it keeps it. The rest
    hear the connection error (as each would have alone), and the next commands reconnect."""
    async with _Stub("drops") as stub:
        client = connect(f"redis://127.0.0.1:{stub.port}/0")
        try:
            answers = await asyncio.gather(
                *(client.set(f"k{i}", "v") for i in range(5)), return_exceptions=True
            )
            assert answers[0] is True
            assert all(isinstance(answer, RedisConnectionError) for answer in answers[1:])
            assert len({id(answer) for answer in answers[1:]}) == 4  # an error each
            again = await asyncio.gather(*(client.set(f"k{i}", "v") for i in range(5)))
            assert again == [True] * 5
            assert stub.connections == 2
        finally:
            await client.aclose()


async def test_a_round_trip_redis_does_not_answer_times_out_as_redis_py_times_out() -> None:
    """Redis stopped answering: after `socket_timeout` every caller of the round trip hears
    redis-py's own `TimeoutError` (one deadline for the whole round trip, not one per reply),
    the connection is dropped, and the next commands go over a new one, under the same
    timeout."""
    async with _Stub("stalls") as stub:
        client = connect(f"redis://127.0.0.1:{stub.port}/0", socket_timeout=0.3)
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            answers = await asyncio.gather(
                *(client.get(f"k{i}") for i in range(3)), return_exceptions=True
            )
            assert all(isinstance(answer, RedisTimeoutError) for answer in answers), answers
            assert 0.25 < loop.time() - started < 2
            assert await client.set("k", "v") is True
            assert stub.connections == 2
            (conn,) = client.connection_pool._available_connections  # type: ignore[attr-defined]
            assert conn.socket_timeout == 0.3
        finally:
            await client.aclose()


async def test_callers_that_give_up_on_a_stalled_reply_free_its_connection() -> None:
    """Redis stopped answering one round trip: once its callers stop waiting (a timeout of
    theirs), its connection is dropped, not held until the socket's own 10 s timeout, so the
    next command, and closing, need not wait for it."""
    async with _Stub("hangs") as stub:
        client = connect(f"redis://127.0.0.1:{stub.port}/0", max_connections=1)
        loop = asyncio.get_running_loop()
        try:
            stalled = [asyncio.wait_for(client.get(key), 0.3) for key in ("k", "j")]
            answers = await asyncio.gather(*stalled, return_exceptions=True)
            assert all(isinstance(answer, TimeoutError) for answer in answers)
            started = loop.time()
            assert await asyncio.wait_for(client.set("k", "v"), 5) is True
            assert loop.time() - started < 2
        finally:
            started = loop.time()
            await client.aclose()
            assert loop.time() - started < 2


@pytest.mark.redis
async def test_a_caller_that_gives_up_waiting_for_a_connection_sends_nothing(
    real_redis_url: str, prefix: str
) -> None:
    """The pool's one connection is busy: a caller that stops waiting for it (a cancel, a
    timeout) has its command dropped, not sent once the connection frees."""
    client = connect(real_redis_url, max_connections=1)
    try:
        busy = asyncio.create_task(client.blpop([f"{prefix}:nothing"], timeout=1))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.incr(f"{prefix}:dropped"), 0.2)
        assert await busy is None
        await asyncio.sleep(0.1)
        assert await client.get(f"{prefix}:dropped") is None
    finally:
        await client.aclose()


async def test_closing_does_not_wait_on_a_redis_that_stopped_answering() -> None:
    """A caller still waits on a stalled reply: closing the client lets it go within about a
    second (it hears the client closed), not at the socket's 10 s timeout."""
    async with _Stub("hangs") as stub:
        client = connect(f"redis://127.0.0.1:{stub.port}/0")
        waiting = asyncio.create_task(client.get("k"))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.aclose()
        assert loop.time() - started < 3
        with pytest.raises(RedisConnectionError, match="closed"):
            await waiting


@pytest.mark.redis
async def test_pipelines_issued_together_share_the_round_trip_each_with_its_replies(
    real_redis_url: str, prefix: str
) -> None:
    """100 tasks each run a pipeline and a transaction beside lone commands: each gets its
    own replies (through redis-py's reply callbacks), a transaction's commands run together,
    and the pool opens one or two connections (redis-py takes one for each pipeline)."""
    name = f"moonq-test-{uuid.uuid4().hex[:8]}"
    client = connect(real_redis_url, client_name=name)

    async def one(i: int) -> tuple[list[Any], list[Any], Any]:
        key = f"{prefix}:p{i}"
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.hset(f"{key}:h", mapping={"a": i, "b": 2 * i})
            pipe.hgetall(f"{key}:h")
            piped = await pipe.execute()
        async with client.pipeline(transaction=True) as tr:
            tr.incrby(key, 10)
            tr.hincrby(f"{key}:h", "a", 1)
            tr.hgetall(f"{key}:h")
            tr.exists(f"{key}:none")
            done = await tr.execute()
        return piped, done, await client.get(key)

    try:
        results = await asyncio.gather(*(one(i) for i in range(100)))
        for i, (piped, done, value) in enumerate(results):
            assert piped == [1, 2, {b"a": str(i).encode(), b"b": str(2 * i).encode()}]
            assert done == [11, i + 1, {b"a": str(i + 1).encode(), b"b": str(2 * i).encode()}, 0]
            assert value == b"11"
        assert 1 <= _connections_named(real_redis_url, name) <= 2
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_pipelines_errors_are_its_own(real_redis: Any, prefix: str) -> None:
    """In one round trip: a transaction whose command fails as it runs (the others ran), one
    refused as it was queued (none ran), a pipeline with an error reply, one that cannot be
    packed (nothing sent), and a lone command: each hears of its own failure alone, as
    redis-py's own pipelines report them."""
    await real_redis.hset(f"{prefix}:hash", "f", "v")

    async def run(transaction: bool, fill: Any, raise_on_error: bool = True) -> list[Any]:
        async with real_redis.pipeline(transaction=transaction) as pipe:
            fill(pipe)
            return list(await pipe.execute(raise_on_error=raise_on_error))

    def runtime_error(pipe: Any) -> None:
        pipe.set(f"{prefix}:ran", "1")
        pipe.incr(f"{prefix}:hash")  # WRONGTYPE, when EXEC runs it
        pipe.get(f"{prefix}:ran")

    def refused(pipe: Any) -> None:
        pipe.set(f"{prefix}:never", "1")
        pipe.execute_command("NO-SUCH-COMMAND")

    def unpackable(pipe: Any) -> None:
        pipe.set(f"{prefix}:unsent", "1")
        pipe.set(f"{prefix}:bad", None)

    answers = await asyncio.gather(
        run(True, runtime_error),
        run(True, runtime_error, raise_on_error=False),
        run(True, refused),
        run(False, runtime_error, raise_on_error=False),
        run(False, unpackable),
        real_redis.hget(f"{prefix}:hash", "f"),
        return_exceptions=True,
    )
    raised, kept, aborted, piped, unpacked, lone = answers
    assert isinstance(raised, ResponseError) and "Command # 2" in str(raised)
    assert "WRONGTYPE" in str(raised)
    assert kept[0] is True and isinstance(kept[1], ResponseError) and kept[2] == b"1"
    assert isinstance(aborted, ResponseError) and "NO-SUCH-COMMAND" in str(aborted)
    assert await real_redis.get(f"{prefix}:never") is None  # nothing of it ran
    assert piped[0] is True and isinstance(piped[1], ResponseError) and piped[2] == b"1"
    assert isinstance(unpacked, DataError)
    assert await real_redis.get(f"{prefix}:unsent") is None
    assert lone == b"v"


@pytest.mark.redis
async def test_a_watched_transaction_keeps_its_connection(real_redis: Any, prefix: str) -> None:
    """WATCH ... MULTI ... EXEC goes as redis-py sends it: a write by someone else between
    the WATCH and the EXEC aborts it."""
    key = f"{prefix}:watched"
    await real_redis.set(key, "0")
    async with real_redis.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        assert await pipe.get(key) == b"0"
        await real_redis.set(key, "changed")
        pipe.multi()
        pipe.set(key, "mine")
        with pytest.raises(WatchError):
            await pipe.execute()
    assert await real_redis.get(key) == b"changed"


async def test_a_connection_lost_mid_pipeline_fails_the_pipeline() -> None:
    """The round trip's first command had its reply; a pipeline after it hears the
    connection error, as it would have alone."""
    async with _Stub("drops") as stub:
        client = connect(f"redis://127.0.0.1:{stub.port}/0")
        try:

            async def piped() -> Any:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.set("a", "1")
                    pipe.set("b", "2")
                    return await pipe.execute()

            first, second = await asyncio.gather(
                client.set("k", "v"), piped(), return_exceptions=True
            )
            assert first is True
            assert isinstance(second, RedisConnectionError)
            assert await piped() == [True, True]  # the next one reconnects
        finally:
            await client.aclose()


@pytest.mark.redis
async def test_a_reply_callbacks_error_is_raised_as_redis_py_raises_it(
    real_redis: Any, prefix: str
) -> None:
    """A callback that fails on its reply is raised whatever `raise_on_error` says, as
    redis-py raises it, and the pipeline's other replies are read off the connection: the
    next command gets its own."""
    key = f"{prefix}:z"
    await real_redis.zadd(key, {"a": 1})

    def broken(value: Any) -> float:
        raise ZeroDivisionError("the callback failed")

    async with real_redis.pipeline(transaction=False) as pipe:
        pipe.zscore(key, "a")
        pipe.zrange(key, 0, -1, withscores=True, score_cast_func=broken)
        pipe.incr(f"{prefix}:n")
        with pytest.raises(ZeroDivisionError):
            await pipe.execute(raise_on_error=False)
    assert await real_redis.get(f"{prefix}:n") == b"1"  # it ran, and its reply was read
    assert await real_redis.zscore(key, "a") == 1.0
