"""moonq: a Redis job queue for Moonshot (Kimi) and other OpenAI-compatible chat APIs.

`Client` and `AsyncClient` talk to a running moonq server; see moonq/client.py.
"""

from moonq.batch_models import Batch, BatchList
from moonq.client import AsyncClient, Client
from moonq.client_errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    ConfigurationError,
    Conflict,
    ConnectionError,
    InvalidResponse,
    MoonqError,
    NotFound,
    PermissionDenied,
    RateLimited,
    Redirected,
    RouteNotFound,
    ServerError,
    StreamDropped,
    Timeout,
    WaitTimeout,
)
from moonq.client_events import Event
from moonq.files import FileObject
from moonq.models import Job, JobList, Status
from moonq.usage_models import UsageReport

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Batch",
    "BatchList",
    "Client",
    "ConfigurationError",
    "Conflict",
    "ConnectionError",
    "Event",
    "FileObject",
    "InvalidResponse",
    "Job",
    "JobList",
    "MoonqError",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "Redirected",
    "RouteNotFound",
    "ServerError",
    "Status",
    "StreamDropped",
    "Timeout",
    "UsageReport",
    "WaitTimeout",
]
