import os
import re

import pyarrow.parquet as pq
import pytest

from storage_schemas import (QUARANTINE_REASONS, SCHEMA_VERSION, TABLES, SchemaError, open_dataset, read_table,
                             table_path, write_table)


def _q(**kw):
    row = {"uri": "/x.mp4", "source_id": None, "stage": "ingest", "reason": "no_face", "message": "m", "detail": None,
           "clip_id": None}
    row.update(kw)
    return row


def test_roundtrip_carries_version_and_validates(tmp_path):
    p = tmp_path / "q.parquet"
    write_table(p, "quarantine", [_q(), _q(uri="/y.mp4", reason="silent")])
    t = read_table(p, "quarantine")
    assert t.num_rows == 2
    assert t.schema.metadata[b"m2fd.schema_version"].decode() == SCHEMA_VERSION
    assert [f for f in os.listdir(tmp_path)] == ["q.parquet"]  # no temp files left behind


@pytest.mark.parametrize("row,msg", [
    (_q(extra=1), "unknown fields"),
    ({k: v for k, v in _q().items() if k != "message"}, "missing fields"),
    (_q(reason="bogus"), "not in the vocabulary"),
    (_q(message=None), "row 0 .*field .message.: null in a non-nullable"),
    (_q(stage=3), "quarantine"),
])
def test_writer_rejects_bad_rows(tmp_path, row, msg):
    with pytest.raises(SchemaError, match=msg):
        write_table(tmp_path / "q.parquet", "quarantine", [row])
    assert not (tmp_path / "q.parquet").exists()


def test_failed_write_keeps_previous_file(tmp_path):
    p = tmp_path / "q.parquet"
    write_table(p, "quarantine", [_q()])
    before = p.read_bytes()
    with pytest.raises(SchemaError):
        write_table(p, "quarantine", [_q(reason="nope")])
    assert p.read_bytes() == before


def test_reader_rejects_foreign_and_incompatible_files(tmp_path):
    p = tmp_path / "x.parquet"
    write_table(p, "quarantine", [_q()])
    with pytest.raises(SchemaError, match="expected 'clips'"):
        read_table(p, "clips")
    t = pq.read_table(p)
    t = t.replace_schema_metadata({b"m2fd.table": b"quarantine", b"m2fd.schema_version": b"9.0.0"})
    pq.write_table(t, p)
    with pytest.raises(SchemaError, match="incompatible"):
        read_table(p, "quarantine")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SchemaError, match="not a readable Parquet"):
        read_table(tmp_path / "bad.parquet", "quarantine")


def test_every_schema_is_documented_and_reasons_are_explained():
    assert set(TABLES) >= {"sources", "clips", "quarantine", "frames", "transcripts", "label_rows", "shards"}
    assert all(QUARANTINE_REASONS.values())
    for name, schema in TABLES.items():
        assert len(set(schema.names)) == len(schema.names), name


def test_query_over_tables(tmp_path):
    write_table(table_path(tmp_path, "quarantine"), "quarantine", [_q(), _q(uri="/b.mp4")])
    ds = open_dataset(tmp_path)
    assert ds.tables == ["quarantine"]
    assert ds.query("select count(*) as n from quarantine where reason='no_face'").to_pylist() == [{"n": 2}]
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "nope")


def test_arrays_are_validated_before_they_replace_anything(tmp_path):
    import numpy as np

    from storage_schemas.arrays import ARRAYS, array_path, read_array, write_array

    crops = np.zeros((5, 96, 96, 3), np.uint8)
    p = write_array(tmp_path, "crops", "c1", crops, n_frames=5)
    assert p == tmp_path / "arrays" / "crops" / "c1.npy" and np.array_equal(read_array(tmp_path, "crops", "c1"), crops)
    for bad, sizes, msg in ((crops.astype(np.float32), {}, "dtype float32"),
                            (crops[..., :2], {}, "axis 3 has size 2"),
                            (np.zeros((5, 96, 64, 3), np.uint8), {}, "crop_size=96"),  # one named size, two values
                            (crops, {"n_frames": 6}, "n_frames=6"),
                            (crops[0], {}, "shape (96, 96, 3)")):
        with pytest.raises(SchemaError, match=re.escape(msg)):
            write_array(tmp_path, "crops", "c1", bad, **sizes)
    assert np.array_equal(np.load(p), crops)  # a rejected write left the committed file as it was
    array_path(tmp_path, "audio", "s").parent.mkdir(parents=True)
    np.save(array_path(tmp_path, "audio", "s"), np.zeros(16, np.float64))  # written by something else
    with pytest.raises(SchemaError, match="array audio .*float64"):
        read_array(tmp_path, "audio", "s")
    with pytest.raises(SchemaError, match="unknown array"):
        array_path(tmp_path, "meshes", "c1")
    assert all(a.doc and a.folder and a.key for a in ARRAYS.values())
