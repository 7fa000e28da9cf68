"""The README's settings table is the settings class, default for default."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import SecretStr

from moonq.settings import Settings

README = Path(__file__).parent.parent / "README.md"
ROW = re.compile(r"^\| `([A-Z_]+)` \| (.+?) \|", re.M)


def _documented() -> dict[str, str]:
    return dict(ROW.findall(README.read_text()))


def _shown(default: object) -> str:
    if default is None:
        return "*(none)*"
    if isinstance(default, SecretStr):
        return f"`{default.get_secret_value()}`" if default.get_secret_value() else "*(empty)*"
    return f"`{default}`"


def test_every_setting_is_documented_with_its_default() -> None:
    documented = _documented()
    fields = {f.alias: f.default for f in Settings.model_fields.values()}
    assert set(documented) == set(fields)
    for name, default in fields.items():
        assert documented[name].startswith(_shown(default)), name


def test_the_set_up_commands_are_there() -> None:
    text = README.read_text()
    assert "make dev" in text and "make test" in text and "docker compose up" in text
