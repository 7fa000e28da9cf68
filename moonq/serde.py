"""JSON for all that crosses Redis: nothing that can write to Redis can run code in a worker.

orjson does the work (several times faster than the standard library, and it writes bytes);
the standard library takes over for what orjson refuses: integers beyond 64 bits.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


# An integer of 19 digits or more may not fit 64 bits (signed, below zero), which orjson reads
# as a float: text with such a run of digits goes to the standard library's exact parser. The
# run is found by mapping every ASCII digit to "0" and all else to "." (one C pass), then a
# substring search: a sixth of a regex's `\d{19}` scan, which was 5 % of a worker's CPU, run on
# every chunk. JSON's numbers are ASCII digits only.
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x2E for i in range(256))
_LONG_RUN = b"0" * 19


def dump_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON; `ValueError` for what cannot be written (nested too deeply)."""
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except TypeError:
        return _stdlib(value).encode()


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as is; `ValueError` as `dump_bytes`."""
    try:
        return orjson.dumps(value, option=_OPTIONS).decode()
    except TypeError:
        return _stdlib(value)


def loads(raw: str | bytes) -> Any:
    """Strict JSON (no `NaN` or `Infinity`), integers of any size kept exact; `ValueError`
    for anything else, too deep nesting included."""
    encoded = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if _LONG_RUN not in encoded.translate(_DIGITS):
        return orjson.loads(raw)
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _stdlib(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except RecursionError as exc:  # orjson refuses past 254 levels, the standard library ~1000
        raise ValueError("nested too deeply to write as JSON") from exc


def arq_serialize(value: Any) -> bytes:
    """arq's job and result serializer. Anything that is not JSON (a failed job's exception)
    is written as its type name only: a repr can carry request headers, keys among them."""
    return json.dumps(value, default=_type_name, separators=(",", ":")).encode()


def _type_name(value: Any) -> str:
    return type(value).__name__


def arq_deserialize(raw: bytes) -> Any:
    return json.loads(raw)
