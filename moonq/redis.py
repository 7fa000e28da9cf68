"""Redis clients: one bounded, blocking pool per process, and the embedded fallback for dev."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import inspect
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import fakeredis
import hiredis
import redis as sync_redis
import redis.sentinel as sync_sentinel
from arq.connections import ArqRedis, RedisSettings
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.client import EMPTY_RESPONSE
from redis.utils import HIREDIS_AVAILABLE

from moonq.serde import arq_deserialize, arq_serialize
from moonq.settings import Settings

_POOL = {"timeout": 10}
_SOCKETS = {"socket_connect_timeout": 3, "socket_timeout": 10, "health_check_interval": 30}
_SENTINEL_SOCKETS = {"socket_connect_timeout": 3, "socket_timeout": 3}


def connect(
    url: str,
    max_connections: int = 64,
    *,
    sentinels: Sequence[tuple[str, int]] = (),
    sentinel_master: str = "mymaster",
    **kwargs: Any,
) -> ArqRedis:
    """A client whose pool waits for a free connection instead of opening one per command.

    redis-py's default pool opens a new connection for every concurrent command; thousands of
    streams must share a bounded pool. Timeouts keep a request from hanging on a Redis that
    stopped answering: it fails (a 503 at the API) and the next one reconnects. With
    `sentinels`, every new connection asks them for the master, so a failover is followed
    (`url` then gives only the database and credentials).
    """
    options = {**_POOL, **_SOCKETS, "max_connections": max_connections, **kwargs}
    pool: ConnectionPool
    if sentinels:
        sentinel, master = _sentinel(sentinels), _master_args(url)
        pool = _SentinelPool(sentinel_master, sentinel, **master, **options)  # type: ignore[no-untyped-call]
    else:
        pool = BlockingConnectionPool.from_url(url, **options)
    if HIREDIS_AVAILABLE:
        pool.connection_class = _hiredis_packing(pool.connection_class)
    client = Client(pool, job_serializer=arq_serialize, job_deserializer=arq_deserialize)
    client.auto_close_connection_pool = True  # the pool is this client's alone
    return client


def from_settings(settings: Settings) -> ArqRedis:
    """The process's client: REDIS_URL, or the master its sentinels name."""
    return connect(
        settings.redis_url,
        settings.redis_max_connections,
        sentinels=settings.sentinels,
        sentinel_master=settings.redis_sentinel_master,
    )


# Commands that hold their connection (blocking reads, transactions, connection state) or
# answer with other than one reply go alone, as redis-py sends them: in a shared round trip
# they would hold up the others, or hand them the wrong replies.
# fmt: off
_ALONE = frozenset({
    "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
    "XREAD", "XREADGROUP", "WAIT", "WAITAOF", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
    "SELECT", "AUTH", "HELLO", "RESET", "QUIT", "MONITOR", "SUBSCRIBE", "PSUBSCRIBE",
    "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "CLIENT", "SHUTDOWN",
    "DEBUG", "SYNC", "PSYNC", "REPLICAOF", "SLAVEOF", "FAILOVER",
})
# fmt: on
CLOSE_GRACE = 1.0  # seconds `Client.aclose` lets round trips under way finish
_Queued = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]
# Errors after which a connection's replies cannot be trusted to line up with its commands.
_BROKEN = (rx.ConnectionError, rx.TimeoutError, rx.InvalidResponse, OSError, asyncio.CancelledError)


