"""`moonq submit | watch | status | cancel | jobs | usage`: jobs from a terminal, through a
moonq server (found as `moonq batch` finds it: --url / --api-key, or MOONQ_URL / MOONQ_API_KEY).

Each failure ends the command with one line on stderr and an exit code of its own (EXIT_CODES),
never a traceback; `--json` prints JSON for scripts (JSON lines for a stream of events).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from importlib import metadata
from itertools import islice
from typing import Any

import httpx

from moonq.batch_cli import connection_options, hidden, object_id, stdout_closed
from moonq.batch_client import explain
from moonq.client import Client
from moonq.client_errors import (
    APIError,
    AuthenticationError,
    ConfigurationError,
    ConnectionError,
    MoonqError,
    NotFound,
    Redirected,
    RouteNotFound,
)
from moonq.job_view import (
    Lines,
    Tokens,
    as_json,
    describe,
    jobs_table,
    print_json,
    print_table,
    usage_table,
)
from moonq.models import Status

DEFAULT_MODEL = "kimi-k2.5"
MAX_PAGE = 100  # the API's largest page of jobs


class Exit(IntEnum):
    OK = 0
    JOB_FAILED = 1
    USAGE = 2  # argparse's own
    UNREACHABLE = 3
    AUTH = 4
    NOT_FOUND = 5
    API_ERROR = 6
    UNEXPECTED = 7
    INTERRUPTED = 130
    PIPE_CLOSED = 141  # stdout closed early; batch_cli.stdout_closed() ends with it


EXIT_CODES = """exit codes:
  0    done
  1    the job failed or was cancelled (status, watch, submit --watch)
  2    bad arguments (or an API key that cannot be sent: a control character, a space...)
  3    the server is unreachable (or its event stream broke off and could not be resumed,
       or it redirects elsewhere: MOONQ_URL should be where it points)
  4    the API key was refused (401)
  5    no such job (404)
  6    any other refusal by the server (4xx, 5xx), e.g. 409 cancelling a job that has ended,
       or a 404 for the route itself (MOONQ_URL is not a moonq server's address)
  7    an answer not shaped as the API promises, or an unforeseen error
  130  interrupted (Ctrl-C; the job keeps running on the server)
  141  stdout was closed before the end (as by `| head`)"""

Command = Callable[[argparse.Namespace, Client], Exit]


class UsageError(Exception):
    """Bad input found only once the command runs (a prompt read from stdin): exit 2, as
    argparse's own usage errors."""


def version() -> str:
    try:
        return metadata.version("moonq")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def exit_code(exc: MoonqError) -> Exit:
    """The exit code a client error ends a command with."""
    if isinstance(exc, ConnectionError | Redirected):
        return Exit.UNREACHABLE
    if isinstance(exc, ConfigurationError):
        return Exit.USAGE
    if isinstance(exc, AuthenticationError):
        return Exit.AUTH
    if isinstance(exc, NotFound) and not isinstance(exc, RouteNotFound):
        return Exit.NOT_FOUND
    if isinstance(exc, APIError):
        return Exit.API_ERROR
    return Exit.UNEXPECTED


def outcome(status: Status) -> Exit:
    return Exit.JOB_FAILED if status in (Status.FAILED, Status.CANCELLED) else Exit.OK


# Following a job's events


def follow(client: Client, job_id: str, as_json: bool) -> Exit:
    """Print the job's events until its end; its outcome."""
    view = Lines() if as_json else Tokens(job_id, sys.stdout, sys.stderr)
    for event in client.job_events(job_id):
        view.show(event)
        if event.terminal:
            return Exit.OK if view.end(event.event, event.data) else Exit.JOB_FAILED
    # Defensive: the stream ended with no terminal event (a 204): the job says how it ended.
    job = client.get_job(job_id)
    ending = {Status.COMPLETED: "done", Status.FAILED: "error"}.get(job.status, "cancelled")
    details = job.result or (job.error.model_dump() if job.error else None)
    return Exit.OK if view.end(ending, details) else Exit.JOB_FAILED


# Commands


def _chat(args: argparse.Namespace) -> dict[str, Any]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():  # an empty message costs a request and answers nothing asked
        raise UsageError("the prompt read from stdin is empty: nothing to ask")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [*messages, {"role": "user", "content": prompt}],
    }
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    return body


