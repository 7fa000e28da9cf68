"""One settings class for every moonq process, read from the environment or `.env`."""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from typing import Annotated, Any, Self
from urllib.parse import SplitResult, parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from moonq.budgets import Budget
from moonq.prices import Price

DEFAULT_MOONSHOT_BASE_URL = "https://api.moonshot.cn/v1"

# Moonshot's account limits by tier (cumulative recharge): concurrency, RPM, TPM.
MOONSHOT_TIERS: dict[int, tuple[int, int, int]] = {
    0: (1, 3, 500_000),
    1: (50, 200, 2_000_000),
    2: (100, 500, 3_000_000),
    3: (200, 5_000, 3_000_000),
    4: (400, 5_000, 4_000_000),
    5: (1_000, 10_000, 5_000_000),
}
DEFAULT_TIER = 1
_LIMITS = ("upstream_concurrency", "upstream_rpm", "upstream_tpm")


# The longest a Redis key may be kept for (a TTL): any more is no TTL at all in practice, and
# past Redis's range EXPIRE would refuse it in the middle of a job's end.
CENTURY = 100 * 365 * 24 * 3600


class Settings(BaseSettings):
    """Every knob moonq has. The README's settings table lists the same names and defaults."""

    # Hidden inputs: a traceback (`arq worker.main.WorkerSettings`, `uvicorn --factory`) must
    # not print a key or a Redis password it refused.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    redis_url: str = Field("redis://localhost:6379/0", alias="REDIS_URL")
    moonshot_api_key: SecretStr | None = Field(None, alias="MOONSHOT_API_KEY")
    moonshot_base_url: str = Field(DEFAULT_MOONSHOT_BASE_URL, alias="MOONSHOT_BASE_URL")
    api_keys: SecretStr = Field(SecretStr(""), alias="MOONQ_API_KEYS")
    admin_keys: SecretStr = Field(SecretStr(""), alias="MOONQ_ADMIN_KEYS")
    stream_usage: bool = Field(False, alias="MOONQ_STREAM_USAGE")
    allow_open: bool = Field(False, alias="MOONQ_ALLOW_OPEN")

    key_prefix: str = Field("moonq", alias="MOONQ_KEY_PREFIX")
    queue_name: str = Field("", alias="MOONQ_QUEUE_NAME")  # unset: under MOONQ_KEY_PREFIX
    result_ttl: int = Field(7 * 24 * 3600, ge=60, le=CENTURY, alias="MOONQ_RESULT_TTL")
    max_events: int = Field(100_000, ge=100, alias="MOONQ_MAX_EVENTS")
    worker_concurrency: int = Field(50, ge=1, le=10_000, alias="MOONQ_WORKER_CONCURRENCY")
    poll_delay: float = Field(0.5, gt=0, le=5, alias="MOONQ_POLL_DELAY")
    job_timeout: int = Field(600, ge=1, alias="MOONQ_JOB_TIMEOUT")
    max_attempts: int = Field(5, ge=1, le=100, alias="MOONQ_MAX_ATTEMPTS")
    shutdown_grace: float = Field(30.0, ge=0, alias="MOONQ_SHUTDOWN_GRACE")
    lock_timeout: float = Field(5.0, ge=1, le=300, alias="MOONQ_LOCK_TIMEOUT")
    moonshot_tier: int = Field(DEFAULT_TIER, alias="MOONQ_MOONSHOT_TIER")
    # The tier's limits unless set (each on its own; 0 = off); the defaults shown are tier 1's.
    upstream_concurrency: int = Field(
        MOONSHOT_TIERS[DEFAULT_TIER][0], ge=0, alias="MOONQ_UPSTREAM_CONCURRENCY"
    )
    upstream_rpm: int = Field(MOONSHOT_TIERS[DEFAULT_TIER][1], ge=0, alias="MOONQ_UPSTREAM_RPM")
    upstream_tpm: int = Field(MOONSHOT_TIERS[DEFAULT_TIER][2], ge=0, alias="MOONQ_UPSTREAM_TPM")
    balance_check_min: float = Field(5.0, gt=0, alias="MOONQ_BALANCE_CHECK_MIN")
    balance_check_max: float = Field(300.0, gt=0, alias="MOONQ_BALANCE_CHECK_MAX")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, alias="MOONQ_MAX_BODY_BYTES")
    # A Redis string holds at most 512 MiB (proto-max-bulk-len): a file's bytes are one string.
    max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1, le=512 * 1024 * 1024, alias="MOONQ_MAX_FILE_BYTES"
    )
    file_ttl: int = Field(0, ge=0, le=CENTURY, alias="MOONQ_FILE_TTL")
    # Moonshot's own per-account file limits: 1,000 files, 10 GiB in all.
    tenant_max_files: int = Field(1000, ge=1, alias="MOONQ_TENANT_MAX_FILES")
    tenant_max_file_bytes: int = Field(10 * 1024**3, ge=1, alias="MOONQ_TENANT_MAX_FILE_BYTES")
    batch_max_lines: int = Field(50_000, ge=1, alias="MOONQ_BATCH_MAX_LINES")
    retry_base_delay: float = Field(1.0, ge=0, alias="MOONQ_RETRY_BASE_DELAY")
    retry_max_delay: float = Field(60.0, ge=0, alias="MOONQ_RETRY_MAX_DELAY")
    connect_timeout: float = Field(10.0, gt=0, alias="MOONQ_CONNECT_TIMEOUT")
    read_timeout: float = Field(120.0, gt=0, alias="MOONQ_READ_TIMEOUT")
    redis_max_connections: int = Field(64, ge=2, alias="MOONQ_REDIS_MAX_CONNECTIONS")
    # Sentinel: REDIS_URL then gives only the database and credentials; the master's address
    # is asked of these, so every process follows a failover.
    redis_sentinels: str | None = Field(None, alias="MOONQ_REDIS_SENTINELS")
    redis_sentinel_master: str = Field(
        "mymaster", min_length=1, max_length=256, alias="MOONQ_REDIS_SENTINEL_MASTER"
    )
    api_workers: int = Field(1, ge=1, le=256, alias="MOONQ_API_WORKERS")
    max_wait: float = Field(60.0, ge=0, alias="MOONQ_MAX_WAIT")
    log_format: str = Field("text", pattern="^(text|json)$", alias="MOONQ_LOG_FORMAT")
    access_log: bool = Field(False, alias="MOONQ_ACCESS_LOG")
    metrics_key: SecretStr | None = Field(None, alias="MOONQ_METRICS_KEY")
    usage_retention_days: int = Field(400, ge=1, le=36_500, alias="MOONQ_USAGE_RETENTION_DAYS")
    # NoDecode: the validator below parses the JSON, so a mistake is named, not a traceback.
    prices: Annotated[dict[str, Price], NoDecode] = Field({}, alias="MOONQ_PRICES")
    price_currency: str = Field("USD", min_length=1, max_length=8, alias="MOONQ_PRICE_CURRENCY")
    budgets: Annotated[dict[str, Budget], NoDecode] = Field({}, alias="MOONQ_BUDGETS")

    @field_validator("prices", "budgets", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """A JSON object, from the environment or given as text (`Settings(MOONQ_BUDGETS=...)`)."""
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a JSON object: {exc.msg} at char {exc.pos}") from exc
        return value

    @field_validator("moonshot_tier")
    @classmethod
    def _check_tier(cls, value: int) -> int:
        if value not in MOONSHOT_TIERS:
            raise ValueError(
                f"must be Moonshot's account tier, 0 to {max(MOONSHOT_TIERS)} (README: Account "
                "and limits); set MOONQ_UPSTREAM_* to set the limits yourself"
            )
        return value

    @model_validator(mode="after")
    def _limits_from_tier(self) -> Self:
        """Each upstream limit not set explicitly is the tier's, so they match the account."""
        for name, value in zip(_LIMITS, MOONSHOT_TIERS[self.moonshot_tier], strict=True):
            if name not in self.model_fields_set:
                setattr(self, name, value)
        return self

    @model_validator(mode="after")
    def _queue_under_prefix(self) -> Self:
        """Two deployments with their own prefixes on one Redis database must not share a
        queue: a worker of one would take the other's jobs and find no record for them."""
        if not self.queue_name:
            self.queue_name = f"{self.key_prefix}:queue"
        return self

    @model_validator(mode="after")
    def _check_admin_keys(self) -> Self:
        """An admin key that is also a tenant's key would make whoever holds it both."""
        admin = self.admin_key_list()
        if set(admin) & set(self.tenants_by_key()):
            raise ValueError("MOONQ_ADMIN_KEYS repeats a key of MOONQ_API_KEYS: use another one")
        return self

    @field_validator("moonshot_api_key")
    @classmethod
    def _blank_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    @field_validator("admin_keys")
    @classmethod
    def _check_admin_key_chars(cls, value: SecretStr) -> SecretStr:
        parse_admin_keys(value.get_secret_value())
        return value

    @field_validator("metrics_key")
    @classmethod
    def _check_metrics_key(cls, value: SecretStr | None) -> SecretStr | None:
        """Stripped, as the token it is compared with is: a key pasted with its line ending
        would otherwise lock /metrics for good. Empty is unset (an open /metrics)."""
        if value is None:
            return None
        raw = value.get_secret_value()
        if raw and not raw.strip():
            raise ValueError(
                "is only whitespace: give a key, or leave it empty for an open /metrics"
            )
        check_sendable(raw.strip(), "the key")
        return SecretStr(raw.strip())

    @field_validator("moonshot_base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL, e.g. https://api.moonshot.cn/v1")
        return value.strip().rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        redis_database(value)
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str | None) -> str | None:
        sentinel_addresses(value or "")
        return value

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """`MOONQ_REDIS_SENTINELS` as (host, port) pairs; empty: connect to REDIS_URL itself."""
        return sentinel_addresses(self.redis_sentinels or "")

    @property
    def upstream_is_local(self) -> bool:
        """The upstream is on this machine (a loopback address): a worker may call it keyless."""
        return is_loopback(urlsplit(self.moonshot_base_url).hostname or "")

    def tenants_by_key(self) -> dict[str, str]:
        """Parse `MOONQ_API_KEYS` (`key=tenant,key2=tenant2`); empty means an open API."""
        return parse_api_keys(self.api_keys.get_secret_value())

    def admin_key_list(self) -> list[str]:
        """`MOONQ_ADMIN_KEYS` (`key,key2`): keys that see every tenant in the dashboard."""
        return parse_admin_keys(self.admin_keys.get_secret_value())

    @property
    def upstream_key(self) -> str:
        return self.moonshot_api_key.get_secret_value() if self.moonshot_api_key else ""