class Client(ArqRedis):
    """moonq's Redis client: commands issued in the same turn of the event loop, by any
    number of tasks, share one round trip (one pipeline, not a transaction), each caller
    getting its own reply or error. A round trip costs redis-py's asyncio client far more
    CPU than a command in a pipeline (measured on the 2-core machine, 50 tasks asking at
    once: ~150 µs against ~30 µs a command: the pool, a timeout, two syscalls, a wake-up
    each), and a worker's and an API's jobs issue their commands in bursts (a poll's jobs
    start together, replies arrive together), which now share round trips as their events
    already did (`worker.publisher`).

    As with redis-py's own: each task's commands go in the order it awaits them (those of
    different tasks were never ordered); a command whose caller gave up before it went out
    is not sent; a round trip whose callers all gave up stops waiting for its replies and
    drops its connection. With retries configured (`retry_on_timeout` in REDIS_URL) every
    command goes alone, as redis-py retries it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queued: list[_Queued] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[None]] = set()  # not yet past their last reply
        options = self.connection_pool.connection_kwargs
        self._alone = any(
            options.get(name) for name in ("retry", "retry_on_timeout", "retry_on_error")
        )

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self._alone or self.connection is not None or _name(args[0]) in _ALONE:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await self._enqueue(args, options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        """A pipeline whose commands, once executed, go in the next shared round trip
        together, in order (a transaction as MULTI ... EXEC), unless it must hold a connection
        of its own (`_SharedPipeline`)."""
        return _SharedPipeline(self, transaction, shard_hint)

    def _enqueue(self, args: tuple[Any, ...], options: dict[str, Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new loop: what an old, closed one left is gone
            self._loop, self._queued, self._sending, self._waiting = loop, [], set(), set()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((args, options, future))
        return future

    def _flush(self) -> None:
        batch = [queued for queued in self._queued if not queued[2].done()]
        self._queued = []
        if not batch:
            return
        # a context of its own: the round trip is no one caller's (its logs are not theirs)
        task = asyncio.get_running_loop().create_task(
            self._send(batch), context=contextvars.Context()
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        left = [len(batch)]  # callers still waiting

        def answered_or_gone(_: asyncio.Future[Any]) -> None:
            left[0] -= 1
            if not left[0] and task in self._waiting:  # nobody waits for what is left
                task.cancel()

        for _, _, future in batch:
            future.add_done_callback(answered_or_gone)

    async def _send(self, batch: list[_Queued]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        pool = self.connection_pool
        try:
            conn = await pool.get_connection()
        except BaseException as exc:  # no connection free in time, or none to be had
            self._waiting.discard(task)
            _fail(batch, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        try:
            await self._send_on(conn, [queued for queued in batch if not queued[2].done()])
        finally:
            self._waiting.discard(task)
            await pool.release(conn)

    async def _send_on(self, conn: Connection, batch: list[_Queued]) -> None:
        """Send the batch as one pipeline and hand each caller its reply. A command that
        cannot be packed (an argument Redis cannot take) is its caller's error alone."""
        packed, sent = _packed(conn, batch)
        if not sent:
            return
        done = 0
        try:
            async with _in_time(conn):
                await conn.send_packed_command(packed)
                for args, options, future in sent:
                    try:
                        group = options.get(_GROUP)
                        if group is None:
                            reply = await self.parse_response(conn, args[0], **options)
                        else:
                            reply = await self._group_replies(conn, group)
                    except _BROKEN:
                        raise
                    except Exception as exc:  # an error reply, or its callback's: its own
                        reply = exc
                    _settle(future, reply)
                    done += 1
        except BaseException as exc:  # the replies left are lost with the connection
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            _fail(sent[done:], exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _group_replies(self, conn: Connection, group: _Group) -> list[Any]:
        """A pipeline's replies, read as redis-py's `Pipeline` reads them; each command's error
        reply in its place. Every reply of the group is read before anything is raised, so
        the connection's later replies stay in line with their commands."""
        if group.transaction:
            return await self._transaction_replies(conn, group)
        replies: list[Any] = []
        for args, options in group.commands:
            try:
                replies.append(await self.parse_response(conn, args[0], **options))
            except _BROKEN:
                raise
            except Exception as exc:  # an error reply, or its callback's: this command's
                replies.append(exc)
        return replies

    async def _transaction_replies(self, conn: Connection, group: _Group) -> list[Any]:
        """MULTI's reply, each command's QUEUED (or its refusal), then EXEC's answers, as
        redis-py reads them; callbacks are the pipeline's to run."""
        refused: list[tuple[int, Exception]] = []
        for i in range(-1, len(group.commands)):
            try:
                await self.parse_response(conn, "_")
            except rx.ResponseError as exc:
                if i >= 0:
                    group.pipeline.annotate_exception(exc, i + 1, group.commands[i][0])
                refused.append((max(i, 0), exc))
        try:
            answer = await self.parse_response(conn, "_")
        except rx.ExecAbortError as exc:  # a command refused as it was queued: none ran
            if refused:
                raise refused[0][1] from exc
            raise
        if answer is None:
            raise rx.WatchError("Watched variable changed.")
        replies = list(answer)
        for i, error in refused:
            replies.insert(i, error)
        if len(replies) != len(group.commands):
            raise rx.InvalidResponse("Wrong number of response items from pipeline execution")
        return replies

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Lets the round trips under way end for up to `CLOSE_GRACE` s; the callers of
        those still waiting then hear that the client closed (as redis-py's own close cuts
        the connections in use), so a Redis that stopped answering does not hold it up."""
        if self._queued:
            self._flush()
        if self._sending:
            _, late = await asyncio.wait(set(self._sending), timeout=CLOSE_GRACE)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await super().aclose(close_connection_pool)


_GROUP = "moonq_pipeline"  # the option that makes a queued entry a whole pipeline


@dataclass(frozen=True)
class _Group:
    """A pipeline's commands as one entry of a shared round trip: packed together (one
    that cannot be packed fails the whole pipeline, nothing sent, as in redis-py), sent
    together, read together."""

    pipeline: Pipeline
    commands: list[tuple[tuple[Any, ...], dict[str, Any]]]
    transaction: bool

    def packing(self) -> list[tuple[Any, ...]]:
        commands = [args for args, _ in self.commands]
        return [("MULTI",), *commands, ("EXEC",)] if self.transaction else commands


class _SharedPipeline(Pipeline):
    """redis-py's pipeline, executed in the client's next shared round trip. One that must
    hold a connection of its own goes as redis-py sends it: WATCH (the check-and-set it
    guards needs the connection until EXEC), `multi()` after a WATCH, scripts (their SHA
    checked first), a command that goes alone, or a client with retries."""

    def __init__(self, client: Client, transaction: bool, shard_hint: Any) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, transaction, shard_hint)
        self._client = client

    def _shared(self) -> bool:
        return bool(
            self.command_stack
            and not (self.watching or self.explicit_transaction or self.scripts)
            and self.connection is None
            and not self._client._alone
            and all(
                _name(args[0]) not in _ALONE and EMPTY_RESPONSE not in options
                for args, options in self.command_stack
            )
        )

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not self._shared():
            return await super().execute(raise_on_error)
        commands = [(args, dict(options)) for args, options in self.command_stack]
        group = _Group(self, commands, self.is_transaction)
        try:
            replies: list[Any] = await self._client._enqueue(("PIPELINE",), {_GROUP: group})
        finally:
            await self.reset()  # type: ignore[no-untyped-call]
        # A reply callback's error is raised whatever `raise_on_error` says, as redis-py lets
        # it out (though redis-py leaves the connection's later replies unread then).
        for reply in replies:
            if isinstance(reply, Exception) and not isinstance(reply, rx.ResponseError):
                raise reply
        if raise_on_error:  # (redis-py's stack type, whose Mapping makes a list invariant)
            self.raise_first_error(cast(Any, commands), replies)
        if not self.is_transaction:  # replies read through their callbacks already
            return replies
        answers = []
        for reply, (args, options) in zip(replies, commands, strict=True):
            callback = self.response_callbacks.get(args[0])
            if callback is not None and not isinstance(reply, Exception):
                options = {k: v for k, v in options.items() if k != "keys"}
                reply = callback(reply, **options)
                if inspect.isawaitable(reply):
                    reply = await reply
            answers.append(reply)
        return answers


@contextlib.asynccontextmanager
async def _in_time(conn: Connection) -> AsyncIterator[None]:
    """One deadline (`socket_timeout`) for a whole round trip, its write and all its replies,
    rather than redis-py's one for the write (an `asyncio.wait_for`: on Python 3.11 a task of
    its own, ~7 µs of CPU) and one for each reply (an `asyncio.timeout`, ~4 µs: a timer set
    and cancelled), each about as much as reading the reply itself; a worker reads ~15
    replies a job. The connection is this round trip's alone meanwhile; past the deadline it
    is dropped and the replies not yet read fail with redis-py's `TimeoutError`, as they
    did."""
    timeout = conn.socket_timeout
    if not timeout:
        yield
        return
    conn.socket_timeout = None  # redis-py then writes and reads without timeouts of its own
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise rx.TimeoutError(f"Timeout talking to {conn._host_error()} ({timeout} s)") from None
    finally:
        conn.socket_timeout = timeout


def _name(command: str | bytes) -> str:
    name = command.decode() if isinstance(command, bytes) else command
    return name.split(" ", 1)[0].upper()


def _packed(conn: Connection, batch: list[_Queued]) -> tuple[list[bytes], list[_Queued]]:
    """The batch's commands packed, and those that could be; the others hear why not."""
    packed: list[bytes] = []
    sent: list[_Queued] = []
    for queued in batch:
        group = queued[1].get(_GROUP)
        try:
            if group is None:
                packed += conn.pack_command(*queued[0])
            else:
                packed += conn.pack_commands(group.packing())
        except Exception as exc:
            _settle(queued[2], exc)
        else:
            sent.append(queued)
    return packed, sent


