"""Settings refuse, at start, what would otherwise fail later (or for ever) at run time."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from moonq.settings import MOONSHOT_TIERS, Settings, is_loopback, redis_database


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def refusal(**values: Any) -> tuple[str, str]:
    """(the setting named, the message) of the one error `values` cause."""
    with pytest.raises(ValidationError) as caught:
        settings(**values)
    [error] = caught.value.errors(include_input=False, include_url=False)
    return str(error["loc"][0]), error["msg"]


@pytest.mark.parametrize(
    "url",
    [
        "localhost:6379",  # no scheme: today a traceback from uvicorn or arq
        "127.0.0.1:6379/0",
        "http://localhost:6379/0",
        "redis://localhost:6379/zero",
        "redis://localhost:63x9/0",
        "redis://localhost:6379/0?db=one",
        "redis:///0",
    ],
)
def test_a_malformed_redis_url_is_refused_by_name(url: str) -> None:
    name, message = refusal(REDIS_URL=url)
    assert name == "REDIS_URL" and "redis://" in message


def test_a_redis_url_error_never_echoes_its_password() -> None:
    name, message = refusal(REDIS_URL="redis://:hunter2@localhost:6379/x")
    assert name == "REDIS_URL" and "hunter2" not in message


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("redis://localhost:6379/0", 0),
        ("redis://localhost", 0),
        ("redis://:pw@redis:6379/13", 13),
        ("rediss://cache.example:6380/2", 2),
        ("redis://localhost:6379?db=5", 5),
        ("unix:///run/redis.sock", 0),
        ("unix:///run/redis.sock?db=3", 3),
    ],
)
def test_well_formed_redis_urls_are_accepted(url: str, database: int) -> None:
    assert settings(REDIS_URL=url).redis_url == url
    assert redis_database(url) == database


@pytest.mark.parametrize("url", ["api.moonshot.cn/v1", "ftp://api.moonshot.cn/v1", "https://"])
def test_an_upstream_url_without_http_is_refused_by_name(url: str) -> None:
    name, message = refusal(MOONSHOT_BASE_URL=url)
    assert name == "MOONSHOT_BASE_URL" and "http" in message


def test_an_upstream_url_keeps_its_path_without_the_trailing_slash() -> None:
    assert settings(MOONSHOT_BASE_URL="http://127.0.0.1:8001/v1/").moonshot_base_url == (
        "http://127.0.0.1:8001/v1"
    )


def test_a_repeated_api_key_is_refused_without_echoing_it() -> None:
    name, message = refusal(MOONQ_API_KEYS="sk-first=alpha, sk-again=beta,sk-first=gamma")
    assert name == "MOONQ_API_KEYS"
    assert "entry 3" in message and "sk-first" not in message and "sk-again" not in message


@pytest.mark.parametrize(
    ("name", "value", "where"),
    [
        ("MOONQ_API_KEYS", "sk-fine=alpha,sk-clé=beta", "entry 2's key holds a non-ASCII"),
        ("MOONQ_API_KEYS", "sk-two words=alpha", "entry 1's key holds whitespace"),
        ("MOONQ_ADMIN_KEYS", "sk-admin,sk-\x7fadmin", "entry 2 holds a control character"),
        ("MOONQ_ADMIN_KEYS", "sk-\u200badmin", "entry 1 holds a non-ASCII"),
        ("MOONQ_METRICS_KEY", "sk-métrics", "the key holds a non-ASCII"),
        ("MOONQ_METRICS_KEY", "sk-\tmetrics", "the key holds whitespace"),
    ],
)
def test_a_key_no_header_can_carry_is_refused_at_start_without_echoing_it(
    name: str, value: str, where: str
) -> None:
    """HTTP headers carry printable ASCII: such a key would be taken and never match."""
    with pytest.raises(ValidationError) as caught:
        settings(**{name: value})
    [error] = caught.value.errors(include_input=False, include_url=False)
    assert error["loc"] == (name,) and where in error["msg"]
    assert "Authorization header" in error["msg"]
    assert "sk-" not in str(caught.value)  # nor in a traceback's text


def test_keys_of_any_printable_ascii_are_taken() -> None:
    taken = settings(
        MOONQ_API_KEYS="sk-A1!#$%&'()*+-./:;<>?@[]^_`{|}~=alpha", MOONQ_ADMIN_KEYS="a~b"
    )
    assert taken.tenants_by_key() == {"sk-A1!#$%&'()*+-./:;<>?@[]^_`{|}~": "alpha"}
    assert taken.admin_key_list() == ["a~b"]


def test_a_metrics_key_of_whitespace_alone_is_refused() -> None:
    """It could never match (the token is stripped); empty stays the documented open."""
    name, message = refusal(MOONQ_METRICS_KEY="  ")
    assert name == "MOONQ_METRICS_KEY" and "only whitespace" in message


def test_distinct_api_keys_map_to_their_tenants() -> None:
    keys = settings(MOONQ_API_KEYS="k1=alpha,k2=alpha").tenants_by_key()
    assert keys == {"k1": "alpha", "k2": "alpha"}


@pytest.mark.parametrize(
    ("base_url", "local"),
    [
        ("http://127.0.0.1:8001/v1", True),
        ("http://127.9.9.9:8001/v1", True),
        ("http://localhost:11434/v1", True),
        ("http://[::1]:8001/v1", True),
        ("https://api.moonshot.cn/v1", False),
        ("http://10.0.0.5:8001/v1", False),
        ("http://localhost.example.com/v1", False),
        ("http://0.0.0.0:8001/v1", False),
    ],
)
def test_only_a_loopback_upstream_counts_as_local(base_url: str, local: bool) -> None:
    assert settings(MOONSHOT_BASE_URL=base_url).upstream_is_local is local


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("::", False)],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_open_api_is_not_allowed_by_default() -> None:
    assert settings().allow_open is False
    assert settings(MOONQ_ALLOW_OPEN="true").allow_open is True


@pytest.mark.parametrize("tier", sorted(MOONSHOT_TIERS))
def test_the_tier_sets_the_upstream_limits(tier: int) -> None:
    chosen = settings(MOONQ_MOONSHOT_TIER=tier)
    limits = (chosen.upstream_concurrency, chosen.upstream_rpm, chosen.upstream_tpm)
    assert limits == MOONSHOT_TIERS[tier]


def test_the_default_tier_is_moonshots_first_paid_one() -> None:
    default = settings()
    assert default.moonshot_tier == 1
    assert (default.upstream_concurrency, default.upstream_rpm, default.upstream_tpm) == (
        50,
        200,
        2_000_000,
    )


def test_each_explicit_limit_overrides_its_tier_value_alone() -> None:
    chosen = settings(MOONQ_MOONSHOT_TIER=3, MOONQ_UPSTREAM_RPM=0, MOONQ_UPSTREAM_TPM="1234")
    assert chosen.upstream_concurrency == MOONSHOT_TIERS[3][0]  # the tier's
    assert chosen.upstream_rpm == 0  # off, as set
    assert chosen.upstream_tpm == 1234


def test_the_limits_come_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONQ_MOONSHOT_TIER", "0")
    monkeypatch.setenv("MOONQ_UPSTREAM_CONCURRENCY", "7")
    chosen = settings()
    assert (chosen.upstream_concurrency, chosen.upstream_rpm, chosen.upstream_tpm) == (
        7,
        *MOONSHOT_TIERS[0][1:],
    )


@pytest.mark.parametrize("tier", [-1, 6, 100])
def test_a_tier_moonshot_does_not_have_is_refused_by_name(tier: int) -> None:
    name, message = refusal(MOONQ_MOONSHOT_TIER=tier)
    assert name == "MOONQ_MOONSHOT_TIER" and "0 to 5" in message


def test_the_queue_is_under_the_key_prefix_unless_named() -> None:
    """Deployments with their own MOONQ_KEY_PREFIX on one Redis database must not share a
    queue: a worker of one would take the other's jobs and find no record for them."""
    assert settings().queue_name == "moonq:queue"  # where it always was
    assert settings(MOONQ_KEY_PREFIX="team-b").queue_name == "team-b:queue"
    named = settings(MOONQ_KEY_PREFIX="team-b", MOONQ_QUEUE_NAME="shared")
    assert named.queue_name == "shared"


@pytest.mark.parametrize("name", ["MOONQ_RESULT_TTL", "MOONQ_FILE_TTL"])
def test_a_ttl_redis_could_not_take_is_refused_at_start(name: str) -> None:
    """EXPIRE refuses a TTL past Redis's range: in the middle of a job's end, or of every
    upload, were it let through."""
    field, message = refusal(**{name: str(10**20)})
    assert field == name and "less than or equal" in message
    assert settings(**{name: str(100 * 365 * 24 * 3600)})  # a century is fine
