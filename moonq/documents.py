"""Documents for `moonq batch run`: found on disk, named stably, turned into batch lines.

A document's custom_id is its path under the common root plus a short hash of its bytes, so a
re-run of the same command knows which documents are done, and an edited one is sent again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Read locally whatever their bytes look like; anything else is read locally only if it is UTF-8.
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
# Never decoded locally: these go through Moonshot's document extraction (purpose=file-extract).
EXTRACT_SUFFIXES = frozenset(
    {".pdf", ".doc", ".docx", ".ppt", ".pptx", ".xls", ".xlsx", ".epub", ".rtf", ".odt"}
)
CHAT_ENDPOINT = "/v1/chat/completions"
HASH_LENGTH = 12
MAX_CUSTOM_ID = 500  # moonq takes custom_ids of up to 512 characters


@dataclass(frozen=True)
class Document:
    path: Path
    name: str  # the path under the common root, with forward slashes
    digest: str  # the first HASH_LENGTH hex digits of the sha256 of its bytes
    text: str | None  # None: it needs file-extract

    @property
    def custom_id(self) -> str:
        return f"{self.name[-(MAX_CUSTOM_ID - HASH_LENGTH - 1) :]}#{self.digest}"


def _walk(path: Path) -> Iterable[Path]:
    """Every regular file under `path`, skipping hidden files and folders (.git and the like)."""
    if path.is_file():
        yield path
        return
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def find_files(paths: Sequence[Path], exclude: Iterable[Path] = ()) -> list[Path]:
    """The files named or found under `paths`, resolved, sorted, each once, minus `exclude`
    (the results file and its state file, which may live among the documents)."""
    skipped = {p.resolve() for p in exclude}
    found = {p.resolve() for path in paths for p in _walk(path)}
    return sorted(found - skipped)


def common_root(files: Sequence[Path]) -> Path:
    """The deepest folder holding every file: the base of their names."""
    if not files:
        raise ValueError("no files")
    return Path(os.path.commonpath([f.parent for f in files]))


def decode_text(path: Path, raw: bytes) -> str | None:
    """The document's text when it can be read here; None when it needs file-extract."""
    suffix = path.suffix.lower()
    if suffix in EXTRACT_SUFFIXES:
        return None
    if suffix in TEXT_SUFFIXES:
        return raw.decode("utf-8-sig", errors="replace")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def load(files: Sequence[Path]) -> list[Document]:
    """Read each file once: its hash, and its text when it is text."""
    root = common_root(files)
    documents = []
    for path in files:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()[:HASH_LENGTH]
        name = path.relative_to(root).as_posix()
        documents.append(Document(path, name, digest, decode_text(path, raw)))
    return documents


@dataclass(frozen=True)
class Request:
    """What every document is asked: the model, the prompt and the optional extras."""

    model: str
    prompt: str
    system: str | None = None
    max_tokens: int | None = None


def messages(request: Request, text: str) -> list[dict[str, str]]:
    """The document goes in a system message (Moonshot's documented way for file contents),
    after the caller's own system message, and before the prompt."""
    out = [{"role": "system", "content": request.system}] if request.system else []
    out.append({"role": "system", "content": text})
    out.append({"role": "user", "content": request.prompt})
    return out


def body(request: Request, text: str) -> dict[str, Any]:
    """The chat completion request for one document."""
    out: dict[str, Any] = {"model": request.model, "messages": messages(request, text)}
    if request.max_tokens is not None:
        out["max_tokens"] = request.max_tokens
    return out


def batch_line(custom_id: str, request: Request, text: str) -> str:
    """One line of the batch input file, in OpenAI's (and Moonshot's) format."""
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT}
    return json.dumps({**line, "body": body(request, text)}, ensure_ascii=False)


def local_estimate(chat: dict[str, Any]) -> int:
    """Prompt tokens guessed from characters (about 3 per token), for when the server has no
    tokenizer to ask."""
    chars = sum(len(str(m.get("content") or "")) for m in chat["messages"])
    return math.ceil(chars / 3)
