"""Published numbers: the curated, versioned ``references.json`` shipped in the package, users'
own files in the same format, and their rows in the store's ``references`` table.

A reference file is one JSON object ``{"version": N, "references": [record, ...]}`` (an ``about``
text is allowed). Each record is one published number, with exactly the keys of
:data:`FIELDS`; ``id``, ``defense``, ``paper``, ``dataset``, ``metric``, ``value``, ``unit`` and
``source`` are required. ``value`` is as printed in the source; ``unit`` says how to read it
(``percent`` or ``fraction`` for accuracies, ``radius`` for an average certified radius).
``eps`` may be a number or a fraction written ``"8/255"``. Guarantees: :func:`load_references`
either returns validated records or raises a one-line :class:`BenchError`; accuracies are
held as fractions in ``[0, 1]`` (:attr:`Reference.fraction`); :func:`sync_references` is
idempotent (a record is keyed by its ``id``: reloading updates, never duplicates).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from bench.errors import BenchError, StoreError
from bench.results.schema import ReferenceRow
from bench.results.store import Store, redact

__all__ = ["FIELDS", "METRICS", "Reference", "ReferenceSet", "StoredReference", "add_published", "from_references",
           "from_rows", "load_references", "packaged", "render_references", "rich_references", "sync_references"]

FIELDS = ("id", "defense", "paper", "year", "where", "dataset", "split", "setting", "metric", "norm", "eps",
          "radius", "attack", "value", "unit", "protocol", "note", "source")
REQUIRED = ("id", "defense", "paper", "dataset", "metric", "value", "unit", "source")
METRICS = ("clean_accuracy", "robust_accuracy", "certified_accuracy", "acr", "certified_accuracy_gain",
           "robust_accuracy_gain")
UNITS = ("percent", "fraction", "radius")
NORMS = ("Linf", "L2", "L1")
FORMATS = ("table", "md", "csv", "json")
PACKAGED = "references.json"


@dataclass(frozen=True)
class Reference:
    """One published number (see the module docstring for the fields)."""

    id: str
    defense: str
    paper: str
    dataset: str
    metric: str
    value: float
    unit: str
    source: str
    year: int | None = None
    where: str | None = None
    split: str | None = None
    setting: str | None = None
    norm: str | None = None
    eps: float | None = None
    radius: float | None = None
    attack: str | None = None
    protocol: str | None = None
    note: str | None = None
    version: str = ""  # "<file name> v<version>", set by the loader

    @property
    def fraction(self) -> float:
        """The value as the board holds it: accuracies (and gains) as fractions, radii as is."""
        return self.value / 100.0 if self.unit == "percent" else self.value

    @property
    def threat(self) -> str:
        """The threat model or radius in words, e.g. ``Linf 8/255``, ``L2 r=0.5``, or ``-``."""
        from bench.config import format_eps

        if self.radius is not None:
            return f"{self.norm or 'L2'} r={self.radius:g}"
        if self.eps is not None:
            return f"{self.norm} {format_eps(self.eps)}"
        return self.norm or "-"


@dataclass(frozen=True)
class ReferenceSet:
    records: tuple[Reference, ...]

    def for_dataset(self, dataset: str | None) -> tuple[Reference, ...]:
        return tuple(r for r in self.records if dataset is None or r.dataset == dataset.lower())

    def merged(self, other: ReferenceSet) -> ReferenceSet:
        """This set plus ``other``; a record of ``other`` replaces one with the same id."""
        theirs = {r.id for r in other.records}
        return ReferenceSet(tuple(r for r in self.records if r.id not in theirs) + other.records)


def packaged() -> ReferenceSet:
    """The curated references shipped with bench (``bench/results/references.json``)."""
    text = resources.files("bench.results").joinpath(PACKAGED).read_text(encoding="utf-8")
    return _parse(text, PACKAGED)


def load_references(extra: Sequence[Path] = ()) -> ReferenceSet:
    """The packaged references plus each user file in ``extra`` (later files win on equal ids)."""
    refs = packaged()
    for path in extra:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise BenchError(f"cannot read references file {path}: {exc.strerror or exc}") from None
        refs = refs.merged(_parse(text, str(path)))
    return refs


def _parse(text: str, origin: str) -> ReferenceSet:
    try:
        doc = json.loads(text, parse_constant=lambda c: _fail(origin, f"non-finite number {c}"))
    except json.JSONDecodeError as exc:
        raise BenchError(f"{origin}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("references"), list):
        raise BenchError(f'{origin}: expected an object {{"version": N, "references": [...]}}')
    unknown = sorted(set(doc) - {"version", "about", "references"})
    if unknown:
        raise BenchError(f"{origin}: unknown top-level key(s) {', '.join(unknown)}")
    version = doc.get("version")
    if not isinstance(version, (int, str)) or isinstance(version, bool):
        raise BenchError(f"{origin}: 'version' must be a number or a string")
    label = f"{Path(origin).name} v{version}"
    records = tuple(_record(item, f"{origin}: reference {i + 1}", label) for i, item in enumerate(doc["references"]))
    ids = [r.id for r in records]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate is not None:
        raise BenchError(f"{origin}: id '{duplicate}' appears more than once")
    return ReferenceSet(records)


def _fail(where: str, why: str) -> Any:
    raise BenchError(f"{where}: {why}")


def _record(item: Any, where: str, version: str) -> Reference:
    if not isinstance(item, dict):
        _fail(where, "must be an object")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        _fail(where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if item.get(k) in (None, "")]
    if missing:
        _fail(where, f"missing {', '.join(missing)}" + (" (every published number needs its source)"
                                                        if "source" in missing else ""))
    where = f"{where} ('{item['id']}')"
    texts = {k: _text(item.get(k), k, where) for k in FIELDS if k not in ("year", "eps", "radius", "value")}
    if texts["metric"] not in METRICS:
        _fail(where, f"unknown metric '{texts['metric']}'; use one of: {', '.join(METRICS)}")
    if texts["unit"] not in UNITS:
        _fail(where, f"unknown unit '{texts['unit']}'; use one of: {', '.join(UNITS)}")
    if texts["norm"] is not None and texts["norm"] not in NORMS:
        _fail(where, f"unknown norm '{texts['norm']}'; use one of: {', '.join(NORMS)}")
    year = item.get("year")
    if year is not None and (not isinstance(year, int) or isinstance(year, bool)):
        _fail(where, "'year' must be an integer")
    return Reference(**texts, year=year, value=_number(item["value"], "value", where),  # type: ignore[arg-type]
                     eps=_number(item.get("eps"), "eps", where), radius=_number(item.get("radius"), "radius", where),
                     version=version)


def _text(value: Any, key: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(where, f"'{key}' must be a string")
    return value.lower() if key in ("defense", "dataset", "attack") else value


def _number(value: Any, key: str, where: str) -> float | None:
    """A finite number; ``eps`` may also be a fraction such as ``"8/255"``."""
    if value is None:
        return None
    if isinstance(value, str) and key == "eps":
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            _fail(where, f"invalid eps '{value}'; use a number or a fraction like 8/255")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, f"'{key}' must be a number")
    if not math.isfinite(value):
        _fail(where, f"'{key}' must be finite")
    return float(value)


# -- the store's references table ----------------------------------------------------------
def _row_note(ref: Reference) -> str:
    """The stored ``note``: the record id first (the key :func:`sync_references` matches), then
    what the table has no column for."""
    parts = [f"{ref.id} ({ref.version})", ref.setting, f"split {ref.split}" if ref.split else None,
             f"attack {ref.attack}" if ref.attack else None, f"unit {ref.unit}",
             f"protocol: {ref.protocol}" if ref.protocol else None, ref.note]
    return "; ".join(p for p in parts if p)


def _row_source(ref: Reference) -> str:
    paper = f"{ref.paper} {ref.year}" if ref.year else ref.paper
    return "; ".join(p for p in (paper, ref.where, ref.source) if p)


def _row_id(note: str | None) -> str:
    return (note or "").split(" (", 1)[0]


def sync_references(store: Store, refs: Iterable[Reference]) -> int:
    """Write ``refs`` into the store's ``references`` table, keyed by record id: an existing
    row of the same id is updated in place, so loading twice never duplicates. Returns how
    many rows were inserted or changed. A store that refuses the write (read-only, locked, gone)
    is a one-line :class:`StoreError`; nothing is half-written (one transaction)."""
    try:
        return _sync(store, list(refs))
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise StoreError(f"result store '{redact(store.url)}': {detail}") from None


def _sync(store: Store, refs: list[Reference]) -> int:
    changed = 0
    with store.session() as s:
        existing = {_row_id(row.note): row for row in s.scalars(select(ReferenceRow))}
        for ref in refs:
            fields = {"defense": ref.defense, "dataset": ref.dataset, "metric": ref.metric, "norm": ref.norm,
                      "eps": ref.eps, "radius": ref.radius, "value": ref.fraction, "source": _row_source(ref),
                      "note": _row_note(ref)}
            row = existing.get(ref.id)
            if row is None:
                s.add(ReferenceRow(**fields))
                changed += 1
            elif any(getattr(row, k) != v for k, v in fields.items()):
                for key, value in fields.items():
                    setattr(row, key, value)
                changed += 1
        s.commit()
    return changed


@dataclass(frozen=True)
class StoredReference:
    """A row of the ``references`` table as the leaderboard reads it (value as a fraction)."""

    id: str
    defense: str
    dataset: str
    metric: str
    norm: str | None
    eps: float | None
    radius: float | None
    attack: str | None
    setting: str
    value: float
    source: str


def from_rows(rows: Iterable[ReferenceRow], refs: ReferenceSet | None = None) -> tuple[StoredReference, ...]:
    """The table's rows, typed; ``setting`` and ``attack`` come from the loaded record of the same
    id when there is one (the table has no column for them)."""
    known = {r.id: r for r in (refs.records if refs else ())}
    out = []
    for row in rows:
        rid = _row_id(row.note)
        ref = known.get(rid)
        out.append(StoredReference(rid, row.defense, row.dataset, row.metric, row.norm, row.eps, row.radius,
                                   ref.attack if ref else None, (ref.setting or ref.paper) if ref else rid,
                                   row.value, row.source))
    return tuple(out)


# -- published rows on a leaderboard -------------------------------------------------------
PUBLISHED = " (published, authors' protocol)"
DIFFERENCE = " Δ measured − published"


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _matches(ref: StoredReference, key: Any) -> bool:
    """Whether the published number ``ref`` is the quantity of board column ``key``: the same
    metric and threat model (norm, eps and attack) or radius; never a balanced-accuracy twin,
    never the cumulative worst case (authors report attacks one by one)."""
    if key.balanced:
        return False
    if key.kind == "clean":
        return ref.metric == "clean_accuracy"
    if key.kind == "attack":
        return (ref.metric == "robust_accuracy" and ref.norm == key.norm and _close(ref.eps, key.eps)
                and ref.attack in (None, key.method.lower()))
    if key.kind == "certified":
        return ref.metric == "certified_accuracy" and _close(ref.radius, key.radius)
    return key.kind == "acr" and ref.metric == "acr"


def add_published(board: Any, refs: Sequence[StoredReference]) -> Any:
    """``board`` with, after the best-ranked measured row of each defense, one row per published
    setting of that defense (``"<defense> (published, authors' protocol)"``, the setting in the
    Model column) holding the published numbers under the columns they match, and one row
    ``"<defense> Δ measured − published"`` with the differences. Published settings that match
    no column are counted in the note; the measured rows and their order are unchanged."""
    from bench.results.leaderboard import DEFENSE, MODEL, RUN_ID, N, strip_marks

    groups: dict[tuple[str, str], list[StoredReference]] = {}
    for ref in refs:
        if ref.dataset == board.dataset.lower():
            groups.setdefault((ref.defense, ref.setting), []).append(ref)
    first: dict[str, int] = {}
    for i, row in enumerate(board.rows):
        first.setdefault(strip_marks(str(row[DEFENSE])).lower(), i)
    extra: dict[int, list[Any]] = {}
    unmatched = 0
    for (defense, setting), members in groups.items():
        if defense not in first:
            continue
        measured = board.rows[first[defense]]
        published = {c.key: ref.value for c in board.columns for ref in members if _matches(ref, c.key)}
        if not published:
            unmatched += len(members)
            continue
        delta = {k: measured[k] - v for k, v in published.items() if measured.get(k) is not None}
        base = {RUN_ID: None, N: None, MODEL: setting}
        extra.setdefault(first[defense], []).append({**base, DEFENSE: defense + PUBLISHED, **published})
        if delta:
            extra[first[defense]].append({**base, DEFENSE: defense + DIFFERENCE, **delta})
    rows = [r for i, row in enumerate(board.rows) for r in (row, *extra.get(i, []))]
    notes = [board.note,
             "published rows: the authors' numbers under their own protocol (bench references lists "
             "each with its source); Δ = measured − published" if extra else "",
             f"{unmatched} published number(s) for these defenses match no column" if unmatched else ""]
    return replace(board, rows=tuple(rows), note="; ".join(filter(None, notes)))


def from_references(refs: Iterable[Reference]) -> tuple[StoredReference, ...]:
    """``refs`` as the leaderboard reads them, without a store (the same values as stored)."""
    return tuple(StoredReference(r.id, r.defense, r.dataset, r.metric, r.norm, r.eps, r.radius, r.attack,
                                 r.setting or r.paper, r.fraction, _row_source(r)) for r in refs)


# -- listing -----------------------------------------------------------------------------------
_COLUMNS = ("id", "defense", "dataset", "split", "setting", "metric", "threat", "value", "paper", "where",
            "protocol", "source")


def _listed(ref: Reference) -> dict[str, Any]:
    value = f"{ref.value:g}%" if ref.unit == "percent" else f"{ref.value:g}"
    return {"id": ref.id, "defense": ref.defense, "dataset": ref.dataset, "split": ref.split or "-",
            "setting": ref.setting or "-", "metric": ref.metric, "threat": ref.threat
            + (f" ({ref.attack})" if ref.attack else ""), "value": value,
            "paper": f"{ref.paper} {ref.year}" if ref.year else ref.paper, "where": ref.where or "-",
            "protocol": ref.protocol or "-", "source": ref.source}


def render_references(refs: Sequence[Reference], fmt: str) -> str:
    """``refs`` as Markdown, CSV or JSON (``table`` is rendered by the CLI with Rich). JSON holds
    every field of every record, values as printed plus ``fraction``."""
    if fmt == "json":
        return json.dumps([asdict(r) | {"fraction": r.fraction} for r in refs], indent=2, ensure_ascii=False) + "\n"
    rows = [_listed(r) for r in refs]
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(_COLUMNS) + " |", "| " + " | ".join("---" for _ in _COLUMNS) + " |"]
        lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in _COLUMNS) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    raise BenchError(f"unknown format '{fmt}'; use one of: {', '.join(FORMATS)}")


def rich_references(refs: Sequence[Reference]) -> Any:
    """A Rich table of ``refs`` (the short columns; ``--format md|csv|json`` gives every field)."""
    from rich.table import Table

    table = Table(title=f"{len(refs)} published number(s)")
    for column in ("id", "defense", "dataset", "setting", "metric", "threat", "value", "source"):
        table.add_column(column, justify="right" if column == "value" else "left", overflow="fold")
    for row in (_listed(r) for r in refs):
        table.add_row(*(row[c] for c in ("id", "defense", "dataset", "setting", "metric", "threat", "value", "source")))
    return table
