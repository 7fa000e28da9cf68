"""JSON for all that crosses Redis: nothing that can write to Redis can run code in a worker."""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def arq_serialize(value: Any) -> bytes:
    """arq's job and result serializer; a failed job's exception becomes its repr."""
    return json.dumps(value, default=repr, separators=(",", ":")).encode()


def arq_deserialize(raw: bytes) -> Any:
    return json.loads(raw)
