"""Documents for `moonq batch run`: found on disk, named stably, turned into batch lines.

A document's custom_id is its name, which depends only on the arguments given (never on which
other files exist), plus a short hash of its bytes, so a re-run of the same command knows which
documents are done, and an edited one is sent again.
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
    name: str  # see `named_files`: from the arguments given, with forward slashes
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


def labels(paths: Sequence[Path]) -> list[str]:
    """What each argument's documents are named under: nothing for a lone argument, else its
    own name, or the path as given where two arguments share a name (a/docs and b/docs)."""
    if len(paths) == 1:
        return [""]
    own = [Path(os.path.abspath(p)).name for p in paths]
    given = [Path(os.path.normpath(p)).as_posix() for p in paths]
    return [g if not o or own.count(o) > 1 else o for o, g in zip(own, given, strict=True)]


def _name(path: Path, argument: Path, label: str) -> str:
    """A file argument is named by its label (or its own name); a file found in a folder by
    its path under the folder, after the folder's label."""
    if path == argument:
        return label or path.name
    relative = path.relative_to(argument).as_posix()
    return f"{label}/{relative}" if label else relative


def named_files(paths: Sequence[Path], exclude: Iterable[Path] = ()) -> list[tuple[Path, str]]:
    """The files named or found under `paths`, each once (named through the first argument
    that reaches it), sorted by name, minus `exclude` (the results file and its state file,
    which may live among the documents). The names depend only on the arguments, so adding a
    file never renames the others."""
    skipped = {p.resolve() for p in exclude}
    seen: dict[Path, str] = {}
    for argument, label in zip(paths, labels(paths), strict=True):
        for found in _walk(argument):
            resolved = found.resolve()
            if resolved not in skipped and resolved not in seen:
                seen[resolved] = _name(found, argument, label)
    names: dict[str, Path] = {}
    for resolved, name in seen.items():
        if name in names:
            raise ValueError(f"{names[name]} and {resolved} would both be named {name}")
        names[name] = resolved
    return sorted(((path, name) for name, path in names.items()), key=lambda item: item[1])


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


def load(files: Sequence[tuple[Path, str]]) -> list[Document]:
    """Read each (path, name) once: its hash, and its text when it is text."""
    documents = []
    for path, name in files:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()[:HASH_LENGTH]
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
