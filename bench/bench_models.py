"""The packaged real models (models/packaged.py), measured side by side in one run on real and made audio.

Sections (all by default; pick with --section):
  asr      faster-whisper (packaged Whisper base, int8, beam 5) vs pocketsphinx on the first --seconds of every
           shared video: language right (SOURCES.md: French, German, else English), real-time factor per CPU
           core (transcription seconds / audio seconds with 1 thread), words per clip.
  asr-torch the same packaged Whisper base weights loaded into openai-whisper's PyTorch model
           (models/whisper_ct2.py) on CUDA (fp16) where there is a GPU, else the CPU: real-time factor per clip
           (beam 5, word timestamps, as the default engine decodes), languages, and where faster-whisper is
           installed whether both give the same text. ``--audio-npz`` reads the clips from a file that
           ``--save-audio-npz`` wrote (a machine without ../shared).
  vad      GMM+gates (ingest's default) vs Silero on a made signal whose speech is known: espeak-ng speech in
           English, German and French (reference: its own level), real speech of three corpus people
           (reference: Whisper's word times), music-like chords, a steady tone, white and brown noise and
           silence (no speech). Precision, recall and F1 per 30 ms, per kind the share marked speech, cost per
           second of audio; and the share of the bundled real videos each one marks as speech.
  blend    blendshapes from our Face Mesh landmarks (extractors.blendshapes) against the Tasks FaceLandmarker's
           own (same .task file) on real frames: mean / p95 |difference|, worst weights; cost per frame of the
           blendshape model, Face Mesh and the Tasks landmarker; and the Tasks transformation matrix's rotation
           against our pose fit (head motion from the first frame, and the fixed offset between the two).
  identity SFace face and GE2E voice embeddings of two halves of each shared speaking video: same-person and
           different-people cosine ranges (what the speaker rule's thresholds rest on).

    .venv/bin/python bench/bench_models.py [--section asr --section vad ...] [--seconds 10]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage_schemas import AUDIO_SAMPLE_RATE as SR  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
LANG = {"dfrf_french": "fr", "mimictalk_german": "de"}


def speaking_videos() -> list[Path]:
    return [SHARED / "real" / f"{n}.mp4" for n in ("d12", "d14", "s18")] + sorted((SHARED / "corpus").glob("*.mp4"))


def audio_of(p: Path) -> np.ndarray:
    from extractors.media import decode_audio

    return decode_audio(str(p))


def section_asr(secs: float) -> None:
    from extractors.transcribe import SphinxTranscriber, make_transcriber

    fw, ps = make_transcriber("base", threads=1), SphinxTranscriber()
    print(f"\n== ASR: first {secs:.0f} s of each video, 1 CPU thread ({fw.engine} vs {ps.engine})")
    print(f"{'video':28s} {'want':>4s} {'fw lang':>7s} {'fw words':>8s} {'fw RTF':>7s} {'ps RTF':>7s}  text (faster-whisper)")
    ok = tot = 0
    rtf_fw, rtf_ps = [], []
    clips = corpus_clips(secs)
    for stem, a in clips.items():
        dur = len(a) / SR
        t0 = time.perf_counter()
        r = fw(a)
        t1 = time.perf_counter()
        ps(a)
        t2 = time.perf_counter()
        want = LANG.get(stem, "en")
        ok += r.language == want
        tot += 1
        rtf_fw.append((t1 - t0) / dur)
        rtf_ps.append((t2 - t1) / dur)
        print(f"{stem:28s} {want:>4s} {str(r.language):>7s} {len(r.words):8d} {rtf_fw[-1]:7.3f} {rtf_ps[-1]:7.3f}  {r.text[:50]!r}")
    print(f"language right: faster-whisper {ok}/{tot}; pocketsphinx (English only) "
          f"{sum(LANG.get(k, 'en') == 'en' for k in clips)}/{tot}")
    print(f"real-time factor per CPU core (median): faster-whisper {np.median(rtf_fw):.3f}, pocketsphinx "
          f"{np.median(rtf_ps):.3f}  ->  {1 / np.median(rtf_fw):.1f} s of audio per second per core")


def corpus_clips(secs: float, npz: str | None = None) -> dict[str, np.ndarray]:
    """{video stem: first ``secs`` of its 16 kHz mono audio} of the corpus videos, or of a saved .npz."""
    if npz:
        with np.load(npz, allow_pickle=False) as z:
            return {k: z[k] for k in sorted(z.files)}
    return {v.stem: audio_of(v)[: int(secs * SR)] for v in sorted((SHARED / "corpus").glob("*.mp4"))}


def section_asr_torch(secs: float, npz: str | None) -> None:
    import torch

    from models.packaged import path
    from models.whisper_ct2 import load_whisper_from_ct2

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    model_dir = Path(os.environ.get("M2FD_WHISPER_CT2") or path("whisper-base")).resolve()
    model_dir = model_dir.parent if model_dir.is_file() else model_dir
    t0 = time.perf_counter()
    model = load_whisper_from_ct2(model_dir, device=dev)
    load_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    try:
        from faster_whisper import WhisperModel

        fw = WhisperModel(str(model_dir), device="cpu", compute_type="float32", cpu_threads=1)
    except ImportError:
        fw = None
    from extractors.config import ExtractConfig
    from extractors.transcribe import token_cap

    per_s = ExtractConfig().asr_max_tokens_per_s  # the default engine's decoding limit (Whisper base loops)
    clips = corpus_clips(secs, npz)
    kw = dict(temperature=0.0, beam_size=5, condition_on_previous_text=False, word_timestamps=True, fp16=cuda,
              verbose=None)
    model.transcribe(next(iter(clips.values())), **kw)  # warm-up (CUDA context, kernels)
    print(f"\n== ASR, openai-whisper (PyTorch) on the packaged Whisper base weights, {name}; load {load_s:.1f} s")
    print(f"{'video':28s} {'want':>4s} {'lang':>5s} {'words':>5s} {'RTF':>7s} {'same text as fw':>15s}  text")
    rtf, ok, same = [], 0, []
    for k, a in clips.items():
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = model.transcribe(a.astype(np.float32), sample_len=token_cap(len(a), per_s), **kw)
        if cuda:
            torch.cuda.synchronize()
        rtf.append((time.perf_counter() - t0) / (len(a) / SR))
        words = sum(len(s.get("words") or []) for s in r["segments"])
        want = LANG.get(k, "en")
        ok += r["language"] == want
        eq = "-"
        if fw is not None:
            segs, _ = fw.transcribe(a, beam_size=5, temperature=0.0, condition_on_previous_text=False,
                                    max_new_tokens=token_cap(len(a), per_s))
            eq = str(" ".join(s.text.strip() for s in segs).strip() == r["text"].strip())
            same.append(eq == "True")
        print(f"{k:28s} {want:>4s} {r['language']:>5s} {words:5d} {rtf[-1]:7.4f} {eq:>15s}  {r['text'].strip()[:50]!r}")
    print(f"language as SOURCES.md says: {ok}/{len(clips)}; real-time factor median {np.median(rtf):.4f} "
          f"(p90 {np.percentile(rtf, 90):.4f}) -> {1 / np.median(rtf):.0f} s of audio per second, one clip at a time")
    if same:
        print(f"same text as faster-whisper (same weights in float32, CPU, beam 5): {sum(same)}/{len(same)}")


def _espeak(tmp: Path, text: str, voice: str) -> np.ndarray:
    from extractors.media import decode_audio

    wav = tmp / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True)
    return decode_audio(str(wav))


def _level_ref(a: np.ndarray, hop: int = 160) -> np.ndarray:
    """Speech reference of a clean synthetic utterance: 10 ms frames above -45 dBFS, gaps < 200 ms closed."""
    from extractors.vad import close_gaps, frame_levels_db

    n = len(a) // hop
    lev = frame_levels_db(a[: n * hop].reshape(n, hop))
    return np.repeat(close_gaps(lev > -45, 20), hop)[: len(a)] if n else np.zeros(len(a), bool)


def _word_ref(a: np.ndarray) -> np.ndarray:
    """Speech reference of real speech: Whisper's word spans, gaps < 300 ms closed."""
    from extractors.transcribe import make_transcriber
    from extractors.vad import close_gaps

    ref = np.zeros(len(a), bool)
    for w in make_transcriber("base").__call__(a).words:
        ref[int(w["start_s"] * SR): int(w["end_s"] * SR)] = True
    hop = 160
    m = close_gaps(ref[:: hop], 30)
    return np.repeat(m, hop)[: len(a)]


