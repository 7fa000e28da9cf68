"""`moonq batch`: documents from a terminal. Unit tests run the command against an in-memory
server (tests/batch_fake.py) behind httpx.MockTransport; the end-to-end tests at the bottom run
it against the real API, worker and fake upstream."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from moonq import batch_cli, batch_watch
from moonq.batch_client import ExitCode
from moonq.documents import Request, batch_line, body, decode_text, load, named_files
from moonq.fake_moonshot import expected_content
from moonq.prices import context_window, cost
from tests.batch_fake import FakeMoonq, multipart
from tests.conftest import until
from tests.procs import clean_env, start

URL = "http://moonq.test"
PROMPT = "Summarise in one line."


@pytest.fixture(autouse=True)
def _terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server settings from the caller's shell; a wide terminal for the tables."""
    monkeypatch.delenv("MOONQ_URL", raising=False)
    monkeypatch.delenv("MOONQ_API_KEY", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(batch_watch, "POLL_EVERY", 0.01)
    monkeypatch.setattr(batch_watch, "RECONNECT_AFTER", 0.01)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    """Five documents in nested folders, plus what is not a document."""
    root = tmp_path / "docs"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "alpha.txt").write_text("Alpha is about apples.")
    (root / "b" / "beta.md").write_text("# Beta\nBeta is about bees.")
    (root / "b" / "deep" / "gamma.markdown").write_text("Gamma: gardens.")
    (root / "b" / "delta.csv").write_text("name,topic\ndelta,dunes\n")
    (root / "epsilon.txt").write_text("Epsilon is about eels.")
    (root / ".hidden.txt").write_text("not a document")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")
    return root


def batch(fake: FakeMoonq | None, *argv: str | Path) -> int:
    transport = fake.transport() if fake else None
    return batch_cli.main([str(a) for a in argv] + ["--url", URL], transport=transport)


def run(fake: FakeMoonq, docs: Path, out: Path, *extra: str) -> int:
    args = ("run", docs, "--prompt", PROMPT, "--model", "kimi-k2.5", "--out", out, *extra)
    return batch(fake, *args)


def results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().split("\n") if line]


# Documents: found, named, read, turned into lines


def test_documents_are_found_recursively_in_order_without_hidden_files(docs: Path) -> None:
    found = named_files([docs], exclude=[docs / "alpha.txt"])
    names = [name for _, name in found]
    assert names == ["b/beta.md", "b/deep/gamma.markdown", "b/delta.csv", "epsilon.txt"]
    assert [path.relative_to(docs).as_posix() for path, _ in found] == names
    # a file named twice (directly and through its folder) is one document
    twice = named_files([docs / "b" / "beta.md", docs / "b"])
    assert sorted(p for p, _ in twice) == sorted(p for p, _ in named_files([docs / "b"]))


def test_custom_ids_stay_when_the_folder_moves_and_change_with_the_content(
    docs: Path, tmp_path: Path
) -> None:
    first = {d.name: d.custom_id for d in load(named_files([docs]))}
    assert first["b/beta.md"].startswith("b/beta.md#") and len(set(first.values())) == 5
    moved = shutil.copytree(docs, tmp_path / "elsewhere" / "copy")
    assert {d.name: d.custom_id for d in load(named_files([moved]))} == first
    (moved / "b" / "beta.md").write_text("# Beta\nBeta is about bears now.")
    again = {d.name: d.custom_id for d in load(named_files([moved]))}
    assert {n for n in first if first[n] != again[n]} == {"b/beta.md"}


def test_custom_ids_depend_on_the_arguments_not_on_the_other_files_found(
    tmp_path: Path,
) -> None:
    """Adding a file elsewhere under the same folder renames nothing, so nothing is paid twice."""
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "a" / "x.txt").write_text("x")
    (tmp_path / "docs" / "a" / "y.txt").write_text("y")
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    assert run(fake, tmp_path / "docs", out) == ExitCode.OK
    (tmp_path / "docs" / "b").mkdir()
    (tmp_path / "docs" / "b" / "z.txt").write_text("z")
    assert run(fake, tmp_path / "docs", out) == ExitCode.OK
    assert [line.custom_id.split("#")[0] for line in fake.lines["batch_2"]] == ["b/z.txt"]
    assert [r["path"] for r in results(out)] == ["a/x.txt", "a/y.txt", "b/z.txt"]


