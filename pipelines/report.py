"""Dataset card (JSON + Markdown) and the self-contained HTML report with plots."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from extractors.config import RunConfig
from storage_schemas import SCHEMA_VERSION, atomic_write_bytes, open_dataset


def finish_dataset(out: Path, cfg: RunConfig) -> dict:
    """Write the dataset card (dataset.json + README.md): counts from the tables, lineage (code,
    config, checkpoints of the last extraction), dataset versions, stats."""
    import hashlib

    from extractors.pose import TEMPLATE_PATH
    from storage_schemas import write_json
    from storage_schemas.dataset import CARD, extract_lineage

    from .ingest import asd_lineage, detector_lineage, vad_lineage
    from .lineage import code_version

    icfg, ecfg = cfg.ingest, cfg.extract

    ext = extract_lineage(out)
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
            "config": cfg.to_dict(),
            "config_digest": {"ingest": icfg.digest(), "extract": ecfg.digest()},
            "checkpoints": {
                "mediapipe": "face_detection full-range + face_mesh refined (mediapipe 0.10.21 wheel)",
                "landmarkers": ext.get("landmarkers"),  # the Face Mesh engines the extraction parts were made with
                "face_template": hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest(),
                "gnpfa": ext.get("gnpfa"),
                "face_detection": detector_lineage(icfg),
                "active_speaker": asd_lineage(icfg),
                "vad": vad_lineage(icfg),
                "transcription": ext.get("engines"),
                "extraction_models": ext.get("models"),  # {name: {path, sha256}} of the per-clip models
            },
        },
        "counts": {"inputs": c["sources"] + c["extra"], "sources": c["sources"], "clips": c["clips"],
                   "clip_hours": round(c["secs"] / 3600, 6), "clips_extracted_ok": ext.get("clips_ok"),
                   "frames": ext.get("frames"), "quarantine": reasons},
    }
    if "shards" in ds.tables:
        card["versions"] = ds.query("select version, count(*) shards, sum(n_samples)::bigint samples, "
                                    "sum(bytes)::bigint bytes from shards group by 1 order by 1").to_pylist()
    card["stats"] = card_stats(out)
    write_json(out / CARD, card)
    write_card_md(out, card)
    return card


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


def _ticks(hi: float, n: int = 4) -> list[float]:
    """Round tick values for counts from 0 to at least ``hi`` (1, 2 or 5 times a power of ten apart, at least 1)."""
    import math

    if hi <= 0:
        return [0.0, 1.0]
    raw = max(hi / n, 1.0)
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw))
    return [i * step for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def _svg(title: str, body: str, w: int, h: int) -> str:
    e = html.escape
    return (f'<svg class="plot" role="img" aria-label="{e(title)}" width="{w}" '
            f'height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">'
            f'<text x="{w / 2:.0f}" y="15" text-anchor="middle" font-size="13">{e(title)}</text>{body}</svg>')


def bar_svg(title: str, labels: list[str], values: list[float], color: str, xlabel: str) -> str:
    """A horizontal bar chart as inline SVG (first label on top)."""
    e = html.escape
    left, top, row, w = 130, 26, 20, 420
    plot_w, h = w - left - 20, top + row * max(len(labels), 1) + 40
    ticks = _ticks(max(values, default=0))
    sx = plot_w / ticks[-1]
    parts = []
    base = top + row * max(len(labels), 1)
    for t in ticks:
        x = left + t * sx
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{base}" stroke="#ddd"/>'
                     f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle">{_num(t)}</text>')
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + i * row
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{v * sx:.1f}" height="{row - 6}" fill="{color}"/>'
                     f'<text x="{left - 4}" y="{y + row / 2 + 4:.0f}" text-anchor="end">{e(lab[:24])}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{base + 30}" text-anchor="middle">{e(xlabel)}</text>')
    return _svg(title, "".join(parts), w, h)


def histogram(con, sql: str, bins: int) -> tuple[list[int], float, float]:
    """(counts, lo, hi) of the finite, non-null values of the one-column query ``sql``: ``bins`` equal
    bins over [lo, hi], the last one closed, with numpy.histogram's bin formula. Computed in
    DuckDB, so a column of every frame of the dataset is never pulled into Python."""
    vals = f"(select cast(v as double) v from ({sql}) t(v) where v is not null and isfinite(v))"
    [(lo, hi, n)] = con.execute(f"select min(v), max(v), count(*) from {vals}").fetchall()
    if not n:
        return [], 0.0, 0.0
    if lo == hi:  # numpy widens an empty range by half a unit either side
        lo, hi = lo - 0.5, hi + 0.5
    counts = [0] * bins
    for b, c in con.execute(f"select least(cast(floor((v - {lo!r}) * ({bins} / ({hi!r} - {lo!r}))) as bigint), {bins - 1}) b, "
                        f"count(*) from {vals} group by 1").fetchall():
        counts[max(int(b), 0)] += int(c)
    return counts, float(lo), float(hi)


def hist_svg(title: str, counts: list[int], lo: float, hi: float, xlabel: str, color: str) -> str:
    """A histogram as inline SVG: equal bins from ``lo`` to ``hi`` with these counts (no counts: "no values")."""
    e = html.escape
    w, h, left, top, bottom = 420, 230, 44, 26, 46
    plot_w, plot_h = w - left - 16, h - top - bottom
    bins = len(counts)
    parts = []
    if bins:
        yt = _ticks(float(max(counts)))
        sy, bw = plot_h / yt[-1], plot_w / bins
        for t in yt:
            y = top + plot_h - t * sy
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
                         f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_num(t)}</text>')
        for i, c in enumerate(counts):
            if c:
                parts.append(f'<rect x="{left + i * bw:.1f}" y="{top + plot_h - c * sy:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                             f'height="{c * sy:.1f}" fill="{color}"/>')
        for frac in (0.0, 0.5, 1.0):
            parts.append(f'<text x="{left + frac * plot_w:.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
                         f'{_num(lo + frac * (hi - lo))}</text>')
    else:
        parts.append(f'<text x="{w / 2:.0f}" y="{top + plot_h / 2:.0f}" text-anchor="middle" fill="#888">no values</text>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>'
                 f'<text x="{left + plot_w / 2:.0f}" y="{h - 10}" text-anchor="middle">{e(xlabel)}</text>'
                 f'<text x="12" y="{top + plot_h / 2:.0f}" text-anchor="middle" transform="rotate(-90 12 '
                 f'{top + plot_h / 2:.0f})">count</text>')
    return _svg(title, "".join(parts), w, h)


_CSS = """body{font-family:sans-serif;margin:16px;color:#222}figure{display:inline-block;margin:6px;vertical-align:top}
svg.plot{border:1px solid #ddd}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{width:236px;border:1px solid #ccc;border-radius:6px;padding:6px;font-size:12px;background:#fafafa}
.card img{width:224px;height:224px;object-fit:cover;background:#333;display:block}
.card .cap{font-style:italic;margin:4px 0}.card .k{color:#666}.tag{background:#e3ecf8;border-radius:3px;padding:0 3px;margin-right:2px}
.dropped{background:#fbeaea}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
#filters select{margin-right:12px}pre{font-size:11px;background:#f4f4f4;padding:6px;overflow:auto;max-height:300px}"""

_JS = """function applyFilters(){var f={};document.querySelectorAll('#filters select').forEach(function(s){f[s.name]=s.value});
var n=0;document.querySelectorAll('.card').forEach(function(c){var show=true;for(var k in f){if(f[k]&&c.dataset[k]!==f[k])show=false}
c.style.display=show?'':'none';if(show)n++});document.getElementById('shown').textContent=n}
document.querySelectorAll('#filters select').forEach(function(s){s.addEventListener('change',applyFilters)});
location.hash.slice(1).split('&').forEach(function(kv){var p=kv.split('=');var s=document.querySelector('#filters select[name="'+p[0]+'"]');
if(s&&p.length==2)s.value=decodeURIComponent(p[1])});applyFilters();"""

MAX_CARDS = 2000  # a larger dataset's report shows the first clips by id (the tables hold them all)


def _keyframes(root: Path, rows: list[dict]) -> dict[str, str]:
    """clip_id -> base64 JPEG keyframe, read from the clip's shard (tar member <key>.keyframe.jpg)."""
    import tarfile

    out: dict[str, str] = {}
    by_shard: dict[str, list[str]] = {}
    for r in rows:
        if r.get("shard"):
            by_shard.setdefault(r["shard"], []).append(r["clip_id"])
    for shard, ids in sorted(by_shard.items()):
        p = root / shard
        if not p.is_file():
            continue
        want = {f"{i}.keyframe.jpg": i for i in ids}
        with tarfile.open(p) as tf:
            for m in tf:
                if m.name in want:
                    out[want[m.name]] = base64.b64encode(tf.extractfile(m).read()).decode()
    return out


def _card(r: dict, key: str | None, preview: str | None) -> str:
    e = lambda v: html.escape("" if v is None else str(v))  # noqa: E731
    status = r.get("fstatus") or "not extracted"
    reason = r.get("drop_reason") or ""
    tags = "".join(f'<span class="tag">{e(t)}</span>' for t in (r.get("style_tags") or []))
    img = f'<img alt="keyframe" src="data:image/jpeg;base64,{key}">' if key else '<img alt="no keyframe">'
    link = f'<a href="{e(preview)}">preview video</a>' if preview else '<span class="k">no preview rendered</span>'
    num = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    return (f'<div class="card{" dropped" if reason else ""}" data-split="{e(r.get("split") or "none")}" '
            f'data-emotion="{e(r.get("emotion") or "none")}" data-reason="{e(reason or "ok")}" data-clip="{e(r["clip_id"])}">'
            f'{img}<b>{e(r["clip_id"])}</b><br><span class="k">{e(r.get("video"))} {num(r.get("start_s"), "{:.1f}")}-'
            f'{num(r.get("end_s"), "{:.1f}")} s</span><br>'
            f'<b>{e(r.get("emotion") or "-")}</b> ({e(r.get("intensity") or "-")}) {tags}'
            f'<div class="cap">{e(r.get("caption") or "")}</div>'
            f'<span class="k">split</span> {e(r.get("split") or "-")} · <span class="k">language</span> {e(r.get("language") or "-")} · '
            f'<span class="k">speaker</span> {e(r.get("speaker_id") or "-")} (face {e(r.get("face_track_id"))})<br>'
            f'<span class="k">speaking score</span> {num(r.get("speaking_score"))} · <span class="k">sync</span> '
            f'{num(r.get("sync_score"))} (<span class="k">AV</span> {num(r.get("av_sync"))} + <span class="k">ASD</span> '
            f'{num(r.get("asd_sync"))}) · <span class="k">lip-sync proxy</span> {num(r.get("lip_sync"))}<br><span class="k">tracked</span> {num(r.get("tracked_ratio"), "{:.0%}")} · '
            f'<span class="k">landmark conf</span> {num(r.get("landmark_conf"))} · <span class="k">GNPFA err</span> '
            f'{num(r.get("recon_err"))}% IOD<br><span class="k">status</span> {e(status)} {e(reason)}<br>{link}</div>')


def write_report(root: Path, out: Path | None = None) -> Path:
    """A single HTML file (no external resources): one card per clip (keyframe from its shard, labels,
    caption, speaking score, quality figures, language, speaker, preview link where
    ``previews/<clip_id>.mp4`` exists), filters by split, emotion and drop reason (inline script), the
    quarantine table, plots and the dataset's lineage. Filters can be preset in the URL: report.html#emotion=happy&split=train."""
    root = Path(root)
    out = Path(out) if out else root / "report.html"
    ds = open_dataset(root)
    con = ds.connect()  # one connection for the report's queries
    q = lambda sql: con.sql(sql).to_arrow_table().to_pylist()  # noqa: E731
    has = ds.tables
    figs: list[str] = []

    def bar(title, rows, k, v="n", color="#3b7dd8", xlabel="clips"):
        figs.append(bar_svg(title, [str(r[k]) for r in rows], [r[v] for r in rows], color, xlabel))

    def hist(title, sql, xlabel, bins=20, color="#d8703b"):
        figs.append(hist_svg(title, *histogram(con, sql, bins), xlabel, color))

    hist("Clip durations", "select duration_s from clips", "seconds")
    if "label_rows" in has:
        bar("Emotions", q("select emotion e, count(*) n from labels group by 1 order by 2 desc, 1"), "e")
        bar("Style tags", q("select unnest(style_tags) t, count(*) n from labels group by 1 order by 2 desc, 1"), "t",
            color="#5aa55a")
    if "frames" in has:
        for a in ("yaw", "pitch", "roll"):
            hist(f"Head {a}", f"select {a} from frames where tracked", "degrees", bins=40, color="#8a5ad8")
    if "clip_features" in has:
        for col, t, x in (("recon_err", "GNPFA round-trip error", "% of inter-ocular distance"),
                          ("landmark_conf", "Landmark confidence", "confidence (0-1)"),
                          ("speaking_score", "Speaking score (Light-ASD)", "mean logit (>= 0: speaking)"),
                          ("av_sync", "AV-sync score", "correlation of predicted and observed mouth motion"),
                          ("sync_score", "Sync score (AV-sync + ASD-sync)", "sum of two correlations"),
                          ("lip_sync", "Lip-sync proxy", "correlation")):
            hist(t, f"select {col} from clip_features", x, bins=10, color="#c44")
    qr = q("select reason r, count(*) n from quarantine group by 1 order by 2 desc, 1")
    if qr:
        bar("Quarantine reasons", qr, "r", color="#888", xlabel="inputs or clips")
    # one row per clip with everything a card shows
    joins, cols = [], ["c.clip_id", "c.source_id", "c.start_s", "c.end_s", "c.face_track_id", "c.speaker_id",
                       "regexp_extract(c.uri, '[^/]+$') video", "c.speaking_score"]
    if "clip_features" in has:
        joins.append("left join clip_features f using (clip_id)")
        cols += ["f.status fstatus", "f.drop_reason", "f.av_sync", "f.asd_sync", "f.sync_score", "f.lip_sync", "f.tracked_ratio", "f.landmark_conf", "f.recon_err"]
    if "label_rows" in has:
        joins.append("left join labels l using (clip_id)")
        cols += ["l.emotion", "l.intensity", "l.style_tags", "l.caption"]
    if "transcripts" in has:
        joins.append("left join transcripts t using (clip_id)")
        cols += ["t.language"]
    if "samples" in has:
        joins.append("left join samples s using (clip_id)")
        cols += ["s.split", "s.shard"]
    rows = q(f"select {', '.join(cols)} from clips c {' '.join(joins)} order by c.clip_id limit {MAX_CARDS}")
    n_clips = q("select count(*) n from clips")[0]["n"]
    keys = _keyframes(root, rows)
    prev = lambda cid: (f"previews/{cid}.mp4" if (root / "previews" / f"{cid}.mp4").is_file() and  # noqa: E731
                        out.parent.resolve() == root.resolve() else None)
    cards = "".join(_card(r, keys.get(r["clip_id"]), prev(r["clip_id"])) for r in rows)

    def options(name, values):
        opts = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in sorted(set(values)))
        return f'<label>{name} <select name="{name}"><option value="">all</option>{opts}</select></label>'

    e = html.escape
    filters = ('<div id="filters">' + options("split", [r.get("split") or "none" for r in rows])
               + options("emotion", [r.get("emotion") or "none" for r in rows])
               + options("reason", [r.get("drop_reason") or "ok" for r in rows])
               + ' <span id="shown"></span> shown</div>')
    qrows = q("select regexp_extract(uri, '[^/]+$') f, stage, reason, message, clip_id from quarantine order by uri, clip_id")
    qtable = ("<table><tr><th>input</th><th>stage</th><th>reason</th><th>clip</th><th>message</th></tr>" + "".join(
        f"<tr><td>{e(str(r['f']))}</td><td>{e(r['stage'])}</td><td>{e(r['reason'])}</td><td>{e(str(r['clip_id'] or ''))}"
        f"</td><td>{e(r['message'])}</td></tr>" for r in qrows) + "</table>") if qrows else "<p>none</p>"
    card = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    c = card.get("counts", {})
    con.close()
    plots = "".join(f"<figure>{f}</figure>" for f in figs)
    more = f"<p>showing the first {len(rows)} of {n_clips} clips by id</p>" if n_clips > len(rows) else ""
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>M2F-D report</title><style>{_CSS}</style></head>"
           f"<body><h1>M2F-D report</h1><p>{c.get('sources')} sources, {c.get('clips')} clips, {c.get('frames')} frames, "
           f"schema {e(str(card.get('schema_version')))}</p><h2>Clips</h2>{filters}{more}<div class='cards'>{cards}</div>"
           f"<h2>Quarantine</h2>{qtable}<h2>Plots</h2>{plots}<h2>Lineage</h2><pre>"
           f"{e(json.dumps(card.get('lineage', {}), indent=1, sort_keys=True))}</pre><script>{_JS}</script></body></html>")
    atomic_write_bytes(out, doc.encode())
    return out
