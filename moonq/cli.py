"""The `moonq` command: run the processes (api, worker, dev, fake-moonshot)."""

from __future__ import annotations

import argparse
import logging.config
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from moonq.settings import Settings, get_settings


def _api(args: argparse.Namespace) -> None:
    import uvicorn

    from api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(_settings()), host=args.host, port=args.port, log_level="info")


def _worker(args: argparse.Namespace) -> None:
    from arq.logs import default_log_config

    from worker.main import create_worker, worker_is_alive

    if args.check:
        sys.exit(0 if worker_is_alive() else "moonq: no worker has polled here lately")

    config = default_log_config(args.verbose)
    level = "DEBUG" if args.verbose else "INFO"
    config["loggers"]["moonq"] = {"level": level, "handlers": ["arq.standard"]}
    logging.config.dictConfig(config)
    create_worker(_settings(), burst=args.burst).run()


def _dev(args: argparse.Namespace) -> None:
    from moonq import dev

    dev.run(_settings(), args.host, args.port)


def _fake(args: argparse.Namespace) -> None:
    from moonq.fake_moonshot import FakeConfig, run

    config = FakeConfig(
        chunks=args.chunks, delay=args.delay, api_key=args.api_key, usage_style=args.usage_style
    )
    run(args.host, args.port, config)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        # Without the offending values: some settings are secrets.
        lines = [
            f"  {'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        sys.exit("moonq: invalid settings:\n" + "\n".join(lines))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moonq", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="run the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(run=_api)

    worker = sub.add_parser("worker", help="run an arq worker")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("-v", "--verbose", action="store_true")
    worker.add_argument(
        "--check", action="store_true", help="exit 0 if this host's worker is alive (healthcheck)"
    )
    worker.set_defaults(run=_worker)

    dev = sub.add_parser("dev", help="API + worker in one process, with local fallbacks")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(run=_dev)

    fake = sub.add_parser("fake-moonshot", help="run the fake Moonshot server")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8001)
    fake.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    fake.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    fake.add_argument("--api-key", default=None, help="require this bearer key")
    fake.add_argument("--usage-style", choices=("moonshot", "openai"), default="moonshot")
    fake.set_defaults(run=_fake)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