def vad_signal(tmp: Path) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int, int]]]:
    rng = np.random.default_rng(0)
    parts: list[tuple[str, np.ndarray, np.ndarray]] = []
    for voice, text in (("en-us", "The weather today is clear, and the forecast for tomorrow says more of the same."),
                        ("de", "Das Wetter ist heute klar, und morgen soll es genauso bleiben."),
                        ("fr", "Le temps est clair aujourd'hui, et demain il fera pareil.")):
        a = _espeak(tmp, text, voice)
        parts.append((f"espeak {voice}", a, _level_ref(a)))
    for name, start in (("edtalk_obama.mp4", 2.0), ("sadtalker_wda_katiehill.mp4", 0.0), ("retalking_face1.mp4", 0.0)):
        a = audio_of(SHARED / "corpus" / name)[int(start * SR): int((start + 6) * SR)]
        parts.append((f"real {Path(name).stem}", a, _word_ref(a)))
    t = np.arange(4 * SR) / SR
    chords = np.zeros_like(t)
    for k, f0 in enumerate((220.0, 261.6, 329.6, 392.0)):  # a chord per second, notes with decaying envelopes
        seg = (t >= k) & (t < k + 1)
        env = np.exp(-3 * (t[seg] - k))
        chords[seg] = env * sum(np.sin(2 * np.pi * f0 * m * t[seg]) / m for m in (1, 1.25, 1.5, 2))
    brown = np.cumsum(rng.standard_normal(3 * SR))
    brown = brown - np.convolve(brown, np.ones(801) / 801, "same")
    noise_parts = {"music-like chords": 0.2 * chords / np.abs(chords).max(),
                   "steady tone 440 Hz": 0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * SR) / SR),
                   "white noise": 0.1 * rng.standard_normal(3 * SR),
                   "brown noise": 0.3 * brown / np.abs(brown).max(),
                   "silence": np.zeros(2 * SR)}
    for k, a in noise_parts.items():
        parts.append((k, a.astype(np.float32), np.zeros(len(a), bool)))
    gap = np.zeros(SR // 2, np.float32)
    sig, ref, spans, pos = [], [], [], 0
    for name, a, r in parts:
        sig += [a.astype(np.float32), gap]
        ref += [r, np.zeros(len(gap), bool)]
        spans.append((name, pos, pos + len(a)))
        pos += len(a) + len(gap)
    return np.concatenate(sig), np.concatenate(ref), spans


def _score(mask_hop: np.ndarray, hop_s: float, ref: np.ndarray, spans) -> dict:
    n = len(ref)
    pred = np.zeros(n, bool)
    h = int(round(hop_s * SR))
    pred[: len(mask_hop) * h] = np.repeat(mask_hop, h)[:n]
    # score per 30 ms
    k = 480
    m = n // k
    p, r = pred[: m * k].reshape(m, k).mean(1) > 0.5, ref[: m * k].reshape(m, k).mean(1) > 0.5
    tp, fp, fn = (p & r).sum(), (p & ~r).sum(), (~p & r).sum()
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    per = {name: float(pred[a:b].mean()) for name, a, b in spans}
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-9), "per": per}


