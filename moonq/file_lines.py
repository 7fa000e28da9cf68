"""An uploaded file's bytes, cut into lines as they stream in (`FileStore.lines`)."""

from __future__ import annotations

from dataclasses import dataclass


def _without_cr(line: bytes | bytearray) -> bytes:
    return bytes(line[:-1] if line.endswith(b"\r") else line)


@dataclass(frozen=True)
class LongLine:
    """A line longer than `lines(max_line=)`: its bytes were skipped, its size counted."""

    size: int


class LineCutter:
    """Splits pieces into lines, dropping a line's bytes once it is past `limit`."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.buffer, self.dropped = limit, bytearray(), 0

    def feed(self, piece: bytes) -> list[bytes | LongLine]:
        scan_from = len(self.buffer)  # the buffer holds no newline yet: search only the piece
        self.buffer += piece
        found: list[bytes | LongLine] = []
        start = 0
        while (end := self.buffer.find(b"\n", scan_from)) != -1:
            found.append(self._line(self.buffer[start:end]))
            start = scan_from = end + 1
        del self.buffer[:start]
        if self.limit is not None and self.dropped + len(self.buffer) > self.limit + 1:
            # over the limit even if it ends in "\r"; keep the last byte, which may be the "\r"
            # of a "\r\n" split across pieces (so `dropped` alone is over the limit)
            self.dropped += len(self.buffer) - 1
            del self.buffer[:-1]
        return found

    def rest(self) -> bytes | LongLine | None:
        """The last line, if the file does not end with a newline."""
        return self._line(self.buffer) if self.buffer or self.dropped else None

    def _line(self, tail: bytes | bytearray) -> bytes | LongLine:
        line, size = _without_cr(tail), self.dropped
        self.dropped = 0
        if self.limit is not None and size + len(line) > self.limit:
            return LongLine(size + len(line))
        return line