def parse_api_keys(raw: str) -> dict[str, str]:
    """Errors never echo an item: each holds a secret. They say where it is instead."""
    tenants: dict[str, str] = {}
    items = filter(None, (part.strip() for part in raw.split(",")))
    for number, item in enumerate(items, start=1):
        key, sep, tenant = item.partition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise ValueError("MOONQ_API_KEYS must look like 'key=tenant,key2=tenant2'")
        check_sendable(key, f"entry {number}'s key")
        if key in tenants:
            # A repeated key would silently belong to only one of its tenants.
            raise ValueError(f"entry {number} repeats the key of an earlier entry")
        tenants[key] = tenant
    return tenants


def parse_admin_keys(raw: str) -> list[str]:
    """`key,key2`; as `parse_api_keys`, an error names the entry, never the key."""
    keys = [key for key in (part.strip() for part in raw.split(",")) if key]
    for number, key in enumerate(keys, start=1):
        check_sendable(key, f"entry {number}")
    return keys


def check_sendable(key: str, where: str) -> None:
    """A bearer key arrives in an HTTP header, which carries printable ASCII: a key holding a
    space, a control or a non-ASCII character is read at start but could never match. The
    error says where the character is and what kind it is, never the key."""
    for position, char in enumerate(key, start=1):
        if not "!" <= char <= "~":
            raise ValueError(
                f"{where} holds {_kind(char)} at character {position}: a key is sent in an"
                " Authorization header, which carries only printable ASCII without spaces,"
                " so this key could never be accepted"
            )


