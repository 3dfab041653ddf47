"""Dataset card (JSON + Markdown) and the self-contained HTML report with plots."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from storage_schemas import SCHEMA_VERSION, atomic_write_bytes, open_dataset


def card_stats(root: Path) -> dict:
    ds = open_dataset(root)
    q = lambda sql: ds.query(sql).to_pylist()  # noqa: E731
    st: dict = {"schema_version": SCHEMA_VERSION}
    if "samples" in ds.tables:
        st["splits"] = {r["split"]: {"clips": r["n"], "hours": round(r["s"] / 3600, 6)} for r in
                        q("select split, count(*) n, sum(n_frames) / 30.0 s from samples group by 1 order by 1")}
    if "label_rows" in ds.tables:
        st["emotion"] = {r["emotion"]: r["n"] for r in q("select emotion, count(*) n from labels group by 1 order by 1")}
        st["intensity"] = {r["intensity"]: r["n"] for r in q("select intensity, count(*) n from labels group by 1 order by 1")}
        st["style_tags"] = {r["t"]: r["n"] for r in q("select unnest(style_tags) t, count(*) n from labels group by 1 order by 1")}
    if "clips" in ds.tables:
        st["clip_duration_hist"] = {r["b"]: r["n"] for r in q(
            "select case when duration_s < 5 then '0-5' when duration_s < 10 then '5-10' when duration_s < 20 "
            "then '10-20' else '20+' end b, count(*) n, min(duration_s) m from clips group by 1 order by m")}
    st["quarantine"] = {r["reason"]: r["n"] for r in q("select reason, count(*) n from quarantine group by 1 order by 1")}
    return st


def write_card_md(root: Path, card: dict) -> None:
    c, s = card.get("counts", {}), card.get("stats", {})
    lines = [f"# {card.get('name', 'M2F-D')} dataset card", "",
             f"- schema version: {card.get('schema_version')}",
             f"- inputs: {c.get('inputs')}, sources: {c.get('sources')}, clips: {c.get('clips')} "
             f"({c.get('clip_hours', 0) * 60:.2f} min), frames: {c.get('frames')}",
             f"- code: {json.dumps(card.get('lineage', {}).get('code'))}",
             f"- GNPFA: {json.dumps(card.get('lineage', {}).get('checkpoints', {}).get('gnpfa'))}",
             f"- transcription: {card.get('lineage', {}).get('checkpoints', {}).get('transcription')}", ""]
    for title, key in (("Splits", "splits"), ("Emotion", "emotion"), ("Intensity", "intensity"),
                       ("Style tags", "style_tags"), ("Quarantine", "quarantine")):
        if s.get(key):
            lines += [f"## {title}", "", "| value | count |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v) if isinstance(v, dict) else v} |" for k, v in s[key].items()] + [""]
    atomic_write_bytes(root / "README.md", "\n".join(lines).encode())


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(root: Path, out: Path | None = None) -> Path:
    """A single HTML file with every plot embedded as PNG (no external resources)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = open_dataset(root)
    q = lambda sql: ds.query(sql).to_pylist()  # noqa: E731
    figs: list[tuple[str, str]] = []

    def bar(title, rows, k, v="n", color="#3b7dd8"):
        fig, ax = plt.subplots(figsize=(5, 2.8))
        ax.bar([str(r[k]) for r in rows], [r[v] for r in rows], color=color)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35, labelsize=8)
        figs.append((title, _png(fig)))

    def hist(title, values, bins=20, color="#d8703b"):
        fig, ax = plt.subplots(figsize=(5, 2.8))
        ax.hist([v for v in values if v is not None], bins=bins, color=color)
        ax.set_title(title)
        figs.append((title, _png(fig)))

    hist("Clip durations (s)", [r["d"] for r in q("select duration_s d from clips")])
    if "label_rows" in ds.tables:
        bar("Emotions", q("select emotion e, count(*) n from labels group by 1 order by 1"), "e")
        bar("Style tags", q("select unnest(style_tags) t, count(*) n from labels group by 1 order by 2 desc"), "t",
            color="#5aa55a")
    if "frames" in ds.tables:
        for a in ("yaw", "pitch", "roll"):
            hist(f"Head {a} (deg)", [r["v"] for r in q(f"select {a} v from frames where tracked")], bins=40,
                 color="#8a5ad8")
    if "clip_features" in ds.tables:
        for col, t in (("recon_err", "GNPFA round-trip error (% IOD)"), ("landmark_conf", "Landmark confidence"),
                       ("lip_sync", "Lip-sync proxy")):
            hist(t, [r["v"] for r in q(f"select {col} v from clip_features")], bins=10, color="#c44")
    qr = q("select reason r, count(*) n from quarantine group by 1 order by 2 desc")
    if qr:
        bar("Quarantine reasons", qr, "r", color="#888")
    card = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    c = card.get("counts", {})
    body = "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b}"><figcaption>'
                   f'{html.escape(t)}</figcaption></figure>' for t, b in figs)
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>M2F-D report</title><style>"
           f"body{{font-family:sans-serif;margin:16px}}figure{{display:inline-block;margin:6px}}"
           f"img{{border:1px solid #ddd}}</style></head><body><h1>M2F-D report</h1>"
           f"<p>{c.get('sources')} sources, {c.get('clips')} clips, {c.get('frames')} frames, "
           f"schema {html.escape(str(card.get('schema_version')))}</p>{body}</body></html>")
    out = out or root / "report.html"
    atomic_write_bytes(out, doc.encode())
    return out
