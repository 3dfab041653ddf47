"""Wire the labeling stage: per-source Ray tasks build clip contexts from the dataset and run the
labeler chain; rows land in the long `label_rows` table (the `labels` view is the wide face)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from extractors.labels.context import DEFAULT_CHAIN, contexts_for_source, decode_value, run_chain
from storage_schemas import open_dataset, table_path, write_table

from .frames import clip_frame_arrays


def _label_task(args: tuple) -> list[dict]:
    ds_dir, uri, clips, chain, options, prior, run = args
    from extractors.labels import get_labeler

    ds = open_dataset(ds_dir)
    ids = [c["clip_id"] for c in clips]
    frames = {c: clip_frame_arrays(ds, c) for c in ids}
    crops = {c: np.load(Path(ds_dir) / "arrays" / "crops" / f"{c}.npy", allow_pickle=False) for c in ids}
    tr = {}
    if "transcripts" in ds.tables:
        for r in ds.table("transcripts").to_pylist():
            if r["clip_id"] in frames:
                tr[r["clip_id"]] = r
    ctxs = contexts_for_source(uri, clips, frames, crops, tr)
    labelers = [get_labeler(name, **options.get(name, {})) for name in chain]
    return [{**r.record(), "run": run} for r in run_chain(ctxs, labelers, prior)]


def run_labels(out: str | os.PathLike, ex, chain: tuple[str, ...] = DEFAULT_CHAIN, options: dict | None = None,
               relabel: bool = False, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Label every kept clip. With ``relabel`` the chain's rows are added as a new run (earlier
    labelers' rows stay); otherwise they are run 0 (the job's own labels), replacing earlier run-0
    rows and keeping every relabel run."""
    out = Path(out)
    tick = progress or (lambda *a: None)
    ds = open_dataset(out)
    clips = ds.query("select c.* from clips c join clip_features f using (clip_id) where f.status = 'ok' "
                     "order by c.clip_id").to_pylist()
    existing = ds.table("label_rows").to_pylist() if "label_rows" in ds.tables else []
    names = set(chain)
    if relabel:
        # a rerun of the same labeler version replaces its rows; other labelers stay intact
        run = max((r["run"] for r in existing), default=0) + 1
        keep = [r for r in existing if r["labeler"] not in names]
    else:
        run = 0
        keep = [r for r in existing if r["run"] > 0]
    prior: dict[str, dict] = {}
    for r in sorted(keep, key=lambda r: r["run"]):
        prior.setdefault(r["clip_id"], {})[r["field"]] = decode_value(r["value"])
    by_src: dict[str, list[dict]] = {}
    for c in clips:
        by_src.setdefault(c["uri"], []).append(c)
    work = [(str(out), uri, cs, chain, options or {}, {c["clip_id"]: prior.get(c["clip_id"], {}) for c in cs}, run)
            for uri, cs in sorted(by_src.items())]
    rows: list[dict] = []
    tick("label", 0, len(work))
    for i, (_, res) in enumerate(ex.map_unordered(_label_task, work)):
        rows += res
        tick("label", i + 1, len(work))
    if relabel:
        # the same labeler re-run keeps its original run number's place: replace, don't stack
        old_runs = {r["run"] for r in existing if r["labeler"] in names}
        if old_runs:
            run_to = min(old_runs)
            for r in rows:
                r["run"] = run_to
    allrows = keep + rows
    allrows.sort(key=lambda r: (r["clip_id"], r["run"], r["labeler"], r["field"]))
    write_table(table_path(out, "label_rows"), "label_rows", allrows)
    return {"rows": len(rows), "run": rows[0]["run"] if rows else run, "labelers": list(chain), "clips": len(clips)}
