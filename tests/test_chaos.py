"""A small run of the fault suite (`make chaos` runs the full one): real processes, injected
upstream faults, workers SIGKILLed mid-stream; nothing lost, duplicated or wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import Config, run

pytestmark = pytest.mark.e2e


def test_small_chaos_run(real_redis_url: str, tmp_path: Path) -> None:
    config = Config(
        jobs=120,
        kills=2,
        kill_every=(1.0, 2.0),
        limit=6,
        lock_timeout=3.0,
        timeout=120,
        seed=11,
        redis_url=real_redis_url,
    )
    report = run(config, tmp_path)
    print(report.table())
    assert report.kills >= 1, "no worker was caught mid-stream"
    assert report.lost == 0 and report.duplicated == 0, report.table()
    assert report.wrong == []
    assert report.peak <= config.limit
    assert report.peak >= 2  # the limiter limits, it does not serialise
    assert report.recoveries and max(report.recoveries) < config.lock_timeout + 5
    assert report.outcomes["ok:completed"] > 0 and report.outcomes["hopeless:failed"] > 0
