"""Transcription. The default engine is faster-whisper (CTranslate2) with the packaged multilingual
Whisper base (models.packaged "whisper-base": language detection, segments, word timestamps; int8 on
CPU, float16 on CUDA; beam 5, temperature 0, a fixed thread count; at most ``max_tokens_per_s`` decoded
tokens per second of audio, and segments whose text is a repetition loop are left out, their seconds
counted in ``rejected_s``). The clips of one source are decoded together (``transcribe_clips``).
openai-whisper ``.pt`` checkpoints stay supported by path or by name in $WHISPER_CACHE; pocketsphinx's
bundled English model is used only where a configured *name* resolves to no weights at all. A
configured path that does not exist is an error. Every result names its engine and the model's sha256."""
from __future__ import annotations

import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage_schemas import AUDIO_SAMPLE_RATE


@dataclass
class Transcript:
    engine: str
    language: str | None
    text: str
    words: list[dict]  # {"word", "start_s", "end_s"}
    model_sha256: str | None = None
    rejected_s: float | None = 0.0  # seconds of decoded segments left out as repetition loops (None: no check)


@dataclass
class Segment:
    """One decoded segment: its text, times (s from the start of the audio decoded) and words, each word's
    text as decoded (with its leading space, so that joining them gives the text back)."""
    text: str
    start_s: float
    end_s: float
    words: list[tuple[str, float, float]]


# Real speech of the shared corpus (17 videos, 5 languages) decodes to at most 5.1 Whisper tokens per
# second and a gzip compression ratio of at most 1.7 per segment; Whisper's decoder stuck in a loop
# (music, some short clips) emits up to 448 tokens of "my, my, my, ..." per 30 s window, ratio 6-26.
MAX_TOKENS_PER_S = 15.0
MAX_COMPRESSION_RATIO = 2.4  # Whisper's own threshold for a failed decode


def compression_ratio(text: str) -> float:
    b = text.encode("utf-8")
    return len(b) / len(zlib.compress(b)) if b else 0.0


def token_cap(n_samples: int, per_s: float, model_max: int = 440) -> int | None:
    """Decoded tokens allowed per 30 s window for audio of ``n_samples`` (None: the model's own 448)."""
    if not per_s:
        return None
    return int(min(model_max, max(16, math.ceil(min(n_samples / AUDIO_SAMPLE_RATE, 30.0) * per_s))))


