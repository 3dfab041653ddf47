"""Ingest one source video: probe, decode, track the speaker, detect speech, cut talking clips.

Pure: returns records for the sources/clips/quarantine tables (storage_schemas) and never raises
for bad input; a bad input becomes one quarantine record with a specific reason.
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from storage_schemas import FPS

from .config import IngestConfig
from .errors import Reject
from .asd import TrackCrops, per_sample, per_sample_sync, span_score, span_sync, track_scores
from .faces import FaceDetector, track
from .media import decode_audio, iter_frames, open_video, timeline
from .probe import Probe, probe
from .segment import talking_spans
from .vad import detect_speech, detect_speech_silero


def source_id_of(sha256: str) -> str:
    return sha256[:16]


def _source_row(uri: str, sha: str, size: int, pr: Probe | None) -> dict[str, Any]:
    return {
        "source_id": source_id_of(sha), "uri": uri, "sha256": sha, "size_bytes": size,
        "container": pr.container if pr else None, "duration_s": pr.duration_s if pr else None,
        "video_codec": pr.video_codec if pr else None, "width": pr.width if pr else None,
        "height": pr.height if pr else None, "rotation": pr.rotation if pr else None,
        "fps_declared": pr.fps_declared if pr else None, "vfr": None, "n_frames_src": pr.n_frames_declared if pr else None,
        "audio_codec": pr.audio_codec if pr else None, "audio_sample_rate": pr.audio_sample_rate if pr else None,
        "audio_channels": pr.audio_channels if pr else None, "status": "quarantined", "n_clips": 0,
        "speech_s": None,
    }


def quarantine_row(uri: str, source_id: str | None, reason: str, message: str, detail: dict | None = None,
                   stage: str = "ingest", clip_id: str | None = None) -> dict[str, Any]:
    return {"uri": uri, "source_id": source_id, "stage": stage, "reason": reason, "message": message,
            "detail": json.dumps(detail, sort_keys=True, default=float) if detail else None, "clip_id": clip_id}


def failed_analysis(uri: str, sha: str, size: int, reason: str, message: str, detail: dict | None = None,
                    stage: str = "ingest") -> dict[str, Any]:
    """The analysis result of a source that could not be analysed: a quarantined source row and one
    quarantine row (the same shape ``analyse`` returns)."""
    return {"source": _source_row(uri, sha, size, None),
            "clips": [], "quarantine": [quarantine_row(uri, source_id_of(sha), reason, message, detail, stage=stage)],
            "metrics": {}}


class SourceAnalysis:
    """Everything measured on one source; the clip decision is made from these arrays."""

    def __init__(self):
        self.timings: dict[str, float] = {"probe": 0.0, "audio": 0.0, "decode": 0.0, "detect": 0.0, "asd": 0.0}
        self.frames_decoded = 0
        self.frames_detected = 0
        self.asd_frames = 0


DETECT_BATCH = 32  # sample frames per detect_batch call (a batched detector: extractors.mesh_torch.TorchFaceDetector)


def analyse(path: str, uri: str, sha: str, size: int, cfg: IngestConfig, detector: FaceDetector | None = None,
            stats: SourceAnalysis | None = None, asd=None, audio_sink=None) -> dict[str, Any]:
    """Return {"source": row, "clips": [rows], "quarantine": [rows], "tracks": [rows], "metrics": {...}}
    for one local file. ``asd`` scores a face track: ``asd(faces (T,112,112) uint8 at 25 fps, mfcc (4T,13))
    -> (T,) speaking logits`` (extractors.asd); None = no active-speaker detection. ``audio_sink(audio)``
    receives the decoded 16 kHz mono audio (the pipeline keeps it, so later stages do not decode again).

    The rows are a deterministic function of the bytes, config and model; wall-clock figures go only
    into "metrics" (never into a table)."""
    st = stats or SourceAnalysis()
    t_start = time.perf_counter()
    sid = source_id_of(sha)
    pr = None
    out: dict[str, list] = {"tracks": [], "dropped": []}  # face_tracks rows, dropped clips' quarantine rows
    try:
        t0 = time.perf_counter()
        pr = probe(path, cfg.video_codecs)
        st.timings["probe"] += time.perf_counter() - t0
        src = _source_row(uri, sha, size, pr)
        clips = _analyse(path, uri, sid, pr, cfg, detector, st, src, asd, out, audio_sink)
    except Reject as r:
        src = _source_row(uri, sha, size, pr)
        return {"source": src, "clips": [], "quarantine": [quarantine_row(uri, sid, r.reason, r.message, r.detail)],
                "tracks": out["tracks"], "metrics": _metrics(st, t_start)}
    src["status"], src["n_clips"] = "ok", len(clips)
    return {"source": src, "clips": clips, "quarantine": out["dropped"], "tracks": out["tracks"],
            "metrics": _metrics(st, t_start)}


def _metrics(st: SourceAnalysis, t_start: float) -> dict[str, float]:
    return {"wall_s": time.perf_counter() - t_start, **{f"{k}_s": v for k, v in st.timings.items()},
            "frames_decoded": st.frames_decoded, "frames_detected": st.frames_detected, "asd_frames": st.asd_frames}


def _analyse(path, uri, sid, pr: Probe, cfg: IngestConfig, detector, st: SourceAnalysis, src: dict, asd,
             out: dict, audio_sink=None) -> list[dict]:
    if pr.duration_s < cfg.min_clip_s:
        raise Reject("too_short", f"video lasts {pr.duration_s:.2f} s, below the {cfg.min_clip_s} s minimum clip",
                     duration_s=pr.duration_s)
    if pr.audio_codec is None:
        raise Reject("no_audio_stream", "no audio stream: speech cannot be established (policy: talking clips need audio)")
    if pr.width < cfg.min_face_px or pr.height < cfg.min_face_px:
        raise Reject("face_too_small", f"frame is {pr.width}x{pr.height}, smaller than the {cfg.min_face_px} px minimum face",
                     width=pr.width, height=pr.height)

    # --- audio: speech ---
    t0 = time.perf_counter()
    audio = decode_audio(path, pr.audio_duration_s)
    if audio_sink is not None:
        audio_sink(audio)
    if cfg.vad == "silero":
        from models.packaged import resolve

        vad = detect_speech_silero(audio, str(resolve(cfg.vad_model, "silero-vad")), cfg.vad_threshold,
                                   cfg.vad_min_dbfs, cfg.vad_min_speech_s)
    else:
        vad = detect_speech(audio, cfg.vad_mode, cfg.vad_min_dbfs, cfg.vad_max_flatness, cfg.vad_min_modulation_db,
                            cfg.vad_min_speech_s)
    st.timings["audio"] += time.perf_counter() - t0
    src["speech_s"] = round(float(vad.speech.sum() * vad.hop_s), 3)
    if vad.p95_db < cfg.silence_dbfs:
        raise Reject("silent", f"audio level stays below {cfg.silence_dbfs} dBFS (95th percentile {vad.p95_db:.1f} dBFS)",
                     p95_dbfs=round(vad.p95_db, 1))
    if not vad.speech.any():
        raise Reject("no_speech", f"the voice detector found no speech (level 10th/95th percentile "
                     f"{vad.noise_floor_db:.1f}/{vad.p95_db:.1f} dBFS)", p10_dbfs=round(vad.noise_floor_db, 1),
                     p95_dbfs=round(vad.p95_db, 1))

    # --- video: the speaker's face on the 30 fps grid ---
    t0 = time.perf_counter()
    vr = open_video(path, pr.width, pr.height, cfg.analysis_max_side)
    tl = timeline(vr, pr.duration_s)
    src["vfr"], src["n_frames_src"] = tl.vfr, len(tl.starts)
    st.timings["decode"] += time.perf_counter() - t0
    if tl.duration_s < cfg.truncated_ratio * pr.duration_s:
        raise Reject("truncated", f"frames cover {tl.duration_s:.2f} s of {pr.duration_s:.2f} s declared",
                     decoded_s=tl.duration_s, declared_s=pr.duration_s)
    n_out = tl.n_out
    stride = max(1, int(round(FPS / cfg.detect_fps)))
    sample_idx = np.arange(0, n_out, stride)
    own = detector is None
    det = detector or FaceDetector(cfg.face_model, cfg.face_min_score)
    # active-speaker detection reads grey crops of every usable face at 25 fps from the same pass
    tc = TrackCrops(n_out, stride, cfg.min_face_px, float(pr.width)) if asd is not None else None
    need = np.union1d(sample_idx, tc.needed()) if tc is not None else sample_idx
    detections: list[np.ndarray] = []
    # a detector with detect_batch (the torch port) gets DETECT_BATCH samples at a time, counted from the
    # source's first frame; the frames between are held until their sample's detections exist
    batch = DETECT_BATCH if hasattr(det, "detect_batch") else 1
    held: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        t1 = time.perf_counter()
        samples = [f for k, f in held if k % stride == 0]
        got = iter(det.detect_batch(np.stack(samples)) if batch > 1 else [det.detect(f) for f in samples])
        t2 = time.perf_counter()
        st.timings["detect"] += t2 - t1
        for k, f in held:
            if k % stride == 0:
                detections.append(next(got))
            if tc is not None and detections:
                tc.add(k, f, detections[-1])
        st.timings["asd"] += time.perf_counter() - t2
        held.clear()

    n_held = 0  # samples among the held frames
    try:
        it = iter_frames(vr, tl, need)
        while True:
            t0 = time.perf_counter()
            try:
                k, frame = next(it)
            except StopIteration:
                break
            st.timings["decode"] += time.perf_counter() - t0
            if k % stride == 0:  # a sample: the held ones are detected first once there are `batch` of them
                if n_held == batch:
                    flush()
                    n_held = 0
                n_held += 1
            held.append((k, frame))
        if held:
            flush()
    finally:
        if own:
            det.close()
    st.frames_decoded += int(tl.source_index(sample_idx[-1:] if len(sample_idx) else np.zeros(1, int))[0]) + 1
    st.frames_detected += len(detections)
    scorer = None
    if tc is not None:
        def scorer(tr):
            t0 = time.perf_counter()
            sc, sy = track_scores(asd, tr, tc, audio)
            st.timings["asd"] += time.perf_counter() - t0
            st.asd_frames += int(sum(np.isfinite(v).sum() for _, v in sc.values()))
            return sc, sy
    return cut_clips(uri, sid, pr, cfg, detections, sample_idx, n_out, vad, scorer, tc, out)


def cut_clips(uri, sid, pr: Probe, cfg: IngestConfig, detections, sample_idx, n_out, vad, scorer=None, tc=None,
              out: dict | None = None) -> list[dict]:
    """Decide the clips from detections (per sample) and the VAD; raise Reject when none remain.

    Without active-speaker detection (``scorer`` None) the speaker is the usable track with the largest
    area over time, and a frame where another face of comparable size is visible is blocked. With it,
    each analysed frame's speaker is its only comparable face or, among several, the one whose sync with
    the speech (models.asd_sync, over +-``asd_sync_window_s``) leads the others by ``asd_sync_margin``, else
    the one whose speaking logit leads by ``asd_margin`` (a frame where none does is blocked), and clips whose face
    speaks less than ``min_speaking_score`` are dropped as ``not_speaking`` (``out["dropped"]``).
    ``out["tracks"]`` receives the face_tracks rows."""
    out = out if out is not None else {"tracks": [], "dropped": []}
    stride = int(sample_idx[1] - sample_idx[0]) if len(sample_idx) > 1 else 1
    tr = track(detections, cfg.track_iou, int(round(cfg.track_max_gap_s * cfg.detect_fps)))
    n_s = len(detections)
    w_px = float(pr.width)
    any_face = any(len(d) for d in detections)
    if not any_face:
        raise Reject("no_face", f"no face in {n_s} frames analysed at {cfg.detect_fps:g} fps", frames_analysed=n_s)
    widths = [(d[:, 2] - d[:, 0]) * w_px for d in detections]
    usable_any = np.array([bool((w >= cfg.min_face_px).any()) for w in widths])
    if not usable_any.any():
        biggest = max(float(w.max()) for w in widths if len(w))
        raise Reject("face_too_small", f"largest face is {biggest:.0f} px wide, below the {cfg.min_face_px} px minimum",
                     largest_face_px=round(biggest, 1))
    boxes = {t.track_id: tr.box_at(t.track_id) for t in tr.tracks}
    wid = {t: (b[:, 2] - b[:, 0]) * w_px for t, b in boxes.items()}  # NaN where absent
    scores, syncs = scorer(tr) if scorer is not None else (None, {})
    speaker = np.full(n_s, -1, np.int64)  # per sample: the speaker's track, -1 for none
    blocked = np.zeros(n_s, bool)
    if scores is None:
        best, best_score = None, 0.0
        for t in tr.tracks:
            w = np.nan_to_num(wid[t.track_id])
            b = boxes[t.track_id]
            score = float(np.nansum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) * (w >= cfg.min_face_px)))
            if score > best_score:
                best, best_score = t.track_id, score
        present = np.nan_to_num(wid[best]) >= cfg.min_face_px
        for t in tr.tracks:
            if t.track_id != best:
                ow = np.nan_to_num(wid[t.track_id])
                blocked |= present & (ow >= cfg.min_face_px) & (ow >= cfg.other_face_ratio * np.nan_to_num(wid[best]))
        speaker[present & ~blocked] = best
    else:
        per = per_sample(scores, tc, n_s, int(round(cfg.detect_fps)))
        W = np.stack([np.nan_to_num(wid[t.track_id]) for t in tr.tracks])  # (tracks, samples)
        S = np.stack([per.get(t.track_id, np.full(n_s, np.nan)) for t in tr.tracks])
        ysync = per_sample_sync(syncs, tc, n_s, int(round(cfg.asd_sync_window_s * 25)))
        Y = np.stack([ysync.get(t.track_id, np.full(n_s, np.nan)) for t in tr.tracks])
        ids = np.array([t.track_id for t in tr.tracks])
        for s_ in range(n_s):
            usable = W[:, s_] >= cfg.min_face_px
            if not usable.any():
                continue
            comp = usable & (W[:, s_] >= cfg.other_face_ratio * W[usable, s_].max())
            if comp.sum() == 1:
                speaker[s_] = ids[comp][0]
                continue
            sc = np.where(comp & np.isfinite(S[:, s_]), S[:, s_], -np.inf)
            order = np.argsort(-sc, kind="stable")
            sy = np.where(comp & np.isfinite(Y[:, s_]), Y[:, s_], -np.inf)
            lead = np.argsort(-sy, kind="stable")
            if np.isfinite(sy[lead[1]]) and sy[lead[0]] - sy[lead[1]] >= cfg.asd_sync_margin and \
                    sc[lead[0]] >= cfg.min_speaking_score:
                speaker[s_] = ids[lead[0]]  # the face that says what is heard
            elif np.isfinite(sc[order[0]]) and sc[order[0]] >= cfg.min_speaking_score and \
                    sc[order[0]] - sc[order[1]] >= cfg.asd_margin:
                speaker[s_] = ids[order[0]]
            else:
                blocked[s_] = True
    ok_s = speaker >= 0
    if not ok_s.any():
        raise Reject("multiple_faces", f"several faces of comparable size are visible in every analysed frame "
                     f"with a usable face, and none is clearly the speaker ({int(blocked.sum())} of {n_s} frames "
                     "blocked)", frames_blocked=int(blocked.sum()), frames_analysed=n_s)
    # hold each sample over its stride on the 30 fps grid
    grid_s = np.minimum(np.arange(n_out) // stride, n_s - 1)
    speech = vad.on_grid(n_out, FPS)
    spans, diag = [], {"candidate_frames": 0, "too_short": 0, "low_speech": 0}
    for tid in sorted(set(speaker[ok_s].tolist())):
        sp, dg = talking_spans(speaker[grid_s] == tid, speech, FPS, cfg.min_clip_s, cfg.max_clip_s,
                               cfg.vad_max_pause_s, cfg.track_max_gap_s, cfg.min_speech_ratio)
        spans += [(a, b, tid) for a, b in sp]
        for k in diag:
            diag[k] += dg[k]
    spans.sort()
    if scores is not None:
        out["tracks"] = [{"source_id": sid, "track_id": int(tid), "start_s": round(float(tc.grid[k0]) / FPS, 6),
                          "asd_fps": 25, "face_size_px": float(np.nanmedian(wid[tid])),
                          "speaking_score": [float(round(v, 4)) if np.isfinite(v) else float("nan") for v in sc],
                          "speaker": any(t == tid for _, _, t in spans)}
                         for tid, (k0, sc) in sorted(scores.items())]
    if not spans:
        if diag["candidate_frames"] == 0 or (blocked.any() and blocked[usable_any].mean() > 0.5):
            if blocked.any() and blocked[usable_any].mean() > 0.5:
                raise Reject("multiple_faces", "several faces of comparable size are visible while there is speech, "
                             "and none is clearly the speaker", frames_blocked=int(blocked.sum()), frames_analysed=n_s)
            raise Reject("no_speech", "speech never overlaps the frames where the speaker's face is visible",
                         speech_frames=int(speech.sum()), face_frames=int(ok_s[grid_s].sum()))
        raise Reject("too_short", f"every talking span is shorter than {cfg.min_clip_s} s or has too little speech",
                     **diag)
    rows = []
    for a, b, tid in spans:
        if rows and a < rows[-1]["start_frame"] + rows[-1]["n_frames"]:
            continue  # never two clips over the same frames
        ss = np.unique(grid_s[a:b])
        bx = boxes[tid][ss]
        bx = bx[~np.isnan(bx[:, 0])]
        med = np.median(bx, axis=0)
        others = {t.track_id for t in tr.tracks if t.track_id != tid and np.isfinite(wid[t.track_id][ss]).any()}
        sp_score = span_score(scores, tid, a, b) if scores is not None else None
        sy = span_sync(syncs, tid, a, b)
        row = {
            "clip_id": f"{sid}-{a:06d}", "source_id": sid, "uri": uri,
            "start_s": round(a / FPS, 6), "end_s": round(b / FPS, 6), "start_frame": int(a), "n_frames": int(b - a),
            "duration_s": round((b - a) / FPS, 6), "fps": FPS,
            "speech_ratio": float(speech[a:b].mean()), "face_ratio": float((speaker[ss] == tid).mean()),
            "face_track_id": int(tid), "face_box": [float(x) for x in med[:4]],
            "face_size_px": float((med[2] - med[0]) * w_px), "face_score": float(med[4]),
            "n_other_faces": len(others), "speaking_score": None if sp_score is None else round(sp_score, 4),
            "asd_sync": None if sy is None else round(sy, 4),
            "width": pr.width, "height": pr.height, "rotation": pr.rotation,
        }
        if sp_score is not None and sp_score < cfg.min_speaking_score:
            out["dropped"].append(quarantine_row(uri, sid, "not_speaking", f"clip {a / FPS:.2f}-{b / FPS:.2f} s: speaking "
                                                 f"score {sp_score:.2f} (< {cfg.min_speaking_score}): the face does "
                                                 "not speak", {"speaking_score": round(sp_score, 4)},
                                                 clip_id=row["clip_id"]))
            continue
        rows.append(row)
    if not rows:
        q = out["dropped"]
        raise Reject("not_speaking", f"the face of every talking span is not speaking ({len(q)} spans, speaking "
                     f"scores {', '.join(json.loads(r['detail'])['speaking_score'].__format__('.2f') for r in q)}; "
                     f"threshold {cfg.min_speaking_score})", spans=len(q))
    return rows
