"""The Files API on real Redis: uploads streamed into Redis and back byte for byte, tenants kept
apart, limits, listing pages, `FileStore.lines`, and the official OpenAI SDK against it."""

from __future__ import annotations

import asyncio
import json
import os
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import redis.exceptions
from arq.connections import ArqRedis

from moonq import files as files_module
from moonq.file_lines import LongLine
from moonq.file_quota import OverQuota, Quota
from moonq.files import FileObject, FileStore, FileTooLarge
from moonq.keys import Keys

MiB = 1024 * 1024


async def _upload(
    client: httpx.AsyncClient, data: bytes, name: str = "in.jsonl", **headers: str
) -> httpx.Response:
    return await client.post(
        "/v1/files", files={"file": (name, data)}, data={"purpose": "batch"}, headers=headers
    )


async def _file_keys(redis: ArqRedis, prefix: str) -> list[bytes]:
    return sorted(await redis.keys(f"{prefix}:file:*"))


async def test_round_trip_of_a_file_of_several_mib(
    real_stack: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    append = FileStore._append

    async def spy(self: FileStore, key: str, piece: bytes) -> None:
        writes.append(len(piece))
        await append(self, key, piece)

    monkeypatch.setattr(FileStore, "_append", spy)
    stack, client = await real_stack()
    data = os.urandom(3 * MiB + 123)
    created = await _upload(client, data, "requests.jsonl")
    assert created.status_code == 200, created.text
    found = created.json()
    assert found["id"].startswith("file-") and len(found["id"]) == 29
    assert found["object"] == "file" and found["purpose"] == "batch"
    assert found["bytes"] == len(data) and found["filename"] == "requests.jsonl"
    # written in pieces of about a MiB, never the whole file at once
    assert sum(writes) == len(data) and len(writes) >= 3 and max(writes) < 2 * MiB

    assert (await client.get(f"/v1/files/{found['id']}")).json() == found
    listed = (await client.get("/v1/files")).json()
    assert listed["object"] == "list" and listed["data"] == [found]
    assert listed["first_id"] == listed["last_id"] == found["id"] and not listed["has_more"]
    content = await client.get(f"/v1/files/{found['id']}/content")
    assert content.status_code == 200 and content.content == data
    pieces = [p async for p in stack.app.state.services.files.read(found["id"])]
    assert await stack.redis.ttl(f"{prefix}:file:{found['id']}:data") == -1  # kept until deleted
    assert len(pieces) == 4 and max(map(len, pieces)) <= MiB

    deleted = await client.delete(f"/v1/files/{found['id']}")
    assert deleted.json() == {"id": found["id"], "object": "file", "deleted": True}
    for path in (f"/v1/files/{found['id']}", f"/v1/files/{found['id']}/content"):
        gone = await client.get(path)
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert (await client.delete(f"/v1/files/{found['id']}")).status_code == 404
    assert (await client.get("/v1/files")).json()["data"] == []
    assert await _file_keys(stack.redis, prefix) == []


async def test_another_tenant_sees_nothing(real_stack: Any) -> None:
    _, client = await real_stack(MOONQ_API_KEYS="ka=team-a,kb=team-b")
    a, b = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
    assert (await _upload(client, b"x\n")).status_code == 401
    file_id = (await _upload(client, b'{"a": 1}\n', **a)).json()["id"]
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        answer = await client.get(path, headers=b)
        assert answer.status_code == 404 and file_id in answer.json()["error"]["message"]
    assert (await client.delete(f"/v1/files/{file_id}", headers=b)).status_code == 404
    assert (await client.get("/v1/files", headers=b)).json()["data"] == []
    after = await client.get("/v1/files", params={"after": file_id}, headers=b)
    assert after.status_code == 400
    assert (await client.get(f"/v1/files/{file_id}/content", headers=a)).content == b'{"a": 1}\n'


async def _chunked(data: bytes, piece: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


async def test_limits_of_an_upload(real_stack: Any, prefix: str) -> None:
    stack, client = await real_stack(MOONQ_MAX_FILE_BYTES=5000, MOONQ_MAX_BODY_BYTES=2048)
    too_large = await _upload(client, b"x" * 5001)
    assert too_large.status_code == 413
    assert "MOONQ_MAX_FILE_BYTES" in too_large.json()["error"]["message"]
    assert (await _upload(client, b"x" * 5000)).status_code == 200  # above MOONQ_MAX_BODY_BYTES

    # a body far over the limit is refused by its length, or while it streams in (chunked)
    huge = httpx.Request(
        "POST",
        "http://moonq/v1/files",
        files={"file": ("a", b"y" * 200_000)},
        data={"purpose": "batch"},
    )
    body = huge.read()
    for content in (body, _chunked(body)):
        answer = await client.post(
            "/v1/files", content=content, headers={"content-type": huge.headers["content-type"]}
        )
        assert answer.status_code == 413, answer.text
        assert "MOONQ_MAX_FILE_BYTES" in answer.json()["error"]["message"]
    # other routes keep their own limit
    job = await client.post(
        "/v1/jobs", content=b" " * 3000, headers={"content-type": "application/json"}
    )
    assert job.status_code == 413 and "MOONQ_MAX_BODY_BYTES" in job.json()["error"]["message"]
    assert len((await client.get("/v1/files")).json()["data"]) == 1
    assert len(await _file_keys(stack.redis, prefix)) == 2  # the one file: record and bytes


async def test_the_store_keeps_nothing_of_a_too_large_upload(
    real_redis: ArqRedis, prefix: str
) -> None:
    store = FileStore(real_redis, Keys(prefix), max_bytes=3 * MiB)
    with pytest.raises(FileTooLarge):
        await store.create("t", "batch", "big", _chunked(b"z" * (3 * MiB + 1), MiB // 2))
    assert await real_redis.keys(f"{prefix}:*") == []
    assert await store.page("t") == ([], False)


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        ({"file": ("a.jsonl", b"x")}, {"purpose": "fine-tune"}, "purpose"),
        ({"file": ("a.jsonl", b"x")}, {}, "purpose"),
        (None, {"purpose": "batch"}, "file"),
        ({"file": ("a.jsonl", b"")}, {"purpose": "batch"}, "file"),
        (None, {"purpose": "batch", "file": "not a file"}, "file"),
    ],
)
async def test_bad_uploads_are_400(
    real_stack: Any, prefix: str, files: Any, data: dict[str, str], param: str
) -> None:
    stack, client = await real_stack()
    answer = await client.post("/v1/files", files=files, data=data)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param == "purpose":
        assert "'batch'" in error["message"]
    assert await _file_keys(stack.redis, prefix) == []


async def test_a_json_body_is_400(real_stack: Any) -> None:
    _, client = await real_stack()
    answer = await client.post("/v1/files", json={"purpose": "batch"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "file"


async def _pages(client: httpx.AsyncClient, **params: Any) -> list[list[str]]:
    pages, after = [], None
    while True:
        query = {**params, **({"after": after} if after else {})}
        listed = (await client.get("/v1/files", params=query)).json()
        pages.append([f["id"] for f in listed["data"]])
        if not listed["has_more"]:
            return pages
        after = listed["last_id"]


async def test_listing_pages_in_both_orders(real_stack: Any) -> None:
    _, client = await real_stack()
    ids = [(await _upload(client, f"{i}\n".encode())).json()["id"] for i in range(5)]
    assert await _pages(client, limit=2) == [ids[:2:-1], ids[2:0:-1], ids[:1]]
    assert await _pages(client, limit=2, order="asc") == [ids[:2], ids[2:4], ids[4:]]
    assert await _pages(client, limit=5) == [ids[::-1]]
    assert await _pages(client, purpose="batch-output") == [[]]
    for bad in ({"limit": 0}, {"limit": 10_001}, {"order": "up"}):
        assert (await client.get("/v1/files", params=bad)).status_code == 422
    unknown = await client.get("/v1/files", params={"after": "file-" + "0" * 24})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_store_filters_by_purpose_and_keeps_time_order(
    real_redis: ArqRedis, prefix: str
) -> None:
    now = [1000.0]
    store = FileStore(real_redis, Keys(prefix), max_bytes=100, clock=lambda: now[0])
    made = []
    for i, purpose in enumerate(["batch", "other", "batch", "other", "batch"]):
        now[0] += 1
        made.append(await store.create("t", purpose, f"f{i}", _one(b"x")))
    batch_ids = [f.id for f in made if f.purpose == "batch"]
    first, more = await store.page("t", purpose="batch", limit=2, order="asc")
    assert [f.id for f in first] == batch_ids[:2] and more
    rest, more = await store.page("t", purpose="batch", after=first[-1].id, order="asc")
    assert [f.id for f in rest] == batch_ids[2:] and not more
    assert [f.created_at for f in made] == [1001, 1002, 1003, 1004, 1005]
    assert await store.get("someone-else", made[0].id) is None


async def test_with_a_ttl_files_expire(real_redis: ArqRedis, prefix: str) -> None:
    keys = Keys(prefix)
    store = FileStore(real_redis, keys, max_bytes=100, clock=lambda: 5000.5, ttl=60)
    found = await store.create("t", "batch", "a", _one(b"x\n"))
    assert found.created_at == 5000 and found.expires_at == 5060
    for key in (keys.file(found.id), keys.file_data(found.id), keys.tenant_files("t")):
        assert 0 < await real_redis.ttl(key) <= 60
    await real_redis.delete(keys.file(found.id))  # as if it expired
    assert await store.page("t") == ([], False)
    assert await real_redis.zcard(keys.tenant_files("t")) == 0  # the index forgot it
    assert await real_redis.hlen(keys.tenant_file_sizes("t")) == 0  # and so did the quota


async def _expire(redis: ArqRedis, keys: Keys, *files: FileObject) -> None:
    """As Redis expires a file: its record and bytes go, the index and quota stay."""
    await redis.delete(*[key for f in files for key in (keys.file(f.id), keys.file_data(f.id))])


async def test_switching_a_ttl_on_keeps_the_files_uploaded_before(
    real_redis: ArqRedis, prefix: str
) -> None:
    """Files uploaded without MOONQ_FILE_TTL are kept forever: a TTL switched on later (and
    shorter than their age) must leave them listed, counted and indexed."""
    keys, now = Keys(prefix), [1000.0]
    kept = FileStore(real_redis, keys, max_bytes=100, clock=lambda: now[0], quota=Quota(3, 100))
    old = []
    for i in range(2):
        now[0] += 1
        old.append(await kept.create("t", "batch", f"old{i}", _one(b"x" * 10)))
    now[0] += 3600
    expiring = FileStore(
        real_redis, keys, max_bytes=100, clock=lambda: now[0], ttl=60, quota=Quota(3, 100)
    )
    new = await expiring.create("t", "batch", "new", _one(b"y" * 10))
    assert [f.id for f in (await expiring.page("t"))[0]] == [new.id, old[1].id, old[0].id]
    with pytest.raises(OverQuota) as refused:  # the old files still count
        await expiring.create("t", "batch", "one-more", _one(b"z"))
    assert refused.value.setting == "MOONQ_TENANT_MAX_FILES"
    assert await real_redis.ttl(keys.file(old[0].id)) == -1
    for key in (keys.tenant_files("t"), keys.tenant_file_sizes("t")):
        assert await real_redis.ttl(key) == -1  # they outlive the new file: they list the old
    for f in old:
        assert await expiring.delete("t", f.id)
    await expiring.check_room("t", 1)  # no file without a TTL is left:
    for key in (keys.tenant_files("t"), keys.tenant_file_sizes("t")):
        assert 0 < await real_redis.ttl(key) <= 60  # the index goes with the last file


async def test_changing_the_ttl_orphans_and_double_counts_nothing(
    real_redis: ArqRedis, prefix: str
) -> None:
    """The TTL shortened, switched off, lengthened: each file lives as long as it was given,
    and is listed and counted exactly as long as it lives."""
    keys = Keys(prefix)

    def store(ttl: int) -> FileStore:
        return FileStore(real_redis, keys, max_bytes=100, ttl=ttl, quota=Quota(4, 100))

    long_lived = await store(3600).create("t", "batch", "a", _one(b"a"))
    await store(1).create("t", "batch", "b", _one(b"b"))  # shortened
    forever = await store(0).create("t", "batch", "c", _one(b"c"))  # switched off
    await store(1).create("t", "batch", "d", _one(b"d"))  # switched on again
    await asyncio.sleep(1.5)
    assert await store(1).check_room("t", 98) is None  # the two that expired count no more
    assert [f.id for f in (await store(0).page("t"))[0]] == [forever.id, long_lived.id]
    for n in range(2):
        await store(3600).create("t", "batch", f"new{n}", _one(b"n"))  # lengthened
    with pytest.raises(OverQuota):  # a, c and the two new ones: each counted once
        await store(3600).check_room("t", 1)
    assert await real_redis.hlen(keys.tenant_file_sizes("t")) == 4
    assert len((await store(0).page("t"))[0]) == 4


async def test_each_upload_looks_at_a_bounded_slice_of_the_index(
    real_redis: ArqRedis, prefix: str
) -> None:
    """Forgetting expired files costs each upload `sweep` lookups at most; successive uploads
    go on where the last one stopped, so every expired file is forgotten in time."""
    keys = Keys(prefix)
    store = FileStore(real_redis, keys, max_bytes=100, quota=Quota(10, 100))
    store.sweep = 2
    made = [await store.create("t", "batch", str(i), _one(b"x")) for i in range(5)]
    await _expire(real_redis, keys, made[0], made[4])
    await real_redis.delete(keys.tenant_file_sweep("t"))  # the uploads' looks start over
    counted = []
    for _ in range(3):
        await store.check_room("t", 1)
        counted.append(await real_redis.hlen(keys.tenant_file_sizes("t")))
    assert counted == [4, 4, 3]  # ranks 0-1 (one gone), 1-2, then 3: the last one gone


async def test_a_corrupt_size_stops_the_quota_before_any_write(
    real_redis: ArqRedis, prefix: str
) -> None:
    keys = Keys(prefix)
    store = FileStore(real_redis, keys, max_bytes=100)
    made = [await store.create("t", "batch", str(i), _one(b"x")) for i in range(2)]
    await _expire(real_redis, keys, made[0])
    await real_redis.hset(keys.tenant_file_sizes("t"), made[1].id, "many")
    with pytest.raises(redis.exceptions.ResponseError, match="is not a number"):
        await store.check_room("t", 1)
    assert await real_redis.zcard(keys.tenant_files("t")) == 2  # nothing was forgotten


async def test_a_tenant_at_its_file_limit_gets_a_409(real_stack: Any, prefix: str) -> None:
    stack, client = await real_stack(
        MOONQ_API_KEYS="ka=team-a,kb=team-b",
        MOONQ_TENANT_MAX_FILES=2,
        MOONQ_TENANT_MAX_FILE_BYTES=100,
    )
    a, b = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
    kept = [(await _upload(client, b"1\n", **a)).json()["id"] for _ in range(2)]
    refused = await _upload(client, b"3\n", **a)
    assert refused.status_code == 409, refused.text
    assert "MOONQ_TENANT_MAX_FILES" in refused.json()["error"]["message"]
    assert len(await _file_keys(stack.redis, prefix)) == 4  # nothing of the third was kept
    assert (await _upload(client, b"x" * 60, **b)).status_code == 200  # another tenant's room
    too_many_bytes = await _upload(client, b"y" * 41, **b)
    assert too_many_bytes.status_code == 409
    assert "MOONQ_TENANT_MAX_FILE_BYTES" in too_many_bytes.json()["error"]["message"]
    assert (await client.delete(f"/v1/files/{kept[0]}", headers=a)).status_code == 200
    assert (await _upload(client, b"3\n", **a)).status_code == 200  # deleting made room
    assert (await _upload(client, b"4\n", **a)).status_code == 409


async def test_the_quota_holds_when_the_bytes_are_published(
    real_redis: ArqRedis, prefix: str
) -> None:
    now = [1000.0]
    store = FileStore(
        real_redis, Keys(prefix), max_bytes=100, clock=lambda: now[0], ttl=60, quota=Quota(2, 10)
    )
    first = await store.create("t", "batch", "a", _one(b"x\n"))
    await store.check_room("t", 2)  # room for one more file...
    second = await store.create("t", "batch", "b", _one(b"y\n"))  # ...which this one takes
    with pytest.raises(OverQuota) as refused:  # so publishing the checked upload is refused
        await store.create("t", "batch", "c", _one(b"z\n"))
    assert refused.value.setting == "MOONQ_TENANT_MAX_FILES"
    assert {f.id for f in (await store.page("t"))[0]} == {first.id, second.id}
    assert len(await real_redis.keys(f"{prefix}:file:*")) == 4  # the refused bytes are gone
    await _expire(real_redis, Keys(prefix), first, second)  # gone: they no longer count
    await store.create("t", "batch", "c", _one(b"z" * 10))
    with pytest.raises(OverQuota) as refused:
        await store.check_room("t", 1)
    assert refused.value.setting == "MOONQ_TENANT_MAX_FILE_BYTES"
    with pytest.raises(OverQuota):
        await store.check_room("someone", 11)


async def test_lines_number_every_line_and_strip_crlf(
    real_redis: ArqRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(real_redis, Keys(prefix), max_bytes=MiB)
    text = b'{"a":1}\r\n\n{"b":2}\n  \r\n' + b"long" * 10 + b"\r\nlast"
    expected = [
        (1, b'{"a":1}'),
        (2, b""),
        (3, b'{"b":2}'),
        (4, b"  "),
        (5, b"long" * 10),
        (6, b"last"),
    ]
    found = await store.create("t", "batch", "a", _one(text))
    for piece in (MiB, 7, 1):  # pieces that split lines, and split "\r" from "\n"
        monkeypatch.setattr(files_module, "PIECE", piece)
        assert [x async for x in store.lines(found.id)] == expected
    ended = await store.create("t", "batch", "b", _one(b"one\r\ntwo\n"))
    assert [x async for x in store.lines(ended.id)] == [(1, b"one"), (2, b"two")]


async def test_lines_past_max_line_keep_only_their_size(
    real_redis: ArqRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(real_redis, Keys(prefix), max_bytes=MiB)
    text = b"ok\r\n" + b"x" * 10 + b"\r\n" + b"y" * 11 + b"\n" + b"z" * 9 + b"\r\nlast-one-long"
    found = await store.create("t", "batch", "a", _one(text))
    expected = [(1, b"ok"), (2, b"x" * 10), (3, LongLine(11)), (4, b"z" * 9), (5, LongLine(13))]
    for piece in (MiB, 7, 3, 1):  # pieces that split lines, and split "\r" from "\n"
        monkeypatch.setattr(files_module, "PIECE", piece)
        assert [x async for x in store.lines(found.id, max_line=10)] == expected


async def test_a_huge_line_fails_its_batch_without_being_held(real_stack: Any) -> None:
    _, client = await real_stack(MOONQ_MAX_BODY_BYTES=64 * 1024)
    size = 16 * MiB  # one line, 256 times MOONQ_MAX_BODY_BYTES
    body = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]}
    first = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    data = json.dumps(first).encode() + b"\n" + b"x" * size + b"\n"
    file_id = (await _upload(client, data)).json()["id"]
    tracemalloc.start()
    try:
        answer = await client.post(
            "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer.status_code == 200, answer.text
    batch = answer.json()
    assert batch["status"] == "failed"
    errors = batch["errors"]["data"]
    assert [(e["line"], e["code"]) for e in errors] == [(2, "line_too_large")]
    assert f"the line is {size} bytes" in errors[0]["message"]
    assert peak < size // 4, f"{peak} bytes at peak for a {size}-byte line"


async def test_the_openai_sdk_speaks_to_it(real_stack: Any) -> None:
    _, client = await real_stack()
    sdk = openai.AsyncOpenAI(
        api_key="unused", base_url="http://moonq/v1", http_client=client, max_retries=0
    )
    data = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    created = await sdk.files.create(file=("batch.jsonl", data), purpose="batch")
    assert created.bytes == len(data) and created.purpose == "batch"
    assert (await sdk.files.retrieve(created.id)).filename == "batch.jsonl"
    assert [f.id async for f in sdk.files.list(purpose="batch")] == [created.id]
    assert (await sdk.files.content(created.id)).content == data
    assert (await sdk.files.delete(created.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(created.id)
