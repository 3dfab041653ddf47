"""What every stage after ingest shares: the local file a source is read from, and the quarantine
table, where each stage replaces only its own rows (a failed item is a row there, never a failed run)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from extractors.ingest import quarantine_row
from extractors.probe import local_copy
from storage_schemas import open_dataset, table_path, write_table
from storage_schemas.arrays import read_array, write_array

CACHE = "cache"


def source_path(out: str | os.PathLike, source: dict) -> str:
    """The local bytes of a source (a row of `sources`): the input file itself, or the copy that
    ingest fetched into DATASET/cache/ under its sha256. Stages never reopen a URL."""
    return local_copy(source["uri"], source["sha256"], source.get("size_bytes"), Path(out) / CACHE)


def keep_audio(out: str | os.PathLike, sha256: str, audio: np.ndarray) -> None:
    write_array(out, "audio", sha256, np.asarray(audio, np.float32))


def source_audio(out: str | os.PathLike, source: dict) -> np.ndarray:
    """A source's decoded audio: the copy ingest kept under parts/audio/, else decoded now and kept (a
    dataset ingested by older code, or parts removed), so each source's audio is decoded once per run."""
    from extractors.media import decode_audio

    try:
        return read_array(out, "audio", source["sha256"])
    except (ValueError, OSError):  # missing, damaged or foreign (SchemaError is a ValueError): decode again
        pass
    audio = decode_audio(source_path(out, source))
    keep_audio(out, source["sha256"], audio)
    return audio


def clip_rows(ds, table: str, clip_ids: list[str]) -> list[dict]:
    """The rows of a per-clip table for these clips only (none where the table is not there yet)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table not in ds.tables:
        return []
    t = ds.table(table)
    return t.filter(pc.is_in(t.column("clip_id"), value_set=pa.array(clip_ids, pa.string()))).to_pylist()


def failure_rows(failure, stage: str, step: str, uri: str, source_id: str | None,
                 clip_ids: list[str | None]) -> list[dict]:
    """Quarantine rows for the items a failed task held (one per clip, or one for the source)."""
    if failure.reject is not None:
        r = failure.reject
        reason, msg, detail = r.reason, r.message, r.detail
    else:
        reason, msg, detail = "processing_error", f"{stage} stage, {step}: {failure.error}", failure.detail()
    return [quarantine_row(uri, source_id, reason, (f"clip {c}: " if c else "") + msg, detail, stage=stage, clip_id=c)
            for c in (clip_ids or [None])]


def sort_quarantine(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda q: (q["uri"], q["stage"], q["reason"], q["clip_id"] or "", q["message"]))


def replace_quarantine(out: str | os.PathLike, stages: tuple[str, ...], rows: list[dict]) -> None:
    """Write the quarantine table with ``stages``' rows replaced by ``rows`` (other stages' rows stay)."""
    ds = open_dataset(out) if (Path(out) / "tables").is_dir() else None
    keep = [q for q in ds.table("quarantine").to_pylist() if q["stage"] not in stages] \
        if ds is not None and "quarantine" in ds.tables else []
    write_table(table_path(out, "quarantine"), "quarantine", sort_quarantine(keep + list(rows)))
