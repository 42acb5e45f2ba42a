"""The test tree itself: pytest imports each test module by its basename (the test
folders are not packages), so two modules of one name in tests/unit and tests/integration
stop the whole run at collection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_every_test_module_has_a_basename_of_its_own() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert len(names) > 50
    assert [name for name, n in names.items() if n > 1] == []
