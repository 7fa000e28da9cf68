"""Logging for every moonq process: text or JSON lines (MOONQ_LOG_FORMAT), the running job's
id, tenant and attempt on every line logged while it runs, and secrets never written.

The job's fields travel in a context variable set where the job starts (worker/jobs.py), so
tasks the job starts (its event writes, its lock keeper) carry them too; a handler filter
adds them to each record. Per-request access lines are off unless MOONQ_ACCESS_LOG: at load
they cost more CPU than the requests they describe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from moonq.redis_clock import FAIR_TOP
from moonq.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Shorter values are not redacted: replacing them everywhere would garble every line.
MIN_SECRET = 8
REDACTED = "***"


@dataclass
class JobContext:
    """What every line logged while a job runs says about it."""

    job_id: str
    tenant: str | None = None
    attempt: int | None = None
    active: bool = True


_job: ContextVar[JobContext | None] = ContextVar("moonq_job", default=None)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[JobContext]:
    """Lines logged inside (and in tasks started inside) name the job; nesting for the same
    job reuses its context. On exit the context goes quiet, also in tasks that outlive it."""
    current = _job.get()
    if current is not None and current.active and current.job_id == job_id:
        yield current
        return
    context = JobContext(job_id)
    token = _job.set(context)
    try:
        yield context
    finally:
        context.active = False
        _job.reset(token)


def bind(*, tenant: str | None = None, attempt: int | None = None) -> None:
    """Add what became known about the running job (its tenant, then its attempt)."""
    context = _job.get()
    if context is None or not context.active:
        return
    if tenant is not None:
        context.tenant = tenant
    if attempt is not None:
        context.attempt = attempt


# arq's line as a job starts, whose last argument may say how long the job was due.
_ARQ_START = "%6.2fs → %s(%s)%s"
_DELAYED = re.compile(r" delayed=(\d+(?:\.\d+)?)s")


class JobFilter(logging.Filter):
    """Puts the running job's fields on each record (`job_id`, `tenant`, `attempt`); and drops
    the "delayed=" of arq's start line for a job scored by its turn, not a time (see
    `moonq.redis_clock`): arq reads every queue score as a time, and the line said the job had
    been due for decades."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _ARQ_START and isinstance(record.args, tuple) and len(record.args) == 4:
            extra = record.args[3]
            found = _DELAYED.search(extra) if isinstance(extra, str) else None
            # due for longer than since FAIR_TOP's instant: its score was no time
            if found and float(found.group(1)) * 1000 > record.created * 1000 - FAIR_TOP:
                record.args = (*record.args[:3], found.string.replace(found.group(0), ""))
        context = _job.get()
        if context is not None and context.active:
            record.job_id = context.job_id
            record.tenant = context.tenant
            record.attempt = context.attempt
        return True


class Formatter(logging.Formatter):
    """Text or JSON lines, with every known secret replaced by `***` (defence in depth:
    nothing is meant to log one)."""

    def __init__(self, style_name: str = "text", secrets: Iterable[str] = ()) -> None:
        super().__init__(TEXT_FORMAT)
        self.json = style_name == "json"
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        if self.json:
            return json.dumps(self._fields(record), ensure_ascii=False, default=str)
        return self.redact(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The text line, the job's fields at its end (before any traceback)."""
        line = super().formatMessage(record)
        job = _job_fields(record)
        return line + "".join(f" {k}={v}" for k, v in job.items()) if job else line

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
            **_job_fields(record),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = self.redact(record.exc_text)
        if record.stack_info:
            out["stack"] = self.redact(self.formatStack(record.stack_info))
        return out


def _job_fields(record: logging.LogRecord) -> dict[str, Any]:
    job_id = getattr(record, "job_id", None)
    if job_id is None:
        return {}
    fields: dict[str, Any] = {"job_id": job_id}
    for name in ("tenant", "attempt"):
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    return fields


def secrets_of(settings: Settings) -> list[str]:
    """Every secret a process knows: the upstream key, the API and admin keys, the metrics
    key, and the Redis password."""
    found = [settings.upstream_key, *settings.tenants_by_key(), *settings.admin_key_list()]
    if settings.metrics_key is not None:
        found.append(settings.metrics_key.get_secret_value())
    with contextlib.suppress(ValueError):
        found.append(urlsplit(settings.redis_url).password or "")
    return [s for s in found if s]


def config(settings: Settings, *, verbose: bool = False) -> dict[str, Any]:
    """A `logging.config.dictConfig` for api, worker and dev (uvicorn takes it as its
    `log_config`, so each of its worker processes applies it too)."""
    level = "DEBUG" if verbose else "INFO"
    quiet = "DEBUG" if verbose else "WARNING"
    formatter = {
        "()": "moonq.logs.Formatter",
        "style_name": settings.log_format,
        "secrets": secrets_of(settings),
    }
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "moonq",
        "filters": ["job"],
        "stream": "ext://sys.stderr",
    }
    # uvicorn and arq log through the root handler; uvicorn's own config would add theirs.
    loggers = {name: {"level": level, "handlers": [], "propagate": True} for name in _OURS}
    loggers |= {name: {"level": quiet} for name in ("httpx", "httpcore", "aiohttp")}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"job": {"()": "moonq.logs.JobFilter"}},
        "formatters": {"moonq": formatter},
        "handlers": {"moonq": handler},
        "root": {"level": level, "handlers": ["moonq"]},
        "loggers": loggers,
    }


_OURS = ("moonq", "arq", "uvicorn", "uvicorn.error", "uvicorn.access")
