"""Scale-out: several API processes on one port, and Redis failover through Sentinel.

`moonq api --workers 2` is started as users start it; which process serves a connection is
read from /proc (the sockets each process holds), so nothing is added to the API for it.
The Sentinel test runs a master, a replica and a sentinel of its own, kills the master and
watches the API and a worker carry on against the promoted replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from api.app import create_app
from moonq.fake_moonshot import FakeServer
from moonq.settings import Settings
from tests.conftest import IN_CI, chat, make_settings
from tests.procs import (
    Proc,
    clean_env,
    real_env,
    serve_on_free_port,
    spawn,
    start,
    start_api,
    wait_log,
)
from worker.main import create_worker

_TCP_ESTABLISHED = "01"


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open."""
    inodes = set()
    with contextlib.suppress(OSError):  # the process may be gone
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _established_on(port: int) -> set[str]:
    """The inodes of the established TCP connections whose local port is `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == _TCP_ESTABLISHED and int(local.rsplit(":", 1)[1], 16) == port:
                    found.add(inode)
    return found


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
    return kids


def _connections_by_process(parent: int, port: int) -> dict[int, int]:
    """How many client connections to `port` each child of `parent` holds."""
    established = _established_on(port)
    return {child: len(_socket_inodes(child) & established) for child in _children(parent)}


@pytest.fixture
def api_two_processes(
    real_redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Proc, str, Settings]]:
    env = real_env(real_redis_url, prefix, MOONQ_API_KEYS="key1=team-a", MOONQ_API_WORKERS="2")
    proc, url = start_api("api", env, tmp_path)
    try:
        yield proc, url, make_settings(real_redis_url, prefix, "http://unused")
    finally:
        proc.stop()


@pytest.mark.e2e
async def test_two_api_processes_both_serve_jobs_and_their_streams(
    api_two_processes: tuple[Proc, str, Settings], fake: FakeServer
) -> None:
    """Connections spread over both processes; each one takes jobs and relays their streams
    to the end through its own pub/sub connection."""
    proc, url, settings = api_two_processes
    port = int(url.rsplit(":", 1)[1])
    headers = {"Authorization": "Bearer key1"}
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for _ in range(40):  # the kernel picks the process: open until both have some
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, headers=headers, timeout=20)
            )
            created = await client.post("/v1/jobs", json=chat("scale"))
            assert created.status_code == 202, created.text
            events = client.stream("GET", f"/v1/jobs/{created.json()['id']}/events")
            response = await stack.enter_async_context(events)
            assert response.status_code == 200
            streams.append(response)
            held = _connections_by_process(proc.popen.pid, port)
            if len(streams) >= 4 and sum(n > 0 for n in held.values()) >= 2:
                break
        assert sum(n > 0 for n in held.values()) == 2, held
        assert sum(held.values()) == len(streams)

        settings = settings.model_copy(update={"moonshot_base_url": fake.url})
        worker = create_worker(settings, burst=True, handle_signals=False)
        try:
            await worker.main()
        finally:
            await worker.close()
        ends = await asyncio.gather(*(_last_event(response) for response in streams))
    assert ends == ["done"] * len(streams)


async def _last_event(response: httpx.Response) -> str:
    last = ""
    async with asyncio.timeout(10):
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                last = json.loads(line[5:])["event"]
    return last


@pytest.mark.e2e
def test_api_workers_refuses_a_count_below_one(tmp_path: Path) -> None:
    proc = start("api", ["api", "--workers", "0"], clean_env(), tmp_path)
    proc.popen.wait(10)
    assert proc.popen.returncode == 2
    assert "--workers: must be a whole number >= 1" in proc.output()


# --- Sentinel ---------------------------------------------------------------------------


class Node:
    """A redis-server (or sentinel) of this test's own on a free port."""

    def __init__(self, workdir: Path, name: str, *extra: str, sentinel_of: int = 0) -> None:
        self.dir = workdir / name
        self.dir.mkdir()
        self.name, self.extra, self.sentinel_of = name, list(extra), sentinel_of
        listening = r"\+monitor master" if sentinel_of else r"Ready to accept connections"
        self.proc, self.port = serve_on_free_port(name, self._launch, lambda _: listening)

    def _launch(self, port: int) -> Proc:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if self.sentinel_of:
            conf = self.dir / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.sentinel_of} 1\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 5000\n"
            )
            return spawn(self.name, [binary, str(conf), "--sentinel"], None, self.dir)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        return spawn(self.name, [*argv, *self.extra], None, self.dir)

    def client(self, timeout: float = 2) -> sync_redis.Redis:
        return sync_redis.Redis(port=self.port, socket_timeout=timeout)

    def stop(self) -> None:
        self.proc.stop(signal.SIGKILL)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[tuple[Node, Node, Node]]:
    """A master, its replica (in sync) and one sentinel watching them."""
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        if IN_CI:
            pytest.fail("CI=true but redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    nodes: list[Node] = []
    try:
        nodes.append(Node(tmp_path, "master"))
        replica = Node(tmp_path, "replica", "--replicaof", "127.0.0.1", str(nodes[0].port))
        nodes.append(replica)
        wait_log(replica.proc, r"MASTER <-> REPLICA sync: Finished with success", timeout=10)
        nodes.append(Node(tmp_path, "sentinel", sentinel_of=nodes[0].port))
        # A sentinel that has not yet heard of the replica has no one to promote.
        wait_log(nodes[2].proc, rf"\+slave slave 127\.0\.0\.1:{replica.port} ", timeout=10)
        yield nodes[0], nodes[1], nodes[2]
    finally:
        for node in nodes:
            node.stop()


@contextlib.asynccontextmanager
async def _api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app as `moonq api` builds it: its Redis client from the settings alone."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moonq") as c,
    ):
        yield c


