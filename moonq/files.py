"""Uploaded files, as OpenAI's Files API knows them (batch input files).

Bytes and record live in Redis, so every API process sees a file and it survives an API restart
(and, with AOF, a Redis restart). The bytes are one string APPENDed ~1 MiB at a time as the
upload streams in and read back with GETRANGE: no file is ever whole in a process's memory.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Literal

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq import file_quota
from moonq.file_lines import LineCutter, LongLine
from moonq.file_quota import Quota
from moonq.keys import Keys

# Bytes written to or read from Redis at a time.
PIECE = 1024 * 1024
# An upload's bytes expire this long after its last piece until the record makes them a file,
# so an API process that dies mid-upload leaves nothing that stays.
PENDING_TTL = 3600
# The most index entries read at a time while listing.
_LIST_BATCH = 1000
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
# Moonshot's own limits per account: 1,000 files, 10 GiB in all.
DEFAULT_QUOTA = Quota(max_files=1000, max_bytes=10 * 1024**3)


class FileObject(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileTooLarge(Exception):
    """The upload passed `max_bytes`; nothing of it was kept."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the file is larger than {max_bytes} bytes")
        self.max_bytes = max_bytes


class UnknownCursor(Exception):
    """`after` names no file of the tenant's (any more)."""


def new_file_id() -> str:
    """`file-` and 24 random hex digits: unguessable, and shaped like OpenAI's ids."""
    return f"file-{secrets.token_hex(12)}"


