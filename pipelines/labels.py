"""Wire the labeling stage: per-source Ray tasks build clip contexts from the dataset and run the
labeler chain; rows land in the long `label_rows` table (the `labels` view is the wide face)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from extractors.labels.context import DEFAULT_CHAIN, contexts_for_source, decode_value, run_chain
from extractors.ingest import quarantine_row
from storage_schemas import atomic_write_bytes, open_dataset, table_path, write_table
from storage_schemas.arrays import array_path, read_array
from storage_schemas.tables import CLIP_COLUMNS

from .executors import TaskFailure, stage_task
from .faults import maybe_fail
from .frames import clip_frame_arrays
from .stage_io import clip_rows, failure_rows, replace_quarantine, source_audio
from .stages import task_options


PARTS = Path("parts") / "label"


@dataclass(frozen=True)
class LabelWork:
    """One source's kept clips to run the labeler chain on (as label run ``run``)."""

    out: str
    source: dict
    clips: list
    chain: tuple
    options: dict  # labeler name -> its options
    prior: dict  # clip_id -> {field: value} of earlier runs' labelers
    run: int
    part: str  # parts/label/<source>-<key>.json: the rows, reused while the key holds


@stage_task
def _label_task(w: LabelWork) -> dict:
    from extractors.labels import get_labeler

    if w.part and Path(w.part).is_file():  # the same inputs, chain and versions: the rows as they were
        return json.loads(Path(w.part).read_text())
    maybe_fail("label", w.source["uri"])
    ds = open_dataset(w.out)
    ids = [c["clip_id"] for c in w.clips]
    frames = {c: clip_frame_arrays(ds, c) for c in ids}
    crops = {c["clip_id"]: read_array(w.out, "crops", c["clip_id"], n_frames=c["n_frames"]) for c in w.clips}
    tr = {r["clip_id"]: r for r in clip_rows(ds, "transcripts", ids)}
    ctxs = contexts_for_source(source_audio(w.out, w.source), w.clips, frames, crops, tr)
    labelers = [get_labeler(name, **w.options.get(name, {})) for name in w.chain]
    failures: list[tuple[str, str, str]] = []
    rows = [{**r.record(), "run": w.run} for r in run_chain(ctxs, labelers, w.prior, failures)]
    res = {"rows": rows, "quarantine": [
        quarantine_row(w.source["uri"], w.source["source_id"], "processing_error",
                       f"clip {cid}: label stage, labeler {lab}: {err}", {"labeler": lab, "error": err},
                       stage="label", clip_id=cid) for cid, lab, err in failures]}
    if w.part and not failures:
        atomic_write_bytes(w.part, json.dumps(res, sort_keys=True).encode())
    return res


def _part(out: Path, source: dict, clips: list[dict], chain, options, prior: dict, run: int) -> str:
    """parts/label/<source>-<key>.json: the key covers every input of the chain on this source (the
    frames table and crops by sha256, transcripts, clips, chain, labeler versions, options, prior
    values), so a later run reuses committed clips' rows byte for byte instead of labelling again."""
    from extractors.labels.base import REGISTRY

    h = hashlib.sha256()
    files = [table_path(out, "frames", source["source_id"])] + [array_path(out, "crops", c["clip_id"]) for c in clips]
    for p in files:
        h.update(hashlib.sha256(p.read_bytes()).digest() if p.is_file() else b"-")
    doc = {"clips": clips, "chain": [(n, getattr(REGISTRY.get(n), "version", None)) for n in chain],
           "options": options, "prior": prior, "run": run, "sha256": source["sha256"]}
    h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return str(out / PARTS / f"{source['source_id']}-{h.hexdigest()[:24]}.json")


def run_labels(out: str | os.PathLike, ex, chain: tuple[str, ...] = DEFAULT_CHAIN, options: dict | None = None,
               relabel: bool = False, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Label every kept clip. With ``relabel`` the chain's rows are added as a new run (earlier
    labelers' rows stay); otherwise they are run 0 (the job's own labels), replacing earlier run-0
    rows and keeping every relabel run."""
    out = Path(out)
    tick = progress or (lambda *a: None)
    ds = open_dataset(out)
    clips = ds.query(f"select {CLIP_COLUMNS} from clips c join clip_features f using (clip_id) where f.status = 'ok' "
                     "order by c.clip_id").to_pylist()
    existing = ds.table("label_rows").to_pylist() if "label_rows" in ds.tables else []
    names = set(chain)
    if relabel:
        # a rerun of the same labelers replaces their rows in the run they first landed in (other labelers'
        # rows stay): the parts are keyed by that run, so clips whose inputs did not change reuse their rows
        # instead of being labelled again (greedy captions: the same text)
        old_runs = {r["run"] for r in existing if r["labeler"] in names}
        run = min(old_runs) if old_runs else max((r["run"] for r in existing), default=0) + 1
        keep = [r for r in existing if r["labeler"] not in names]
    else:
        run = 0
        keep = [r for r in existing if r["run"] > 0]
    prior: dict[str, dict] = {}
    for r in sorted(keep, key=lambda r: r["run"]):
        prior.setdefault(r["clip_id"], {})[r["field"]] = decode_value(r["value"])
    sources = {s["source_id"]: s for s in ds.table("sources").to_pylist()}
    by_src: dict[str, list[dict]] = {}
    for c in clips:
        by_src.setdefault(c["source_id"], []).append(c)
    trans = {r["clip_id"]: r for r in ds.table("transcripts").to_pylist()} if "transcripts" in ds.tables else {}
    work = []
    for sid, cs in sorted(by_src.items()):
        pr = {c["clip_id"]: prior.get(c["clip_id"], {}) for c in cs}
        key_clips = [{**c, "transcript": trans.get(c["clip_id"])} for c in cs]
        work.append(LabelWork(str(out), sources[sid], cs, tuple(chain), options or {}, pr, run,
                              _part(out, sources[sid], key_clips, chain, options or {}, pr, run)))
    rows: list[dict] = []
    quarantine: list[dict] = []
    tick("label", 0, len(work))
    for i, (w, res) in enumerate(ex.map_unordered(_label_task, work, **task_options(_label_task))):
        if isinstance(res, TaskFailure):  # the whole source's task: each of its clips is held back
            s, cs = w.source, w.clips
            res = {"rows": [], "quarantine": failure_rows(res, "label", "labeler chain", s["uri"], s["source_id"],
                                                          [c["clip_id"] for c in cs])}
        rows += res["rows"]
        quarantine += res["quarantine"]
        tick("label", i + 1, len(work))
    # a clip a labeler failed on is held out of new shards until a later run labels it (see shards),
    # and keeps the rows it had of that labeler
    failed = {(q["clip_id"], (json.loads(q["detail"] or "{}")).get("labeler")) for q in quarantine}
    if failed:
        old = [r for r in existing if r not in keep and ((r["clip_id"], r["labeler"]) in failed
                                                         or (r["clip_id"], None) in failed)]
        keep = keep + old
    replace_quarantine(out, ("label",), quarantine)
    allrows = keep + rows
    allrows.sort(key=lambda r: (r["clip_id"], r["run"], r["labeler"], r["field"]))
    write_table(table_path(out, "label_rows"), "label_rows", allrows)
    return {"rows": len(rows), "run": rows[0]["run"] if rows else run, "labelers": list(chain), "clips": len(clips),
            "failed_clips": len({q["clip_id"] for q in quarantine})}
