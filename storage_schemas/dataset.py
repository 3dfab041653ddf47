"""Read access to an M2F-D dataset directory: tables as Arrow, SQL through DuckDB."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

import pyarrow.parquet as pq

from .io import SchemaError, iter_table, read_table
from .tables import PARTITIONED, TABLES, VIEW_COLUMNS

TABLES_DIR = "tables"
CARD = "dataset.json"
EXTRACT_LINEAGE = Path("lineage") / "extract.json"  # GNPFA checkpoint + transcription engines of the last extraction


def extract_lineage(root: str | Path) -> dict:
    """What the last extraction recorded (empty before any extraction)."""
    p = Path(root) / EXTRACT_LINEAGE
    return json.loads(p.read_text()) if p.is_file() else {}


def gnpfa_checkpoint_dir(root: str | Path, required: bool = False) -> Path | None:
    """The GNPFA checkpoint directory the dataset's latents were encoded with (None before extraction,
    or a clear error where the caller needs it)."""
    g = extract_lineage(root).get("gnpfa") or {}
    if not g.get("path"):
        if required:
            raise ValueError(f"{root} has no extraction lineage: no GNPFA checkpoint to decode latents with")
        return None
    p = Path(g["path"])
    return p if p.is_absolute() else Path(root) / p


def table_path(root: str | Path, name: str, part: str | None = None) -> Path:
    """File of a table, or of one part of a partitioned table (a folder of Parquet files)."""
    if name in PARTITIONED:
        base = Path(root) / TABLES_DIR / name
        return base / f"{part}.parquet" if part is not None else base
    return Path(root) / TABLES_DIR / f"{name}.parquet"


def _present(root: Path, name: str) -> bool:
    p = table_path(root, name)
    return p.is_dir() and any(p.glob("*.parquet")) if name in PARTITIONED else p.is_file()


class Dataset:
    """An M2F-D dataset on disk. ``tables`` lists the tables present; ``query`` runs SQL."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / TABLES_DIR).is_dir():
            raise FileNotFoundError(f"{self.root} is not an M2F-D dataset (no {TABLES_DIR}/ folder)")
        self.tables = [n for n in TABLES if _present(self.root, n)]

    @property
    def card(self) -> dict:
        p = self.root / CARD
        return json.loads(p.read_text()) if p.is_file() else {}

    def table(self, name: str) -> pa.Table:
        if name not in self.tables:
            raise KeyError(f"table {name!r} not in dataset {self.root}; present: {self.tables}")
        if name in PARTITIONED:
            parts = sorted(table_path(self.root, name).glob("*.parquet"))
            return pa.concat_tables([read_table(p, name) for p in parts])
        return read_table(table_path(self.root, name), name)

    def batches(self, name: str, batch_rows: int = 65536):
        """A table ``batch_rows`` rows at a time (each batch read through its schema), in row order
        (a partitioned table's parts in name order): for readers that must not hold a whole table."""
        if name not in self.tables:
            raise KeyError(f"table {name!r} not in dataset {self.root}; present: {self.tables}")
        parts = sorted(table_path(self.root, name).glob("*.parquet")) if name in PARTITIONED else [table_path(self.root, name)]
        for p in parts:
            yield from iter_table(p, name, batch_rows)

    def _check(self, name: str) -> None:
        """Schema name and version check from Parquet footers only (cheap, no data read)."""
        from .tables import SCHEMA_VERSION

        paths = sorted(table_path(self.root, name).glob("*.parquet")) if name in PARTITIONED else [table_path(self.root, name)]
        for p in paths:
            md = pq.read_schema(p).metadata or {}
            v = md.get(b"m2fd.schema_version", b"").decode()
            if md.get(b"m2fd.table", b"").decode() != name or v.split(".")[:1] != SCHEMA_VERSION.split(".")[:1]:
                raise SchemaError(f"{p}: not an M2F-D {name!r} table of schema {SCHEMA_VERSION} (found {v!r})")

    def connect(self, only: set[str] | None = None):
        """A DuckDB connection with the dataset's tables (or those named in ``only``) as views.

        Connections are cursors of one in-memory database per process (opening a database costs about
        35 ms, a cursor microseconds); the views are temporary, so each connection sees only its own
        dataset."""
        con = _database().cursor()
        self._views(con, only)
        return con

    def _views(self, con, only: set[str] | None = None) -> None:
        want = self.tables if only is None else [n for n in self.tables if n in only or (n == "label_rows" and "labels" in only)]
        for name in want:
            self._check(name)
            con.execute(f"CREATE TEMP VIEW {name} AS {self._view_sql(name)}")
        if "label_rows" in want:
            con.execute(labels_view_sql())

    def _src(self, name: str, options: str = "") -> str:
        p = table_path(self.root, name)
        path = str(p / "*.parquet" if name in PARTITIONED else p).replace("'", "''")
        return f"read_parquet('{path}'{options})"

    def _view_sql(self, name: str) -> str:
        """A table's view: its files, plus the VIEW_COLUMNS joined in (null while their table is absent),
        in the table's own row order."""
        extra = VIEW_COLUMNS.get(name)
        if not extra:
            return f"SELECT * FROM {self._src(name)}"
        cols, joins = [], []
        for i, (col, (other, typ, _)) in enumerate(extra.items()):
            duck = {"string": "VARCHAR"}[str(typ)]
            if other in self.tables:
                self._check(other)
                joins.append(f"LEFT JOIN (SELECT clip_id, {col} FROM {self._src(other)}) j{i} USING (clip_id)")
                cols.append(f"j{i}.{col}")
            else:
                cols.append(f"CAST(NULL AS {duck}) AS {col}")
        return (f"SELECT t.* EXCLUDE (file_row_number), {', '.join(cols)} FROM "
                f"{self._src(name, ', file_row_number = true')} t {' '.join(joins)} ORDER BY t.file_row_number")

    def query(self, sql: str) -> pa.Table:
        """Run one SQL statement over the dataset's tables (views of the tables it names)."""
        con = self.connect(only=set(re.findall(r"[a-z_][a-z0-9_]*", sql.lower())))
        try:
            return con.sql(sql).to_arrow_table()
        finally:
            con.close()