async def _until_ok(call: Any, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        answer: httpx.Response = await call()
        if answer.status_code < 500 or time.monotonic() > deadline:
            return answer
        assert answer.status_code == 503, answer.text  # the store is away: never a 500
        await asyncio.sleep(0.1)


def _replicated(master: Node, fence: str) -> int:
    """How many replicas hold every write the master has taken so far (WAIT, up to 5 s).

    WAIT counts acks of its own connection's last write: on a connection that wrote nothing
    it answers at once, replica up to date or not (a loaded machine then lost the job in the
    failover). So the same connection writes a fence first; replication keeps order.
    """
    with master.client(timeout=10).pipeline(transaction=False) as pipe:
        pipe.set(fence, 1).execute_command("WAIT", 1, 5000)
        acks: int = pipe.execute()[-1]
    return acks


@pytest.mark.e2e
async def test_api_and_worker_follow_a_sentinel_failover(
    sentinel_set: tuple[Node, Node, Node], fake: FakeServer, prefix: str
) -> None:
    master, replica, sentinel = sentinel_set
    # REDIS_URL names no server at all: only the sentinel can lead to the data.
    settings = make_settings(
        "redis://127.0.0.1:9/0",
        prefix,
        fake.url,
        MOONQ_REDIS_SENTINELS=f"127.0.0.1:{sentinel.port}",
        MOONQ_REDIS_SENTINEL_MASTER="mymaster",
    )
    async with _api(settings) as client:
        assert (await client.get("/readyz")).status_code == 200
        first = (await client.post("/v1/jobs", json=chat("before"))).json()["id"]
        assert master.client().exists(f"{prefix}:job:{first}")
        assert _replicated(master, f"{prefix}:fence") == 1  # the replica has the job too

        master.stop()  # down to the sentinel after 1 s: it promotes the replica
        answer = await _until_ok(lambda: client.get(f"/v1/jobs/{first}"), timeout=15)
        assert answer.status_code == 200 and answer.json()["status"] == "queued"
        second = (await client.post("/v1/jobs", json=chat("after"))).json()["id"]
        assert replica.client().exists(f"{prefix}:job:{second}")

        worker = create_worker(settings, burst=True, handle_signals=False)
        try:
            await worker.main()
        finally:
            await worker.close()
        for job_id in (first, second):
            done = (await client.get(f"/v1/jobs/{job_id}")).json()
            assert done["status"] == "completed", done


def test_sentinel_settings_are_checked_at_start() -> None:
    with pytest.raises(ValueError, match=re.escape("host:port,host:port")):
        Settings(_env_file=None, MOONQ_REDIS_SENTINELS="127.0.0.1")  # type: ignore[call-arg]
    parsed = Settings(_env_file=None, MOONQ_REDIS_SENTINELS="a:26379, [::1]:26380")  # type: ignore[call-arg]
    assert parsed.sentinels == [("a", 26379), ("::1", 26380)]
