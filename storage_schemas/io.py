"""Validated, atomic reading and writing of M2F-D tables and JSON documents."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .tables import SCHEMA_VERSION, TABLES
from .vocab import QUARANTINE_REASONS


_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() would give; mkstemp's 0600 is not wanted


class SchemaError(ValueError):
    """A record or file does not match its declared storage schema."""


def _records_to_table(name: str, records: Iterable[Mapping[str, Any]]) -> pa.Table:
    schema = TABLES[name]
    rows = list(records)
    names = set(schema.names)
    for i, row in enumerate(rows):
        extra = set(row) - names
        missing = names - set(row)
        if extra or missing:
            raise SchemaError(
                f"table {name!r} row {i}: unknown fields {sorted(extra)}, missing fields {sorted(missing)}"
            )
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise SchemaError(f"table {name!r}: {e}") from e
    validate_table(name, table)
    return table


def validate_table(name: str, table: pa.Table) -> None:
    """Raise SchemaError unless ``table`` matches storage schema ``name`` exactly."""
    if name not in TABLES:
        raise SchemaError(f"unknown table {name!r}; known: {sorted(TABLES)}")
    schema = TABLES[name]
    if table.schema.names != schema.names:
        raise SchemaError(f"table {name!r}: columns {table.schema.names} != schema {schema.names}")
    for field in schema:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            raise SchemaError(f"table {name!r}.{field.name}: type {col.type} != {field.type}")
        if not field.nullable and col.null_count:
            raise SchemaError(f"table {name!r}.{field.name}: {col.null_count} nulls in a non-nullable field")
    if name == "quarantine" and table.num_rows:
        bad = set(table.column("reason").to_pylist()) - set(QUARANTINE_REASONS)
        if bad:
            raise SchemaError(f"quarantine reasons not in the vocabulary: {sorted(bad)}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, doc: Any) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table(path: str | os.PathLike, name: str, data: pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """Validate ``data`` against schema ``name`` and write it as Parquet, atomically.

    The file carries the table name and schema version in its metadata, and the bytes are a
    deterministic function of the rows (no timestamps are written).
    """
    table = data if isinstance(data, pa.Table) else _records_to_table(name, data)
    validate_table(name, table)
    table = table.replace_schema_metadata(
        {**(TABLES[name].metadata or {}), b"m2fd.table": name.encode(), b"m2fd.schema_version": SCHEMA_VERSION.encode()}
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return table


def read_table(path: str | os.PathLike, name: str) -> pa.Table:
    """Read a Parquet table written by ``write_table`` and check its schema and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {name!r} not found at {path}")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({e})") from e
    md = table.schema.metadata or {}
    version = md.get(b"m2fd.schema_version", b"").decode()
    if md.get(b"m2fd.table", b"").decode() != name:
        raise SchemaError(f"{path}: holds table {md.get(b'm2fd.table', b'?').decode()!r}, expected {name!r}")
    if version.split(".")[:1] != SCHEMA_VERSION.split(".")[:1] or not version:
        raise SchemaError(f"{path}: schema version {version!r} is incompatible with {SCHEMA_VERSION}")
    validate_table(name, table.replace_schema_metadata(None))
    return table
