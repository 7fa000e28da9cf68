"""What routes need, built once per process in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from moonq.budgets import Budgets
from moonq.files import FileStore
from moonq.keys import Keys
from moonq.settings import Settings
from moonq.store import JobStore
from moonq.stream import EventHub
from moonq.usage import UsageLedger


@dataclass
class Services:
    settings: Settings
    redis: Redis
    store: JobStore
    hub: EventHub
    tenants: dict[str, str]
    files: FileStore
    ledger: UsageLedger
    budgets: Budgets

    @property
    def keys(self) -> Keys:
        return self.store.keys


def services(request: HTTPConnection) -> Services:
    found: Services = request.app.state.services
    return found
