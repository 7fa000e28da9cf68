"""Redis clients: one bounded, blocking pool per process, and the embedded fallback for dev."""

from __future__ import annotations

from typing import Any

import fakeredis
from arq.connections import ArqRedis
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline

from moonq.serde import arq_deserialize, arq_serialize


def connect(url: str, max_connections: int = 64, **kwargs: Any) -> ArqRedis:
    """A client whose pool waits for a free connection instead of opening one per command.

    redis-py's default pool opens a new connection for every concurrent command; thousands of
    streams must share a bounded pool. Timeouts keep a request from hanging on a Redis that
    stopped answering: it fails (a 503 at the API) and the next one reconnects.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=30,
        **kwargs,
    )
    client = ArqRedis(pool, job_serializer=arq_serialize, job_deserializer=arq_deserialize)
    client.auto_close_connection_pool = True  # the pool is this client's alone
    return client


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


__all__ = ["ArqRedis", "Redis", "connect", "embedded", "ping", "transient"]
