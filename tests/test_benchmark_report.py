"""benchmarks/_report.py: a rerun replaces a section of docs/performance.md but keeps its hand-written notes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _report

    yield _report
    sys.modules.pop("_report", None)


def test_a_rerun_replaces_the_measured_body_and_keeps_the_notes(report, tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\n## A\n\nold table\n\n{report.NOTES}\n\nwhy it missed\n\n## B\n\nb body\n")
    report.write_section("A", "new table", doc)
    text = doc.read_text()
    assert "old table" not in text and "new table" in text
    assert text.index("new table") < text.index(report.NOTES) < text.index("why it missed") < text.index("## B")
    report.write_section("B", "b again", doc)  # a section without notes is replaced whole
    report.write_section("C", "c body", doc)  # a new section is appended
    text = doc.read_text()
    assert "b body" not in text and "why it missed" in text
    assert text.index("## A") < text.index("## B") < text.index("b again") < text.index("## C")
