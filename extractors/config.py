"""Ingest configuration with the embedded defaults. Pure data; no I/O."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IngestConfig:
    # discovery
    extensions: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".flv")
    # probing / decoding
    video_codecs: tuple[str, ...] = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mjpeg", "prores")
    analysis_max_side: int = 640  # frames are decoded at most this large for face detection
    truncated_ratio: float = 0.9  # decoded/declared duration below this = truncated
    # face detection and tracking
    detect_fps: float = 10.0  # face detection rate on the 30 fps grid (every 3rd frame)
    face_model: int = 1  # MediaPipe face detection: 0 short range (<2 m), 1 full range (<5 m)
    face_min_score: float = 0.5
    # which face detector runs it: "mediapipe" (MediaPipe's CPU graph), "torch" (the same full-range network
    # in PyTorch, extractors.mesh_torch.TorchFaceDetector: on CUDA where the cluster has a GPU, an analysis
    # task then asks a share of it; boxes within a few % IoU of MediaPipe's) or "auto" (torch where the
    # cluster has a GPU, else mediapipe). The engine that ran is in the ingest parts' names.
    detector: str = "mediapipe"
    min_face_px: int = 64  # minimum speaker face width in display pixels
    other_face_ratio: float = 0.4  # a second face this large relative to the speaker blocks the frame
    track_iou: float = 0.3
    track_max_gap_s: float = 0.5
    min_face_ratio: float = 0.9  # fraction of a clip's analysed frames with the speaker visible
    # active-speaker detection (Light-ASD): which face speaks, and whether the clip's face speaks at all.
    # A relative path is looked up under $M2FD_MODELS (default: ../shared/models beside the repository);
    # empty = off (the largest face is the speaker; a comparable second face blocks the frame).
    asd_weights: str = "light-asd/pretrain_AVA_CVPR.model"
    asd_durations_s: tuple[int, ...] = (4,)  # window lengths (s) scored and averaged (the original demo: 1-6 s)
    asd_threads: int = 1  # torch threads per worker: fixed, so scores do not depend on the machine
    # where Light-ASD runs: "cpu" (the same scores on every machine), "cuda" (an analysis task then asks a
    # share of a GPU: 10 ms a face frame on one core against 0.015 on an H200; float scores differ in the
    # last digits, and the lineage names the device) or "auto" (CUDA where the cluster has a GPU)
    asd_device: str = "cpu"
    min_speaking_score: float = -2.5  # clips whose mean speaking logit is below this: not_speaking (bench_asd)
    asd_margin: float = 1.0  # among comparable faces, the speaker must lead the next by this logit
    # which of several comparable faces says what is heard (models/asd_sync.py, on Light-ASD's visual
    # embedding): "shipped" (models/assets/asd-sync-v2), a weights file, or "" (off: the speaking logit alone
    # decides). Where two or more comparable faces each have a sync score over +-asd_sync_window_s around a
    # frame, the one leading the next by asd_sync_margin is the speaker; where none leads, the logit rule
    # above decides. Each clip's ASD-sync is clips.asd_sync (a part of extract's sync score).
    asd_sync_model: str = "shipped"
    # its speech view's encoder: "packaged" (the Whisper-base CTranslate2 model) or such a folder (sha256 checked)
    asd_sync_encoder: str = "packaged"
    asd_sync_window_s: float = 5.0
    asd_sync_margin: float = 0.05
    # voice activity detection: "gmm" (the packaged GMM detector with the level/flatness/modulation gates
    # below) or "silero" (Silero VAD, vad_model: "packaged" or a path to its .onnx; vad_threshold on its
    # probability). gmm stays the default: Silero is the better detector on clean speech (bench_models:
    # F1 0.91 vs 0.78) but hears almost no speech in voice-over-music videos such as the bundled demo's.
    vad: str = "gmm"
    vad_model: str = "packaged"
    vad_threshold: float = 0.5
    vad_mode: int = 2  # aggressiveness of the packaged WebRTC-style GMM voice detector (0-3)
    vad_min_dbfs: float = -45.0  # quieter 30 ms frames are never speech
    vad_max_flatness: float = 0.3  # spectral flatness above this is noise, not voice
    vad_min_modulation_db: float = 1.5  # level std over 0.5 s; steady sounds fall below it
    silence_dbfs: float = -60.0  # whole track below this (95th pct frame level) = silent
    vad_min_speech_s: float = 0.15
    vad_max_pause_s: float = 1.0  # pauses shorter than this stay inside a talking span
    min_speech_ratio: float = 0.4  # fraction of a clip that must be speech
    # clip cutting
    min_clip_s: float = 2.0
    max_clip_s: float = 20.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IngestConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown ingest config keys: {sorted(unknown)}; known: {sorted(known)}")
        kw = {}
        for k, v in d.items():
            default = known[k].default
            if isinstance(default, tuple):
                v = tuple(v)
            elif isinstance(default, bool):
                v = bool(v)
            elif isinstance(default, int):
                v = int(v)
            elif isinstance(default, float):
                v = float(v)
            kw[k] = v
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def check(self) -> None:
        if not 0 < self.min_clip_s <= self.max_clip_s:
            raise ValueError(f"need 0 < min_clip_s <= max_clip_s, got {self.min_clip_s}, {self.max_clip_s}")
        if not 0 < self.detect_fps <= 30:
            raise ValueError(f"detect_fps must be in (0, 30], got {self.detect_fps}")
        if self.asd_weights and not self.asd_durations_s:
            raise ValueError("asd_durations_s needs at least one window length")
        if self.asd_sync_window_s < 1.0:
            raise ValueError(f"ingest.asd_sync_window_s must be >= 1 s, got {self.asd_sync_window_s}")
        if self.asd_device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"ingest.asd_device must be auto, cpu or cuda, got {self.asd_device!r}")
        if self.vad not in ("gmm", "silero"):
            raise ValueError(f"vad must be gmm or silero, got {self.vad!r}")
        if self.face_model not in (0, 1):
            raise ValueError("face_model must be 0 or 1")
        if self.detector not in ("mediapipe", "torch", "auto"):
            raise ValueError(f"ingest.detector must be mediapipe, torch or auto, got {self.detector!r}")
        if self.detector != "mediapipe" and self.face_model != 1:
            raise ValueError("ingest.detector=torch/auto runs the full-range model only: set face_model=1")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(_keyed(self.to_dict()), sort_keys=True).encode()).hexdigest()[:12]


# keys added after datasets were made, with the default that does what was done before them: left out of
# digests and part keys at that default, so a dataset's parts stay valid across the upgrade
_ADDED_LATER = {"detector": "mediapipe", "asr_engine": "ctranslate2", "mesh_pad_to": 0, "sources_per_worker": 1}
_NONE = object()


def _keyed(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if _ADDED_LATER.get(k, _NONE) != v}


@dataclass(frozen=True)
class ExtractConfig:
    mesh_max_side: int = 1280  # frames for Face Mesh are decoded at most this large ...
    mesh_min_face_px: int = 128  # ... unless the speaker's face would then be narrower than this (up to full size)
    # a speaker face narrower than this fraction of the frame's longer side is meshed in an upscaled window
    # of mesh_window_scale x its box (Face Mesh's own detector misses small faces in a whole frame)
    mesh_window_below: float = 0.15
    mesh_window_scale: float = 3.0
    # Face Mesh engine: "mediapipe" (MediaPipe's CPU graph, frame by frame), "torch" (the same networks in
    # PyTorch, batched: extractors.mesh_torch; on CUDA where the task has a GPU, else on the CPU) or "auto"
    # (torch where the extraction task gets a GPU, mediapipe elsewhere). The engine a part was made with is
    # recorded in the extraction lineage (landmarkers).
    landmarker: str = "auto"
    # frames per batch of the torch engine (per clip, from its first frame); 0 = 32 on the CPU, 256 on CUDA
    mesh_batch: int = 0
    # torch engine tracking: MediaPipe's frame-to-frame chain, cut every mesh_chain frames into pieces
    # tracked in parallel, each piece's chain started mesh_warmup frames earlier (extractors.mesh_torch);
    # mesh_chain 0: mesh_passes passes over each batch instead (1 = every frame cropped at its detection)
    mesh_chain: int = 8
    mesh_warmup: int = 2
    mesh_passes: int = 3
    # on CUDA, cut the torch engine's crops with one torch.compile'd kernel (extractors.mesh_torch.warp_crops
    # fused=True): landmarks 1.9x at batch 4,096 on an H100, the same accuracy, but 10-20 s of compilation
    # per worker and no gain measured on the whole extraction (bench/RESULTS.md); the CPU never uses it
    mesh_fused_warp: bool = False
    # extraction tasks sharing one GPU (each asks 1/this of it); 0 = the stage's declared share, an eighth
    # (pipelines/stages.py: 8 measured best for the GPU alone). A node with more than 8 cores per GPU
    # leaves cores idle unless this is raised, since the tasks also transcribe and embed on their CPU
    tasks_per_gpu: int = 0
    # torch engine: its networks run on calls of exactly this many crops (the last call padded), so a clip's
    # landmarks do not depend on how its frames were batched with other clips', and on CUDA each network
    # keeps one captured graph. 0 = on CUDA one chain step of a batch (mesh batch / mesh_chain crops: 2.1x
    # the whole extraction of unpadded calls, 16 workers on an H100, bench/RESULTS.md), on the CPU each
    # batch's own size. sources_per_worker > 1 needs it set
    mesh_pad_to: int = 0
    # torch engine: sources one extraction worker runs at once, in threads sharing one tracker whose chain
    # steps run every source's chains in one network call (extractors.mesh_torch.SharedTracker: many small
    # clips fill a GPU as one large batch does; on Ray a threaded actor per worker). Scheduling only: the
    # results are the same as one source per worker with the same mesh_pad_to
    sources_per_worker: int = 1
    # video decoding for extraction: "cpu" (decord), "nvdec" (NVIDIA's decoder into GPU memory, for the torch
    # landmarker on CUDA; an error where it cannot run) or "auto" (nvdec where it can run: the torch landmarker
    # on CUDA, PyNvVideoCodec installed, an H.264/HEVC/AV1/VP9 source at a constant frame rate without rotation;
    # else cpu)
    decoder: str = "auto"
    crop_size: int = 64  # face crops for the GNPFA image encoders (square, RGB); a chosen checkpoint's size wins
    crop_expand: float = 1.3  # crop side = this x the landmark box's larger side
    conf_resid_scale: float = 0.03  # landmark_conf = exp(-(stable-point rms off the clip neutral / this)^2), IOD
    # "base" = the packaged multilingual Whisper base on faster-whisper (models.packaged); a CTranslate2 model
    # folder or an openai-whisper .pt path; another name = <name>.pt in $WHISPER_CACHE, else pocketsphinx
    whisper_checkpoint: str | None = "base"
    asr_threads: int = 1  # CTranslate2 CPU threads per worker (fixed: the same transcript on every machine)
    # "cpu" (the same transcripts on every machine), "cuda" (faster on a GPU node; float16 transcripts differ
    # in places and the engine string says so) or "auto" (CUDA where a GPU is visible)
    asr_device: str = "cpu"
    # which runtime decodes: "ctranslate2" (faster-whisper) or "torch" (openai-whisper's PyTorch model on the
    # same packaged weights, models.whisper_ct2: for GPUs whose CUDA the ctranslate2 wheel was not built for,
    # such as CUDA 13 nodes; beam 5 as faster-whisper; the engine string says "whisper-torch")
    asr_engine: str = "ctranslate2"
    # decoded tokens per second of audio at most (real speech: <= 5.1; 0 = Whisper's 448 per 30 s window), and
    # the gzip compression ratio above which a decoded segment is a repetition loop and left out (Whisper's 2.4)
    asr_max_tokens_per_s: float = 15.0
    asr_max_compression_ratio: float = 2.4
    # per-clip models ("packaged" = models.packaged's verified file, a path, or "" = off)
    # face_landmarker.task: its face_blendshapes.tflite and geometry pipeline on our landmarks
    # (frames.blendshapes, frames.face_transform)
    blendshape_model: str = "packaged"
    face_embedder: str = "packaged"  # SFace (.onnx): clip_features.face_embedding
    voice_embedder: str = "packaged"  # Resemblyzer's pretrained.pt: clip_features.voice_embedding
    keyframe_px: int = 256  # the middle frame's face crop kept for the shards' keyframe.jpg (resized to its size)
    identity_frames: int = 6  # frames per clip (evenly spaced, where tracked) averaged into the face embedding
    # quality thresholds: clips below them are dropped with a reason
    min_tracked_ratio: float = 0.9
    min_landmark_conf: float = 0.5
    max_jitter: float = 0.05
    min_lip_sync: float = -1.0  # off by default; the proxy is reported per clip
    # audio-visual synchronisation (models/av_sync.py): "shipped" (models/assets/av-sync-v2), a weights file,
    # or "" (off); clip_features.av_sync. Clips scoring below min_av_sync are dropped as poor_av_sync.
    av_sync_model: str = "shipped"
    # its speech encoder: "packaged" (the Whisper-base CTranslate2 model) or such a folder; its model.bin must
    # be the one the weights were fitted with (sha256 checked)
    av_sync_encoder: str = "packaged"
    min_av_sync: float = -1.0  # off by default (see bench/RESULTS.md: the score is reported per clip)
    # clip_features.sync_score = av_sync + the clip's ASD-sync (ingest): clips below min_sync_score are dropped
    # as poor_sync (dubbing, voice-over, the wrong one of two talking faces). 0.27: bench/bench_asd.py's
    # leave-one-person-out threshold keeping 95% of real clips (0.271) rounded down; -2 turns it off
    min_sync_score: float = 0.27
    # GNPFA: "shipped" (models/assets/gnpfa-v1, the same latent space for every dataset), "bootstrap" (train
    # one on this run's meshes: a private latent space) or a checkpoint folder (model.safetensors + config.json).
    # A dataset whose shards were committed with a shipped or bootstrap GNPFA keeps its own copy of it.
    gnpfa_checkpoint: str | None = "shipped"
    # the bootstrap's architecture and budget (the shipped and provided checkpoints carry their own)
    gnpfa_z_dim: int = 32
    gnpfa_hidden: int = 256
    gnpfa_enc_width: int = 16
    gnpfa_geometry_steps: int = 600
    gnpfa_image_steps: int = 300
    gnpfa_train_threads: int = 2  # fixed so bootstrap weights are reproducible across machines
    # a bootstrap trains on at most about this many tracked frames: a seeded per-clip sample, read source by
    # source (about 24 KB a frame at 64 px crops: 20,000 frames ~0.5 GB, whatever the dataset's size)
    gnpfa_bootstrap_max_frames: int = 20_000
    device: str = "auto"  # auto | cpu | cuda

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractConfig":
        cfg = cls(**_checked_keys(cls, d, "extract"))
        if cfg.landmarker not in ("auto", "mediapipe", "torch"):
            raise ValueError(f"extract.landmarker must be auto, mediapipe or torch, got {cfg.landmarker!r}")
        if cfg.decoder not in ("auto", "cpu", "nvdec"):
            raise ValueError(f"extract.decoder must be auto, cpu or nvdec, got {cfg.decoder!r}")
        if cfg.mesh_batch < 0 or cfg.mesh_passes < 1 or cfg.tasks_per_gpu < 0 or cfg.mesh_chain < 0 or \
                cfg.mesh_warmup < 0 or cfg.mesh_pad_to < 0 or cfg.sources_per_worker < 1:
            raise ValueError("extract.mesh_batch, mesh_chain, mesh_warmup, mesh_pad_to and tasks_per_gpu must be >= 0, "
                             "extract.mesh_passes and sources_per_worker >= 1")
        if cfg.sources_per_worker > 1 and not cfg.mesh_pad_to:
            raise ValueError("extract.sources_per_worker > 1 shares one tracker between sources: set extract.mesh_pad_to "
                             "(e.g. 256) so each source's landmarks do not depend on which sources shared its batches")
        if cfg.sources_per_worker > 1 and cfg.landmarker == "mediapipe":
            raise ValueError("extract.sources_per_worker > 1 shares the torch landmarker: set landmarker=torch or auto")
        for key in ("device", "asr_device"):
            if getattr(cfg, key) not in ("auto", "cpu", "cuda"):
                raise ValueError(f"extract.{key} must be auto, cpu or cuda, got {getattr(cfg, key)!r}")
        if cfg.asr_engine not in ("ctranslate2", "torch"):
            raise ValueError(f"extract.asr_engine must be ctranslate2 or torch, got {cfg.asr_engine!r}")
        return cfg

    def mesh_batch_for(self, cuda: bool) -> int:
        """Frames per torch Face Mesh batch on this device (mesh_batch, or its default)."""
        return self.mesh_batch or (256 if cuda else 32)

    def mesh_pad_for(self, cuda: bool) -> int | None:
        """Crops per torch Face Mesh network call on this device (mesh_pad_to, or its default; None: each
        call the size of its batch's step)."""
        if self.mesh_pad_to:
            return self.mesh_pad_to
        return -(-self.mesh_batch_for(True) // self.mesh_chain) if cuda and self.mesh_chain else None

    def keyed(self) -> dict[str, Any]:
        """to_dict() less the keys added after datasets were made while at the default that does what was
        done before them (what digests and part keys hash, so existing parts stay valid)."""
        return _keyed(self.to_dict())

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.keyed(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ShardConfig:
    max_shard_bytes: int = 256 * 1024 * 1024  # shards are closed before they pass this size
    include_landmarks: bool = False  # add <key>.landmarks.npy (float16, n x 478 x 3) to samples
    train_fraction: float = 0.8  # of speakers, by a hash of the founding clip's source; val gets val_fraction,
    val_fraction: float = 0.1  # test the rest (a speaker's clips all go where its first clip went)
    # speaker identity (extractors.identity.SpeakerRule): a clip joins a speaker whose face centroid is at
    # least this cosine-similar; voice decides only for clips without a face embedding
    speaker_face_threshold: float = 0.6
    speaker_voice_threshold: float = 0.85
    keyframe_size: int = 224

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardConfig":
        return cls(**_checked_keys(cls, d, "shard"))


def _checked_keys(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}; known: {sorted(known)}")
    return d


_SECTIONS = {"ingest": IngestConfig, "extract": ExtractConfig, "shard": ShardConfig}


@dataclass(frozen=True)
class RunConfig:
    """The job's one config object: its ingest, extract and shard sections. Loaded once per run (the CLI
    and the Dagster resource both call ``load``) and passed down; every stage reads its own section."""

    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    shard: ShardConfig = dataclasses.field(default_factory=ShardConfig)

    @classmethod
    def load(cls, *docs: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> "RunConfig":
        """The embedded defaults, then each document's sections key by key, then ``overrides``
        (KEY=VALUE with a YAML value; KEY may be prefixed `ingest.` / `extract.` / `shard.`, and an
        unprefixed key goes to the one section that has it). Raises ValueError naming what is wrong."""
        import yaml

        sections: dict[str, dict] = {name: {} for name in _SECTIONS}
        fields = {name: {f.name for f in dataclasses.fields(c)} for name, c in _SECTIONS.items()}
        for doc in docs:
            doc = doc or {}
            if not isinstance(doc, dict):
                raise ValueError(f"a config document is a mapping of sections {sorted(_SECTIONS)}, got {type(doc).__name__}")
            unknown = set(doc) - set(sections)
            if unknown:
                raise ValueError(f"config sections must be among {sorted(sections)}, got {sorted(unknown)}")
            for k in sections:
                sections[k].update(doc.get(k) or {})
        for ov in overrides:
            if "=" not in ov:
                raise ValueError(f"--set expects KEY=VALUE, got {ov!r}")
            k, v = ov.split("=", 1)
            sec, _, key = k.strip().rpartition(".")
            if not sec:
                owners = [n for n, fs in fields.items() if key in fs]
                sec = owners[0] if len(owners) == 1 else "ingest"  # unknown keys are reported by ingest
            if sec not in sections:
                raise ValueError(f"unknown config section {sec!r}")
            sections[sec][key] = yaml.safe_load(v)
        try:
            return cls(**{name: c.from_dict(sections[name]) for name, c in _SECTIONS.items()})
        except TypeError as e:  # a value of the wrong kind for a field
            raise ValueError(str(e)) from e

    def to_dict(self) -> dict[str, dict]:
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}