def transcribe_clips(engine, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
    """One Transcript per clip, the clips (16 kHz mono, in time order, of one source) decoded in one pass.

    Whisper encodes a 30 s window at a time however short the audio (about 1.3 s of one CPU core for
    Whisper base), and a clip decoded alone takes at least one window: a source's clips are decoded back
    to back as one recording instead, so they share windows and one language detection. Each word goes
    to the clip holding its midpoint, its times counted from that clip's start; a segment lying in one
    clip gives that clip its text, one spanning a join gives each clip its own words' text. Segments
    left out as repetition loops count in ``rejected_s`` of the clips they overlap. A clip's transcript
    so depends on the source's other clips decoded with it (the same ones on every run of a config).
    ``engine.decode(audio, language) -> (language, [Segment])``; ``engine.max_compression_ratio``: the
    loop check (absent: none, rejected_s None)."""
    if not audios:
        return []
    lengths = [len(a) for a in audios]
    packed = (audios[0] if len(audios) == 1 else np.concatenate(audios)).astype(np.float32)
    lang, segs = engine.decode(packed, language)
    limit = getattr(engine, "max_compression_ratio", None)
    joins = np.cumsum(lengths)[:-1] / AUDIO_SAMPLE_RATE  # where each clip after the first starts

    def clip_of(t: float) -> int:
        return int(np.searchsorted(joins, t, side="right"))

    starts = np.concatenate([[0.0], joins])
    ends = np.concatenate([joins, [np.inf]])
    text: list[list[str]] = [[] for _ in audios]
    words: list[list[dict]] = [[] for _ in audios]
    rejected = [0.0] * len(audios)
    for seg in segs:
        first, last = clip_of(seg.start_s), clip_of(max(seg.start_s, seg.end_s - 1e-3))
        if limit is not None and compression_ratio(seg.text) > limit:
            for i in range(first, last + 1):
                lo, hi = (starts[i] if i else -np.inf), ends[i]
                rejected[i] += max(0.0, min(seg.end_s, hi) - max(seg.start_s, lo))
            continue
        own = [clip_of((a + b) / 2) for _, a, b in seg.words]
        if first == last and all(k == first for k in own):
            text[first].append(seg.text)
        else:
            for i in sorted(set(own)):
                text[i].append("".join(w for (w, _, _), k in zip(seg.words, own) if k == i))
        for (w, a, b), k in zip(seg.words, own):
            if w.strip():
                dur = lengths[k] / AUDIO_SAMPLE_RATE
                words[k].append({"word": w.strip(), "start_s": round(min(max(a - starts[k], 0.0), dur), 3),
                                 "end_s": round(min(max(b - starts[k], 0.0), dur), 3)})
    out = []
    for i in range(len(audios)):
        t = "".join(text[i]).strip()
        # the language of audio with no accepted speech is not known (unless the caller said it)
        out.append(Transcript(engine.engine, language or (lang if t or words[i] else None), t, words[i],
                              getattr(engine, "sha256", None), round(rejected[i], 3) if limit is not None else None))
    return out


def resolve_whisper(checkpoint: str | None) -> tuple[str, str] | None:
    """(kind, path) for a configured checkpoint, kind "ct2" (a CTranslate2 model folder) or "pt" (an
    openai-whisper checkpoint); None where a *name* resolves to nothing on this machine.

    Order: an existing path (a folder with model.bin = ct2, a file = pt); "base" or "packaged" = the
    packaged faster-whisper base (sha256 verified); other names look for <name>.pt in $WHISPER_CACHE
    (default ~/.cache/whisper). A value that looks like a path but does not exist raises."""
    if not checkpoint:
        return None
    p = Path(checkpoint).expanduser()
    if p.is_dir():
        if not (p / "model.bin").is_file():
            raise FileNotFoundError(f"extract.whisper_checkpoint = {checkpoint!r}: folder has no CTranslate2 model.bin")
        return "ct2", str(p)
    if p.is_file():
        return "pt", str(p)
    if os.sep in checkpoint or checkpoint.endswith((".pt", ".bin")):
        raise FileNotFoundError(f"extract.whisper_checkpoint = {checkpoint!r}: no such file or folder")
    if checkpoint in ("base", "packaged"):
        from models.packaged import path

        return "ct2", str(path("whisper-base").parent)
    root = os.environ.get("WHISPER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "whisper"))
    cand = Path(root) / f"{checkpoint}.pt"
    return ("pt", str(cand)) if cand.is_file() else None


def transcriber_sha256(checkpoint: str | None) -> str | None:
    """sha256 of the weights a configured checkpoint resolves to (None: pocketsphinx)."""
    from models.packaged import verified_sha256

    r = resolve_whisper(checkpoint)
    if r is None:
        return None
    kind, path = r
    return verified_sha256(os.path.join(path, "model.bin") if kind == "ct2" else path)


class _Engine:
    """What the engines share: ``engine(audio, language) -> Transcript`` for one clip; each engine defines
    ``decode(audio, language) -> (language, [Segment])`` (transcribe_clips decodes several clips at once)."""

    def __call__(self, audio: np.ndarray, language: str | None = None) -> Transcript:
        return transcribe_clips(self, [audio], language)[0]


class FasterWhisperTranscriber(_Engine):
    """faster-whisper on a CTranslate2 model folder: deterministic settings (beam 5, temperature 0 only,
    no conditioning on previous text, fixed CPU threads). The encoder runs once per 30 s window: the
    language detection's encoder output is reused by the decoding (faster-whisper 1.2.1 encodes the first
    window twice)."""

    def __init__(self, model_dir: str, device: str | None = None, threads: int = 1,
                 max_tokens_per_s: float = MAX_TOKENS_PER_S, max_compression_ratio: float = MAX_COMPRESSION_RATIO):
        from faster_whisper import WhisperModel

        if device is None:
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.device = device
        self.model = WhisperModel(model_dir, device=device, compute_type="float16" if device == "cuda" else "int8",
                                  cpu_threads=threads, num_workers=1, local_files_only=True)
        self.sha256 = transcriber_sha256(model_dir)
        self.engine = f"faster-whisper:{Path(model_dir).name}:{self.sha256[:16]}" + (":cuda-float16" if device == "cuda" else "")
        self.max_tokens_per_s, self.max_compression_ratio = max_tokens_per_s, max_compression_ratio
        self._encoded: dict = {}
        encode = self.model.encode

        def encode_once(features: np.ndarray):
            a = np.ascontiguousarray(features, np.float32)
            key = (a.shape, hashlib.sha256(a.tobytes()).hexdigest())
            if key not in self._encoded:
                self._encoded.clear()
                self._encoded[key] = encode(features)
            return self._encoded[key]

        self.model.encode = encode_once

    def detect_language(self, audio: np.ndarray) -> str | None:
        """The most probable language of the first 30 s window, from the very window (and so the encoder
        output) the decoding then starts from."""
        from faster_whisper.audio import pad_or_trim

        if not self.model.model.is_multilingual:
            return "en"
        fe = self.model.feature_extractor
        feats = fe(audio)
        n = min(fe.nb_max_frames, feats.shape[-1] - 1)  # faster-whisper's content frames of the first window
        if n <= 0:
            return None
        probs = self.model.model.detect_language(self.model.encode(pad_or_trim(feats[:, :n])))[0]
        return probs[0][0][2:-2]  # "<|de|>" -> "de"

    def decode(self, audio: np.ndarray, language: str | None = None) -> tuple[str | None, list[Segment]]:
        audio = audio.astype(np.float32)
        try:
            lang = language or self.detect_language(audio)
            segs, _ = self.model.transcribe(audio, language=lang, beam_size=5, temperature=0.0,
                                            condition_on_previous_text=False, word_timestamps=True, vad_filter=False,
                                            max_new_tokens=token_cap(len(audio), self.max_tokens_per_s))
            segs = list(segs)
        finally:
            self._encoded.clear()
        return lang, [Segment(s.text, float(s.start), float(s.end), [(w.word, float(w.start), float(w.end))
                                                                     for w in (s.words or [])]) for s in segs]


class WhisperTranscriber(_Engine):
    """openai-whisper's PyTorch model: an openai-whisper ``.pt`` checkpoint (greedy decoding), or a
    CTranslate2 model folder's weights loaded into it (models.whisper_ct2; asr_engine=torch: beam 5 as
    faster-whisper decodes, engine "whisper-torch:<folder>:<sha16>"), float16 on CUDA."""

    def __init__(self, checkpoint_path: str, device: str | None = None, max_tokens_per_s: float = MAX_TOKENS_PER_S,
                 max_compression_ratio: float = MAX_COMPRESSION_RATIO):
        import torch

        from models.packaged import verified_sha256

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = ":cuda-fp16" if self.device == "cuda" else ""
        if Path(checkpoint_path).is_dir():
            from models.whisper_ct2 import load_whisper_from_ct2

            self.model = load_whisper_from_ct2(checkpoint_path, device=self.device)
            self.sha256 = transcriber_sha256(checkpoint_path)
            self.engine = f"whisper-torch:{Path(checkpoint_path).name}:{self.sha256[:16]}{cuda}"
            self.beam_size: int | None = 5
        else:
            from whisper.model import ModelDimensions, Whisper

            # read here with weights_only (no pickle code runs), not through whisper.load_model's own torch.load
            ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            self.model = Whisper(ModelDimensions(**ckpt["dims"]))
            self.model.load_state_dict(ckpt["model_state_dict"])
            self.model = self.model.to(self.device)
            self.sha256 = verified_sha256(checkpoint_path)
            self.engine = f"whisper:{self.sha256[:16]}{cuda}"
            self.beam_size = None
        self.max_tokens_per_s, self.max_compression_ratio = max_tokens_per_s, max_compression_ratio

    def decode(self, audio: np.ndarray, language: str | None = None) -> tuple[str | None, list[Segment]]:
        cap = token_cap(len(audio), self.max_tokens_per_s)
        res = self.model.transcribe(audio.astype(np.float32), language=language, word_timestamps=True,
                                    fp16=self.device == "cuda", temperature=0.0, condition_on_previous_text=False,
                                    verbose=None, **({"sample_len": cap} if cap else {}),
                                    **({"beam_size": self.beam_size} if self.beam_size else {}))
        return res.get("language"), [Segment(seg.get("text", ""), float(seg["start"]), float(seg["end"]),
                                             [(w["word"], float(w["start"]), float(w["end"]))
                                              for w in seg.get("words", []) or []])
                                     for seg in res.get("segments", [])]


class SphinxTranscriber(_Engine):
    """pocketsphinx 5 with its bundled US-English acoustic model, dictionary and language model."""

    def __init__(self):
        import pocketsphinx
        from pocketsphinx import Decoder

        self._dec = Decoder(loglevel="FATAL")
        self.engine = f"pocketsphinx:{getattr(pocketsphinx, '__version__', '5')}-en-us"

    def decode(self, audio: np.ndarray, language: str | None = None) -> tuple[str | None, list[Segment]]:
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        d = self._dec
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        fr = 100.0  # frames per second of the decoder
        words = []
        for seg in d.seg():
            w = seg.word
            if w.startswith("<") or w.startswith("[") or w in ("<s>", "</s>", "<sil>"):
                continue
            words.append((" " + w.split("(")[0], seg.start_frame / fr, (seg.end_frame + 1) / fr))
        hyp = d.hyp()
        text = (hyp.hypstr if hyp else "").strip()
        if not text and not words:
            return "en", []
        # one segment for the utterance: its words carry the times (the hypothesis text has no times)
        return "en", [Segment(" " + text, words[0][1] if words else 0.0, words[-1][2] if words else 0.0, words)]


_PROCESS: dict = {}


def make_transcriber(whisper_checkpoint: str | None, threads: int = 1, max_tokens_per_s: float = MAX_TOKENS_PER_S,
                     max_compression_ratio: float = MAX_COMPRESSION_RATIO, device: str = "cpu",
                     engine: str = "ctranslate2", cache: dict | None = None):
    """The engine for a configured checkpoint, one per process (loading Whisper takes about a second).
    ``device``: "cpu" (the default: the same transcripts on every machine, and no CUDA library is loaded,
    so a node whose CUDA the wheel was not built for still transcribes), "cuda", or "auto" (CUDA where a
    GPU is visible); a GPU engine names its device in the engine string (its transcripts differ in places).
    ``engine``: "ctranslate2" (faster-whisper) or "torch" (a CTranslate2 folder's weights in openai-whisper's
    PyTorch model, on any device PyTorch runs on); an openai-whisper .pt runs in PyTorch either way.
    ``cache``: where the engine is kept (default: this process's; a thread that must not share one passes its own)."""
    key = ("transcriber", whisper_checkpoint, threads, max_tokens_per_s, max_compression_ratio, device, engine)
    store = _PROCESS if cache is None else cache
    if key not in store:
        r = resolve_whisper(whisper_checkpoint)
        limits = {"max_tokens_per_s": max_tokens_per_s, "max_compression_ratio": max_compression_ratio}
        if r is None:
            store[key] = SphinxTranscriber()
        elif r[0] == "ct2" and engine == "ctranslate2":
            store[key] = FasterWhisperTranscriber(r[1], device=None if device == "auto" else device, threads=threads,
                                                  **limits)
        else:
            store[key] = WhisperTranscriber(r[1], device=None if device == "auto" else device, **limits)
    return store[key]


def clip_audio(audio: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    return audio[int(round(start_s * AUDIO_SAMPLE_RATE)): int(round(end_s * AUDIO_SAMPLE_RATE))]
