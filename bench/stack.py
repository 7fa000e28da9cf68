"""The processes a benchmark measures, started as users start them (the `moonq` console script)
on 127.0.0.1 with real Redis: the fake upstream, the API (one process, or uvicorn's supervisor
and its children sharing one port) and one or more workers; and what they cost, read from /proc.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import redis

from tests.procs import Proc, clean_env, free_port, start, wait_http

ARQ_PREFIXES = ("arq:job:", "arq:in-progress:", "arq:result:", "arq:retry:")
GROUPS = ("fake", "api", "worker")  # the servers; a group's CPU is that of all its processes
TICK = os.sysconf("SC_CLK_TCK")
_STARTED = "Application startup complete"  # uvicorn logs it once per API process


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks: its own and those of its reaped children) of every
    process (this kernel may lack /proc/PID/task/*/children: the parent pids say it too)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # it has just exited
                continue
            fields = stat.rsplit(")", 1)[-1].split()  # fields[0] is the state, field 3
            table[int(entry.name)] = (int(fields[1]), sum(map(int, fields[11:15])))
    return table


def descendants(roots: list[int], table: dict[int, tuple[int, int]]) -> list[int]:
    """`roots` and all their children, grandchildren...: the processes of a server."""
    children = defaultdict(list)
    for pid, (parent, _) in table.items():
        children[parent].append(pid)
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
            todo += children[pid]
    return found


def group_of(name: str) -> str:
    """ "worker2" belongs to "worker"."""
    return name.rstrip("0123456789")


class Stack:
    """The fake upstream, the API (`args.api_procs` processes) and `args.workers` workers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.prefix = args, f"bench{uuid.uuid4().hex[:10]}"
        self.workdir = Path(tempfile.mkdtemp(prefix="moonq-bench-"))
        self.fake_ports = [free_port() for _ in range(getattr(args, "fakes", 1))]
        self.api_port = free_port()
        self.fake_urls = [f"http://127.0.0.1:{p}" for p in self.fake_ports]
        self.fake_url, self.api_url = self.fake_urls[0], f"http://127.0.0.1:{self.api_port}"
        self.procs: dict[str, Proc] = {}
        self.job_ids: set[str] = set()
        self.redis = redis.Redis.from_url(args.redis_url)
        self.api_procs: int = getattr(args, "api_procs", 1)
        self.workers: int = getattr(args, "workers", 1)
        self.slots = (0, 0)  # each worker's concurrency, the limiter's
        self.rss_since_start = False  # the kernel could not start the peak RSS afresh

    def env(self, worker: int, limit: int, fake: int = 0) -> dict[str, str]:
        """RPM and TPM limits off: the benchmark sends far more than a real account may.
        `fake`: which of the fake upstream's processes this process calls."""
        env = {
            "REDIS_URL": self.args.redis_url,
            "MOONQ_KEY_PREFIX": self.prefix,
            "MOONQ_QUEUE_NAME": f"{self.prefix}:queue",
            "MOONSHOT_BASE_URL": f"{self.fake_urls[fake % len(self.fake_urls)]}/v1",
            "MOONSHOT_API_KEY": "sk-bench",
            "MOONQ_API_KEYS": "",
            "MOONQ_WORKER_CONCURRENCY": str(worker),
            "MOONQ_UPSTREAM_CONCURRENCY": str(limit),
            "MOONQ_UPSTREAM_RPM": "0",
            "MOONQ_UPSTREAM_TPM": "0",
        }
        return clean_env(**env | dict(item.split("=", 1) for item in self.args.env))

    def up(self, concurrency: int) -> None:
        """The fake upstream (one process on a port of its own for each of `--fakes`; worker
        i calls fake i mod F), the API and the workers."""
        for i, port in enumerate(self.fake_ports):
            name = "fake" if i == 0 else f"fake{i + 1}"
            args = ["fake-moonshot", "--port", str(port)]
            self.procs[name] = start(name, args, self.env(concurrency, concurrency), self.workdir)
        fakes = [name for name in self.procs if group_of(name) == "fake"]
        for name, url in zip(fakes, self.fake_urls, strict=True):
            wait_http(f"{url}/_fake/stats", self.procs[name])
        self.slots = (concurrency, concurrency)
        self.start_api(self.api_procs)
        self.start_worker(concurrency, concurrency)

    def start_api(self, procs: int) -> None:
        """`moonq api --workers procs` (again, on the same port), once every process is up."""
        if "api" in self.procs:
            self.procs.pop("api").stop()
        self.api_procs = procs
        args = ["api", "--port", str(self.api_port), "--workers", str(procs)]
        proc = start(f"api-x{procs}", args, self.env(*self.slots), self.workdir)
        self.procs["api"], deadline = proc, time.monotonic() + 30
        wait_http(f"{self.api_url}/readyz", proc)
        while proc.output().count(_STARTED) < procs:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{proc.output()}")
            time.sleep(0.05)

    def start_worker(self, worker: int, limit: int, count: int | None = None) -> None:
        """`count` (default: as many as now) worker processes, each with `worker` slots, all
        under one limiter of `limit`, in place of the running ones."""
        for name in [name for name in self.procs if group_of(name) == "worker"]:
            self.procs.pop(name).stop()
        self.workers, self.slots = count or self.workers, (worker, limit)
        started = []
        for i in range(self.workers):
            log = f"worker{i + 1}-{worker}-{limit}"
            proc = start(log, ["worker"], self.env(worker, limit, fake=i), self.workdir)
            self.procs["worker" if i == 0 else f"worker{i + 1}"] = proc
            started.append(proc)
        deadline = time.monotonic() + 20
        for proc in started:
            while "moonq worker:" not in proc.output():  # logged at the end of its startup
                if proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start:\n{proc.output()}")
                time.sleep(0.05)

    def pids(self, group: str, table: dict[int, tuple[int, int]]) -> list[int]:
        roots = [p.popen.pid for name, p in self.procs.items() if group_of(name) == group]
        return descendants(roots, table)

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each group of processes (uvicorn's children and every worker
        included) and of the whole machine. Redis's own counters are server-wide (other users
        of this Redis would show up in them), so it is in "rest"."""
        busy = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        found = {"client": time.process_time(), "machine": (sum(busy) - busy[3] - busy[4]) / TICK}
        table = process_table()
        for group in GROUPS:
            found[group] = sum(table[pid][1] for pid in self.pids(group, table)) / TICK
        return found

    def redis_calls(self) -> int:
        """Commands Redis has run, those run inside scripts included (server-wide: nothing
        else should use this Redis while the benchmark runs)."""
        stats: dict[str, dict[str, int]] = self.redis.info("commandstats")  # type: ignore[assignment]
        return sum(entry["calls"] for entry in stats.values())

    def redis_cpu(self) -> float:
        """CPU seconds the Redis server process has used, all its threads (server-wide, as
        `redis_calls`)."""
        info: dict[str, float] = self.redis.info("cpu")  # type: ignore[assignment]
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def peak_rss(self) -> dict[str, float]:
        """The API's and the workers' peak resident memory (VmHWM), MiB, summed over their
        processes (the sum of each one's peak: at most the peak of the sum)."""
        found, table = {}, process_table()
        for group in ("api", "worker"):
            total = 0
            for pid in self.pids(group, table):
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(next(r.split()[1] for r in status.splitlines() if r[:6] == "VmHWM:"))
            found[group] = total / 1024
        return found

    def reset_peak_rss(self) -> None:
        """Start the API's and the workers' VmHWM afresh (from their present RSS)."""
        table = process_table()
        for pid in self.pids("api", table) + self.pids("worker", table):
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:  # a kernel without it (gVisor): the peak since the start, then
                self.rss_since_start = True

    def down(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        for line in complaints(self.workdir):
            print(line, file=sys.stderr)
        shutil.rmtree(self.workdir, ignore_errors=True)
        doomed = list(self.redis.scan_iter(f"{self.prefix}:*", count=1000))
        ids = self.job_ids | {k.decode().rsplit(":", 1)[1] for k in doomed if b":job:" in k}
        doomed += [p + i for i in ids for p in ARQ_PREFIXES]
        for i in range(0, len(doomed), 500):
            self.redis.delete(*doomed[i : i + 500])
        self.redis.close()


_LEVEL = re.compile(r" (WARNING|ERROR|CRITICAL) ")
_VARYING = re.compile(r"job_[0-9a-f]{32}|\b[0-9a-f]{32}\b|\d+(\.\d+)?")


def complaints(workdir: Path, top: int = 6) -> list[str]:
    """What the servers of a run warned of, each log's most frequent messages counted (job
    ids and numbers made alike): a run's errors say what the client saw, these why."""
    lines: list[str] = []
    for log in sorted(workdir.glob("*.log")):
        found: Counter[str] = Counter()
        with log.open(errors="replace") as text:
            for line in text:
                level = _LEVEL.search(line)
                if level:
                    found[_VARYING.sub("N", line[level.start() + 1 :].strip())[:160]] += 1
        if found:
            lines.append(f"{log.stem}: {sum(found.values())} warnings and errors, most often:")
            lines += [f"  {n}× {message}" for message, n in found.most_common(top)]
    return lines
