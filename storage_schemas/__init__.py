"""storage_schemas: the single source of every M2F-D field name, dtype, shape and version."""
from .dataset import Dataset, open_dataset, table_path
from .io import RowBuffer, SchemaError, atomic_write_bytes, read_table, records_table, validate_table, write_json, write_table
from .tables import ACTIVE_TABLES, AUDIO_SAMPLE_RATE, FPS, SCHEMA_VERSION, TABLES
from .vocab import QUARANTINE_REASONS

__all__ = [
    "ACTIVE_TABLES", "AUDIO_SAMPLE_RATE", "Dataset", "FPS", "QUARANTINE_REASONS", "RowBuffer", "SCHEMA_VERSION",
    "SchemaError", "TABLES", "atomic_write_bytes", "open_dataset", "read_table", "records_table", "table_path",
    "validate_table", "write_json", "write_table",
]
