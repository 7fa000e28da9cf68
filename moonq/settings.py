"""One settings class for every moonq process, read from the environment or `.env`."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MOONSHOT_BASE_URL = "https://api.moonshot.cn/v1"


class Settings(BaseSettings):
    """Every knob moonq has. The README's settings table lists the same names and defaults."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    redis_url: str = Field("redis://localhost:6379/0", alias="REDIS_URL")
    moonshot_api_key: SecretStr | None = Field(None, alias="MOONSHOT_API_KEY")
    moonshot_base_url: str = Field(DEFAULT_MOONSHOT_BASE_URL, alias="MOONSHOT_BASE_URL")
    api_keys: SecretStr = Field(SecretStr(""), alias="MOONQ_API_KEYS")
    stream_usage: bool = Field(False, alias="MOONQ_STREAM_USAGE")

    key_prefix: str = Field("moonq", alias="MOONQ_KEY_PREFIX")
    queue_name: str = Field("moonq:queue", alias="MOONQ_QUEUE_NAME")
    result_ttl: int = Field(7 * 24 * 3600, ge=60, alias="MOONQ_RESULT_TTL")
    max_events: int = Field(100_000, ge=100, alias="MOONQ_MAX_EVENTS")
    worker_concurrency: int = Field(50, ge=1, le=10_000, alias="MOONQ_WORKER_CONCURRENCY")
    poll_delay: float = Field(0.05, gt=0, le=5, alias="MOONQ_POLL_DELAY")
    job_timeout: int = Field(600, ge=1, alias="MOONQ_JOB_TIMEOUT")
    max_attempts: int = Field(5, ge=1, le=100, alias="MOONQ_MAX_ATTEMPTS")
    shutdown_grace: float = Field(30.0, ge=0, alias="MOONQ_SHUTDOWN_GRACE")
    lock_timeout: float = Field(5.0, ge=1, le=300, alias="MOONQ_LOCK_TIMEOUT")
    upstream_concurrency: int = Field(50, ge=0, alias="MOONQ_UPSTREAM_CONCURRENCY")
    upstream_rpm: int = Field(200, ge=0, alias="MOONQ_UPSTREAM_RPM")
    upstream_tpm: int = Field(128_000, ge=0, alias="MOONQ_UPSTREAM_TPM")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, alias="MOONQ_MAX_BODY_BYTES")
    retry_base_delay: float = Field(1.0, ge=0, alias="MOONQ_RETRY_BASE_DELAY")
    retry_max_delay: float = Field(60.0, ge=0, alias="MOONQ_RETRY_MAX_DELAY")
    connect_timeout: float = Field(10.0, gt=0, alias="MOONQ_CONNECT_TIMEOUT")
    read_timeout: float = Field(120.0, gt=0, alias="MOONQ_READ_TIMEOUT")
    redis_max_connections: int = Field(64, ge=2, alias="MOONQ_REDIS_MAX_CONNECTIONS")
    max_wait: float = Field(60.0, ge=0, alias="MOONQ_MAX_WAIT")

    @field_validator("moonshot_api_key")
    @classmethod
    def _blank_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    @field_validator("moonshot_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def tenants_by_key(self) -> dict[str, str]:
        """Parse `MOONQ_API_KEYS` (`key=tenant,key2=tenant2`); empty means an open API."""
        return parse_api_keys(self.api_keys.get_secret_value())

    @property
    def upstream_key(self) -> str:
        return self.moonshot_api_key.get_secret_value() if self.moonshot_api_key else ""


def parse_api_keys(raw: str) -> dict[str, str]:
    tenants: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, tenant = item.partition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            # Never echo the item: it holds a secret.
            raise ValueError("MOONQ_API_KEYS must look like 'key=tenant,key2=tenant2'")
        tenants[key] = tenant
    return tenants


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests build their own `Settings(...)` instead."""
    return Settings()
