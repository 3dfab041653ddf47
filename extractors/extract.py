"""Per-frame extraction for the clips of one source: Face Mesh landmarks locked to the speaker, head
pose, pose-normalised geometry, face crops, 30 fps audio features, transcripts and quality scores.

Pure: returns arrays and records; the runner writes them through storage_schemas.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np


from .audio_features import log_mel_30fps, rms_db_30fps
from .config import ExtractConfig
from .landmarks import MeshTracker
from .media import NvdecVideo, decode_audio, iter_frames, open_video, timeline
from .pose import STABLE, head_pose, load_template, mouth_opening, neutral_shape, normalise, to_metric
from .records import failed_check
from .shards import keyframe_crop
from .transcribe import clip_audio, transcribe_clips


@dataclass
class ClipFeatures:
    clip_id: str
    n_frames: int
    tracked: np.ndarray  # (n,) bool
    landmarks: np.ndarray  # (n, 478, 3) float32 image-normalised, NaN where untracked
    conf: np.ndarray  # (n,) float32
    rotation: np.ndarray  # (n, 3, 3)
    translation: np.ndarray  # (n, 3) pixels
    scale: np.ndarray  # (n,)
    geometry: np.ndarray  # (n, 478, 3) pose-normalised mesh in template units (IOD), NaN where untracked
    neutral: np.ndarray  # (478, 3)
    crops: np.ndarray  # (n, S, S, 3) uint8 face crops (zeros where untracked)
    audio_feat: np.ndarray  # (n, 80) log-mel
    audio_db: np.ndarray  # (n,)
    blendshapes: np.ndarray | None = None  # (n, 52) ARKit weights, NaN where untracked (or no model)
    face_transform: np.ndarray | None = None  # (n, 4, 4) MediaPipe facial transformation matrix, NaN likewise
    keyframe: np.ndarray | None = None  # (K, K, 3) uint8 face crop of the clip's middle frame (shards' keyframe.jpg)
    face_embedding: np.ndarray | None = None  # (128,) SFace, L2-normalised mean over the probe frames; NaN if none
    voice_embedding: np.ndarray | None = None  # (256,) speaker encoder over the clip's audio; NaN if none
    transcript: dict | None = None
    quality: dict = field(default_factory=dict)


def crop_grid(lm_norm: np.ndarray, width: int, height: int, size: int, expand: float) -> tuple[np.ndarray, np.ndarray]:
    """The pixel rows and columns (size each) of the face crop: a square centred on the landmark box, side
    = expand x the box's larger side, sampled nearest-neighbour (enough at 64 px)."""
    xs, ys = lm_norm[:, 0] * width, lm_norm[:, 1] * height
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    side = max(xs.max() - xs.min(), ys.max() - ys.min()) * expand
    g = (np.arange(size) + 0.5) / size - 0.5
    px = np.clip(np.round(cx + g * side).astype(int), 0, width - 1)
    py = np.clip(np.round(cy + g * side).astype(int), 0, height - 1)
    return py, px


def crop_face(frame: np.ndarray, lm_norm: np.ndarray, size: int, expand: float) -> np.ndarray:
    """Square crop centred on the landmark box, side = expand x the box's larger side, resized."""
    py, px = crop_grid(lm_norm, frame.shape[1], frame.shape[0], size, expand)
    return frame[py[:, None], px[None, :]]


def _host(frame) -> np.ndarray:
    """A frame as a numpy array (NVDEC's frames are CUDA tensors until a host copy is needed)."""
    return frame if isinstance(frame, np.ndarray) else frame.cpu().numpy()


def _quality(f: ClipFeatures) -> dict:
    t = f.tracked
    q = {"tracked_ratio": float(t.mean()), "landmark_conf": float(np.nanmean(np.where(t, f.conf, np.nan))) if t.any() else 0.0}
    if t.sum() >= 3:
        g = f.geometry[t]
        # jitter: mean second difference of the normalised mesh (IOD units per frame^2)
        q["jitter"] = float(np.linalg.norm(np.diff(g, 2, axis=0), axis=-1).mean()) if len(g) >= 3 else 0.0
        mo = mouth_opening(f.geometry)  # NaN where untracked
        q["lip_sync"] = lip_sync_proxy(mo, speech_envelope(f.audio_feat))
    else:
        q["jitter"], q["lip_sync"] = float("nan"), float("nan")
    return q


def speech_envelope(audio_mel: np.ndarray) -> np.ndarray:
    """Per-frame speech-band energy: mean of the log-mel bins covering roughly 100 Hz - 2.5 kHz."""
    return audio_mel[:, 5:50].mean(axis=1)


