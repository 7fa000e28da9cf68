"""`moonq batch`: documents and batch files from a terminal, through a moonq server.

Each failure ends the command with one line and an exit code of its own (see EXIT_CODES), never
a traceback; the server is found through --url / --api-key, or MOONQ_URL / MOONQ_API_KEY.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from moonq.batch_client import DEFAULT_URL, Client, CliError, ExitCode
from moonq.batch_dryrun import dry_run
from moonq.batch_results import TERMINAL, Results
from moonq.batch_run import RunOptions, collect, refused, run, validation_details
from moonq.client_errors import one_line, printable
from moonq.documents import Request
from moonq.job_view import Terminal

JSON = dict[str, Any]
Command = Callable[[argparse.Namespace, Client, Console], ExitCode]

EXIT_CODES = """exit codes: 0 done (run: every document completed), 1 other error, 2 bad arguments
(or an API key that cannot be sent), 3 server unreachable (or it redirects elsewhere), 4 API key
refused (401), 5 unknown batch or file (404), 6 refused as invalid (the bad lines are printed),
7 no documents found, 8 some documents not completed, 130 interrupted (Ctrl-C; a batch keeps
running on the server), 141 stdout closed early (as by `| head`)"""
# What a program killed by SIGPIPE ends with (128 + 13): its reader stopped reading.
PIPE_CLOSED = 141


def _metadata(value: str) -> tuple[str, str]:
    key, sep, item = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, item


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return number


def _print_json(value: Any) -> None:
    """ASCII-escaped: it can be written to any stdout, whatever its encoding."""
    print(json.dumps(value, indent=2))


def _when(stamp: Any) -> str:
    if not isinstance(stamp, int | float):
        return "-"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _run(args: argparse.Namespace, client: Client, console: Console) -> ExitCode:
    request = Request(args.model, args.prompt, args.system, args.max_tokens)
    if args.dry_run:
        documents = collect(args.paths, args.out)
        return dry_run(client, console, documents, request, Results.load(args.out))
    return run(client, console, RunOptions(args.paths, request, args.out))


def _submit(args: argparse.Namespace, client: Client, console: Console) -> ExitCode:
    uploaded = client.upload(args.file.name, args.file.read_bytes(), "batch")
    batch = client.create_batch(uploaded["id"], args.window, dict(args.metadata))
    if args.json:
        _print_json(batch)
    else:
        print(batch["id"])
    if batch.get("status") == "failed":
        raise refused(batch)
    return ExitCode.OK


def _describe(batch: JSON) -> list[str]:
    counts = batch.get("request_counts") or {}
    usage = batch.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    total = usage.get("total_tokens") or prompt + completion
    lines = [
        f"{batch['id']}: {batch.get('status')}",
        f"requests: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed,"
        f" {counts.get('total', 0)} in all",
        f"tokens: {total:,} ({prompt:,} prompt, {completion:,} completion)",
        f"created: {_when(batch.get('created_at'))}",
    ]
    for name in ("in_progress_at", "completed_at", "failed_at", "cancelled_at", "expired_at"):
        if batch.get(name):
            lines.append(f"{name.removesuffix('_at').replace('_', ' ')}: {_when(batch[name])}")
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name):
            lines.append(f"{name.removesuffix('_id').replace('_', ' ')}: {batch[name]}")
    return lines + validation_details(batch)


def _status(args: argparse.Namespace, client: Client, console: Console) -> ExitCode:
    batch = client.batch(args.id)
    if args.json:
        _print_json(batch)
    else:
        print("\n".join(printable(line) for line in _describe(batch)))
    return ExitCode.OK


def _missing_file(batch: JSON, errors: bool) -> str:
    """Why there is no such file: an ended batch without errors has no error file at all."""
    if errors and batch.get("status") in TERMINAL and batch.get("status") != "failed":
        return "error file: none of its lines failed, was cancelled or expired"
    return f"{'error' if errors else 'output'} file (yet)"


def _results(args: argparse.Namespace, client: Client, console: Console) -> ExitCode:
    batch = client.batch(args.id)
    file_id = batch.get("error_file_id" if args.errors else "output_file_id")
    if not file_id:
        print(f"moonq: batch {args.id} has no {_missing_file(batch, args.errors)}", file=sys.stderr)
        return ExitCode.OK
    sys.stdout.flush()
    with client.file_stream(file_id) as chunks:
        if args.out is not None:
            with args.out.open("wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
        else:
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    return ExitCode.OK


def _cancel(args: argparse.Namespace, client: Client, console: Console) -> ExitCode:
    batch = client.cancel(args.id)
    print(printable(f"{batch['id']}: {batch.get('status')}"))
    return ExitCode.OK


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def object_id(value: str) -> str:
    """An id given on the command line (job_..., batch_...): it goes into a URL's path, so
    one that is empty or has a slash or a space is refused here, not sent to another route."""
    if not _ID.fullmatch(value):
        raise argparse.ArgumentTypeError(f"not an id: {value!r}")
    return value


def connection_options() -> argparse.ArgumentParser:
    """`--url` and `--api-key`, for every command that talks to a server (`moonq batch`, jobs)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--url", help=f"the moonq server (default: $MOONQ_URL, else {DEFAULT_URL})"
    )
    options.add_argument("--api-key", help="its API key (default: $MOONQ_API_KEY)")
    return options


