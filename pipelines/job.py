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
    import hashlib

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
        ext = result.get("extract")
        if ext is None:  # stages not run now keep what the last run recorded
            import json

            prev = json.loads((out / CARD).read_text()) if (out / CARD).is_file() else {}
            pc = prev.get("lineage", {}).get("checkpoints", {})
            ext = {"gnpfa": pc.get("gnpfa"), "engines": pc.get("transcription"),
                   "clips_ok": prev.get("counts", {}).get("clips_extracted_ok"),
                   "frames": prev.get("counts", {}).get("frames")}
        from storage_schemas import open_dataset

        reasons: dict[str, int] = {}
        for r in open_dataset(out).query("select reason from quarantine").column("reason").to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
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
            "counts": {"inputs": s.n_inputs, "sources": s.n_sources, "clips": s.n_clips,
                       "clip_hours": s.clip_hours, "clips_extracted_ok": ext.get("clips_ok"),
                       "frames": ext.get("frames"), "quarantine": dict(sorted(reasons.items()))},
        }
        from .report import card_stats, write_card_md, write_report

        card["stats"] = card_stats(out)
        write_json(out / CARD, card)
        write_card_md(out, card)
        if "shard" in result:
            result["report"] = str(write_report(out))
    return result
