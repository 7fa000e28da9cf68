"""Real processes for end-to-end tests: the `moonq` CLI started as users start it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MOONQ = shutil.which("moonq", path=os.path.dirname(sys.executable)) or "moonq"
SECRET_ENV = ("MOONSHOT_API_KEY", "MOONQ_API_KEYS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**values: str) -> dict[str, str]:
    """The test's environment minus anything moonq reads, plus `values`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("MOONQ_", "MOONSHOT_")) or k == "REDIS_URL")
    }
    return {**env, "PYTHONUNBUFFERED": "1", **values}


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
    log = workdir / f"{name}.log"
    handle = log.open("wb")
    popen = subprocess.Popen(
        [MOONQ, *args], env=env, cwd=workdir, stdout=handle, stderr=subprocess.STDOUT
    )
    handle.close()
    return Proc(name, popen, log, args)


def wait_http(url: str, proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.output()}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer {url} in {timeout}s:\n{proc.output()}")
