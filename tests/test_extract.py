"""`purpose=file-extract` uploads proxied to the (fake) upstream with the server's key: only the
uploading tenant reads or deletes them, and upstream failures never leak the key."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import openai

from moonq.fake_moonshot import FakeServer

UPSTREAM_KEY = "sk-test-upstream-key"  # what tests.conftest.make_settings gives the API
A, B = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
DOCUMENT = "Quarterly report — revenue rose.\n".encode()


async def _extract(client: httpx.AsyncClient, data: bytes, **headers: str) -> httpx.Response:
    return await client.post(
        "/v1/files",
        files={"file": ("report.txt", data, "text/plain")},
        data={"purpose": "file-extract"},
        headers=headers,
    )


async def test_extract_round_trip_for_the_owner_only(real_stack: Any, fake: FakeServer) -> None:
    fake.config.api_key = UPSTREAM_KEY  # the fake refuses any other key
    _, client = await real_stack(MOONQ_API_KEYS="ka=team-a,kb=team-b")
    created = await _extract(client, DOCUMENT, **A)
    assert created.status_code == 200, created.text
    found = created.json()
    assert found["purpose"] == "file-extract" and found["bytes"] == len(DOCUMENT)
    assert not found["id"].startswith("file-")  # the upstream's id
    file_id = found["id"]

    content = await client.get(f"/v1/files/{file_id}/content", headers=A)
    assert content.status_code == 200
    assert content.json()["content"] == DOCUMENT.decode()
    assert content.json()["filename"] == "report.txt"
    assert (await client.get(f"/v1/files/{file_id}", headers=A)).json()["id"] == file_id

    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert (await client.get(path, headers=B)).status_code == 404
    assert (await client.delete(f"/v1/files/{file_id}", headers=B)).status_code == 404
    assert (await client.get("/v1/files", headers=A)).json()["data"] == []  # not a moonq file

    deleted = await client.delete(f"/v1/files/{file_id}", headers=A)
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert (await client.get(f"/v1/files/{file_id}/content", headers=A)).status_code == 404
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}) as raw:
        assert (await raw.get(f"{fake.url}/files")).json()["data"] == []  # gone upstream too


async def test_the_openai_sdk_extracts_through_moonq(real_stack: Any) -> None:
    _, client = await real_stack()
    sdk = openai.AsyncOpenAI(
        api_key="unused", base_url="http://moonq/v1", http_client=client, max_retries=0
    )
    created = await sdk.files.create(file=("a.txt", b"hello, document"), purpose="file-extract")  # type: ignore[arg-type]
    text = (await sdk.files.content(created.id)).json()["content"]
    assert text == "hello, document"
    assert (await sdk.files.delete(created.id)).deleted is True


async def test_a_refused_key_is_a_502_that_does_not_show_it(
    real_stack: Any, fake: FakeServer
) -> None:
    fake.config.api_key = "sk-another-key"
    stack, client = await real_stack()
    answer = await _extract(client, DOCUMENT)
    assert answer.status_code == 502 and answer.json()["error"]["type"] == "upstream_error"
    assert UPSTREAM_KEY not in answer.text
    assert await stack.redis.keys(f"{stack.settings.key_prefix}:*") == []


async def test_a_refused_document_keeps_the_upstreams_4xx(real_stack: Any) -> None:
    stack, client = await real_stack()
    answer = await client.post(
        "/v1/files", files={"file": ("tool.exe", b"MZ")}, data={"purpose": "file-extract"}
    )
    assert answer.status_code == 400
    assert "unsupported file type" in answer.json()["error"]["message"]
    assert await stack.redis.keys(f"{stack.settings.key_prefix}:*") == []
    empty = await _extract(client, b"")
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "file"


async def test_an_unreachable_upstream_is_a_502(real_stack: Any) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, client = await real_stack(MOONSHOT_BASE_URL=f"http://127.0.0.1:{port}/v1")
    answer = await _extract(client, DOCUMENT)
    assert answer.status_code == 502 and answer.json()["error"]["type"] == "upstream_error"