_DB: tuple[int, object] | None = None


def _database():
    """This process's in-memory DuckDB database (a new one after a fork: a child never uses its
    parent's)."""
    global _DB
    if _DB is None or _DB[0] != os.getpid():
        import duckdb

        _DB = (os.getpid(), duckdb.connect(":memory:"))
    return _DB[1]


def open_dataset(root: str | Path) -> Dataset:
    return Dataset(root)


def labels_view_sql() -> str:
    """The wide `labels` view: per clip, each field's value from its most recent labeler run, with
    the labeler and confidence of emotion and caption."""
    from .vocab import LABEL_FIELDS

    cols = []
    for f, kind in LABEL_FIELDS.items():
        expr = {"string": "json_extract_string(value, '$')", "double": "TRY_CAST(value AS DOUBLE)",
                "string_list": "from_json(value, '[\"VARCHAR\"]')", "json": "CAST(value AS JSON)"}[kind]
        cols.append(f"first(CASE WHEN field = '{f}' THEN {expr} END) FILTER (WHERE field = '{f}') AS {f}")
    for f in ("emotion", "caption"):
        cols.append(f"first(confidence) FILTER (WHERE field = '{f}') AS {f}_confidence")
        cols.append(f"first(labeler || ':' || labeler_version) FILTER (WHERE field = '{f}') AS {f}_labeler")
    return ("CREATE TEMP VIEW labels AS WITH cur AS (SELECT * FROM label_rows QUALIFY row_number() OVER "
            "(PARTITION BY clip_id, field ORDER BY run DESC, labeler) = 1) SELECT clip_id, " + ", ".join(cols) +
            " FROM cur GROUP BY clip_id")
