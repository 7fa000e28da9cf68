"""The `moonq` command: run the processes (api, worker, dev, fake-moonshot), or `moonq batch`.

`moonq batch` (moonq/batch_cli.py) sends documents and batch files to a running server.

Everything that can be known to be wrong at start is refused at start, with one line naming
the setting or the port, before a server binds or a worker takes a job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging.config
import resource
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import ValidationError

from moonq import batch_cli, collector, job_cli, logs
from moonq.settings import Settings, get_settings, is_loopback, redis_database


def _api(args: argparse.Namespace) -> None:
    import uvicorn

    from api.app import create_app

    settings = _settings()
    raise_open_files_limit()
    workers = args.workers or settings.api_workers
    _refuse_open_api(settings, args.host)
    _check_redis(settings)
    sock = _listen(args.host, args.port)
    logging.config.dictConfig(logs.config(settings))
    if workers > 1:
        _api_processes(sock, workers)
        return
    config = uvicorn.Config(
        create_app(settings), log_level="info", backlog=BACKLOG, **_server_logging(settings)
    )
    server = uvicorn.Server(config)
    collector.tune()
    announce(sock)
    server.run(sockets=[sock])


def _api_processes(sock: socket.socket, workers: int) -> None:
    """uvicorn's supervisor: `workers` processes accept on the one socket, each building its
    own app (its own Redis pool and pub/sub fan-out) from the same environment; one that dies
    is replaced."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "api.app:app_from_env",
        factory=True,
        workers=workers,
        log_level="info",
        backlog=BACKLOG,
        **_server_logging(_settings()),
    )
    announce(sock)
    Multiprocess(config, sockets=[sock]).run()


def _server_logging(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging: moonq's (MOONQ_LOG_FORMAT), applied in each API process too; its
    access lines only with MOONQ_ACCESS_LOG."""
    return {"log_config": logs.config(settings), "access_log": settings.access_log}


def _worker(args: argparse.Namespace) -> None:
    import uvloop

    from worker.main import HEARTBEAT_EVERY, create_worker, worker_is_alive

    if args.check:
        if not worker_is_alive(args.pid):
            _fail(
                f"no worker with process id {args.pid} polled in the last {6 * HEARTBEAT_EVERY:g} s"
            )
        return

    settings = _settings()
    raise_open_files_limit()
    _require_upstream_key(settings)
    _check_redis(settings)
    logging.config.dictConfig(logs.config(settings, verbose=args.verbose))
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # arq's loop, made by its worker
    worker = create_worker(settings, burst=args.burst)
    collector.tune()
    worker.run()


def _dev(args: argparse.Namespace) -> None:
    from moonq import dev

    settings = _settings()
    raise_open_files_limit()
    _refuse_open_api(settings, args.host)
    _check_redis(settings)  # a Redis that is down means the embedded one; a wrong one, an error
    sock = _listen(args.host, args.port)
    collector.tune()
    dev.run(settings, sock)


def _fake(args: argparse.Namespace) -> None:
    from moonq.fake_moonshot import FakeConfig, run

    config = FakeConfig(
        chunks=args.chunks, delay=args.delay, api_key=args.api_key, usage_style=args.usage_style
    )
    sock = _listen(args.host, args.port)
    collector.tune()
    run(sock, config)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        # Without the offending values: some settings are secrets.
        lines = []
        for error in exc.errors(include_input=False, include_url=False):
            name = ".".join(map(str, error["loc"]))  # none for a check of several settings
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"  {name}: {message}" if name else f"  {message}")
        _fail("invalid settings:\n" + "\n".join(lines))


def _fail(message: str) -> NoReturn:
    sys.exit(f"moonq: {message}")


# Connections a listening socket queues before they are accepted (uvicorn's default is 2,048;
# the kernel caps it at net.core.somaxconn): ten thousand clients connecting at once must not
# find the queue full.
BACKLOG = 16_384


def raise_open_files_limit() -> None:
    """Every stream holds a socket: the soft limit on open files (often 1,024) is raised to
    the hard one, which the process may do by itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _listen(host: str, port: int) -> socket.socket:
    """Bind before anything else starts, so a taken port stops the process at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # that say they are TCP, and accepted connections inherit it. Without it every small
    # response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    return sock


def announce(sock: socket.socket) -> None:
    """uvicorn's own line, with the port really bound (`--port 0` included)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port
    )
    logging.getLogger("moonq.api").info("Dashboard: http://%s:%d/dashboard", shown, port)


