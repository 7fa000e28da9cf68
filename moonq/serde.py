"""JSON for all that crosses Redis: nothing that can write to Redis can run code in a worker."""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def arq_serialize(value: Any) -> bytes:
    """arq's job and result serializer. Anything that is not JSON (a failed job's exception)
    is written as its type name only: a repr can carry request headers, keys among them."""
    return json.dumps(value, default=_type_name, separators=(",", ":")).encode()


def _type_name(value: Any) -> str:
    return type(value).__name__


def arq_deserialize(raw: bytes) -> Any:
    return json.loads(raw)