def section_vad() -> None:
    from extractors.config import IngestConfig
    from extractors.vad import detect_speech, detect_speech_silero
    from models.packaged import path

    cfg = IngestConfig()
    silero = str(path("silero-vad"))
    with tempfile.TemporaryDirectory() as td:
        sig, ref, spans = vad_signal(Path(td))
    dur = len(sig) / SR
    t0 = time.perf_counter()
    g = detect_speech(sig, cfg.vad_mode, cfg.vad_min_dbfs, cfg.vad_max_flatness, cfg.vad_min_modulation_db, cfg.vad_min_speech_s)
    t1 = time.perf_counter()
    s = detect_speech_silero(sig, silero, cfg.vad_threshold, cfg.vad_min_dbfs, cfg.vad_min_speech_s)
    t2 = time.perf_counter()
    res = {"gmm+gates": (_score(g.speech, g.hop_s, ref, spans), t1 - t0),
           "silero": (_score(s.speech, s.hop_s, ref, spans), t2 - t1)}
    print(f"\n== VAD on a {dur:.0f} s made signal ({ref.mean():.0%} speech), scored per 30 ms")
    print(f"{'':14s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'ms per s audio':>15s}")
    for k, (r, t) in res.items():
        print(f"{k:14s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {1000 * t / dur:15.2f}")
    print(f"{'share marked speech':32s} {'reference':>9s} {'gmm+gates':>10s} {'silero':>7s}")
    for name, a, b in spans:
        print(f"{name:32s} {ref[a:b].mean():9.2f} {res['gmm+gates'][0]['per'][name]:10.2f} {res['silero'][0]['per'][name]:7.2f}")
    print("share of each bundled real video marked speech (d12/d14/s18 are voice over music; d3 digital silence):")
    for v in sorted((SHARED / "real").glob("*.mp4")):
        try:
            a = audio_of(v)
        except Exception as e:  # yongen has no audio track
            print(f"  {v.stem:8s} no audio ({type(e).__name__})")
            continue
        g = detect_speech(a, cfg.vad_mode, cfg.vad_min_dbfs, cfg.vad_max_flatness, cfg.vad_min_modulation_db, cfg.vad_min_speech_s)
        s = detect_speech_silero(a, silero, cfg.vad_threshold, cfg.vad_min_dbfs, cfg.vad_min_speech_s)
        print(f"  {v.stem:8s} gmm+gates {g.speech.mean() if len(g.speech) else 0:.2f}  silero {s.speech.mean() if len(s.speech) else 0:.2f}")


