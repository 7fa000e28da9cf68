"""The garbage collector of moonq's server processes (`moonq.collector`): set for thousands of
streams' objects held at once."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from moonq import collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_a_server_collects_young_objects_less_often_and_never_walks_what_it_started_with() -> None:
    _, middle, old = gc.get_threshold()
    started_with = {"config": [1, 2, 3]}
    collector.tune()
    assert gc.get_threshold() == (collector.YOUNG, middle, old)
    assert gc.get_freeze_count() > 0
    # What the process built to start is frozen: no later collection tracks it.
    assert not any(started_with is o for o in gc.get_objects())
    collector.tune()  # twice (moonq dev's API and worker share a process): the same setting
    assert gc.get_threshold() == (collector.YOUNG, middle, old)


@pytest.mark.usefixtures("restored_collector")
def test_each_process_of_a_multi_process_api_sets_its_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from api.app import app_from_env
    from moonq.settings import get_settings

    monkeypatch.setenv("MOONQ_API_KEYS", "")
    get_settings.cache_clear()
    try:
        app_from_env()
    finally:
        get_settings.cache_clear()
    assert gc.get_threshold()[0] == collector.YOUNG


@pytest.mark.usefixtures("restored_collector")
def test_cyclic_garbage_is_still_collected_after_the_tuning() -> None:
    collector.tune()

    class Node:
        pass

    for _ in range(3 * collector.YOUNG):  # cycles only the collector can free
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
    alive = sum(isinstance(o, Node) for o in gc.get_objects())
    assert alive < 2 * collector.YOUNG  # the young collections ran as allocation went on


@pytest.mark.usefixtures("restored_collector")
@pytest.mark.parametrize("command", [["worker"], ["fake-moonshot", "--port", "0"]])
def test_the_server_commands_set_their_collector_before_serving(
    monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """`moonq worker` and `moonq fake-moonshot` (the API's processes: above) serve with the
    collector set; the serving itself is replaced by a look at the setting."""
    import asyncio
    import logging.config

    import moonq.fake_moonshot
    import worker.main
    from moonq import cli
    from moonq.settings import get_settings

    seen: list[int] = []

    class Served:
        def run(self, *_: object) -> None:
            seen.append(gc.get_threshold()[0])

    monkeypatch.setattr(cli, "_check_redis", lambda settings: None)
    monkeypatch.setattr(logging.config, "dictConfig", lambda config: None)
    monkeypatch.setattr(asyncio, "set_event_loop_policy", lambda policy: None)
    monkeypatch.setattr(worker.main, "create_worker", lambda settings, burst: Served())
    monkeypatch.setattr(moonq.fake_moonshot, "run", lambda sock, config: Served().run(sock.close()))
    monkeypatch.setenv("MOONSHOT_API_KEY", "sk-test")
    get_settings.cache_clear()
    try:
        cli.main(command)
    finally:
        get_settings.cache_clear()
    assert seen == [collector.YOUNG]
