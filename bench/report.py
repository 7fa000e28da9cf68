"""The benchmark's Markdown report: every figure is the median, over the repeats, of the
per-run figure (a ratio: the median of the per-run ratios)."""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import NamedTuple

from bench.measure import Crowd, Row, Run, pct

PROCS = ("fake", "api", "worker", "client")
Scaling = list[tuple[str, int, Row]]  # ("worker"/"API", processes, the ceiling row)


class Result(NamedTuple):
    rows: list[Row]
    scaling: Scaling
    crowds: tuple[Crowd, Crowd] | None  # `--slow`: direct, moonq
    rss: dict[str, float]  # the API's and the workers' peak RSS (MiB) before `--slow`


def med(values: Iterable[float]) -> float:
    found = [v for v in values if not math.isnan(v)]
    return statistics.median(found) if found else math.nan


def num(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"


def cpu_ms(value: float) -> str:
    """CPU milliseconds to a hundredth below 10: a job costs a process 1-3 ms, and the
    changes steered by are a few percent of that."""
    return f"{value:.2f}" if abs(value) < 10 else num(value)


def fine(value: float) -> str:
    """Milliseconds to a hundredth below 1."""
    return f"{value:.2f}" if abs(value) < 1 else num(value)


def signed(value: float, show: Callable[[float], str] = num) -> str:
    return "–" if math.isnan(value) else f"{'-' if value < 0 else '+'}{show(abs(value))}"


def both(r: Row, f: Callable[[Run], float]) -> tuple[float, float]:
    return med(map(f, r.direct)), med(map(f, r.moonq))


def paired(r: Row, f: Callable[[Run, Run], float]) -> float:
    """The median over the repeats of `f(direct run, moonq run)`."""
    return med(f(d, m) for d, m in zip(r.direct, r.moonq, strict=True))


def ratio(r: Row, f: Callable[[Run], float], unit: str = "ms", scale: float = 1000) -> str:
    times = paired(r, lambda d, m: f(m) / f(d))
    if math.isnan(times):
        return "–"
    direct, moonq = both(r, f)
    return f"**{times:.2f}×** ({num(direct * scale)}→{num(moonq * scale)} {unit})"


def at(name: str, q: float) -> Callable[[Run], float]:
    return lambda run: run.pct(name, q)


def cpu(process: str) -> Callable[[Run], float]:
    return lambda run: run.cpu[process]


def relay(q: float) -> Callable[[Run], float]:
    return lambda run: run.relay(q) * 1000


def relay_added(q: float) -> Callable[[Run, Run], float]:
    return lambda direct, moonq: (moonq.relay(q) - direct.relay(q)) * 1000


def main_cells(r: Row) -> list[str]:
    d, m = r.direct[0], r.moonq[0]
    cells = [r.name, str(len(m.samples)), r.conc, f"{d.peak}/{m.peak}"]
    cells += [ratio(r, at(k, q)) for k in ("ttfc", "total") for q in (0.5, 0.95)]
    cells.append(ratio(r, lambda run: run.rate, "req/s", 1))
    overhead = paired(r, lambda d, m: m.pct("total", 0.5) - d.pct("total", 0.5))
    return [*cells, signed(overhead * 1000)]


def cost_cells(r: Row) -> list[str]:
    phases = [num(med(run.phases.get(k, math.nan) for run in r.moonq)) for k in PHASES]
    cells = [r.name, num(med(run.pct("post", 0.5) * 1000 for run in r.moonq)), *phases[:2]]
    cells += [num(med(run.pct("total", 0.5) * 1000 for run in r.direct)), phases[2]]
    for process in PROCS:
        direct, moonq = both(r, cpu(process))
        cells.append(f"{cpu_ms(direct)}→{cpu_ms(moonq)}")
    direct, moonq = both(r, cpu("rest"))
    return [*cells, f"{direct:.2f}→{moonq:.2f}", f"{med(x.redis_per_chunk for x in r.moonq):.1f}"]


def ttfc_added(q: float) -> Callable[[Run, Run], float]:
    return lambda direct, moonq: (moonq.pct("ttfc", q) - direct.pct("ttfc", q)) * 1000


def latency_cells(r: Row, args: argparse.Namespace) -> list[str]:
    cells = [r.name, *(signed(paired(r, ttfc_added(q))) for q in (0.5, 0.99))]
    if args.pickup:
        cells += [num(med(pct(run.pickup, q) * 1000 for run in r.moonq)) for q in (0.5, 0.99)]
    if args.relay:
        for q in (0.5, 0.99):
            direct, moonq = both(r, relay(q))
            added = paired(r, relay_added(q))
            cells += [f"{fine(direct)}→{fine(moonq)}", signed(added, fine)]
    return cells


PHASES = ("queued", "worker run", "delivery")
HEADS = (
    "scenario | n | worker/limiter conc. | upstream peak in flight (direct/moonq) | TTFC p50 "
    "| TTFC p95 | total p50 | total p95 | throughput | overhead p50 (ms)",
    "scenario | submit POST | queued | worker run | direct total | delivery | CPU ms/req: fake "
    "| api | worker | client | Redis + other load (cores) | Redis commands per chunk",
)
NOTE = (
    "**Where moonq's time goes** (p50 ms; queued = created→started, worker run = started→"
    "completed, delivery = completed→`done` at the client (`[DONE]` for the chat row, whose "
    "submit is its stream); CPU per request, direct→moonq, summed over each server's "
    "processes, the direct figures for api/worker being their idle cost)"
)
TTFC = "TTFC adds = moonq's time to the first chunk less the direct client's, at each percentile"
PICKUP = "pickup = the job record's created_at→started_at"
RELAY = (
    "relay = the fake's write of a chunk (its `x_fake_sent_at`, `time.time()`) → its arrival "
    "at the client, over every chunk of the run, direct→moonq, and what moonq adds"
)


def table(head: str, lines: Iterable[list[str]]) -> str:
    rule = "|---" * (head.count("|") + 1) + "|"
    return "\n".join([f"| {head} |", rule, *(f"| {' | '.join(x)} |" for x in lines)])


def latency_table(rows: list[Row], args: argparse.Namespace) -> str:
    head, title, says = "scenario | TTFC adds p50 | TTFC adds p99", ["first token"], [TTFC]
    if args.pickup:
        head, title, says = head + " | pickup p50 | pickup p99", [*title, "pickup"], [*says, PICKUP]
    if args.relay:
        head += " | relay p50 | moonq adds p50 | relay p99 | moonq adds p99"
        title, says = [*title, "chunk relay"], [*says, RELAY]
    named = ", ".join(title[:-1]) + f" and {title[-1]}" if len(title) > 1 else title[0]
    note = f"**{named.capitalize()}** (ms; {'; '.join(says)})"
    return f"{note}\n\n{table(head, (latency_cells(r, args) for r in rows))}\n"


def scaling_table(scaling: Scaling) -> str:
    """Jobs/s of the ceiling row by processes, against linear growth from the first count."""
    lines, base = [], dict[str, float]()
    for kind, count, row in scaling:
        d, m = both(row, lambda run: run.rate)
        each = m / count
        base.setdefault(kind, each)
        api, worker = (med(run.cpu[k] for run in row.moonq) for k in ("api", "worker"))
        redis = med(run.redis_cpu for run in row.moonq)
        # The cores Redis and the load kept busy: is one of them the limit, not moonq?
        busy = [
            med(run.redis_cpu * run.rate / 1000 for run in row.moonq),
            med(run.cpu["client"] * run.rate / 1000 for run in row.moonq),
        ]
        name = f"{count} {kind} process{'es' if count > 1 else ''}"
        cells = [name, row.conc, f"{num(d)}", f"{num(m)}", num(each)]
        cells += [f"{each / base[kind]:.0%}", cpu_ms(api), cpu_ms(worker), cpu_ms(redis)]
        lines.append([*cells, " / ".join(f"{b:.2f}" for b in busy)])
    head = "scaled | worker/limiter conc. | direct jobs/s | moonq jobs/s | jobs/s per process "
    head += "| efficiency vs linear | CPU ms/job: api | worker | Redis "
    head += "| cores busy: Redis / load clients"
    return table(head, lines)


def crowd_table(direct: Crowd, moonq: Crowd) -> str:
    def line(name: str, c: Crowd) -> list[str]:
        errors = "; ".join(f"{n}× {e}" for e, n in c.errors.most_common(3)) or "–"
        totals = [pct([s.total for s in c.samples], q) for q in (0.5, 0.99)]
        relay = [fine(pct([x for s in c.samples for x in s.relay], q) * 1000) for q in (0.5, 0.99)]
        queued = c.phases.get("queued")
        waited = "–" if not queued else " / ".join(f"{pct(queued, q):.1f}" for q in (0.5, 0.99))
        rss = "–" if not c.rss else f"{c.rss['api']:.0f} / {c.rss['worker']:.0f}"
        cpu = "–" if not c.cpu else f"{cpu_ms(c.cpu['api'])} / {cpu_ms(c.cpu['worker'])}"
        cells = [name, f"{len(c.samples)}/{c.n}", str(sum(c.errors.values())), errors]
        cells += [f"{c.wall:.1f}", *(f"{t:.1f}" for t in totals), waited, " / ".join(relay)]
        return [*cells, rss, cpu]

    head = "client | completed | client errors | the errors | all done (s) | stream total p50 (s) "
    head += "| p99 (s) | queued p50 / p99 (s) | relay p50 / p99 (ms) | peak RSS API / worker (MiB) "
    head += "| CPU ms per stream: API / worker"
    return table(head, [line("direct", direct), line("moonq", moonq)])


def header(args: argparse.Namespace, elapsed: float, redis_version: str) -> str:
    env = "".join(f", {item}" for item in args.env)
    runs = "one run" if args.repeat == 1 else f"median of {args.repeat} runs"
    command = f"python -m bench.run {' '.join(args.argv)}" if args.argv else "make bench"
    rows = f"""levels {args.levels}, {args.requests or "max(10, 2×level)"} requests each"""
    parameters = f"""the upstream answers after {args.first_byte * 1000:.0f} ms with \
{args.chunks} content chunks {args.delay * 1000:.0f} ms apart (delays ±20% per request); {rows}"""
    if args.scaling:
        parameters = f"only the ceiling row, with {args.scaling} worker, then API, processes"
    ceiling = f"""
- ceiling: {args.ceiling} in flight, {args.ceiling_requests} requests of \
{args.ceiling_chunks} chunks answered at once (no delays): what the queue itself can pass"""
    ceiling = ceiling if args.ceiling else ""
    if args.sequential and not args.scaling:
        ceiling += f"""
- sequential: {args.sequential} requests one at a time, each answered after 50 ms with \
5 chunks 10 ms apart: what the queue adds to a lone request's first token"""
    return f"""# moonq benchmark: the queue next to calling the upstream directly ({runs})

- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; run time {elapsed:.0f} s (`{command}`)
- machine: nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, \
{platform.platform()}, Redis {redis_version}; the fake, API, worker, Redis and this client \
share these cores
- moonq: {args.api_procs} API process(es) (`moonq api --workers {args.api_procs}`), \
{args.workers} worker process(es)
- parameters: {parameters}, after a warm-up; MOONQ_UPSTREAM_RPM/TPM=0 (off), other settings \
default{env}\
{ceiling}
- {runs}: each row is run {args.repeat}× (direct, then moonq, in turn) and each figure is the \
median of its per-run values (a ratio: of the per-run ratios); ratio = moonq / direct (time: \
>1 is slower; throughput: <1 is fewer per second). moonq times count from the submit call; \
TTFC = time to the first upstream chunk.
"""


def report(args: argparse.Namespace, result: Result, elapsed: float, redis_version: str) -> str:
    rows = result.rows
    parts = [header(args, elapsed, redis_version)]
    parts += [table(HEADS[0], map(main_cells, rows)), NOTE, table(HEADS[1], map(cost_cells, rows))]
    parts.append(latency_table(rows, args))
    if result.scaling:
        parts.append(
            f"**Scaling** (the ceiling row with 1, 2, … worker processes (API ×{args.api_procs})"
            f", then API processes (workers ×{args.workers}); efficiency = jobs/s per process "
            "against the first count's)\n\n" + scaling_table(result.scaling)
        )
    if result.rss:
        api, worker = result.rss["api"], result.rss["worker"]
        parts.append(
            f"Peak RSS (VmHWM, summed over processes): API {api:.0f} MiB, worker {worker:.0f} MiB."
        )
    if result.crowds:
        parts.append(
            f"**{args.slow} slow streams at once** ({args.slow_chunks} chunks "
            f"{args.slow_delay:g} s apart, all started together; one run; peak RSS summed over "
            f"each server's processes, since {result.crowds[1].rss_since})\n\n"
            + crowd_table(*result.crowds)
        )
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"