def lip_sync_proxy(mouth_open: np.ndarray, envelope: np.ndarray, max_lag: int = 6, smooth: int = 5) -> float:
    """Best Pearson correlation, over lags within +-max_lag frames (200 ms), between the mouth opening and
    the speech envelope, both smoothed over ``smooth`` frames. NaN (untracked) frames are left out."""
    ok = ~np.isnan(mouth_open)
    k = np.ones(smooth) / smooth
    mo = np.convolve(np.where(ok, mouth_open, np.nanmean(mouth_open) if ok.any() else 0.0), k, "same")
    env = np.convolve(envelope, k, "same")
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        a = np.roll(mo, lag)
        m = ok & np.roll(ok, lag)
        m[:max_lag] = m[len(m) - max_lag:] = False
        if m.sum() < 10:
            continue
        x, y = a[m], env[m]
        if x.std() < 1e-9 or y.std() < 1e-9:
            continue
        best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


def mesh_decode_side(width: int, height: int, clips: list[dict], cfg: ExtractConfig) -> int:
    """The longest side frames are decoded at for Face Mesh: ``mesh_max_side``, or larger (up to the
    video's own size) where the smallest speaker face of the clips would be narrower than
    ``mesh_min_face_px`` there. Ingest measured the face in display pixels."""
    full = max(width, height)
    face = min((float(c["face_size_px"]) for c in clips), default=float(full))
    need = full * cfg.mesh_min_face_px / max(face, 1.0)
    return int(min(full, max(cfg.mesh_max_side, np.ceil(need))))


def probe_frames(n: int, k: int) -> set[int]:
    """``k`` evenly spaced frame indices of an ``n``-frame clip (the identity probes)."""
    return {int((j + 0.5) * n / k) for j in range(min(k, n))}


def _unit_mean(vecs: list[np.ndarray], dim: int) -> np.ndarray:
    if not vecs:
        return np.full(dim, np.nan, np.float32)
    m = np.mean(vecs, axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def _meshed(frames, n: int, box, window: float | None, cfg: ExtractConfig, landmarker, tm: dict):
    """Yield (i, frame, landmarks or None, face crop or None) for the next ``n`` frames of one clip:
    MediaPipe's graph frame by frame, or ``landmarker`` (extractors.mesh_torch.TorchFaceMesh) on batches of
    ``cfg.mesh_batch`` frames (0: 32 on the CPU, 256 on CUDA) counted from the clip's first frame (so a
    frame's batch never depends on other clips). Frames decoded by NVDEC stay CUDA tensors (H, W, 3): the
    crops are cut on the GPU at the same pixels ``crop_face`` takes, and only they come back to the host."""
    if landmarker is None:
        with MeshTracker(window_scale=window) as mt:
            for i in range(n):
                t0 = time.perf_counter()
                _, frame = next(frames)
                t1 = time.perf_counter()
                lm = mt.process(frame, box)
                tm["decode_s"] = tm.get("decode_s", 0) + t1 - t0
                tm["mesh_s"] = tm.get("mesh_s", 0) + time.perf_counter() - t1
                if lm is not None:
                    box = [float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max())]
                yield i, frame, lm, (None if lm is None else crop_face(frame, lm, cfg.crop_size, cfg.crop_expand))
        return
    from .mesh_torch import detection_roi

    carry = None
    size = cfg.mesh_batch_for(landmarker.device.type == "cuda")
    for b0 in range(0, n, size):
        t0 = time.perf_counter()
        m, batch = min(size, n - b0), None
        for j in range(m):
            frame = next(frames)[1]
            if batch is None:  # the batch's buffer, each frame copied in as it comes, so a decoder's chunks are
                # let go as they are used (stacking a list held every chunk and the stacked copy at once: on
                # CUDA ~1.4 GB a worker for 256 frames of 1280x720, bench/RESULTS.md)
                batch = (np.empty((m, *frame.shape), frame.dtype) if isinstance(frame, np.ndarray)
                         else frame.new_empty((m, *frame.shape)))
            batch[j] = frame
        del frame  # the last frame's view would keep its decoder chunk alive while the batch is tracked
        t1 = time.perf_counter()
        on_host = isinstance(batch, np.ndarray)
        h, w = batch.shape[1:3]
        lms, carry = landmarker.track_array(batch, box, detection_roi(w, h, box, window), carry)
        ok = np.flatnonzero(~np.isnan(lms[:, 0, 0]))
        crops = [None] * m
        if len(ok):
            grid = [crop_grid(lms[k], w, h, cfg.crop_size, cfg.crop_expand) for k in ok]
            py, px = np.stack([g[0] for g in grid]), np.stack([g[1] for g in grid])
            if on_host:
                cut = batch[ok[:, None, None], py[:, :, None], px[:, None, :]]
            else:
                import torch

                dev = batch.device
                cut = batch[torch.from_numpy(ok).to(dev)[:, None, None], torch.from_numpy(py).to(dev)[:, :, None],
                            torch.from_numpy(px).to(dev)[:, None, :]].cpu().numpy()
            for j, k in enumerate(ok):
                crops[k] = cut[j]
        tm["decode_s"] = tm.get("decode_s", 0) + t1 - t0
        tm["mesh_s"] = tm.get("mesh_s", 0) + time.perf_counter() - t1
        for k in range(m):
            yield b0 + k, batch[k], (None if np.isnan(lms[k, 0, 0]) else lms[k]), crops[k]


