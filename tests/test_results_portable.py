"""The committed results (benchmarks/results/*.json and each study's JSONs) name data and files by
placeholder (WIKITEXT2_DIR, KJV_DIR) or relative to the repository, never by this machine's paths."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SAVED = sorted(RESULTS.glob("*.json")) + sorted(RESULTS.glob("study/*/*.json"))  # run folders below are not committed


def absolute_paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("/") or "=/" in value else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [p for item in items for p in absolute_paths(item)]


@pytest.mark.parametrize("path", SAVED, ids=lambda p: str(p.relative_to(RESULTS)))
def test_saved_results_hold_no_absolute_paths(path: Path) -> None:
    assert not absolute_paths(json.loads(path.read_text())), f"{path.name} records this machine's paths"