def _fail(batch: list[_Queued], exc: BaseException) -> None:
    """Each caller left waiting hears of the failure, by an exception of its own (one
    shared would gather every caller's traceback)."""
    if isinstance(exc, asyncio.CancelledError):  # the client is closing, not the callers
        exc = rx.ConnectionError("the Redis client closed with the command under way")
    for _, _, future in batch:
        _settle(future, _copy(exc))


def _copy(exc: BaseException) -> BaseException:
    try:
        mine = copy.copy(exc)
    except Exception:
        return exc
    mine.__cause__, mine.__traceback__ = exc.__cause__, None
    return mine


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # its caller gave up meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis's C packer, as redis-py's blocking client packs them; its
    asyncio client packs each in Python, an `encode` and a copy of the buffer so far per
    argument (redis/redis-py#4176). A worker's script calls carry many jobs' keys and events:
    their packing was the largest single cost of its Python (13 % of a profile at c=200),
    and hiredis packs them ~6× faster, byte for byte the same."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py splits a command name of several words (`CONFIG GET`)
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # bool, None...: as redis-py's encoder refuses them
            raise rx.DataError(str(exc)) from None


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _hiredis_packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """The pool's connection class (TCP, TLS, a Unix socket, Sentinel's), packing by hiredis."""
    if cls not in _PACKING:
        _PACKING[cls] = type(f"Hiredis{cls.__name__}", (_HiredisPacking, cls), {})
    return _PACKING[cls]


class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (connections to whichever node is master now), bounded and waiting
    like `BlockingConnectionPool`: redis-py's own opens one per concurrent command."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Also the connections to the sentinels, which redis-py never closes."""
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def _sentinel(addresses: Sequence[tuple[str, int]]) -> Sentinel:
    return Sentinel(list(addresses), sentinel_kwargs=dict(_SENTINEL_SOCKETS))  # type: ignore[no-untyped-call]


def _master_args(url: str) -> dict[str, Any]:
    """What of REDIS_URL holds under Sentinel: database, credentials, TLS; not the address."""
    args: dict[str, Any] = dict(parse_url(url))
    for key in ("host", "port", "path", "connection_class"):
        args.pop(key, None)
    if url.startswith("rediss:"):
        args["ssl"] = True
    return args


def arq_settings(settings: Settings) -> RedisSettings:
    """arq's view of the same connection, for arq's own tools (`arq --check`)."""
    found = RedisSettings.from_dsn(settings.redis_url)
    if not settings.sentinels:
        return found
    master = settings.redis_sentinel_master
    return replace(found, host=settings.sentinels, sentinel=True, sentinel_master=master)


def sync_client(settings: Settings, timeout: float = 3) -> sync_redis.Redis:
    """A blocking client to the same Redis, for checks at start."""
    sockets = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    if not settings.sentinels:
        return sync_redis.Redis.from_url(settings.redis_url, **sockets)
    sentinel = sync_sentinel.Sentinel(settings.sentinels, sentinel_kwargs=sockets)  # type: ignore[no-untyped-call]
    master: sync_redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, **_master_args(settings.redis_url), **sockets
    )
    return master