def test_several_arguments_name_documents_by_their_argument_without_collisions(
    tmp_path: Path,
) -> None:
    for folder in ("one", "two", "p/docs", "q/docs"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.txt").write_text("the same text")
    (tmp_path / "p" / "note.md").write_text("a note")

    def names(*paths: str) -> list[str]:
        return [name for _, name in named_files([tmp_path / p for p in paths])]

    assert names("one") == ["x.txt"] and names("p/note.md") == ["note.md"]
    assert names("one", "two", "p/note.md") == ["note.md", "one/x.txt", "two/x.txt"]
    given = [(tmp_path / p).as_posix() for p in ("p/docs", "q/docs")]
    assert names("p/docs", "q/docs") == [f"{given[0]}/x.txt", f"{given[1]}/x.txt"]
    assert names("one/x.txt", "two/x.txt") == [
        f"{(tmp_path / p).as_posix()}/x.txt" for p in ("one", "two")
    ]
    documents = load(named_files([tmp_path / "one", tmp_path / "two"]))
    assert len({d.custom_id for d in documents}) == 2


@pytest.mark.parametrize(
    ("name", "raw", "local"),
    [
        ("notes.txt", b"plain", True),
        ("notes.md", b"\xff\xfe broken bytes", True),  # a text suffix is read whatever it holds
        ("data.csv", "naïve,ok".encode(), True),  # any UTF-8 text
        ("report.pdf", b"%PDF-1.7 ascii looking", False),
        ("scan.bin", b"\x89PNG\r\n\x1a\n\x00\x00", False),
        ("letter.docx", b"PK\x03\x04", False),
    ],
)
def test_text_is_read_here_and_other_formats_go_to_file_extract(
    name: str, raw: bytes, local: bool
) -> None:
    assert (decode_text(Path(name), raw) is not None) == local


def test_a_batch_line_puts_the_document_in_a_system_message_after_the_callers() -> None:
    request = Request("kimi-k2.5", "What is it about?", system="Be brief.", max_tokens=50)
    line = json.loads(batch_line("a.txt#0123", request, "Document text."))
    assert line == {
        "custom_id": "a.txt#0123",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "kimi-k2.5",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "system", "content": "Document text."},
                {"role": "user", "content": "What is it about?"},
            ],
            "max_tokens": 50,
        },
    }
    plain = json.loads(batch_line("a", Request("m", "q"), "t"))["body"]
    assert [m["role"] for m in plain["messages"]] == [
        "system",
        "user",
    ] and "max_tokens" not in plain


def test_the_price_table_and_context_windows() -> None:
    assert context_window("moonshot-v1-8k") == 8_192 and context_window("kimi-k2.6") == 262_144
    assert context_window("moonshot-v1-auto") == 131_072 and context_window("gpt-x") is None
    assert cost("kimi-k2.5", 1_000_000, 1_000_000) == pytest.approx(3.60)
    assert cost("no-such-model", 10) is None


# Running: results appended, resumed, retried


