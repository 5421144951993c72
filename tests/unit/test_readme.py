"""The README's configuration table is the real option table."""

from __future__ import annotations

import re
from pathlib import Path

from extproc.settings.options import OPTIONS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def table_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for match in re.finditer(r"^\| `(--[a-z-]+)` \| `([A-Z_]+)` \| ([^|]+) \|", README, re.M):
        rows[match.group(1)] = (match.group(2), match.group(3).strip())
    return rows


def test_every_option_is_documented_with_its_variable_and_default() -> None:
    rows = table_rows()
    assert set(rows) == {option.flag for option in OPTIONS}
    for option in OPTIONS:
        env, default = rows[option.flag]
        assert env == option.env
        expected = "required" if option.default is None else f"`{option.default}`"
        assert default == expected, option.flag
