"""JSON through Redis: exact, strict, and a clear error for what cannot be written."""

from __future__ import annotations

import pytest

from moonq import serde


def test_integers_of_any_size_are_read_and_written_exactly() -> None:
    text = (
        '{"big":123456789012345678901234567890,"low":-9223372036854775809,'
        '"s":"1234567890123456789012"}'
    )
    value = serde.loads(text)
    assert value["big"] == 123456789012345678901234567890 and value["low"] == -9223372036854775809
    assert serde.loads(text.encode()) == value
    assert serde.dump_bytes(value) == text.encode() and serde.dumps(value) == text


def test_a_long_number_after_any_text_is_read_exactly() -> None:
    text = '["ünïcödé",-1234567890123456789012]'
    assert serde.loads(text) == serde.loads(text.encode()) == ["ünïcödé", -1234567890123456789012]
    # A lone surrogate (text that came from JSON's "\\ud800") cannot be UTF-8, yet is seen past.
    assert serde.loads('["\ud800",1234567890123456789012]')[1] == 1234567890123456789012


@pytest.mark.parametrize(
    "text", ['{"x":NaN}', '{"x":-Infinity}', '{"x":1,}', "[" * 2000 + "]" * 2000]
)
def test_what_is_not_strict_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        serde.loads(text)
    with pytest.raises(ValueError):  # the same with a long number in it (the exact parser)
        serde.loads(text.replace("1", "12345678901234567890") if "1" in text else text + "1" * 19)


def test_what_cannot_be_written_is_a_value_error() -> None:
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError):
        serde.dump_bytes({"data": deep})
    with pytest.raises(ValueError):
        serde.dumps({"data": deep})