def test_run_writes_every_answer_and_a_rerun_sends_nothing(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    assert run(fake, docs, out) == ExitCode.OK
    written = results(out)
    assert {r["path"] for r in written} == {d.name for d in load(named_files([docs]))}
    for entry in written:
        assert entry["status"] == "completed" and entry["error"] is None
        assert entry["content"].startswith(PROMPT)  # the answer, from the fake's echo
        assert (docs / entry["path"]).read_text()[:10] in entry["content"]
        assert entry["usage"]["total_tokens"] == 20
    assert "5 of 5 documents completed" in capsys.readouterr().out
    assert not (tmp_path / "answers.jsonl.moonq.json").exists()  # the batch is over

    assert run(fake, docs, out) == ExitCode.OK
    assert fake.calls("POST", "/v1/batches") == 1 and fake.calls("POST", "/v1/files") == 1
    assert results(out) == written
    assert "nothing to send" in capsys.readouterr().out


def test_an_edited_document_is_the_only_one_sent_again(docs: Path, tmp_path: Path) -> None:
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    assert run(fake, docs, out) == ExitCode.OK
    (docs / "epsilon.txt").write_text("Epsilon is about eagles.")
    assert run(fake, docs, out) == ExitCode.OK
    second = fake.lines["batch_2"]
    assert [line.custom_id.split("#")[0] for line in second] == ["epsilon.txt"]
    assert "eagles" in results(out)[-1]["content"]


def test_failed_documents_exit_8_and_only_they_are_retried(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "answers.jsonl"
    ids = {d.name: d.custom_id for d in load(named_files([docs]))}
    fake = FakeMoonq(fail={ids["b/beta.md"]})
    assert run(fake, docs, out) == ExitCode.SOME_FAILED
    failed = [r for r in results(out) if r["status"] != "completed"]
    assert [(r["path"], r["content"]) for r in failed] == [("b/beta.md", None)]
    assert failed[0]["error"]["message"]
    assert "1 not completed" in capsys.readouterr().out

    fake.fail.clear()
    assert run(fake, docs, out) == ExitCode.OK
    assert [line.custom_id for line in fake.lines["batch_2"]] == [ids["b/beta.md"]]


def test_a_batch_left_running_is_picked_up_not_sent_again(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier run was stopped after it created its batch and wrote two answers."""
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    documents = load(named_files([docs]))
    request = Request("kimi-k2.5", PROMPT)
    text = "\n".join(batch_line(d.custom_id, request, d.text or "") for d in documents)
    running = fake.new_batch(text)
    fake.finish(running["id"], 2)
    state = {"batch_id": running["id"], "documents": {d.custom_id: d.name for d in documents}}
    (tmp_path / "answers.jsonl.moonq.json").write_text(json.dumps(state))
    out.write_text("".join(json.dumps(line) + "\n" for line in picked_lines(fake, documents[:2])))

    assert run(fake, docs, out) == ExitCode.OK
    assert "picking up batch batch_1" in capsys.readouterr().out
    assert fake.calls("POST", "/v1/batches") == 0  # nothing sent again
    assert sorted(r["path"] for r in results(out)) == sorted(d.name for d in documents)
    assert not (tmp_path / "answers.jsonl.moonq.json").exists()


def picked_lines(fake: FakeMoonq, documents: list[Any]) -> list[dict[str, Any]]:
    """The results lines an interrupted run had written for these documents."""
    return [
        {"custom_id": d.custom_id, "path": d.name, "status": "completed", "batch_id": "batch_1"}
        for d in documents
    ]


@pytest.mark.parametrize("mode", ["dropped stream", "no event stream"])
def test_without_a_steady_event_stream_every_answer_still_arrives(
    docs: Path, tmp_path: Path, mode: str
) -> None:
    fake = FakeMoonq(drop_after=2) if mode == "dropped stream" else FakeMoonq(events=False)
    out = tmp_path / "answers.jsonl"
    assert batch_cli.main(
        ["run", str(docs), "--prompt", PROMPT, "--model", "m", "--out", str(out), "--url", URL],
        transport=fake.transport(),
    ) == ExitCode.OK  # fmt: skip
    assert len({r["custom_id"] for r in results(out)}) == len(results(out)) == 5
    if mode == "dropped stream":
        assert fake.streams == [None, "2"]  # resumed after the last event it saw
    else:
        assert fake.calls("GET", "/v1/batches/batch_1") >= 5  # polled


def test_ctrl_c_stops_watching_and_says_how_to_resume(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"

    def interrupted(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            raise KeyboardInterrupt
        return fake.handle(request)

    args = ["run", str(docs), "--prompt", PROMPT, "--model", "m", "--out", str(out)]
    code = batch_cli.main([*args, "--url", URL], transport=httpx.MockTransport(interrupted))
    assert code == ExitCode.INTERRUPTED
    err = capsys.readouterr().err
    assert "batch_1 keeps running on the server" in err and "same command again" in err
    assert "Traceback" not in err
    assert json.loads((tmp_path / "answers.jsonl.moonq.json").read_text())["batch_id"] == "batch_1"
    assert run(fake, docs, out) == ExitCode.OK and fake.calls("POST", "/v1/batches") == 1


def test_a_results_file_cut_mid_line_is_resumed(docs: Path, tmp_path: Path) -> None:
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    assert run(fake, docs, out) == ExitCode.OK
    whole = out.read_text()
    out.write_text(whole[: whole.rindex("\n", 0, -1) + 30])  # the last line torn off
    assert run(fake, docs, out) == ExitCode.OK
    assert len(fake.lines["batch_2"]) == 1  # only the document whose line was torn
    assert sum(1 for line in out.read_text().splitlines() if line.endswith("}")) == 5


def test_answers_with_unicode_line_separators_are_recognised_as_done(
    tmp_path: Path,
) -> None:
    """json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 unescaped in a line."""
    folder = tmp_path / "in"
    folder.mkdir()
    for number, separator in enumerate(["\u2028", "\u2029", "\x85"]):
        (folder / f"doc{number}.txt").write_text(f"before{separator}after")
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    assert run(fake, folder, out) == ExitCode.OK
    assert run(fake, folder, out) == ExitCode.OK
    assert fake.calls("POST", "/v1/batches") == 1  # nothing sent again
    written = results(out)
    assert len(written) == 3 and all(r["status"] == "completed" for r in written)
    assert "before\u2028after" in written[0]["content"]


def refusing(fake: FakeMoonq, status: int, message: str) -> httpx.MockTransport:
    """The fake, except that file-extract uploads named bad.* are refused with `status`."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/files":
            name, _ = multipart(request)["file"]
            if name and name.startswith("bad."):
                return httpx.Response(status, json={"error": {"message": message}})
        return fake.handle(request)

    return httpx.MockTransport(handle)


@pytest.mark.parametrize("status", [404, 413, 415, 422])
def test_a_document_the_server_cannot_extract_fails_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.pdf").write_bytes(b"%PDF-broken")
    (folder / "good.pdf").write_bytes(b"%PDF-1.7 fine")
    (folder / "note.txt").write_text("a note")
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    message = f"The upstream refused the file: unsupported ({status} test)"
    argv = ["run", str(folder), "--prompt", PROMPT, "--model", "moonshot-v1-8k", "--out", str(out)]

    code = batch_cli.main(
        [*argv, "--dry-run", "--url", URL], transport=refusing(fake, status, message)
    )
    assert code == ExitCode.OK
    shown = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in shown.splitlines() if "│" in line}
    assert "cannot extract: The upstream refused" in rows["bad.pdf"]
    assert "yes" in rows["good.pdf"] and "yes" in rows["note.txt"]
    assert "total (2 to send)" in shown

    code = batch_cli.main([*argv, "--url", URL], transport=refusing(fake, status, message))
    assert code == ExitCode.SOME_FAILED
    by_path = {r["path"]: r for r in results(out)}
    assert by_path["good.pdf"]["status"] == by_path["note.txt"]["status"] == "completed"
    assert (
        by_path["bad.pdf"]["status"] == "failed"
        and message in by_path["bad.pdf"]["error"]["message"]
    )
    assert [line.custom_id.split("#")[0] for line in fake.lines["batch_1"]] == [
        "good.pdf",
        "note.txt",
    ]


def test_a_document_without_text_is_not_sent_and_fails_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty file (or blank, or a PDF of zero bytes) is a question about nothing: paid for,
    answered from the prompt alone. It is a `failed` line, and the others go on."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "blank.md").write_text(" \n\n")
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "note.txt").write_text("a note")
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"

    assert run(fake, folder, out, "--dry-run") == ExitCode.OK
    shown = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in shown.splitlines() if "│" in line}
    for name in ("empty.txt", "blank.md", "empty.pdf"):
        assert "not sent: no text in it" in rows[name]
    assert "total (1 to send)" in shown

    assert run(fake, folder, out) == ExitCode.SOME_FAILED
    by_path = {r["path"]: r for r in results(out)}
    assert by_path["note.txt"]["status"] == "completed"
    for name in ("empty.txt", "blank.md", "empty.pdf"):
        assert by_path[name]["status"] == "failed"
        assert by_path[name]["error"]["code"] == "empty_document"
    assert [line.custom_id.split("#")[0] for line in fake.lines["batch_1"]] == ["note.txt"]
    assert fake.calls("POST", "/v1/files") == 1  # the batch file alone: no empty upload
    assert "1 of 4 documents completed" in capsys.readouterr().out


