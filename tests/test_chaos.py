"""A small run of the fault suite (`make chaos` runs the full one): real processes, injected
upstream faults, absurd usage, workers SIGKILLed and stalled mid-stream; nothing lost,
duplicated or wrong, and every disruption asked for made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import Config, run

pytestmark = pytest.mark.e2e


@pytest.mark.slow  # half a minute; `make chaos` runs it, and the full 500-job suite
@pytest.mark.timeout(150)  # `timeout` below, plus starting and checking
def test_small_chaos_run(real_redis_url: str, tmp_path: Path) -> None:
    config = Config(
        jobs=120,
        kills=2,
        stalls=1,  # SIGSTOP past the lock timeout, then SIGCONT
        handbacks=0,  # `make chaos` does those
        absurd=2,
        kill_every=(1.0, 2.0),
        limit=6,
        rpm=1000,  # on, not binding: the limiter's minute window runs under kills and stalls
        tpm=200_000,
        lock_timeout=3.0,
        timeout=75,  # ~25 s when all is well
        seed=11,
        redis_url=real_redis_url,
    )
    report = run(config, tmp_path)
    print(report.table())
    print(report.outcomes, report.wrong[:10], report.no_ttl[:10])
    assert (report.kills, report.stalls) == (config.kills, config.stalls), report.table()
    assert report.lost == 0 and report.duplicated == 0, (report.table(), report.outcomes)
    assert report.wrong == []
    assert report.no_ttl == []
    assert report.peak <= config.limit + report.frozen  # a frozen worker's streams stay open
    assert report.peak >= 2  # the limiter limits, it does not serialise
    assert report.rpm_peak <= config.rpm
    # A killed job runs again once its lock lapses, as soon as it gets an upstream permit; a
    # kill that lands while a stalled worker still holds permits (they lapse after the lock
    # timeout too) can wait for both. The kill alone is bounded in test_faults.
    assert report.recoveries and max(report.recoveries) < 2 * config.lock_timeout + 5
    assert report.outcomes["ok:completed"] > 0 and report.outcomes["hopeless:failed"] > 0
    assert report.outcomes["absurd_usage:failed"] == config.absurd