class FileStore:
    """A tenant's files: create, read, list, delete; `read` and `lines` serve the batch code."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        ttl: int = 0,
        quota: Quota = DEFAULT_QUOTA,
    ) -> None:
        self.redis, self.keys, self.max_bytes, self.clock = redis, keys, max_bytes, clock
        self.ttl = ttl  # seconds a file is kept; 0 keeps it until deleted, as OpenAI does
        self.quota = quota
        self.sweep = file_quota.SWEEP  # index entries each upload looks at for expired files
        self._check = redis.register_script(file_quota.CHECK)
        self._publish_script = redis.register_script(file_quota.PUBLISH)

    async def create(
        self, tenant: str, purpose: str, filename: str, source: AsyncIterator[bytes]
    ) -> FileObject:
        """Store the bytes, then make them visible as a file in one step, if the tenant's quota
        has room (else `OverQuota`); an upload that fails or is too large (`FileTooLarge`)
        leaves nothing behind."""
        file_id = new_file_id()
        data = self.keys.file_data(file_id)
        try:
            size = await self._write(data, source)
            return await self._publish(tenant, file_id, purpose, filename, size)
        except BaseException:
            with suppress(RedisError, OSError):  # else PENDING_TTL removes it
                await self.redis.unlink(data)
            raise

    async def _write(self, key: str, source: AsyncIterator[bytes]) -> int:
        size, buffer = 0, bytearray()
        async for chunk in source:
            size += len(chunk)
            if size > self.max_bytes:
                raise FileTooLarge(self.max_bytes)
            buffer += chunk
            if len(buffer) >= PIECE:
                await self._append(key, bytes(buffer))
                buffer.clear()
        if buffer:
            await self._append(key, bytes(buffer))
        return size

    async def _append(self, key: str, piece: bytes) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.append(key, piece)
        pipe.expire(key, PENDING_TTL)
        await pipe.execute()

    async def _publish(
        self, tenant: str, file_id: str, purpose: str, filename: str, size: int
    ) -> FileObject:
        created = self.clock()
        expires = int(created) + self.ttl if self.ttl else None
        found = FileObject(
            id=file_id,
            bytes=size,
            created_at=int(created),
            filename=filename,
            purpose=purpose,
            expires_at=expires,
        )
        answer = await self._publish_script(
            keys=[*self._quota_keys(tenant), self.keys.file(file_id), self.keys.file_data(file_id)],
            args=[
                *self._quota_args(created, size),
                file_id,
                tenant,
                found.model_dump_json(),
            ],
        )
        if (refused := file_quota.over(int(answer), self.quota)) is not None:
            raise refused
        return found

    async def check_room(self, tenant: str, size: int) -> None:
        """Raise `OverQuota` if the tenant has no room for a file of `size` bytes: asked before
        an upload's bytes are stored (its publication asks again, atomically)."""
        answer = await self._check(
            keys=self._quota_keys(tenant), args=self._quota_args(self.clock(), size)
        )
        if (refused := file_quota.over(int(answer), self.quota)) is not None:
            raise refused

    def _quota_keys(self, tenant: str) -> list[str]:
        return [
            self.keys.tenant_files(tenant),
            self.keys.tenant_file_sizes(tenant),
            self.keys.tenant_file_sweep(tenant),
        ]

    def _quota_args(self, now: float, size: int) -> list[str | int]:
        limits = [self.quota.max_files, self.quota.max_bytes]
        return [repr(now), self.ttl, size, *limits, self.keys.file_base(), self.sweep]

    async def get(self, tenant: str, file_id: str) -> FileObject | None:
        """The tenant's file; another tenant's is None, exactly like a missing one."""
        if not _FILE_ID.match(file_id):
            return None
        return (await self._read_many(tenant, [file_id]))[0]

    async def _read_many(self, tenant: str, file_ids: list[str]) -> list[FileObject | None]:
        pipe = self.redis.pipeline(transaction=False)
        for file_id in file_ids:
            pipe.hmget(self.keys.file(file_id), ["tenant", "object"])
        found: list[FileObject | None] = []
        for owner, raw in await pipe.execute():
            mine = owner is not None and raw is not None and owner.decode() == tenant
            found.append(FileObject.model_validate_json(raw) if mine else None)
        return found

    async def page(
        self,
        tenant: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
        order: str = "desc",
    ) -> tuple[list[FileObject], bool]:
        """The tenant's files by creation time (`desc`: newest first), `limit` at a time after
        the file `after` (`UnknownCursor` if it is not the tenant's); and whether more follow."""
        index, desc = self.keys.tenant_files(tenant), order == "desc"
        start = 0
        if after is not None:
            rank = await (self.redis.zrevrank if desc else self.redis.zrank)(index, after)
            if rank is None:
                raise UnknownCursor(after)
            start = rank + 1
        found: list[FileObject] = []
        async for item in self._walk(tenant, index, start, desc, min(limit + 1, _LIST_BATCH)):
            if purpose is None or item.purpose == purpose:
                found.append(item)
                if len(found) > limit:
                    break
        return found[:limit], len(found) > limit

    async def _walk(
        self, tenant: str, index: str, start: int, desc: bool, batch: int
    ) -> AsyncIterator[FileObject]:
        """The index's files from rank `start` on; expired ones leave the index as met."""
        seen: set[str] = set()  # a file created meanwhile shifts the ranks of a `desc` walk
        read = self.redis.zrevrange if desc else self.redis.zrange
        while True:
            ids = [m.decode() for m in await read(index, start, start + batch - 1)]
            files = await self._read_many(tenant, ids)
            gone = [file_id for file_id, item in zip(ids, files, strict=True) if item is None]
            if gone:  # expired: out of the index and the quota
                pipe = self.redis.pipeline(transaction=True)
                pipe.zrem(index, *gone)
                pipe.hdel(self.keys.tenant_file_sizes(tenant), *gone)
                await pipe.execute()
            for item in files:
                if item is not None and item.id not in seen:
                    seen.add(item.id)
                    yield item
            if len(ids) < batch:
                return
            start += len(ids) - len(gone)
            batch = _LIST_BATCH

    async def delete(self, tenant: str, file_id: str) -> bool:
        """Delete the tenant's file; False if there is none (or it is another tenant's)."""
        if await self.get(tenant, file_id) is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.file(file_id))
        pipe.unlink(self.keys.file_data(file_id))  # freed off Redis's main thread
        pipe.zrem(self.keys.tenant_files(tenant), file_id)
        pipe.hdel(self.keys.tenant_file_sizes(tenant), file_id)
        removed, *_ = await pipe.execute()
        return bool(removed)  # a concurrent delete got there first

    async def read(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, a piece (~1 MiB) at a time; ends early if it is deleted meanwhile."""
        key = self.keys.file_data(file_id)
        size, offset = await self.redis.strlen(key), 0
        while offset < size:
            piece: bytes = await self.redis.getrange(key, offset, min(offset + PIECE, size) - 1)
            if not piece:
                return
            yield piece
            offset += len(piece)

    async def lines(
        self, file_id: str, max_line: int | None = None
    ) -> AsyncIterator[tuple[int, bytes | LongLine]]:
        """(1-based number, line without `\\n` or `\\r\\n`), streaming; a last line without a
        newline counts, empty lines are yielded too. Only the line being read is held whole,
        and not even that past `max_line` bytes: such a line is a `LongLine`, its size only."""
        number, cut = 0, LineCutter(max_line)
        async for piece in self.read(file_id):
            for line in cut.feed(piece):
                number += 1
                yield number, line
        if (last := cut.rest()) is not None:
            yield number + 1, last
