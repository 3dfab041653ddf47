"""Who is speaking: a face embedding (OpenCV Zoo SFace), a voice embedding (Resemblyzer's GE2E
encoder, re-implemented here) and a pure rule that assigns clips to speakers.

Pure module (numpy, cv2, torch): no Ray, no Dagster. Model files come from ``models.packaged``
(``path("sface")``, ``path("voice-encoder")``); this module only takes paths.

Face
    ``FaceEmbedder(model_path).embed(frame_rgb, landmarks)`` aligns the face with SFace's own
    ``alignCrop`` (a similarity transform of five points onto its 112x112 template) and returns the
    L2-normalised 128-d feature. The five points come from MediaPipe Face Mesh's refined landmarks
    (``face_row``), not from a YuNet detection.

Voice
    ``VoiceEmbedder(weights_path).embed(audio_16k)`` is Resemblyzer 0.1.4's
    ``VoiceEncoder.embed_utterance`` (40-channel power mel, 25 ms / 10 ms at 16 kHz; LSTM 3x256,
    linear 256, ReLU, L2 norm; partials of 160 frames at 1.3 per second, min coverage 0.75, averaged
    and renormalised), without importing resemblyzer/librosa/webrtcvad. Of ``preprocess_wav`` it keeps
    ``normalize_volume(-30 dBFS, increase_only=True)`` (the encoder's input is a *linear* power mel,
    so the level matters) and skips ``trim_long_silences`` (webrtcvad): feed it speech (the pipeline's
    VAD segments).

Speakers
    ``assign_speakers(committed, new, SpeakerRule())``: see its docstring.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------- face

# MediaPipe Face Mesh (refine_landmarks=True, 478 points). "Right" is the subject's right, which is
# the image-left side of an unmirrored frame - the side YuNet (and SFace's template) calls right.
MESH_RIGHT_IRIS = 468  # centre of the subject's right iris (image left)
MESH_LEFT_IRIS = 473  # centre of the subject's left iris (image right)
MESH_NOSE_TIP = 1
MESH_MOUTH_RIGHT = 61  # subject's right mouth corner (image left)
MESH_MOUTH_LEFT = 291  # subject's left mouth corner (image right)
FACE_EMBED_DIM = 128


def face_row(landmarks_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """A YuNet-style face row (15,) float32 in pixels from Face Mesh landmarks normalised to the frame
    (x by width, y by height; (478, 3) or (478, 2)):
    [x, y, w, h, re_x, re_y, le_x, le_y, nose_x, nose_y, rmouth_x, rmouth_y, lmouth_x, lmouth_y, score].

    Eyes are the iris centres (468 subject-right, 473 subject-left), nose tip 1, mouth corners 61
    (subject-right) and 291 (subject-left); the box is the extent of all landmarks; score is 1.
    SFace's ``alignCrop`` reads only the ten point coordinates."""
    lm = np.asarray(landmarks_norm, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[0] < 478 or lm.shape[1] < 2:
        raise ValueError(f"face_row needs the 478 refined Face Mesh landmarks, got shape {lm.shape}")
    xy = lm[:, :2] * np.array([float(width), float(height)])
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    pts = xy[[MESH_RIGHT_IRIS, MESH_LEFT_IRIS, MESH_NOSE_TIP, MESH_MOUTH_RIGHT, MESH_MOUTH_LEFT]]
    return np.concatenate([[x0, y0, x1 - x0, y1 - y0], pts.reshape(-1), [1.0]]).astype(np.float32)


def check_opencv(version: str | None = None) -> None:
    """Raise where OpenCV cannot run SFace: OpenCV 5's dnn engine rejects the packaged model (its weights
    are declared as graph inputs: "ninputs == 1 && empty name can only be used with single input", seen on
    the lent GPU machine's cv2 5.0.0); 4.x runs it."""
    if version is None:
        import cv2

        version = cv2.__version__
    if int(version.split(".")[0]) >= 5:
        raise RuntimeError(f"extract.face_embedder: SFace runs on OpenCV 4 (cv2.FaceRecognizerSF), and this "
                           f"environment has OpenCV {version}, whose dnn engine rejects the model; install "
                           f"opencv-contrib-python<5 (the project's pin) or set extract.face_embedder=''")


class FaceEmbedder:
    """SFace (``cv2.FaceRecognizerSF``) on a frame and its Face Mesh landmarks.

    ``embed`` runs with OpenCV's thread count set to 1 (restored afterwards), so the feature does
    not depend on the machine's core count or on other threads' settings; the frame is converted to
    BGR, the order SFace was trained and is documented with. One instance per worker: not
    thread-safe (cv2.setNumThreads is process-wide)."""

    def __init__(self, model_path: str | Path):
        import cv2

        p = Path(model_path)
        if not p.is_file():
            raise FileNotFoundError(f"SFace model not found: {p}")
        check_opencv()
        self.model_path = p
        self._rec = cv2.FaceRecognizerSF.create(str(p), "")

    def align(self, frame_rgb: np.ndarray, landmarks_norm: np.ndarray) -> np.ndarray:
        """The 112x112 BGR crop SFace embeds."""
        import cv2

        frame = np.asarray(frame_rgb)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
        h, w = frame.shape[:2]
        row = face_row(landmarks_norm, w, h).reshape(1, -1)
        bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        return self._rec.alignCrop(bgr, row)

    def embed(self, frame_rgb: np.ndarray, landmarks_norm: np.ndarray) -> np.ndarray:
        """(128,) float32, L2-normalised."""
        import cv2

        prev = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            crop = self.align(frame_rgb, landmarks_norm)
            feat = np.asarray(self._rec.feature(crop), dtype=np.float64).reshape(-1)
        finally:
            cv2.setNumThreads(prev)
        return _unit(feat).astype(np.float32)


# --------------------------------------------------------------------------------------------- voice

# resemblyzer/hparams.py (0.1.4)
SAMPLE_RATE = 16000
MEL_WINDOW_MS = 25
MEL_STEP_MS = 10
MEL_CHANNELS = 40
PARTIAL_FRAMES = 160  # 1.6 s
NORM_TARGET_DBFS = -30.0
HIDDEN = 256
EMBED_DIM = 256
LAYERS = 3
PARTIAL_RATE = 1.3  # partial utterances per second (embed_utterance's default)
MIN_COVERAGE = 0.75
N_FFT = SAMPLE_RATE * MEL_WINDOW_MS // 1000  # 400
HOP = SAMPLE_RATE * MEL_STEP_MS // 1000  # 160
# librosa.stft(center=True) pads n_fft//2 each side; its default pad_mode is "constant" (zeros) since
# librosa 0.10, which is what `pip install resemblyzer==0.1.4` (librosa>=0.9.1) gets today.
STFT_PAD_MODE = "constant"
_INT16_MAX = 2 ** 15 - 1


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = MEL_CHANNELS,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32: ``librosa.filters.mel(sr=, n_fft=, n_mels=)`` with its defaults
    (Slaney mel scale, htk=False; Slaney area normalisation, norm="slaney"), in numpy."""
    fmax = sr / 2.0 if fmax is None else float(fmax)
    fftfreqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, None].astype(np.float32)
    return weights


def _hann_periodic(n: int) -> np.ndarray:
    # scipy.signal.get_window("hann", n, fftbins=True), as librosa.stft uses
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


_MEL_BASIS = None


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """(n_frames, 40) float32 power mel of a 16 kHz waveform: resemblyzer's ``wav_to_mel_spectrogram``
    (librosa.feature.melspectrogram: n_fft 400, hop 160, periodic Hann, center=True, power 2; not
    log). n_frames = 1 + len(wav) // 160."""
    global _MEL_BASIS
    if _MEL_BASIS is None:
        _MEL_BASIS = mel_filterbank().astype(np.float64)
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    x = np.pad(x, N_FFT // 2, mode=STFT_PAD_MODE)
    n_frames = 1 + (len(x) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * _hann_periodic(N_FFT)[None, :], axis=1)) ** 2
    return (spec @ _MEL_BASIS.T).astype(np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = NORM_TARGET_DBFS) -> np.ndarray:
    """resemblyzer's ``normalize_volume(wav, -30, increase_only=True)``: raise quiet audio to the
    target RMS level, leave louder audio as it is (and digital silence untouched)."""
    wav = np.asarray(wav, dtype=np.float32)
    rms = float(np.sqrt(np.mean((wav.astype(np.float64) * _INT16_MAX) ** 2))) if wav.size else 0.0
    if rms <= 0.0:
        return wav
    change = target_dbfs - 20.0 * np.log10(rms / _INT16_MAX)
    if change < 0:
        return wav
    return (wav * (10.0 ** (change / 20.0))).astype(np.float32)


def partial_slices(n_samples: int, rate: float = PARTIAL_RATE,
                   min_coverage: float = MIN_COVERAGE) -> tuple[list[slice], list[slice]]:
    """(wav slices, mel slices) of the partial utterances: resemblyzer's
    ``VoiceEncoder.compute_partial_slices``. Always at least one slice; may reach past the audio."""
    if not 0 < min_coverage <= 1:
        raise ValueError("min_coverage must be in (0, 1]")
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    frame_step = int(np.round((SAMPLE_RATE / rate) / HOP))
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(f"rate {rate} out of range")
    wav_slices, mel_slices = [], []
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    for i in range(0, steps, frame_step):
        mel_slices.append(slice(i, i + PARTIAL_FRAMES))
        wav_slices.append(slice(i * HOP, (i + PARTIAL_FRAMES) * HOP))
    last = wav_slices[-1]
    coverage = (n_samples - last.start) / (last.stop - last.start)
    if coverage < min_coverage and len(mel_slices) > 1:
        mel_slices, wav_slices = mel_slices[:-1], wav_slices[:-1]
    return wav_slices, mel_slices


class VoiceEmbedder:
    """Resemblyzer's GE2E speaker encoder on the released ``pretrained.pt``.

    ``embed`` takes one utterance (float32 mono at 16 kHz) and returns its (256,) float32 embedding
    (non-negative, L2-normalised). Each call embeds exactly one utterance: its partials form one
    batch whose size depends on that utterance's length only, so the result never depends on what
    else is being embedded (measured bit-identical with 1 and 2 torch threads). torch's thread count
    is the caller's business. Digital silence is not rejected: it yields the embedding of the LSTM's
    biases, which means nothing (the pipeline quarantines silent sources before this step)."""

    def __init__(self, weights_path: str | Path, device: str = "cpu"):
        import torch
        from torch import nn

        p = Path(weights_path)
        if not p.is_file():
            raise FileNotFoundError(f"voice encoder weights not found: {p}")
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
        state = ckpt.get("model_state", ckpt) if isinstance(ckpt, dict) else ckpt
        # the checkpoint also carries GE2E's training-only similarity_weight/bias
        state = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
        self.lstm = nn.LSTM(MEL_CHANNELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBED_DIM)
        mod = nn.ModuleDict({"lstm": self.lstm, "linear": self.linear})
        mod.load_state_dict(state, strict=True)
        self.device = torch.device(device)
        mod.to(self.device).eval()
        self.weights_path = p

    def embed_partials(self, mels: np.ndarray) -> np.ndarray:
        """(B, 160, 40) mel partials -> (B, 256) float32 unit embeddings."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(mels, dtype=np.float32)).to(self.device)
            _, (hidden, _) = self.lstm(x)
            e = torch.relu(self.linear(hidden[-1]))
            e = e / torch.norm(e, dim=1, keepdim=True)
            return e.cpu().numpy().astype(np.float32)

    def embed(self, audio_16k: np.ndarray) -> np.ndarray:
        wav = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
        if wav.size == 0:
            raise ValueError("cannot embed empty audio")
        if not np.isfinite(wav).all():
            raise ValueError("audio holds non-finite samples")
        wav = normalize_volume(wav)
        wav_slices, mel_slices = partial_slices(len(wav))
        need = wav_slices[-1].stop
        if need >= len(wav):
            wav = np.pad(wav, (0, need - len(wav)))
        mel = mel_spectrogram(wav)
        partials = self.embed_partials(np.stack([mel[s] for s in mel_slices]))
        return _unit(partials.astype(np.float64).mean(axis=0)).astype(np.float32)


# ------------------------------------------------------------------------------------------ speakers

def speaker_id_for(clip_id: str) -> str:
    """The id of a speaker founded by ``clip_id``."""
    return "spk-" + hashlib.sha256(clip_id.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class SpeakerRule:
    face_threshold: float = 0.6
    voice_threshold: float = 0.85


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n <= 0.0:
        raise ValueError("cannot normalise a zero or non-finite vector")
    return v / n


class _Speaker:
    __slots__ = ("speaker_id", "face_sum", "voice_sum")

    def __init__(self, speaker_id: str):
        self.speaker_id = speaker_id
        self.face_sum: np.ndarray | None = None
        self.voice_sum: np.ndarray | None = None

    def add(self, face, voice) -> None:
        if face is not None:
            self.face_sum = face.copy() if self.face_sum is None else self.face_sum + face
        if voice is not None:
            self.voice_sum = voice.copy() if self.voice_sum is None else self.voice_sum + voice


def _vec(item: dict, key: str) -> np.ndarray | None:
    v = item.get(key)
    return None if v is None else _unit(v)


def _best(vec: np.ndarray | None, speakers: list[_Speaker], attr: str) -> tuple[_Speaker | None, float | None]:
    """Highest cosine to a speaker's centroid (ties: the first in speaker_id order)."""
    if vec is None:
        return None, None
    best, best_sim = None, None
    for s in speakers:
        c = getattr(s, attr)
        if c is None:
            continue
        sim = float(vec @ _unit(c))
        if best_sim is None or sim > best_sim:
            best, best_sim = s, sim
    return best, best_sim


def assign_speakers(committed: list[dict], new: list[dict], rule: SpeakerRule = SpeakerRule()) -> list[dict]:
    """Assign each new clip to a speaker; committed clips keep theirs.

    Items are ``{"clip_id", "face": vector | None, "voice": vector | None}``; committed items also
    carry ``"speaker_id"``. A speaker's face (voice) centroid is the renormalised mean of its members'
    unit face (voice) embeddings. New clips are taken in sorted clip_id order (so the result does not
    depend on input order), and each one, once placed, becomes a member (of the speaker it joined or
    founded) for the clips after it:

    * with a face embedding: it joins the speaker whose face centroid has the highest cosine, if that
      is >= ``rule.face_threshold`` (method "face"); otherwise it founds a new speaker ("new") - the
      voice does not overrule a face;
    * without one, but with a voice embedding: the same with voice centroids and
      ``rule.voice_threshold`` (method "voice", else "new");
    * with neither: a new speaker ("new").

    A new speaker's id is ``speaker_id_for(clip_id)``. Returns, for the new clips only (sorted by
    clip_id), ``{"clip_id", "speaker_id", "face_sim", "voice_sim", "method"}``, where face_sim /
    voice_sim are the highest cosine to any existing speaker's centroid (None where the clip lacks
    that embedding or no speaker has one); voice_sim is reported even when the face decided.
    Inputs are not modified. Raises ValueError on duplicate clip ids or a new speaker id that
    already exists."""
    speakers: dict[str, _Speaker] = {}
    seen: set[str] = set()
    for item in sorted(committed, key=lambda d: d["clip_id"]):
        cid = item["clip_id"]
        if cid in seen:
            raise ValueError(f"duplicate clip_id {cid!r} among committed clips")
        seen.add(cid)
        sid = item["speaker_id"]
        speakers.setdefault(sid, _Speaker(sid)).add(_vec(item, "face"), _vec(item, "voice"))
    out = []
    for item in sorted(new, key=lambda d: d["clip_id"]):
        cid = item["clip_id"]
        if cid in seen:
            raise ValueError(f"clip_id {cid!r} is given twice (committed or new)")
        seen.add(cid)
        face, voice = _vec(item, "face"), _vec(item, "voice")
        order = [speakers[k] for k in sorted(speakers)]
        f_spk, f_sim = _best(face, order, "face_sum")
        v_spk, v_sim = _best(voice, order, "voice_sum")
        if face is not None:
            target = f_spk if f_sim is not None and f_sim >= rule.face_threshold else None
            method = "face"
        else:
            target = v_spk if v_sim is not None and v_sim >= rule.voice_threshold else None
            method = "voice"
        if target is None:
            sid = speaker_id_for(cid)
            if sid in speakers:
                raise ValueError(f"speaker id {sid} of new clip {cid!r} already exists")
            target = speakers[sid] = _Speaker(sid)
            method = "new"
        target.add(face, voice)
        out.append({"clip_id": cid, "speaker_id": target.speaker_id, "face_sim": f_sim,
                    "voice_sim": v_sim, "method": method})
    return out
