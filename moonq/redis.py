"""Redis clients: one bounded, blocking pool per process, and the embedded fallback for dev."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import fakeredis
import hiredis
import redis as sync_redis
import redis.sentinel as sync_sentinel
from arq.connections import ArqRedis, RedisSettings
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
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
    client = ArqRedis(pool, job_serializer=arq_serialize, job_deserializer=arq_deserialize)
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