def _submit(args: argparse.Namespace, client: Client) -> Exit:
    job = client.create_job(_chat(args), custom_id=args.custom_id)
    if args.watch:
        if args.json:
            print(as_json(job), flush=True)
        else:
            print(f"moonq: {job.id}", file=sys.stderr)
        return follow(client, job.id, args.json)
    if args.json:
        print_json(job)
    else:
        print(job.id)
    return Exit.OK


def _watch(args: argparse.Namespace, client: Client) -> Exit:
    return follow(client, args.id, args.json)


def _status(args: argparse.Namespace, client: Client) -> Exit:
    job = client.get_job(args.id)
    if args.json:
        print_json(job)
    else:
        print("\n".join(describe(job)))
    return outcome(job.status)


def _cancel(args: argparse.Namespace, client: Client) -> Exit:
    job = client.cancel_job(args.id)
    if args.json:
        print_json(job)
    else:
        print(f"{job.id}: {job.status.value}")
    return Exit.OK


def _jobs(args: argparse.Namespace, client: Client) -> Exit:
    found = client.list_jobs(status=args.status, limit=min(args.limit, MAX_PAGE))
    jobs = list(islice(found, args.limit))
    if args.json:
        print_json([job.model_dump(mode="json") for job in jobs])
    else:
        print_table(jobs_table(jobs))
    return Exit.OK


def _usage(args: argparse.Namespace, client: Client) -> Exit:
    report = client.usage(args.start, args.end)
    if args.json:
        print_json(report)
        return Exit.OK
    print_table(usage_table(report))
    if report.unpriced_models:
        unpriced = ", ".join(report.unpriced_models)
        print(f"no price known for {unpriced}: not in the cost total (MOONQ_PRICES)")
    return Exit.OK


# Arguments


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {value!r}")
    return int(value)