def _frames(v: Path, n: int) -> list[np.ndarray]:
    import cv2

    cap, out = cv2.VideoCapture(str(v)), []
    while len(out) < n:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    return out


def section_blend(n: int) -> None:
    import mediapipe as mp

    from extractors.blendshapes import BlendshapeModel
    from extractors.face_geometry import FaceGeometry
    from extractors.landmarks import MeshTracker
    from extractors.pose import head_pose, load_template, to_metric, rotation_angle_deg
    from models.packaged import path
    from storage_schemas.vocab import BLENDSHAPES

    task = str(path("face-landmarker"))
    bm = BlendshapeModel(task)
    geo = FaceGeometry(task)
    tpl = load_template()
    vision = mp.tasks.vision
    opts = vision.FaceLandmarkerOptions(base_options=mp.tasks.BaseOptions(model_asset_path=task),
                                        running_mode=vision.RunningMode.VIDEO, num_faces=1,
                                        output_face_blendshapes=True, output_facial_transformation_matrixes=True)
    F = np.diag([1.0, -1.0, -1.0])  # Tasks' canonical face space (y up, z towards the camera) -> our image axes
    diffs, t_mesh, t_blend, t_tasks, rel, offs = [], 0.0, 0.0, 0.0, [], []
    t_geo, geo_rot, geo_tr, rel_ours_mesh = 0.0, 0.0, 0.0, []
    n_frames = 0
    for v in (SHARED / "real" / "d12.mp4", SHARED / "corpus" / "edtalk_obama.mp4", SHARED / "corpus" / "retalking_face4.mp4"):
        frames = _frames(v, n)
        h, w = frames[0].shape[:2]
        r_ours, r_tasks, r_mesh = [], [], []
        with MeshTracker() as mt, vision.FaceLandmarker.create_from_options(opts) as lmk:
            box = [0.0, 0.0, 1.0, 1.0]
            for i, fr in enumerate(frames):
                t0 = time.perf_counter()
                lm = mt.process(fr, box)
                t1 = time.perf_counter()
                res = lmk.detect_for_video(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(fr)),
                                           int(i * 1000 / 30))
                t2 = time.perf_counter()
                t_mesh += t1 - t0
                t_tasks += t2 - t1
                if lm is None or not res.face_blendshapes:
                    continue
                box = [float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max())]
                t3 = time.perf_counter()
                ours = bm(lm[None], w, h)[0]
                t_blend += time.perf_counter() - t3
                n_frames += 1
                theirs = np.array([c.score for c in res.face_blendshapes[0]], np.float32)
                diffs.append(np.abs(ours - theirs))
                _, r, _, _ = head_pose(to_metric(lm, w, h), tpl)
                r_ours.append(r)
                m_tasks = np.asarray(res.facial_transformation_matrixes[0])
                r_tasks.append(F @ m_tasks[:3, :3] @ F)
                # extractors.face_geometry: on Tasks' own landmarks (must equal Tasks), and on Face Mesh's
                lm_tasks = np.array([[p.x, p.y, p.z] for p in res.face_landmarks[0]], np.float32)[None]
                m_same = geo(lm_tasks, w, h)[0]
                geo_rot = max(geo_rot, float(np.abs(m_same[:3, :3] - m_tasks[:3, :3]).max()))
                geo_tr = max(geo_tr, float(np.abs(m_same[:3, 3] - m_tasks[:3, 3]).max()))
                t4 = time.perf_counter()
                m_mesh = geo(lm[None], w, h)[0]
                t_geo += time.perf_counter() - t4
                r_mesh.append(F @ (m_mesh[:3, :3] / np.linalg.norm(m_mesh[:3, 0])) @ F)
        for ro, rt, rm in zip(r_ours, r_tasks, r_mesh):  # motion relative to the first frame, in each own frame
            rel.append(rotation_angle_deg(ro @ r_ours[0].T, rt @ r_tasks[0].T))
            offs.append(rotation_angle_deg(ro, rt))
            rel_ours_mesh.append(rotation_angle_deg(ro @ r_ours[0].T, rm @ r_mesh[0].T))
    d = np.stack(diffs)
    worst = np.argsort(-d.mean(0))[:5]
    print(f"\n== Blendshapes on {n_frames} real frames (d12, obama, retalking_face4)")
    print(f"ours (Face Mesh landmarks) vs Tasks FaceLandmarker: mean |diff| {d.mean():.3f}, p95 {np.percentile(d, 95):.3f}; "
          "worst: " + ", ".join(f"{BLENDSHAPES[k]} {d[:, k].mean():.3f}" for k in worst))
    fm, bl, tk = 1000 * t_mesh / n_frames, 1000 * t_blend / n_frames, 1000 * t_tasks / n_frames
    print(f"cost per frame: blendshape model {bl:.2f} ms, Face Mesh {fm:.2f} ms (blendshapes add {bl / fm:.0%}), "
          f"Tasks FaceLandmarker {tk:.2f} ms")
    print(f"Tasks transformation matrix vs our pose fit: head motion from the first frame differs {np.mean(rel):.2f} deg "
          f"mean (p95 {np.percentile(rel, 95):.2f}); fixed offset between the two frames {np.mean(offs):.1f} +- "
          f"{np.std(offs):.1f} deg")
    print(f"extractors.face_geometry on Tasks' landmarks vs Tasks' matrix: max |diff| rotation x scale {geo_rot:.2g}, "
          f"translation {geo_tr:.2g} cm; on Face Mesh landmarks (frames.face_transform) {1000 * t_geo / n_frames:.3f} ms "
          f"a frame, head motion vs our pose fit {np.mean(rel_ours_mesh):.2f} deg mean (p95 "
          f"{np.percentile(rel_ours_mesh, 95):.2f})")


