"""The schema at /openapi.json tells the truth: schemathesis sends generated requests (and the
schema's own examples) to every operation of a real-Redis-backed app, with a real worker and
the fake upstream behind it, and checks that no answer is a 5xx and that every status, content
type and body is one the schema documents."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import APIRouter, FastAPI
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import openapi
from api.app import create_app
from api.auth import Tenant
from moonq.fake_moonshot import start_fake
from moonq.settings import Settings
from tests.conftest import cleanup_prefix, make_settings
from worker.main import create_worker

pytestmark = pytest.mark.redis

KEY = "key-openapi"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Cases per operation: the whole file stays within ~30 s on two cores.
EXAMPLES = 20


class Backing(threading.Thread):
    """The fake upstream and a worker on an event loop of their own, so that chat completions
    end: schemathesis's cases are synchronous and run the app on a loop of schemathesis's."""

    def __init__(self, settings_for: Callable[[str], Settings]) -> None:
        super().__init__(name="openapi-backing", daemon=True)
        self._settings_for = settings_for
        self.settings: Settings | None = None
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        fake = await start_fake()
        self.settings = self._settings_for(fake.url)
        worker = create_worker(self.settings, handle_signals=False)
        running = asyncio.create_task(worker.main())
        self.ready.set()
        try:
            await self._stopping.wait()
        finally:
            await worker.close()
            await asyncio.wait({running}, timeout=10)
            await fake.close()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(15)


@pytest.fixture(scope="module")
def app(real_redis_url: str) -> Iterator[FastAPI]:
    prefix = f"oa{uuid.uuid4().hex[:10]}"
    backing = Backing(
        lambda upstream: make_settings(
            real_redis_url, prefix, upstream, MOONQ_API_KEYS=f"{KEY}=openapi"
        )
    )
    backing.start()
    assert backing.ready.wait(15) and backing.settings is not None
    try:
        yield create_app(backing.settings)
    finally:
        shutdown_lifespans()
        backing.stop()
        cleanup_prefix(real_redis_url, prefix)


# Loaded at import, as schemathesis's pytest plugin needs (its lazy `from_fixture` breaks on
# pytest 9); the same routes as the app under test, which is passed to each call.
DOCUMENT = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: Any, app: FastAPI) -> None:
    case.call_and_validate(app=app, headers=AUTH, checks=CHECKS)


def test_docs_offer_the_bearer_scheme_and_every_error_shape(app: FastAPI) -> None:
    """/docs's "Authorize" sends the key; every error a route documents is the real shape."""
    document = app.openapi()
    assert document == DOCUMENT  # what schemathesis tests is what /docs shows
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/readyz":
                    found = response["content"]["application/json"]["schema"]
                    assert found == error, (method, path, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_a_wrong_key_gets_the_documented_401(app: FastAPI) -> None:
    case = schema["/v1/jobs"]["GET"].Case(headers={"Authorization": "Bearer not-a-key"})
    answer = case.call_and_validate(app=app, checks=CHECKS)
    assert answer.status_code == 401
    assert set(answer.json()["error"]) >= {"message", "type", "param", "code"}


def test_a_router_that_documents_nothing_still_shows_the_real_errors() -> None:
    """A new route, before its author adds `responses=`: 401 (it takes a key), 422 (it has a
    parameter) and 503 (it needs Redis), each in the real shape, not FastAPI's own."""
    bare = FastAPI()
    router = APIRouter()

    @router.get("/v1/things/{thing_id}")
    async def thing(thing_id: int, tenant: Tenant) -> dict[str, int]:
        return {"id": thing_id}

    bare.include_router(router)
    openapi.install(bare)
    responses = bare.openapi()["paths"]["/v1/things/{thing_id}"]["get"]["responses"]
    assert sorted(responses) == ["200", "401", "422", "503"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert all(
        responses[s]["content"]["application/json"]["schema"] == error
        for s in ("401", "422", "503")
    )
    assert "HTTPValidationError" not in bare.openapi()["components"]["schemas"]
