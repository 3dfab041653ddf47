"""The M2F-D job: every stage in order on one executor, under the dataset lock, ending with the
dataset card (counts + lineage)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from extractors.config import ExtractConfig, IngestConfig, ShardConfig
from extractors.pose import TEMPLATE_PATH
from storage_schemas import SCHEMA_VERSION, write_json
from storage_schemas.dataset import CARD

from .executors import make_executor
from .ingest import IngestSummary, run_ingest
from .lineage import code_version
from .lock import DatasetLock

STAGES = ("ingest", "extract", "label", "shard")


def run_job(sources: list[str], out: str | os.PathLike, icfg: IngestConfig | None = None,
            ecfg: ExtractConfig | None = None, executor: str = "ray", scfg: ShardConfig | None = None, num_cpus: int | None = None,
            stages: tuple[str, ...] = STAGES, progress: Callable[[str, int, int], None] | None = None,
            log: Callable[[str], None] = print) -> dict:
    icfg, ecfg, scfg = icfg or IngestConfig(), ecfg or ExtractConfig(), scfg or ShardConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    with DatasetLock(out):
        ex = make_executor(executor, num_cpus)
        try:
            s: IngestSummary = run_ingest(sources, out, icfg, ex=ex, progress=progress)
            result["ingest"] = s
            if "extract" in stages and s.n_clips:
                from .extract import run_extract

                result["extract"] = run_extract(out, ecfg, ex, progress=progress, log=log)
                if "label" in stages and result["extract"]["clips_ok"]:
                    from .labels import run_labels

                    result["label"] = run_labels(out, ex, progress=progress)
                if "shard" in stages and result["extract"]["clips_ok"]:
                    from .shards import run_shards

                    result["shard"] = run_shards(out, scfg, ex, progress=progress)
        finally:
            ex.close()
        finish_dataset(out, icfg, ecfg, scfg, result.get("extract"))
        if "shard" in result:
            from .report import write_report

            result["report"] = str(write_report(out))
    return result


def finish_dataset(out: Path, icfg: IngestConfig, ecfg: ExtractConfig, scfg: ShardConfig, ext: dict | None) -> dict:
    """Write the dataset card (dataset.json + README.md): counts from the tables, lineage, stats.
    Stages that did not run now keep the lineage the last run recorded."""
    import hashlib
    import json

    from storage_schemas import open_dataset

    from .report import card_stats, write_card_md

    if ext is None:
        prev = json.loads((out / CARD).read_text()) if (out / CARD).is_file() else {}
        pc = prev.get("lineage", {}).get("checkpoints", {})
        ext = {"gnpfa": pc.get("gnpfa"), "engines": pc.get("transcription"),
               "clips_ok": prev.get("counts", {}).get("clips_extracted_ok"),
               "frames": prev.get("counts", {}).get("frames")}
    ds = open_dataset(out)
    one = lambda sql: ds.query(sql).to_pylist()[0]  # noqa: E731
    c = one("select (select count(*) from sources) sources, (select count(*) from clips) clips, "
            "(select coalesce(sum(duration_s), 0) from clips) secs, (select count(*) from quarantine where "
            "stage = 'discover' or reason = 'duplicate') extra")
    reasons = {r["reason"]: r["n"] for r in ds.query("select reason, count(*) n from quarantine group by 1 order by 1").to_pylist()}
    card = {
        "name": "M2F-D", "schema_version": SCHEMA_VERSION,
        "lineage": {
            "code": code_version(),
            "config": {"ingest": icfg.to_dict(), "extract": ecfg.to_dict(), "shard": scfg.to_dict()},
            "config_digest": {"ingest": icfg.digest(), "extract": ecfg.digest()},
            "checkpoints": {
                "mediapipe": "face_detection full-range + face_mesh refined (mediapipe 0.10.21 wheel)",
                "face_template": hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest(),
                "gnpfa": ext.get("gnpfa"),
                "transcription": ext.get("engines"),
            },
        },
        "counts": {"inputs": c["sources"] + c["extra"], "sources": c["sources"], "clips": c["clips"],
                   "clip_hours": round(c["secs"] / 3600, 6), "clips_extracted_ok": ext.get("clips_ok"),
                   "frames": ext.get("frames"), "quarantine": reasons},
    }
    card["stats"] = card_stats(out)
    write_json(out / CARD, card)
    write_card_md(out, card)
    return card