def _kind(char: str) -> str:
    if char.isspace():
        return "whitespace"
    return "a control character" if char.isascii() else "a non-ASCII character"


def redis_database(url: str) -> int:
    """The database a Redis URL names, checked the way arq and redis-py will read it.

    Whether that database exists only Redis can say (`databases` in its config): `moonq api`
    and `moonq worker` ask it at start. The errors never echo the URL: it may hold a password.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            "must start with redis://, rediss:// or unix:// (e.g. redis://localhost:6379/0)"
        )
    if parts.scheme != "unix" and not (parts.hostname and _valid_port(parts)):
        raise ValueError("must name a host and, optionally, a numeric port: redis://host:6379/0")
    query_db = parse_qs(parts.query).get("db")
    path_db = parts.path.strip("/") if parts.scheme != "unix" else ""
    database = query_db[0] if query_db else path_db or "0"
    if not database.isdigit():
        raise ValueError("the database must be a number >= 0, as in redis://localhost:6379/0")
    return int(database)


def sentinel_addresses(raw: str) -> list[tuple[str, int]]:
    """Parse `host:port,host:port` (`[::1]:26379` for IPv6); the port is required."""
    addresses = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"must list sentinels as host:port,host:port (entry {item[:64]!r} is not)"
            )
        addresses.append((host, int(port)))
    return addresses


def _valid_port(parts: SplitResult) -> bool:
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1): reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests build their own `Settings(...)` instead."""
    return Settings()
