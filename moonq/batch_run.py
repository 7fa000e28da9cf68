"""`moonq batch run`: one request per document, sent as one batch, each answer appended to the
results file as it finishes. A re-run sends only what is not done, and picks up a batch that an
interrupted run left running instead of sending it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from moonq.batch_client import Client, CliError, EmptyDocument, ExitCode, Unextractable
from moonq.batch_results import TERMINAL, Results, State, record, state_path
from moonq.batch_watch import Tracker, View, watch
from moonq.documents import Document, Request, batch_line, load, named_files

JSON = dict[str, Any]


@dataclass(frozen=True)
class RunOptions:
    paths: Sequence[Path]
    request: Request
    out: Path
    window: str = "24h"


def collect(paths: Sequence[Path], out: Path) -> list[Document]:
    """The documents under `paths`, never the results file or its state file."""
    for path in paths:
        if not path.exists():
            raise CliError(f"no such file or folder: {path}", ExitCode.NO_DOCUMENTS)
    state = state_path(out)
    try:
        files = named_files(paths, exclude=[out, state, state.with_name(state.name + ".tmp")])
    except ValueError as exc:  # two documents with one name: their answers could not be told apart
        raise CliError(f"{exc}: name them through different arguments") from exc
    if not files:
        shown = ", ".join(str(p) for p in paths)
        raise CliError(f"no documents found under {shown}", ExitCode.NO_DOCUMENTS)
    return load(files)


def text_of(client: Client, document: Document) -> str:
    """Its text: read here, or extracted by the server (PDF, DOCX, ...). `EmptyDocument`
    for none (an empty file, or a scan without a text layer)."""
    text = document.text
    if text is None:
        content = document.path.read_bytes()
        text = client.extract(document.path.name, content) if content else ""
    if not text.strip():
        raise EmptyDocument(
            "no text in it (an empty file, or a scan without a text layer): nothing to ask about"
        )
    return text


def validation_details(batch: JSON) -> list[str]:
    """A failed batch's bad lines, one per line of output."""
    errors = (batch.get("errors") or {}).get("data") or []
    lines = []
    for error in errors:
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        param = f" ({error['param']})" if error.get("param") else ""
        lines.append(f"  {where}{error.get('message') or error.get('code')}{param}")
    return lines


def refused(batch: JSON) -> CliError:
    return CliError(
        f"the server refused batch {batch['id']}:", ExitCode.INVALID, validation_details(batch)
    )


def follow_batch(
    client: Client,
    console: Console,
    results: Results,
    batch: JSON,
    paths: dict[str, str],
) -> JSON:
    """Watch `batch` to its end with a progress bar; Ctrl-C stops watching, not the batch."""
    total = int((batch.get("request_counts") or {}).get("total") or len(paths))
    try:
        with View(console, total, batch["id"]) as view:
            return watch(Tracker(client, results, batch["id"], paths, view))
    except KeyboardInterrupt:
        raise CliError(
            f"stopped watching: batch {batch['id']} keeps running on the server. Run the same"
            f" command again to pick it up (`moonq batch status {batch['id']}` shows it)",
            ExitCode.INTERRUPTED,
        ) from None


def resume(client: Client, console: Console, results: Results, state: State) -> set[str]:
    """Finish the batch an earlier run left behind; the custom_ids it tried, when it was still
    running (their failures are news of this run, not to be retried at once)."""
    saved = state.load()
    if saved is None:
        return set()
    try:
        batch = client.batch(saved["batch_id"])
    except CliError as exc:
        if exc.code != ExitCode.NOT_FOUND:
            raise
        state.clear()  # expired on the server: its lines are sent again
        return set()
    running = batch.get("status") not in TERMINAL
    if running:
        console.print(f"picking up batch {batch['id']} ({batch.get('status')}) from an earlier run")
    final = follow_batch(client, console, results, batch, dict(saved["documents"]))
    state.clear()
    if final.get("status") == "failed" and validation_details(final):
        raise refused(final)
    return set(saved["documents"]) if running else set()


def batch_lines(
    client: Client, results: Results, pending: list[Document], request: Request
) -> dict[str, str]:
    """custom_id → batch line; a document the server cannot extract is written as failed."""
    lines = {}
    for document in pending:
        try:
            text = text_of(client, document)
        except Unextractable as exc:
            error = {"code": exc.error_code, "message": str(exc)}
            results.append(record(document.custom_id, document.name, "failed", None, error=error))
            continue
        lines[document.custom_id] = batch_line(document.custom_id, request, text)
    return lines


def submit(
    client: Client,
    console: Console,
    results: Results,
    state: State,
    pending: list[Document],
    options: RunOptions,
) -> None:
    """Send the pending documents as one batch and watch it to its end."""
    lines = batch_lines(client, results, pending, options.request)
    if not lines:
        return
    content = "".join(line + "\n" for line in lines.values()).encode()
    uploaded = client.upload(f"{options.out.stem}.batch.jsonl", content, "batch")
    metadata = {"source": "moonq batch run", "results": options.out.name}
    batch = client.create_batch(uploaded["id"], options.window, metadata)
    paths = {d.custom_id: d.name for d in pending if d.custom_id in lines}
    state.save(batch["id"], paths)
    console.print(f"batch {batch['id']}: {len(lines)} documents sent")
    final = follow_batch(client, console, results, batch, paths)
    state.clear()
    if final.get("status") == "failed" and validation_details(final):
        raise refused(final)


def summary(console: Console, documents: list[Document], results: Results) -> ExitCode:
    latest = results.latest
    done = sum(latest.get(d.custom_id, {}).get("status") == "completed" for d in documents)
    console.print(f"{done} of {len(documents)} documents completed; results in {results.path}")
    if done == len(documents):
        return ExitCode.OK
    console.print(
        f"{len(documents) - done} not completed (their error is in {results.path});"
        " run the same command again to retry them"
    )
    return ExitCode.SOME_FAILED


def run(client: Client, console: Console, options: RunOptions) -> ExitCode:
    if not options.out.parent.is_dir() or options.out.is_dir():
        raise CliError(f"--out {options.out}: not a file in an existing folder")
    documents = collect(options.paths, options.out)
    results = Results.load(options.out)
    state = State(state_path(options.out))
    tried = resume(client, console, results, state)
    skip = results.completed() | tried
    pending = [d for d in documents if d.custom_id not in skip]
    if not pending:
        console.print("nothing to send: every document is done or was just tried")
    else:
        submit(client, console, results, state, pending, options)
    return summary(console, documents, results)
