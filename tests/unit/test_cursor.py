"""The file cursor store: atomic, durable, and loud about a file it cannot trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamer.cursor import FileCursorStore
from streamer.errors import ConfigError


def test_missing_file_gives_initial_cursor(tmp_path: Path) -> None:
    assert FileCursorStore(tmp_path / "c.json", "main", initial=7).load() == 7


def test_commit_then_load_in_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.json"
    FileCursorStore(path, "main").commit(12345)
    assert FileCursorStore(path, "main").load() == 12345
    assert json.loads(path.read_text())["feed"] == "main"
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # no temp file left behind


@pytest.mark.parametrize("content", ["", "{", '{"cursor": -1}', '{"cursor": "12"}', "[]"])
def test_unreadable_file_stops_instead_of_guessing(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="unreadable"):
        FileCursorStore(path, "main").load()


def test_another_feeds_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    FileCursorStore(path, "other").commit(5)
    with pytest.raises(ConfigError, match="belongs to feed 'other'"):
        FileCursorStore(path, "main").load()