def track_frames(frames: np.ndarray, box, cfg: ExtractConfig, window: float | None = None, landmarker=None,
                 timings: dict | None = None) -> np.ndarray:
    """(n, 478, 3) landmarks (NaN where untracked) of ``n`` consecutive frames of one clip, exactly as
    extraction tracks them (MediaPipe's graph, or ``landmarker`` where given)."""
    out = np.full((len(frames), 478, 3), np.nan, np.float32)
    for i, _, lm, _ in _meshed(enumerate(frames), len(frames), box, window, cfg, landmarker, {} if timings is None else timings):
        if lm is not None:
            out[i] = lm
    return out


def extract_source(path: str, width: int, height: int, clips: list[dict], cfg: ExtractConfig,
                   transcriber=None, template: np.ndarray | None = None, timings: dict | None = None,
                   blendshaper=None, face_geometry=None, face_embedder=None, voice_embedder=None,
                   audio: np.ndarray | None = None, landmarker=None, nvdec: bool = False,
                   av_sync=None) -> list[ClipFeatures]:
    """Extract every clip of one source in one sequential decoding pass (``audio``: the source's decoded
    16 kHz mono audio where the caller has it, else it is decoded here). ``transcriber`` (an engine of
    extractors.transcribe) transcribes the clips that pass the quality checks (records.failed_check), in
    one pass (transcribe_clips); a clip the checks drop gets no transcript. The optional models:
    ``blendshaper(landmarks (n,478,3), width, height) -> (n,52)`` (extractors.blendshapes),
    ``face_geometry(landmarks, width, height) -> (n,4,4)`` (extractors.face_geometry),
    ``face_embedder.embed(frame, landmarks) -> (128,)`` on ``identity_frames`` probe frames and
    ``voice_embedder.embed(audio) -> (256,)`` on the clip's audio (extractors.identity); ``landmarker``:
    a TorchFaceMesh (extractors.mesh_torch) in place of MediaPipe's own graph; ``nvdec``: decode with NVDEC
    into CUDA memory (with a CUDA ``landmarker`` only); ``av_sync``: a models.av_sync.AVSync (loaded with its speech
    encoder) scoring each clip's mouth motion against its speech (quality["av_sync"])."""
    tm = timings if timings is not None else {}
    tpl = load_template() if template is None else template
    t0 = time.perf_counter()
    if audio is None:
        audio = decode_audio(path)
    tm["audio_decode_s"] = tm.get("audio_decode_s", 0) + time.perf_counter() - t0
    if nvdec:  # frames stay on the GPU for the torch landmarker
        vr = NvdecVideo(path, width, height, mesh_decode_side(width, height, clips, cfg))
        tl = vr.timeline
    else:
        vr = open_video(path, width, height, mesh_decode_side(width, height, clips, cfg))
        tl = timeline(vr, 1e9)
    clips = sorted(clips, key=lambda c: c["start_frame"])
    need = np.concatenate([np.arange(c["start_frame"], c["start_frame"] + c["n_frames"]) for c in clips])
    frames = vr.iter_frames(need) if nvdec else iter_frames(vr, tl, need)
    out = []
    for c in clips:
        n = c["n_frames"]
        lms = np.full((n, 478, 3), np.nan, np.float32)
        crops = np.zeros((n, cfg.crop_size, cfg.crop_size, 3), np.uint8)
        box = c["face_box"]
        small = float(c["face_size_px"]) < cfg.mesh_window_below * max(width, height)
        probes = probe_frames(n, cfg.identity_frames) if face_embedder is not None else set()
        face_vecs = []
        key = np.zeros((cfg.keyframe_px, cfg.keyframe_px, 3), np.uint8)
        window = cfg.mesh_window_scale if small else None
        for i, frame, lm, crop in _meshed(frames, n, box, window, cfg, landmarker, tm):
            if i == n // 2:  # the keyframe comes from this pass: the shards do not decode the video again
                key = keyframe_crop(_host(frame), c["face_box"], cfg.keyframe_px)
            if lm is not None:
                lms[i] = lm
                crops[i] = crop
                if i in probes:
                    t3 = time.perf_counter()
                    face_vecs.append(face_embedder.embed(_host(frame), lm))
                    tm["face_embed_s"] = tm.get("face_embed_s", 0) + time.perf_counter() - t3
        t0 = time.perf_counter()
        tracked = ~np.isnan(lms[:, 0, 0])
        rot = np.full((n, 3, 3), np.nan, np.float32)
        trans = np.full((n, 3), np.nan, np.float32)
        scale = np.full(n, np.nan, np.float32)
        conf = np.zeros(n, np.float32)
        geom = np.full((n, 478, 3), np.nan, np.float32)
        for i in np.flatnonzero(tracked):
            m = to_metric(lms[i], width, height)  # display pixels, whatever size was decoded
            s, r, t, resid = head_pose(m, tpl)
            rot[i], trans[i], scale[i] = r, t, s
            geom[i] = normalise(m, s, r, t)
        neutral = neutral_shape(geom[tracked], mouth_opening(geom[tracked])) if tracked.any() else np.full((478, 3), np.nan)
        if tracked.any():
            # confidence: how far the expression-free (stable) points sit from the speaker's own neutral
            dev = np.sqrt(((geom[tracked][:, STABLE] - neutral[STABLE]) ** 2).sum(-1).mean(-1))
            conf[tracked] = np.exp(-((dev / cfg.conf_resid_scale) ** 2))
        tm["pose_s"] = tm.get("pose_s", 0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        a = clip_audio(audio, c["start_s"], c["end_s"])
        feat = log_mel_30fps(a, n)
        level = rms_db_30fps(a, n)
        tm["audio_feat_s"] = tm.get("audio_feat_s", 0) + time.perf_counter() - t0
        f = ClipFeatures(c["clip_id"], n, tracked, lms, conf, rot, trans, scale, geom, neutral.astype(np.float32),
                         crops, feat, level)
        t0 = time.perf_counter()
        f.blendshapes = (blendshaper(lms, width, height).astype(np.float32) if blendshaper is not None
                         else np.full((n, 52), np.nan, np.float32))
        f.face_transform = (face_geometry(lms, width, height).astype(np.float32) if face_geometry is not None
                            else np.full((n, 4, 4), np.nan, np.float32))
        t1 = time.perf_counter()
        f.keyframe = key
        f.face_embedding = _unit_mean(face_vecs, 128)
        f.voice_embedding = (voice_embedder.embed(a).astype(np.float32) if voice_embedder is not None and a.size
                             else np.full(256, np.nan, np.float32))
        tm["blendshapes_s"] = tm.get("blendshapes_s", 0) + t1 - t0
        tm["voice_embed_s"] = tm.get("voice_embed_s", 0) + time.perf_counter() - t1
        f.quality = _quality(f)
        if av_sync is not None:
            t0 = time.perf_counter()
            f.quality["av_sync"] = av_sync.score_clip(a, f.blendshapes, mouth_opening(f.geometry))
            tm["av_sync_s"] = tm.get("av_sync_s", 0) + time.perf_counter() - t0
        f.quality["asd_sync"] = c.get("asd_sync")  # ingest's (clips.asd_sync); with av_sync, the sync score
        out.append(f)
    if transcriber is not None:  # the clips the quality checks keep, decoded together (transcribe_clips)
        t0 = time.perf_counter()
        keep = [(f, c) for f, c in zip(out, clips) if failed_check(f.quality, cfg)[0] is None]
        for (f, _), tr in zip(keep, transcribe_clips(transcriber, [clip_audio(audio, c["start_s"], c["end_s"])
                                                                   for _, c in keep])):
            f.transcript = dataclasses.asdict(tr)  # the transcripts table's fields, less clip_id
        tm["transcribe_s"] = tm.get("transcribe_s", 0) + time.perf_counter() - t0
        tm["transcribed_clips"] = tm.get("transcribed_clips", 0) + len(keep)
    return out


_ARRAYS = ("tracked", "landmarks", "conf", "rotation", "translation", "scale", "geometry", "neutral", "crops",
           "audio_feat", "audio_db", "blendshapes", "face_transform", "keyframe", "face_embedding", "voice_embedding")


def features_to_npz(feats: list[ClipFeatures]) -> tuple[bytes, dict]:
    """Serialise clip features without pickle: one .npz of plain arrays plus a JSON-able dict."""
    import io

    arrays, meta = {}, {}
    for f in feats:
        for k in _ARRAYS:
            arrays[f"{f.clip_id}/{k}"] = getattr(f, k)
        meta[f.clip_id] = {"n_frames": f.n_frames, "transcript": f.transcript, "quality": f.quality}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), meta


def features_from_npz(path: str, meta: dict) -> list[ClipFeatures]:
    with np.load(path, allow_pickle=False) as z:
        out = []
        for cid in sorted(meta):
            kw = {k: z[f"{cid}/{k}"] for k in _ARRAYS}
            out.append(ClipFeatures(clip_id=cid, n_frames=meta[cid]["n_frames"], transcript=meta[cid]["transcript"],
                                    quality=meta[cid]["quality"], **kw))
    return out