def hidden(text: str, args: argparse.Namespace) -> str:
    """`text` (an unforeseen error's) on one line, without the API key or the URL's password,
    should it quote either."""
    key = getattr(args, "api_key", None) or os.environ.get("MOONQ_API_KEY")
    url = getattr(args, "url", None) or os.environ.get("MOONQ_URL") or ""
    password = url.partition("://")[2].partition("/")[0].rpartition("@")[0].partition(":")[2]
    for secret in (key, password):
        if secret:
            text = text.replace(secret, "***")
    return one_line(text)


def stdout_closed() -> int:
    """Python's own advice for a reader that stopped reading (`| head`): send what is left
    of stdout to /dev/null, so the flush at exit cannot fail again, and end quietly with
    PIPE_CLOSED, as a program killed by SIGPIPE would."""
    with contextlib.suppress(OSError, ValueError):  # a stdout with no file behind it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return PIPE_CLOSED


def _add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    run_ = sub.add_parser(
        "run",
        parents=[common],
        help="ask the same question of every document, as one batch",
        description="One request per document: .txt/.md/.markdown and other UTF-8 files are"
        " read here; PDF, DOCX and other formats go through the server's file-extract. The"
        " document goes in a system message, then --prompt as the user message. Answers are"
        " appended to --out as they finish; running the same command again sends only what is"
        " not done, and picks up a batch an interrupted run left running.",
        epilog=EXIT_CODES,
    )
    run_.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    run_.add_argument("--prompt", required=True, help="what to ask of each document")
    run_.add_argument("--system", help="a system message before the document (default: none)")
    run_.add_argument("--model", required=True, help="e.g. kimi-k2.5, moonshot-v1-32k")
    run_.add_argument(
        "--out", required=True, type=Path, metavar="FILE", help="the results file (JSONL)"
    )
    run_.add_argument(
        "--dry-run",
        action="store_true",
        help="show each document's prompt tokens, the total, the cost and what would not fit;"
        " send nothing (only non-text documents are extracted, to count them)",
    )
    run_.add_argument("--max-tokens", type=_positive, help="answer length cap (default: none)")
    run_.set_defaults(batch_run=_run)


def _add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    submit = sub.add_parser("submit", parents=[common], help="submit a batch JSONL file")
    submit.add_argument("file", type=Path, metavar="FILE.jsonl")
    submit.add_argument("--window", default="24h", help="completion window (default: %(default)s)")
    submit.add_argument(
        "--metadata",
        type=_metadata,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metadata entry of the batch; repeat for more (default: none)",
    )
    submit.add_argument("--json", action="store_true", help="print the batch object, not its id")
    submit.set_defaults(batch_run=_submit)

    status = sub.add_parser("status", parents=[common], help="show a batch")
    status.add_argument("id", type=object_id, metavar="ID", help="a batch id (batch_...)")
    status.add_argument("--json", action="store_true", help="print the batch object")
    status.set_defaults(batch_run=_status)

    results = sub.add_parser("results", parents=[common], help="print a batch's output file")
    results.add_argument("id", type=object_id, metavar="ID", help="a batch id (batch_...)")
    results.add_argument("--errors", action="store_true", help="the error file instead")
    results.add_argument(
        "--out", type=Path, metavar="FILE", help="write to this file (default: stdout)"
    )
    results.set_defaults(batch_run=_results)

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a batch")
    cancel.add_argument("id", type=object_id, metavar="ID", help="a batch id (batch_...)")
    cancel.set_defaults(batch_run=_cancel)


def configure(batch: argparse.ArgumentParser) -> None:
    """Add the batch commands to `batch` (the `moonq batch` parser, or a parser of its own)."""
    batch.epilog = EXIT_CODES
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="COMMAND")
    common = connection_options()
    _add_run(sub, common)
    _add_commands(sub, common)


def execute(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """Run the parsed command; its exit code. Every failure is one line on stderr."""
    console = Terminal(markup=False, highlight=False, soft_wrap=True)
    try:
        with Client(args.url, args.api_key, transport) as client:
            code = int(args.batch_run(args, client, console))
        sys.stdout.flush()  # here, where a reader that has gone is caught, not at exit
        return code
    except CliError as exc:
        lines = (printable(line) for line in (f"moonq: {exc}", *exc.details))
        print(*lines, sep="\n", file=sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        print("moonq: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        return stdout_closed()
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"moonq: {where}{exc.strerror or exc}", file=sys.stderr)
        return int(ExitCode.ERROR)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        # An answer not shaped as the contract says: still one line, naming what was off.
        said = hidden(f"{type(exc).__name__}: {exc}", args)
        print(f"moonq: unexpected answer from the server ({said})", file=sys.stderr)
        return int(ExitCode.ERROR)
    except Exception as exc:  # a bug or a case not foreseen: still one line, never a traceback
        said = hidden(f"{type(exc).__name__}: {exc}", args)
        print(f"moonq: unexpected error ({said})", file=sys.stderr)
        return int(ExitCode.ERROR)


def entry(args: argparse.Namespace) -> None:
    """The `moonq batch` hook of moonq.cli."""
    sys.exit(execute(args))


def main(argv: Sequence[str] | None = None, transport: httpx.BaseTransport | None = None) -> int:
    """`moonq batch ARGS` on its own parser; tests inject the transport."""
    parser = argparse.ArgumentParser(prog="moonq batch")
    configure(parser)
    return execute(parser.parse_args(argv), transport)
