"""Validated, atomic reading and writing of M2F-D tables and JSON documents."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .tables import SCHEMA_VERSION, TABLES
from .vocab import QUARANTINE_REASONS


_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() would give; mkstemp's 0600 is not wanted


class SchemaError(ValueError):
    """A record or file does not match its declared storage schema."""


def _value_problem(typ: pa.DataType, v: Any, nullable: bool) -> str | None:
    """Why ``v`` cannot be stored as ``typ`` (None when it can). Checks shapes and nullability, the
    things Arrow's conversion may let through or report without a row; scalar dtypes are left to
    Arrow's own conversion."""
    if v is None:
        return None if nullable else "null in a non-nullable field"
    if pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ):
        if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__len__"):
            return f"expected a list, got {type(v).__name__}"
        if pa.types.is_fixed_size_list(typ) and len(v) != typ.list_size:
            return (f"expected exactly {typ.list_size} values, got {len(v)}"
                    + (" (store null for a missing value, not an empty list)" if len(v) == 0 else ""))
        vf = typ.value_field
        if pa.types.is_nested(vf.type) or not vf.nullable:
            for j, x in enumerate(v):
                p = _value_problem(vf.type, x, vf.nullable)
                if p:
                    return f"item {j}: {p}"
        return None
    if pa.types.is_struct(typ):
        if not isinstance(v, Mapping):
            return f"expected a struct (mapping), got {type(v).__name__}"
        names = {typ.field(i).name for i in range(typ.num_fields)}
        if set(v) - names:
            return f"unknown struct fields {sorted(set(v) - names)}"
        if names - set(v):
            return f"missing struct fields {sorted(names - set(v))}"
        for i in range(typ.num_fields):
            f = typ.field(i)
            p = _value_problem(f.type, v.get(f.name), f.nullable)
            if p:
                return f"{f.name}: {p}"
        return None
    if isinstance(v, float) and pa.types.is_integer(typ):
        return f"float {v!r} in an integer field"
    return None


def _row_label(row: Mapping[str, Any]) -> str:
    key = next((k for k in ("clip_id", "source_id", "shard", "uri") if row.get(k) is not None), None)
    return f" ({key} {row[key]})" if key else ""


def validate_rows(name: str, rows: list[Mapping[str, Any]]) -> None:
    """Raise SchemaError naming the table, row and field of the first record that does not fit
    storage schema ``name``: unknown or missing fields, nulls where the schema forbids them, lists
    of the wrong length for fixed-size fields, malformed structs."""
    schema = TABLES[name]
    names = set(schema.names)
    for i, row in enumerate(rows):
        extra = set(row) - names
        missing = names - set(row)
        if extra or missing:
            raise SchemaError(
                f"table {name!r} row {i}{_row_label(row)}: unknown fields {sorted(extra)}, missing fields {sorted(missing)}"
            )
        for field in schema:
            p = _value_problem(field.type, row[field.name], field.nullable)
            if p:
                raise SchemaError(f"table {name!r} row {i}{_row_label(row)} field {field.name!r}: {p}")


def _records_to_table(name: str, records: Iterable[Mapping[str, Any]]) -> pa.Table:
    schema = TABLES[name]
    rows = list(records)
    validate_rows(name, rows)
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise SchemaError(f"table {name!r}: {e}") from e
    validate_table(name, table)
    return table


def records_table(name: str, records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows as an Arrow table of schema ``name``, each row validated first (SchemaError names the first
    that does not fit)."""
    return _records_to_table(name, records)


class RowBuffer:
    """A table's rows gathered part by part (a source at a time) as compact Arrow, each part validated
    as it comes, for a writer that sorts the whole table before writing it: Arrow holds a float in
    4 bytes where a Python list holds it in about 32, so a driver does not grow with Python objects."""

    def __init__(self, name: str):
        self.name, self.parts = name, []

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            self.parts.append(records_table(self.name, rows))

    def __len__(self) -> int:
        return sum(t.num_rows for t in self.parts)

    def table(self, sort_by: list[str]) -> pa.Table:
        """Every row so far, sorted by ``sort_by`` (ascending), in one chunk."""
        t = pa.concat_tables(self.parts) if self.parts else TABLES[self.name].empty_table()
        return t.sort_by([(k, "ascending") for k in sort_by]).combine_chunks()


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
    try:
        table.validate(full=True)
    except pa.ArrowInvalid as e:
        raise SchemaError(f"table {name!r}: invalid Arrow data ({e})") from e
    if name == "quarantine" and table.num_rows:
        bad = set(table.column("reason").to_pylist()) - set(QUARANTINE_REASONS)
        if bad:
            raise SchemaError(f"quarantine reasons not in the vocabulary: {sorted(bad)}")


def _parquet_schema(schema: pa.Schema) -> pa.Schema:
    """The schema a table is stored under in Parquet: fixed-size lists as plain lists.

    Parquet has no fixed-size list (both are LIST there), but Arrow C++ up to at least pyarrow 25
    cannot read back a fixed-size list column holding a null (apache/arrow#35692: 'Expected all
    lists to be of size=N but index i had size=0'), so a dropped clip's null neutral made the whole
    clip_features table unreadable. Stored as lists, cast back to the storage schema on read."""
    def conv(t: pa.DataType) -> pa.DataType:
        return pa.list_(t.value_field) if pa.types.is_fixed_size_list(t) else t

    return pa.schema([f.with_type(conv(f.type)) for f in schema], metadata=schema.metadata)


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
    stored = table.cast(_parquet_schema(TABLES[name])).replace_schema_metadata(
        {**(TABLES[name].metadata or {}), b"m2fd.table": name.encode(), b"m2fd.schema_version": SCHEMA_VERSION.encode()}
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(stored, tmp, compression="zstd", write_statistics=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # what replaces the old file must read back as what was validated
        back = read_table(tmp, name)
        if back.num_rows != table.num_rows:
            raise SchemaError(f"table {name!r}: wrote {table.num_rows} rows but {back.num_rows} read back")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return table


def _check_footer(path: Path, md: dict, name: str) -> None:
    version = md.get(b"m2fd.schema_version", b"").decode()
    if md.get(b"m2fd.table", b"").decode() != name:
        raise SchemaError(f"{path}: holds table {md.get(b'm2fd.table', b'?').decode()!r}, expected {name!r}")
    if version.split(".")[:1] != SCHEMA_VERSION.split(".")[:1] or not version:
        raise SchemaError(f"{path}: schema version {version!r} is incompatible with {SCHEMA_VERSION}")


def _conform(path: Path, name: str, table: pa.Table) -> pa.Table:
    try:
        table = table.replace_schema_metadata(None).cast(TABLES[name])
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise SchemaError(f"{path}: does not match the {name!r} schema ({e})") from e
    validate_table(name, table)
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
    _check_footer(path, md, name)
    return _conform(path, name, table).replace_schema_metadata(md)


def iter_table(path: str | os.PathLike, name: str, batch_rows: int = 65536) -> Iterator[pa.Table]:
    """Read a table written by ``write_table`` ``batch_rows`` rows at a time, each batch checked like
    ``read_table`` checks the whole: memory is bounded by the batch, not the table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {name!r} not found at {path}")
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({e})") from e
    _check_footer(path, pf.schema_arrow.metadata or {}, name)
    with pf:
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                yield _conform(path, name, pa.Table.from_batches([batch]))
        except pa.ArrowInvalid as e:
            raise SchemaError(f"{path}: not a readable Parquet file ({e})") from e