def test_other_formats_are_extracted_by_the_server_and_the_upload_deleted(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "report.pdf").write_bytes(b"%PDF-1.7 quarterly numbers")
    (folder / "note.txt").write_text("a note")
    fake, out = FakeMoonq(), tmp_path / "answers.jsonl"
    assert run(fake, folder, out) == ExitCode.OK
    assert fake.calls("DELETE", "/v1/files/") == 1  # the extract upload, once read
    purposes = [purpose for _, purpose, _ in fake.files.values()]
    assert purposes == ["batch"]
    report = next(line for line in fake.lines["batch_1"] if line.custom_id.startswith("report"))
    assert report.body["messages"][0]["content"].startswith("extracted report.pdf: %PDF-1.7")


# Dry run


def test_dry_run_counts_prices_and_flags_what_is_too_long_and_sends_nothing(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (docs / "huge.txt").write_text("word " * 40_000)  # 200k characters: too long for 8k
    fake = FakeMoonq()
    out = tmp_path / "answers.jsonl"
    args = ("run", docs, "--prompt", PROMPT, "--model", "moonshot-v1-8k", "--out", out)
    assert batch(fake, *args, "--dry-run", "--max-tokens", "100") == ExitCode.OK
    shown = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in shown.splitlines() if "│" in line}
    assert "TOO LONG" in rows["huge.txt"] and "yes" in rows["alpha.txt"]
    assert sum("TOO LONG" in row for row in rows.values()) == 1
    assert "server tokenizer" in shown
    estimates = fake.calls("POST", "/v1/tokenizers/estimate-token-count")
    assert estimates == 6 and f"{(200_000 + len(PROMPT)) // 4 + 1:,}" in rows["huge.txt"]
    assert "estimated input cost: $" in shown and "6 × --max-tokens" in shown
    assert fake.calls("POST", "/v1/files") == fake.calls("POST", "/v1/batches") == 0
    assert not out.exists()


