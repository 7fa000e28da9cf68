"""The benchmark's load processes (`python -m bench.run --clients K`): a run's requests are
dealt out to K processes and come back whole, with the CPU those processes spent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.load import Load
from bench.measure import Crowd, Row, Run, Sample, Shape, error_line
from bench.report import crowd_table, scaling_table
from bench.stack import complaints
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
    moonq.phases = {"queued": [0.25, 1.5]}  # created → started, each completed stream
    rows = crowd_table(direct, moonq).splitlines()
    assert "| queued p50 / p99 (s) | relay p50 / p99 (ms) |" in rows[0]
    assert "| 0.2 / 1.5 | 2.0 / 3.0 |" in rows[-1]  # the time queued, then the relay's
    assert "| 21.0 | – | 2.0 / 3.0 |" in rows[-2]
    assert rows[0].endswith("| peak RSS API / worker (MiB) | CPU ms per stream: API / worker |")
    assert rows[-1].endswith("| 96 / 80 | 2.25 / 3.94 |")  # CPU to a hundredth
    assert rows[-2].endswith("| – | – |")  # the direct client's row: no moonq processes


def test_the_scaling_rows_show_what_redis_and_the_load_kept_busy() -> None:
    def run(rate: float, redis_ms: float, client_ms: float) -> Run:
        samples = [Sample(0.01, 0.02)] * int(rate)
        found = Run(samples, 1.0, cpu={"api": 1.5, "worker": 2.0, "client": client_ms})
        found.redis_cpu = redis_ms
        return found

    rows = [
        ("worker", 1, Row("workers ×1", [run(900, 0, 0)], [run(300, 0.5, 1.0)], "800/800")),
        ("worker", 4, Row("workers ×4", [run(900, 0, 0)], [run(1000, 0.9, 1.2)], "800/800")),
    ]
    lines = scaling_table(rows).splitlines()
    head = "| CPU ms/job: api | worker | Redis | cores busy: Redis / load clients |"
    assert lines[0].endswith(head)
    # 4 processes at 250 jobs/s each against 300 for one: 83% of linear; Redis busy 0.9 ms ×
    # 1000 jobs/s = 0.90 of a core, the load 1.2 ms × 1000 = 1.20 cores.
    four = "| 4 worker processes | 800/800 | 900 | 1000 | 250 | 83% | 1.50 | 2.00 | 0.90 "
    four += "| 0.90 / 1.20 |"
    assert lines[-1] == four
    assert lines[-2].endswith("| 100% | 1.50 | 2.00 | 0.50 | 0.15 / 0.30 |")


async def test_a_run_keeps_exactly_its_concurrency_across_the_processes() -> None:
    """c=1 through two load processes is one request at a time, not one in each; c=3 through
    two is two and one at a time, each with its slots' share of the requests (6 and 3 of 9:
    both take three rounds, as one process with c=3 would)."""
    fakes = [await start_fake(), await start_fake()]
    load = Load(2, [fake.origin for fake in fakes])
    try:
        await load.run("direct", Shape(3, 0.02, 0.0), 6, 1, "http://unused", set())
        alone = [(fake.stats.requests, fake.stats.peak_in_flight) for fake in fakes]
        for fake in fakes:
            fake.stats.reset()
        await load.run("direct", Shape(3, 0.02, 0.0), 9, 3, "http://unused", set())
        three = [(fake.stats.requests, fake.stats.peak_in_flight) for fake in fakes]
    finally:
        load.close()
        for fake in fakes:
            await fake.close()
    assert alone == [(6, 1), (0, 0)]
    assert three == [(6, 2), (3, 1)]


def test_a_crowd_error_is_one_line_of_its_table_cell(tmp_path: Path) -> None:
    """An error's text (httpx's has a second line, a job's its id) stays one line of the
    crowd table, like errors counted together; and the servers' own warnings are summed up."""
    ids = ["job_" + "a" * 32, "job_" + "b" * 32]
    errors = Counter(
        error_line(RuntimeError(f"job {i} ended with stream_error\nmore | text")) for i in ids
    )
    assert errors == Counter({"RuntimeError: job job_… ended with stream_error": 2})
    samples = [Sample(0.1, 20.5)]
    moonq = Crowd(3, samples, errors, 21.5)
    table = crowd_table(Crowd(3, samples * 3, Counter(), 21.0), moonq)
    assert len(table.splitlines()) == 4
    assert "| 2× RuntimeError: job job_… ended with stream_error |" in table
    log = tmp_path / "worker1.log"
    log.write_text(
        "".join(
            f"2026-11-27 18:44:0{n},761 WARNING moonq.worker job {i}: its lock had lapsed\n"
            for n, i in enumerate(ids)
        )
        + "2026-11-27 18:44:09,000 INFO arq.worker fine\n"
    )
    assert complaints(tmp_path) == [
        "worker1: 2 warnings and errors, most often:",
        "  2× WARNING moonq.worker job N: its lock had lapsed",
    ]
