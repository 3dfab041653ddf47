"""Transcription. The default engine is faster-whisper (CTranslate2) with the packaged multilingual
Whisper base (models.packaged "whisper-base": language detection, segments, word timestamps; int8 on
CPU, float16 on CUDA; beam 5, temperature 0, a fixed thread count). openai-whisper ``.pt`` checkpoints
stay supported by path or by name in $WHISPER_CACHE; pocketsphinx's bundled English model is used only
where a configured *name* resolves to no weights at all. A configured path that does not exist is an
error. Every result names its engine and the model's sha256."""
from __future__ import annotations

import os
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


class FasterWhisperTranscriber:
    """faster-whisper on a CTranslate2 model folder: deterministic settings (beam 5, temperature 0 only,
    no conditioning on previous text, fixed CPU threads)."""

    def __init__(self, model_dir: str, device: str | None = None, threads: int = 1):
        from faster_whisper import WhisperModel

        if device is None:
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.device = device
        self.model = WhisperModel(model_dir, device=device, compute_type="float16" if device == "cuda" else "int8",
                                  cpu_threads=threads, num_workers=1, local_files_only=True)
        self.sha256 = transcriber_sha256(model_dir)
        self.engine = f"faster-whisper:{Path(model_dir).name}:{self.sha256[:16]}"

    def __call__(self, audio: np.ndarray, language: str | None = None) -> Transcript:
        segs, info = self.model.transcribe(audio.astype(np.float32), language=language, beam_size=5, temperature=0.0,
                                           condition_on_previous_text=False, word_timestamps=True, vad_filter=False)
        segs = list(segs)
        words = [{"word": w.word.strip(), "start_s": round(float(w.start), 3), "end_s": round(float(w.end), 3)}
                 for s in segs for w in (s.words or []) if w.word.strip()]
        text = "".join(s.text for s in segs).strip()
        return Transcript(self.engine, info.language if segs or info.language else None, text, words, self.sha256)


class WhisperTranscriber:
    def __init__(self, checkpoint_path: str, device: str | None = None):
        import torch
        import whisper

        from models.packaged import verified_sha256

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = whisper.load_model(checkpoint_path, device=self.device)
        self.sha256 = verified_sha256(checkpoint_path)
        self.engine = f"whisper:{self.sha256[:16]}"

    def __call__(self, audio: np.ndarray, language: str | None = None) -> Transcript:
        res = self.model.transcribe(audio.astype(np.float32), language=language, word_timestamps=True,
                                    fp16=self.device == "cuda", temperature=0.0, condition_on_previous_text=False,
                                    verbose=None)
        words = [{"word": w["word"].strip(), "start_s": float(w["start"]), "end_s": float(w["end"])}
                 for seg in res.get("segments", []) for w in seg.get("words", []) or []]
        return Transcript(self.engine, res.get("language"), res.get("text", "").strip(), words, self.sha256)


class SphinxTranscriber:
    """pocketsphinx 5 with its bundled US-English acoustic model, dictionary and language model."""

    def __init__(self):
        import pocketsphinx
        from pocketsphinx import Decoder

        self._dec = Decoder(loglevel="FATAL")
        self.engine = f"pocketsphinx:{getattr(pocketsphinx, '__version__', '5')}-en-us"

    def __call__(self, audio: np.ndarray, language: str | None = None) -> Transcript:
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
            words.append({"word": w.split("(")[0], "start_s": seg.start_frame / fr, "end_s": (seg.end_frame + 1) / fr})
        hyp = d.hyp()
        return Transcript(self.engine, "en", (hyp.hypstr if hyp else "").strip(), words)


_CACHE: dict = {}


def make_transcriber(whisper_checkpoint: str | None, threads: int = 1):
    """The engine for a configured checkpoint, one per process (loading Whisper takes about a second)."""
    key = (whisper_checkpoint, threads)
    if key not in _CACHE:
        r = resolve_whisper(whisper_checkpoint)
        if r is None:
            _CACHE[key] = SphinxTranscriber()
        elif r[0] == "ct2":
            _CACHE[key] = FasterWhisperTranscriber(r[1], threads=threads)
        else:
            _CACHE[key] = WhisperTranscriber(r[1])
    return _CACHE[key]


def clip_audio(audio: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    return audio[int(round(start_s * AUDIO_SAMPLE_RATE)): int(round(end_s * AUDIO_SAMPLE_RATE))]
