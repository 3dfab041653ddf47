import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractors.discover import discover
from extractors.errors import Reject
from extractors.probe import fetch, sha256_file

EXT = (".mp4", ".mkv")


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.mp4").write_bytes(b"1")
    (tmp_path / "a" / "two.MKV").write_bytes(b"2")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / ".hidden.mp4").write_bytes(b"h")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "three.mp4").write_bytes(b"3")
    os.symlink(tmp_path / "missing.mp4", tmp_path / "a" / "broken.mp4")
    return tmp_path


def test_folder_walk_filters_by_extension_and_flags_broken_links(tree):
    refs = discover([str(tree / "a")], EXT)
    names = {os.path.basename(r.uri): r.problem for r in refs}
    assert names == {"one.mp4": None, "two.MKV": None, "three.mp4": None, "broken.mp4": "not_a_file"}


def test_explicit_file_glob_missing_and_repeats(tree):
    refs = discover([str(tree / "a" / "notes.txt"), str(tree / "a" / "*.mp4"), str(tree / "nope.mp4"),
                     str(tree / "a" / "one.mp4")], EXT)
    got = [(os.path.basename(r.uri), r.problem) for r in refs]
    assert ("notes.txt", None) in got  # a named file is always taken
    assert ("nope.mp4", "not_a_file") in got
    assert sum(1 for n, _ in got if n == "one.mp4") == 1  # repeated URIs collapse


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet", "txt"])
def test_manifests_resolve_relative_paths(tree, kind):
    entries = ["a/one.mp4", str(tree / "a" / "sub" / "three.mp4"), "a/absent.mp4"]
    m = tree / ("list.manifest.txt" if kind == "txt" else f"list.{kind}")
    if kind == "csv":
        m.write_text("path\n" + "\n".join(entries) + "\n")
    elif kind == "jsonl":
        m.write_text("\n".join(json.dumps({"uri": e}) for e in entries))
    elif kind == "parquet":
        pq.write_table(pa.table({"url": entries}), m)
    else:
        m.write_text("# comment\n" + "\n".join(entries))
    refs = discover([str(m)], EXT)
    assert [(os.path.basename(r.uri), r.problem) for r in refs] == [
        ("absent.mp4", "not_a_file"), ("one.mp4", None), ("three.mp4", None)]


def test_manifest_without_path_column_is_a_clear_error(tree):
    m = tree / "bad.csv"
    m.write_text("name\nx\n")
    with pytest.raises(ValueError, match="needs one of the columns"):
        discover([str(m)], EXT)


def test_fsspec_urls(tree):
    import fsspec

    refs = discover([f"file://{tree}/a/sub"], EXT)
    assert [os.path.basename(r.uri) for r in refs] == ["three.mp4"]
    mem = fsspec.filesystem("memory")
    mem.pipe("/bucket/vids/x.mp4", b"remote bytes")
    refs = discover(["memory://bucket/vids"], EXT)
    assert len(refs) == 1 and refs[0].is_remote and refs[0].problem is None
    assert refs[0].uri.startswith("memory://") and refs[0].uri.endswith("/bucket/vids/x.mp4")
    path, sha, size = fetch(refs[0].uri, tree / "cache")
    assert size == 12 and sha == sha256_file(path) and open(path, "rb").read() == b"remote bytes"
    missing = discover(["memory://bucket/none.mp4"], EXT)
    assert missing[0].problem == "not_a_file"
    with pytest.raises(Reject) as e:
        fetch("memory://bucket/gone.mp4", tree / "cache")
    assert e.value.reason == "fetch_error"


def test_unknown_protocol_becomes_fetch_error():
    refs = discover(["nosuchproto://bucket/x.mp4"], EXT)
    assert refs[0].problem == "fetch_error"
