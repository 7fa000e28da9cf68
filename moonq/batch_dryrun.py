"""`moonq batch run --dry-run`: what a run would send, what it would cost, and which documents
would not fit the model, before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from moonq import prices
from moonq.batch_client import Client, ExitCode, Unextractable
from moonq.batch_results import Results
from moonq.batch_run import text_of
from moonq.documents import Document, Request, body, local_estimate


class Estimator:
    """Prompt tokens from the server's tokenizer; characters/3 once the server has none."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.local = False

    def __call__(self, request: Request, text: str) -> int:
        chat = body(request, text)
        if not self.local:
            counted = self.client.estimate(chat)
            if counted is not None:
                return counted
            self.local = True
        return local_estimate(chat)


@dataclass(frozen=True)
class Row:
    document: Document
    tokens: int | None  # None: already done, or it has no text to send
    failure: Unextractable | None = None  # why it has none: a run records it as failed


def fits(tokens: int, request: Request) -> Text:
    """'yes', or why not: prompt and answer must both fit the model's context window."""
    window = prices.context_window(request.model)
    if window is None:
        return Text("unknown model")
    needed = tokens + (request.max_tokens or 0)
    if needed <= window:
        return Text("yes")
    extra = f" + {request.max_tokens:,} answer" if request.max_tokens else ""
    return Text.assemble(("TOO LONG", "bold red"), f": {tokens:,}{extra} > {window:,}")


def cost_lines(request: Request, prompt_tokens: int, documents: int) -> list[str]:
    known = prices.price(request.model)
    if known is None:
        return [f"estimated cost: unknown (no price known for {request.model})"]
    lines = [f"estimated input cost: ${prices.cost(request.model, prompt_tokens):,.4f}"]
    if request.max_tokens:
        most = prices.cost(request.model, 0, documents * request.max_tokens) or 0.0
        lines.append(f"answers: up to ${most:,.4f} ({documents} × --max-tokens)")
    else:
        lines.append(f"answers: ${known.output:.2f} per 1M answer tokens, on top")
    lines.append("(Moonshot's list prices as of 2026, in USD; they may change)")
    return lines


def estimate_rows(
    client: Client, documents: list[Document], request: Request, done: set[str]
) -> tuple[list[Row], bool]:
    """A row per document; whether the estimates are local."""
    estimate = Estimator(client)
    rows = []
    for document in documents:
        if document.custom_id in done:
            rows.append(Row(document, None))
            continue
        try:
            text = text_of(client, document)
        except Unextractable as exc:
            rows.append(Row(document, None, exc))
            continue
        rows.append(Row(document, estimate(request, text)))
    return rows, estimate.local


def table(rows: list[Row], request: Request, local: bool) -> Table:
    source = "characters/3" if local else "server tokenizer"
    out = Table(title=f"{request.model}: prompt tokens per document ({source})")
    out.add_column("document")
    out.add_column("prompt tokens", justify="right")
    out.add_column("fits the context window")
    for row in rows:
        if row.failure is not None:
            failure = Text.assemble((row.failure.label, "bold red"), f": {row.failure}")
            out.add_row(row.document.name, "-", failure)
        elif row.tokens is None:
            out.add_row(row.document.name, "-", "done already: skipped")
        else:
            out.add_row(row.document.name, f"{row.tokens:,}", fits(row.tokens, request))
    total = sum(row.tokens or 0 for row in rows)
    out.add_section()
    out.add_row(f"total ({sum(r.tokens is not None for r in rows)} to send)", f"{total:,}", "")
    return out


def dry_run(
    client: Client, console: Console, documents: list[Document], request: Request, out: Results
) -> ExitCode:
    done = out.completed()
    extracted = [d for d in documents if d.text is None and d.custom_id not in done]
    if extracted:
        console.print(
            f"{len(extracted)} document(s) are not plain text: the server extracts their text"
            " (Moonshot's file-extract) to count it; nothing else is sent",
            style="dim",
        )
    rows, local = estimate_rows(client, documents, request, done)
    console.print(table(rows, request, local))
    sent = [r for r in rows if r.tokens is not None]
    total = sum(r.tokens or 0 for r in sent)
    for line in cost_lines(request, total, len(sent)):
        console.print(line)
    console.print("dry run: no batch created, nothing sent for completion", style="dim")
    return ExitCode.OK