def section_identity() -> None:
    from extractors.identity import FaceEmbedder, VoiceEmbedder
    from extractors.landmarks import MeshTracker
    from models.packaged import path

    fe, ve = FaceEmbedder(path("sface")), VoiceEmbedder(path("voice-encoder"))
    faces, voices, names = [], [], []
    import cv2

    for v in speaking_videos():
        cap = cv2.VideoCapture(str(v))
        nfr = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = cap.get(cv2.CAP_PROP_FPS) or 25
        a = audio_of(v)
        pair_f, pair_v = [], []
        for half in (0, 1):
            vecs = []
            for j in range(4):
                cap.set(cv2.CAP_PROP_POS_FRAMES, int(nfr * (half / 2 + (j + 0.5) / 8)))
                ok, f = cap.read()
                if not ok:
                    continue
                f = cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
                with MeshTracker(window_scale=3.0 if max(f.shape[:2]) >= 1080 else None) as mt:
                    lm = mt.process(f, [0.0, 0.0, 1.0, 1.0])
                if lm is not None:
                    vecs.append(fe.embed(f, lm))
            m = np.mean(vecs, 0) if vecs else None
            pair_f.append(None if m is None else m / np.linalg.norm(m))
            seg = a[len(a) * half // 2: len(a) * (half + 1) // 2]
            pair_v.append(ve.embed(seg))
        faces.append(pair_f)
        voices.append(pair_v)
        names.append(v.stem)
    print(f"\n== Identity: two halves of each of {len(names)} speaking videos (one person each)")
    for what, E in (("face (SFace)", faces), ("voice (GE2E)", voices)):
        same = [float(a @ b) for a, b in E if a is not None and b is not None]
        diff = [float(E[i][0] @ E[j][1]) for i in range(len(E)) for j in range(len(E))
                if i != j and E[i][0] is not None and E[j][1] is not None]
        worst_same = names[int(np.argmin([float(a @ b) if a is not None and b is not None else 9 for a, b in E]))]
        print(f"{what:13s} same person: min {min(same):.3f} (worst {worst_same}), median {np.median(same):.3f}; "
              f"different people: max {max(diff):.3f}, median {np.median(diff):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=("asr", "asr-torch", "vad", "blend", "identity"))
    ap.add_argument("--audio-npz", help="asr-torch: read the clips from this .npz (written by --save-audio-npz)")
    ap.add_argument("--save-audio-npz", help="write the corpus clips of the asr sections to this .npz and stop")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--frames", type=int, default=150, help="frames per video in the blend section")
    a = ap.parse_args()
    if a.save_audio_npz:
        np.savez(a.save_audio_npz, **corpus_clips(a.seconds))
        return
    import torch

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # a GPU machine with only what asr-torch needs
        pass
    for s in a.section or ("asr", "asr-torch", "vad", "blend", "identity"):
        {"asr": lambda: section_asr(a.seconds), "asr-torch": lambda: section_asr_torch(a.seconds, a.audio_npz),
         "vad": section_vad, "blend": lambda: section_blend(a.frames), "identity": section_identity}[s]()


if __name__ == "__main__":
    main()
