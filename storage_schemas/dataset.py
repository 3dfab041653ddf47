"""Read access to an M2F-D dataset directory: tables as Arrow, SQL through DuckDB."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from .io import read_table
from .tables import TABLES

TABLES_DIR = "tables"
CARD = "dataset.json"


def table_path(root: str | Path, name: str) -> Path:
    return Path(root) / TABLES_DIR / f"{name}.parquet"


class Dataset:
    """An M2F-D dataset on disk. ``tables`` lists the tables present; ``query`` runs SQL."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / TABLES_DIR).is_dir():
            raise FileNotFoundError(f"{self.root} is not an M2F-D dataset (no {TABLES_DIR}/ folder)")
        self.tables = [n for n in TABLES if table_path(self.root, n).is_file()]

    @property
    def card(self) -> dict:
        p = self.root / CARD
        return json.loads(p.read_text()) if p.is_file() else {}

    def table(self, name: str) -> pa.Table:
        if name not in self.tables:
            raise KeyError(f"table {name!r} not in dataset {self.root}; present: {self.tables}")
        return read_table(table_path(self.root, name), name)

    def connect(self):
        import duckdb

        con = duckdb.connect(":memory:")
        for name in self.tables:
            read_table(table_path(self.root, name), name)  # schema/version check before exposing it
            p = str(table_path(self.root, name)).replace("'", "''")
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{p}')")
        return con

    def query(self, sql: str) -> pa.Table:
        con = self.connect()
        try:
            return con.sql(sql).to_arrow_table()
        finally:
            con.close()


def open_dataset(root: str | Path) -> Dataset:
    return Dataset(root)
