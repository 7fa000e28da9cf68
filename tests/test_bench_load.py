"""The benchmark's load processes (`python -m bench.run --clients K`): a run's requests are
dealt out to K processes and come back whole, with the CPU those processes spent."""

from __future__ import annotations

from collections import Counter

from bench.load import Load
from bench.measure import Crowd, Sample, Shape
from bench.report import crowd_table
from moonq.fake_moonshot import start_fake


async def test_a_run_sent_by_two_processes_comes_back_whole() -> None:
    fakes = [await start_fake(), await start_fake()]
    load = Load(2, [fake.origin for fake in fakes])
    try:
        sent = await load.run("direct", Shape(3, 0.0, 0.0), 11, 4, "http://unused", set())
        crowd = await load.crowd("direct", Shape(2, 0.3, 0.0), 6, "http://unused", set())
    finally:
        load.close()
        for fake in fakes:
            await fake.close()
    assert len(sent.samples) == 11
    assert all(0 < s.ttfc <= s.total for s in sent.samples)
    assert sent.cpu > 0  # the load processes' own CPU, which the parent's clock does not see
    # Both upstreams answered, each its process's share (6 + 5 and 3 + 3 requests).
    assert [fake.stats.requests for fake in fakes] == [6 + 3, 5 + 3]
    assert (crowd.n, len(crowd.samples), sum(crowd.errors.values())) == (6, 6, 0)
    # Started together: each process's three streams took about one stream's time, not three.
    assert crowd.wall < 2 * min(s.total for s in crowd.samples)


def test_the_slow_row_shows_what_each_stream_cost_the_api_and_the_worker() -> None:
    samples = [Sample(0.1, 20.5, relay=[0.001, 0.002]), Sample(0.2, 21.0, relay=[0.003])]
    direct = Crowd(2, samples, Counter(), 21.0)
    moonq = Crowd(2, samples, Counter(), 21.5, rss={"api": 96.0, "worker": 80.0})
    moonq.cpu = {"api": 2.25, "worker": 3.94}
    rows = crowd_table(direct, moonq).splitlines()
    assert rows[0].endswith("| peak RSS API / worker (MiB) | CPU ms per stream: API / worker |")
    assert rows[-1].endswith("| 96 / 80 | 2.2 / 3.9 |")
    assert rows[-2].endswith("| – | – |")  # the direct client's row: no moonq processes
