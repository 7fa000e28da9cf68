"""The benchmark's load processes (`python -m bench.run --clients K`): a run's requests are
dealt out to K processes and come back whole, with the CPU those processes spent."""

from __future__ import annotations

from bench.load import Load
from bench.measure import Shape
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