class _EmbeddedPipeline(Pipeline):
    def info(self, section: str | None = None, *args: Any, **kwargs: Any) -> Any:
        # An empty hash reads as an empty INFO section: arq only logs its fields.
        return self.hgetall("moonq:embedded:info")


class EmbeddedArqRedis(ArqRedis):
    """ArqRedis over an in-process fakeredis server. fakeredis lacks INFO, which arq's worker
    sends at start in a pipeline (`arq.connections.log_redis_info`); answer it with nothing."""

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        return _EmbeddedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


def embedded(server: fakeredis.FakeServer | None = None) -> ArqRedis:
    server = server or fakeredis.FakeServer()
    pool = fakeredis.FakeAsyncRedis(server=server).connection_pool
    client = EmbeddedArqRedis(pool, job_serializer=arq_serialize, job_deserializer=arq_deserialize)
    client.auto_close_connection_pool = True
    return client


# Replies that say "not now" rather than "never": the same command may well succeed later.
_TRANSIENT_REPLIES = (
    "BUSY",
    "LOADING",
    "MASTERDOWN",
    "MISCONF",  # a failed snapshot refuses writes until the next one succeeds
    "TRYAGAIN",
    "CLUSTERDOWN",
    "OOM",
    "NOREPLICAS",
)


def transient(exc: BaseException) -> bool:
    """Whether a failure talking to Redis may pass if the same work runs again: a lost or slow
    connection, a server loading, busy, read-only or out of memory. A script's error reply
    or an argument redis-py refuses (`DataError`) fails the same way every time."""
    if isinstance(exc, OSError | rx.ConnectionError | rx.TimeoutError):
        return True
    if isinstance(exc, rx.ReadOnlyError | rx.OutOfMemoryError):  # a failover; memory freed
        return True
    if isinstance(exc, rx.ResponseError):
        return str(exc).startswith(_TRANSIENT_REPLIES)
    return isinstance(exc, rx.RedisError) and not isinstance(exc, rx.DataError)


async def ping(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


__all__ = [
    "ArqRedis",
    "Redis",
    "arq_settings",
    "connect",
    "embedded",
    "from_settings",
    "ping",
    "sync_client",
    "transient",
]