def _prompt(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty: give the message to send, or '-' for stdin")
    return value


def _day(value: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat() if len(value) == 10 else _not_a_day(value)
    except ValueError:
        return _not_a_day(value)


def _not_a_day(value: str) -> str:
    raise argparse.ArgumentTypeError(f"must be a UTC day as YYYY-MM-DD, got {value!r}")


def _command(
    sub: Any, common: argparse.ArgumentParser, name: str, run: Command, **kw: Any
) -> argparse.ArgumentParser:
    json_help = kw.pop("json_help")
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=[common],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.set_defaults(run=entry, job_run=run)
    return parser


def _add_submit(sub: Any, common: argparse.ArgumentParser) -> None:
    submit = _command(
        sub,
        common,
        "submit",
        _submit,
        help="queue a chat completion; print its job id",
        description="Queue one chat completion and print its job id.",
        json_help="print the job object; with --watch, the job and then each event as JSON lines",
    )
    submit.add_argument(
        "prompt", type=_prompt, help="the user message, not empty ('-' reads it from stdin)"
    )
    submit.add_argument("--model", default=DEFAULT_MODEL, help="the model (default: %(default)s)")
    submit.add_argument("--system", help="a system message before it (default: none)")
    submit.add_argument("--max-tokens", type=_positive, help="answer length cap (default: none)")
    submit.add_argument("--custom-id", help="your own id for the job (default: none)")
    submit.add_argument(
        "--watch", action="store_true", help="then print the answer as it streams, as `moonq watch`"
    )


def _add_job_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    watch = _command(
        sub,
        common,
        "watch",
        _watch,
        help="print a job's answer as it streams",
        description="Print the job's content as it streams, from the start, then live, to its"
        " end; reasoning goes to stderr (dimmed on a terminal), and so does the usage at the"
        " end. A dropped connection is resumed where it broke off.",
        json_help="print each event as a line of JSON",
    )
    status = _command(
        sub,
        common,
        "status",
        _status,
        help="show a job and its answer",
        description="Show the job: its status, times, tokens, error, and the answer's content.",
        json_help="print the job object",
    )
    cancel = _command(
        sub,
        common,
        "cancel",
        _cancel,
        help="cancel a queued or running job",
        description="Cancel a queued or running job; one that has ended is refused (exit 6).",
        json_help="print the job object",
    )
    for parser in (watch, status, cancel):
        parser.add_argument("id", type=object_id, metavar="ID", help="a job id (job_...)")


def _add_lists(sub: Any, common: argparse.ArgumentParser) -> None:
    jobs = _command(
        sub,
        common,
        "jobs",
        _jobs,
        help="list your jobs, newest first",
        description="Your jobs, newest first, as a table.",
        json_help="print a JSON array of job objects",
    )
    jobs.add_argument(
        "--status",
        choices=[status.value for status in Status],
        help="only jobs of this status (default: any)",
    )
    jobs.add_argument(
        "--limit", type=_positive, default=20, help="at most this many (default: %(default)s)"
    )
    usage = _command(
        sub,
        common,
        "usage",
        _usage,
        help="tokens and cost by day and model",
        description="Completed jobs' tokens and estimated cost by UTC day and model, with"
        " totals per model and in all.",
        json_help="print the usage report object",
    )
    usage.add_argument(
        "--start", type=_day, help="first UTC day, YYYY-MM-DD (default: 29 days before --end)"
    )
    usage.add_argument("--end", type=_day, help="last UTC day, YYYY-MM-DD (default: today)")


def configure(top: argparse.ArgumentParser, sub: Any) -> None:
    """Add `--version` and the job commands to the `moonq` parser and its subparsers."""
    top.add_argument("--version", action="version", version=f"moonq {version()}")
    common = connection_options()
    _add_submit(sub, common)
    _add_job_commands(sub, common)
    _add_lists(sub, common)


def _missing(args: argparse.Namespace) -> str:
    job_id = getattr(args, "id", None)
    if job_id is not None:
        return f"no job {job_id} on this server"
    return "not found on the server (is it an older moonq?)"


def execute(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """Run the parsed command; its exit code. Every failure is one line on stderr."""
    try:
        with Client(args.url, args.api_key, transport=transport) as client:
            code = int(args.job_run(args, client))
        sys.stdout.flush()  # here, where a reader that has gone is caught, not at exit
        return code
    except MoonqError as exc:
        print(f"moonq: {explain(exc, _missing(args))}", file=sys.stderr)
        return int(exit_code(exc))
    except UsageError as exc:
        print(f"moonq: {exc}", file=sys.stderr)
        return int(Exit.USAGE)
    except KeyboardInterrupt:
        print("moonq: interrupted (a job keeps running on the server)", file=sys.stderr)
        return int(Exit.INTERRUPTED)
    except BrokenPipeError:
        return stdout_closed()
    except Exception as exc:  # a bug or a case not foreseen: still one line, never a traceback
        said = hidden(f"{type(exc).__name__}: {exc}", args)
        print(f"moonq: unexpected error ({said})", file=sys.stderr)
        return int(Exit.UNEXPECTED)


def entry(args: argparse.Namespace) -> None:
    """The hook of moonq.cli for each job command."""
    sys.exit(execute(args))


def main(argv: Sequence[str] | None = None, transport: httpx.BaseTransport | None = None) -> int:
    """The job commands on a `moonq` parser of their own; tests inject the transport."""
    top = argparse.ArgumentParser(prog="moonq")
    configure(top, top.add_subparsers(dest="command", required=True))
    return execute(top.parse_args(argv), transport)
