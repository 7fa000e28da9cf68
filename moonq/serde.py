"""JSON for all that crosses Redis: nothing that can write to Redis can run code in a worker.

orjson does the work (several times faster than the standard library, and it writes bytes);
the standard library takes over for what orjson refuses: integers beyond 64 bits.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dump_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except TypeError:
        return _stdlib(value).encode()


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as is."""
    try:
        return orjson.dumps(value, option=_OPTIONS).decode()
    except TypeError:
        return _stdlib(value)


def loads(raw: str | bytes) -> Any:
    return orjson.loads(raw)


def _stdlib(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def arq_serialize(value: Any) -> bytes:
    """arq's job and result serializer. Anything that is not JSON (a failed job's exception)
    is written as its type name only: a repr can carry request headers, keys among them."""
    return json.dumps(value, default=_type_name, separators=(",", ":")).encode()


def _type_name(value: Any) -> str:
    return type(value).__name__


def arq_deserialize(raw: bytes) -> Any:
    return json.loads(raw)
