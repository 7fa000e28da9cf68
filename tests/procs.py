"""Real processes for end-to-end tests: the `moonq` CLI started as users start it.

Ports: `moonq api` and `moonq fake-moonshot` bind port 0 and print the port they got, so they
cannot collide. `redis-server` cannot say, so it gets a random port from below the kernel's
ephemeral range and is started again on another one if that turns out to be taken. A server
counts as up only once its own log says it listens, so a test never talks to another run's
server that took the port first.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MOONQ = shutil.which("moonq", path=os.path.dirname(sys.executable)) or "moonq"
SECRET_ENV = ("MOONSHOT_API_KEY", "MOONQ_API_KEYS")
# Below Linux's default ephemeral range (32768-60999), from which bind(0) and outgoing
# connections draw their ports: a port picked here is not taken by some client socket.
PORTS = (20000, 32000)
_IN_USE = re.compile(r"address already in use|errno 98|eaddrinuse", re.IGNORECASE)
_UVICORN = re.compile(r"Uvicorn running on http://[^:]+:([1-9]\d*)")
_FAKE = re.compile(r"fake Moonshot listening on http://[^:]+:([1-9]\d*)/")
_rng = random.SystemRandom()


class PortTaken(RuntimeError):
    """The server could not bind its port: someone else holds it."""


def free_port() -> int:
    """A port free at this moment, picked at random; servers started on it retry on collision."""
    for _ in range(200):
        port = _rng.randrange(*PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def clean_env(**values: str) -> dict[str, str]:
    """The test's environment minus anything moonq reads, plus `values`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("MOONQ_", "MOONSHOT_")) or k == "REDIS_URL")
    }
    return {**env, "PYTHONUNBUFFERED": "1", **values}


def real_env(redis_url: str, prefix: str, **values: str) -> dict[str, str]:
    """`clean_env` for processes of a deployment on real Redis, under a prefix of its own
    (and the queue that goes with it), plus `values`."""
    return clean_env(
        REDIS_URL=redis_url, MOONQ_KEY_PREFIX=prefix, MOONQ_QUEUE_NAME=f"{prefix}:queue", **values
    )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start(name: str, args: list[str], env: dict[str, str], workdir: Path) -> Proc:
    return spawn(name, [MOONQ, *args], env, workdir)


def spawn(name: str, argv: list[str], env: dict[str, str] | None, workdir: Path) -> Proc:
    """Any program, its output in `workdir/name.log`."""
    log = workdir / f"{name}.log"
    handle = log.open("wb")
    popen = subprocess.Popen(argv, env=env, cwd=workdir, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return Proc(name, popen, log, argv)


def wait_http(url: str, proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(proc)
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer {url} in {timeout}s:\n{proc.output()}")


def _check_alive(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        output = proc.output()
        if _IN_USE.search(output):
            raise PortTaken(f"{proc.name}: port taken")
        raise RuntimeError(f"{proc.name} exited early:\n{output}")


def wait_log(proc: Proc, pattern: str | re.Pattern[str], timeout: float = 20) -> re.Match[str]:
    """The first match of `pattern` in the process's log, once it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, proc.output())
        if found:
            return found
        _check_alive(proc)
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: no {pattern!r} in {timeout}s:\n{proc.output()}")


def serve_on_free_port(
    name: str,
    launch: Callable[[int], Proc],
    listening: Callable[[int], str],
    tries: int = 5,
) -> tuple[Proc, int]:
    """Start a server on a random free port, again on another one while the port is taken.

    `listening(port)` is the log line (a regex) the server prints once it has bound its port.
    """
    for _ in range(tries):
        port = free_port()
        proc = launch(port)
        try:
            wait_log(proc, listening(port))
            return proc, port
        except PortTaken:
            continue
        except BaseException:
            proc.stop()
            raise
    raise RuntimeError(f"{name}: every port tried was taken")


def _start_server(
    name: str,
    args: list[str],
    env: dict[str, str],
    workdir: Path,
    listening: re.Pattern[str],
    ready: str,
) -> tuple[Proc, str]:
    """`moonq <args>` on port 0; (process, origin), once its log says which port it bound
    and `origin + ready` answers."""
    proc = start(name, [*args, "--port", "0"], env, workdir)
    try:
        origin = f"http://127.0.0.1:{int(wait_log(proc, listening).group(1))}"
        wait_http(origin + ready, proc)
    except BaseException:
        proc.stop()
        raise
    return proc, origin


def start_fake(name: str, env: dict[str, str], workdir: Path, *extra: str) -> tuple[Proc, str]:
    """`moonq fake-moonshot`; (process, origin URL), once it answers."""
    return _start_server(name, ["fake-moonshot", *extra], env, workdir, _FAKE, "/_fake/stats")


def start_api(name: str, env: dict[str, str], workdir: Path) -> tuple[Proc, str]:
    """`moonq api`; (process, base URL), once it answers `/readyz`."""
    return _start_server(name, ["api"], env, workdir, _UVICORN, "/readyz")


class RedisServer:
    """A redis-server of a test's own, which it may kill, restart (same port, and with `aof`
    the same data), stall (SIGSTOP: it stops answering but keeps every connection) and resume.
    """

    def __init__(self, workdir: Path, aof: bool = False) -> None:
        self.dir = workdir / f"redis-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        self.aof = aof
        self.proc: Proc | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _launch(self, port: int) -> Proc:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--save", "", "--appendonly", "yes" if self.aof else "no"]
        if self.aof:
            argv += ["--appendfsync", "always"]
        return spawn("redis", argv, None, self.dir)

    def start(self) -> None:
        """On a free port the first time, on the same port after that."""
        if self.port == 0:
            self.proc, self.port = serve_on_free_port("redis-server", self._launch, _redis_ready)
        else:
            self.proc = self._launch(self.port)
            wait_log(self.proc, _redis_ready(self.port))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.popen.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.signal(signal.SIGKILL)
        self.proc.popen.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.kill()


def _redis_ready(port: int) -> str:
    return r"Ready to accept connections"