def test_dry_run_estimates_locally_without_a_tokenizer_and_skips_what_is_done(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "answers.jsonl"
    assert run(FakeMoonq(), docs, out) == ExitCode.OK
    (docs / "new.txt").write_text("x" * 300)
    capsys.readouterr()
    fake = FakeMoonq(estimate=False)
    assert run(fake, docs, out, "--dry-run") == ExitCode.OK
    shown = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in shown.splitlines() if "│" in line}
    expected = -(-(300 + len(PROMPT)) // 3)  # characters / 3, rounded up
    assert f" {expected:,} " in rows["new.txt"]
    assert "done already" in rows["alpha.txt"] and "characters/3" in shown
    assert "total (1 to send)" in shown


def test_dry_run_of_an_unknown_model_says_the_cost_is_unknown(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("run", docs, "--prompt", "q", "--model", "my-local-llm", "--out", tmp_path / "o")
    assert batch(FakeMoonq(), *args, "--dry-run") == ExitCode.OK
    shown = capsys.readouterr().out
    assert "estimated cost: unknown" in shown and "unknown model" in shown


# The other commands, and failures


def test_submit_status_results_and_cancel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeMoonq()
    request = Request("kimi-k2.5", "hi")
    upload = tmp_path / "in.jsonl"
    upload.write_text("".join(batch_line(f"r{i}", request, f"doc {i}") + "\n" for i in range(3)))
    assert batch(fake, "submit", upload, "--metadata", "team=blue") == ExitCode.OK
    assert capsys.readouterr().out.strip() == "batch_1"
    assert fake.batches["batch_1"]["metadata"] == {"team": "blue"}

    fake.finish("batch_1", 2)
    fake.fail.add("r2")
    assert batch(fake, "status", "batch_1") == ExitCode.OK
    assert "batch_1: in_progress" in (shown := capsys.readouterr().out)
    assert "2 completed, 0 failed, 3 in all" in shown
    assert batch(fake, "status", "batch_1", "--json") == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["request_counts"]["completed"] == 2

    assert batch(fake, "results", "batch_1") == ExitCode.OK
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["custom_id"] for line in lines] == ["r0", "r1"]  # what is over so far
    assert batch(fake, "cancel", "batch_1") == ExitCode.OK
    assert capsys.readouterr().out.strip() == "batch_1: cancelled"
    saved = tmp_path / "errors.jsonl"
    assert batch(fake, "results", "batch_1", "--errors", "--out", saved) == ExitCode.OK
    assert [json.loads(line)["custom_id"] for line in saved.read_text().splitlines()] == ["r2"]


def test_results_errors_of_a_batch_that_ended_without_one_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeMoonq()
    upload = tmp_path / "in.jsonl"
    upload.write_text(batch_line("r0", Request("kimi-k2.5", "hi"), "doc") + "\n")
    assert batch(fake, "submit", upload) == ExitCode.OK
    fake.finish("batch_1", 1)
    capsys.readouterr()
    assert batch(fake, "results", "batch_1", "--errors") == ExitCode.OK
    out, err = capsys.readouterr()
    assert out == ""
    expected = "has no error file: none of its lines failed, was cancelled or expired"
    assert err == f"moonq: batch batch_1 {expected}\n"


def test_a_refused_batch_file_prints_its_bad_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upload = tmp_path / "bad.jsonl"
    good = batch_line("ok", Request("m", "q"), "t")
    upload.write_text(f'{good}\nnot json\n{{"custom_id": 7}}\n')
    assert batch(FakeMoonq(), "submit", upload, "--json") == ExitCode.INVALID
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "failed"
    assert "refused batch batch_1" in captured.err
    assert "line 2: bad line" in captured.err and "line 3: bad line" in captured.err


@pytest.mark.parametrize("answer", [["not", "an", "object"], {"data": 7}, "just a string"])
def test_dry_run_falls_back_to_the_local_estimate_on_a_misshapen_answer(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: Any
) -> None:
    fake = FakeMoonq()

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/tokenizers/estimate-token-count":
            return httpx.Response(200, json=answer)
        return fake.handle(request)

    args = [
        "run",
        str(docs),
        "--prompt",
        PROMPT,
        "--model",
        "kimi-k2.5",
        "--out",
        str(tmp_path / "o"),
    ]
    assert (
        batch_cli.main([*args, "--dry-run", "--url", URL], transport=httpx.MockTransport(handle))
        == 0
    )
    captured = capsys.readouterr()
    assert "characters/3" in captured.out and "total (5 to send)" in captured.out
    assert captured.err == ""


def test_an_unforeseen_error_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("something nobody planned for")

    code = batch_cli.main(
        ["status", "batch_1", "--url", URL], transport=httpx.MockTransport(broken)
    )
    assert code == ExitCode.ERROR
    err = capsys.readouterr().err
    assert err.startswith("moonq: ") and "something nobody planned for" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("fake", "argv", "code", "message"),
    [
        (FakeMoonq(key="sk-right"), ["status", "batch_1"], ExitCode.AUTH, "refused the API key"),
        (FakeMoonq(), ["status", "batch_9"], ExitCode.NOT_FOUND, "no batch batch_9"),
        (FakeMoonq(), ["cancel", "batch_9"], ExitCode.NOT_FOUND, "no batch batch_9"),
        (None, ["status", "batch_1"], ExitCode.UNREACHABLE, "cannot reach the moonq server at"),
    ],
)
def test_each_failure_is_one_line_with_its_own_exit_code(
    fake: FakeMoonq | None,
    argv: list[str],
    code: ExitCode,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOONQ_API_KEY", "sk-wrong")
    if fake is None:  # nothing listens there
        monkeypatch.setenv("MOONQ_URL", "http://127.0.0.1:9")
        assert batch_cli.main(argv) == code
    else:
        assert batch(fake, *argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("moonq: ") and message in err
    assert "sk-wrong" not in err


def test_a_key_or_a_redirect_that_cannot_work_is_one_line_with_its_exit_code(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONQ_API_KEY", "sk-secret\r")
    assert batch(FakeMoonq(), "status", "batch_1") == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "MOONQ_API_KEY" in err and "secret" not in err and len(err.splitlines()) == 1
    monkeypatch.setenv("MOONQ_API_KEY", "sk-fine")

    def moved(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"location": f"https://new.test{request.url.path}"})

    argv = ["status", "batch_1", "--url", "http://old.test/v1"]
    assert batch_cli.main(argv, transport=httpx.MockTransport(moved)) == ExitCode.UNREACHABLE
    err = capsys.readouterr().err
    assert err == (
        "moonq: the server at http://old.test redirected (301) to"
        " https://new.test/v1/batches/batch_1: set MOONQ_URL (or --url) to https://new.test\n"
    )


def test_batch_output_survives_odd_terminals_pipes_and_server_strings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--json is ASCII-escaped (any stdout encoding takes it); escape sequences in what the
    server says are not passed to the terminal; a closed stdout ends the command quietly."""
    fake = FakeMoonq()
    upload = tmp_path / "in.jsonl"
    upload.write_text(batch_line("r\u00e9sum\u00e9 \U0001f600", Request("m", "q"), "t") + "\n")
    assert batch(fake, "submit", upload, "--metadata", "who=\x1b[2J\U0001f600") == ExitCode.OK
    capsys.readouterr()
    assert batch(fake, "status", "batch_1", "--json") == ExitCode.OK
    printed = capsys.readouterr().out
    assert printed.isascii() and json.loads(printed)["metadata"] == {"who": "\x1b[2J\U0001f600"}

    fake.batches["batch_1"]["status"] = "\x1b]0;owned\x07failed\x1b[0m"
    assert batch(fake, "status", "batch_1") == ExitCode.OK
    shown = capsys.readouterr().out
    assert shown.startswith("batch_1: failed\n") and "\x1b" not in shown

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert batch(fake, "status", "batch_1") == batch_cli.PIPE_CLOSED == 141
    assert capsys.readouterr().err == ""


def test_no_documents_is_its_own_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o.jsonl"
    assert run(FakeMoonq(), tmp_path / "empty", out) == ExitCode.NO_DOCUMENTS
    assert run(FakeMoonq(), tmp_path / "missing", out) == ExitCode.NO_DOCUMENTS
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("moonq: no documents found under") and "no such file" in err[1]


def test_the_moonq_command_has_batch_and_never_shows_a_traceback(tmp_path: Path) -> None:
    env = clean_env(MOONQ_URL="http://127.0.0.1:9")
    proc = start("status", ["batch", "status", "batch_1"], env, tmp_path)
    assert proc.popen.wait(20) == ExitCode.UNREACHABLE
    out = proc.output()
    assert out.startswith("moonq: cannot reach the moonq server at http://127.0.0.1:9")
    assert "Traceback" not in out


# End to end: the real API, worker and fake upstream, as processes


def upstream_requests(cluster: Any) -> int:
    stats = httpx.get(f"{cluster.fake_url}/_fake/stats", timeout=5).json()
    requests: int = stats["requests"]
    return requests


@pytest.mark.e2e
def test_the_batch_commands_against_the_real_stack(
    cluster_factory: Any, docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One API, worker and fake upstream (processes take seconds to start) for both."""
    cluster = cluster_factory()
    run_answers_every_document_and_resends_nothing(cluster, docs, tmp_path)
    submit_status_results_and_cancel_work(cluster, tmp_path, capsys)


def run_answers_every_document_and_resends_nothing(
    cluster: Any, docs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "answers.jsonl"
    argv = ["run", str(docs), "--prompt", PROMPT, "--model", "moonshot-v1-8k", "--out", str(out)]
    argv += ["--url", cluster.api_url]
    assert batch_cli.main(argv) == ExitCode.OK
    request = Request("moonshot-v1-8k", PROMPT)
    expected = {
        d.custom_id: expected_content(body(request, d.text or ""))
        for d in load(named_files([docs]))
    }
    written = results(out)
    assert {r["custom_id"]: r["content"] for r in written} == expected
    assert all(r["status"] == "completed" and r["usage"]["total_tokens"] for r in written)
    sent = upstream_requests(cluster)
    assert sent == len(expected)

    assert batch_cli.main(argv) == ExitCode.OK  # a re-run sends nothing new
    assert upstream_requests(cluster) == sent and results(out) == written


def submit_status_results_and_cancel_work(
    cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    url = ["--url", cluster.api_url]
    quick, slow = tmp_path / "quick.jsonl", tmp_path / "slow.jsonl"
    request = Request("moonshot-v1-8k", "hi")
    quick.write_text("".join(batch_line(f"q{i}", request, f"doc {i}") + "\n" for i in range(3)))
    hang = {"fake_moonshot": {"delay": 5.0}}  # each chunk 5 s apart: still running when cancelled
    slow.write_text("".join(slow_line(f"s{i}", request, hang) for i in range(2)))

    assert batch_cli.main(["submit", str(quick), "--metadata", "team=blue", *url]) == 0
    quick_id = capsys.readouterr().out.strip()
    assert batch_cli.main(["submit", str(slow), "--json", *url]) == 0
    slow_id = json.loads(capsys.readouterr().out)["id"]

    until(lambda: status_of(quick_id, url)["status"] == "completed", timeout=10)
    shown = status_of(quick_id, url)
    assert shown["metadata"] == {"team": "blue"} and shown["request_counts"]["completed"] == 3
    assert batch_cli.main(["results", quick_id, *url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["q0", "q1", "q2"]

    assert batch_cli.main(["cancel", slow_id, *url]) == 0
    assert capsys.readouterr().out.startswith(f"{slow_id}: cancel")
    until(lambda: status_of(slow_id, url)["status"] == "cancelled", timeout=10)
    assert batch_cli.main(["status", slow_id, *url]) == 0
    assert f"{slow_id}: cancelled" in capsys.readouterr().out
    assert batch_cli.main(["status", "batch_" + "0" * 24, *url]) == ExitCode.NOT_FOUND

    bad = tmp_path / "bad.jsonl"
    bad.write_text(batch_line("ok", request, "fine") + '\n{"custom_id": "x", "body": 3}\n')
    assert batch_cli.main(["submit", str(bad), *url]) == ExitCode.INVALID
    err = capsys.readouterr().err
    assert "refused batch" in err and "line 2:" in err and "Traceback" not in err


def slow_line(custom_id: str, request: Request, extra: dict[str, Any]) -> str:
    line = json.loads(batch_line(custom_id, request, "slow document"))
    line["body"].update(extra)
    return json.dumps(line) + "\n"


def status_of(batch_id: str, url: list[str]) -> dict[str, Any]:
    """`moonq batch status --json`, read back."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert batch_cli.main(["status", batch_id, "--json", *url]) == 0
    found: dict[str, Any] = json.loads(printed.getvalue())
    return found


@pytest.mark.parametrize("argv", [["status", ""], ["results", "../files"], ["cancel", "a b"]])
def test_an_id_that_is_not_one_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An id goes into the URL's path: an empty one, or one with a slash or a space, would
    reach another route (and be reported as a server at the wrong address)."""
    with pytest.raises(SystemExit) as exited:
        batch_cli.main([*argv, "--url", URL])
    assert exited.value.code == 2
    assert "not an id" in capsys.readouterr().err