def _refuse_open_api(settings: Settings, host: str) -> None:
    """An API without keys serves anyone who can reach it: only on loopback, unless allowed."""
    if settings.tenants_by_key() or settings.allow_open or is_loopback(host):
        return
    _fail(
        f"MOONQ_API_KEYS is empty, so the API on {host} would be open to anyone who can reach"
        " it. Set MOONQ_API_KEYS (key=tenant,...), or MOONQ_ALLOW_OPEN=true if something in"
        " front of it already restricts access."
    )


def _require_upstream_key(settings: Settings) -> None:
    """Without a key every job would fail with a 401; a local upstream may need none."""
    if settings.moonshot_api_key is None and not settings.upstream_is_local:
        _fail(
            "MOONSHOT_API_KEY is not set, so every job would fail upstream with a 401. Set it,"
            " or point MOONSHOT_BASE_URL at a keyless upstream on a loopback address"
            " (e.g. http://127.0.0.1:8001/v1 for `moonq fake-moonshot`)."
        )


def _check_redis(settings: Settings) -> None:
    """Ask Redis once. A database it does not have, or credentials it refuses, would otherwise
    look like a Redis that is "not reachable yet" for ever; a Redis that is down is waited for.
    """
    import redis

    from moonq.redis import sync_client

    client = sync_client(settings)
    try:
        client.ping()
    except redis.AuthenticationError:
        _fail("invalid settings:\n  REDIS_URL: Redis refused its username or password")
    except redis.ResponseError as exc:
        if "DB index is out of range" in str(exc):
            database = redis_database(settings.redis_url)
            _fail(
                f"invalid settings:\n  REDIS_URL: that Redis has no database {database}"
                " (by default it has 0-15; see `databases` in its config)"
            )
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            _fail("invalid settings:\n  REDIS_URL: Redis wants a password (redis://:pw@host/0)")
    except (redis.RedisError, OSError):
        pass  # not up yet: the processes wait for it
    finally:
        client.close()


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port, 0 to 65535 (got {text!r})")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return int(text)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moonq", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="run the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=_port, default=8000)
    api.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="API processes on the one port (default: MOONQ_API_WORKERS, 1)",
    )
    api.set_defaults(run=_api)

    worker = sub.add_parser("worker", help="run an arq worker")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("-v", "--verbose", action="store_true")
    worker.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if the worker with process id --pid polled lately (healthcheck)",
    )
    worker.add_argument(
        "--pid",
        type=int,
        default=1,
        help="the worker --check asks about; default 1: a container's main process",
    )
    worker.set_defaults(run=_worker)

    dev = sub.add_parser("dev", help="API + worker in one process, with local fallbacks")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=_port, default=8000)
    dev.set_defaults(run=_dev)

    fake = sub.add_parser("fake-moonshot", help="run the fake Moonshot server")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=_port, default=8001)
    fake.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    fake.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    fake.add_argument(
        "--api-key", default=None, help="require this bearer key (default: accept any request)"
    )
    fake.add_argument("--usage-style", choices=("moonshot", "openai"), default="moonshot")
    fake.set_defaults(run=_fake)

    batch = sub.add_parser("batch", help="documents and batch files through a moonq server")
    batch_cli.configure(batch)
    batch.set_defaults(run=batch_cli.entry)
    job_cli.configure(top, sub)  # --version, submit, watch, status, cancel, jobs, usage
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
