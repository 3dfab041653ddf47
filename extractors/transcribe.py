"""Transcription: Whisper from a configured checkpoint (name or path), or pocketsphinx's bundled
English model where no Whisper weights exist on the machine. Every result names its engine."""
from __future__ import annotations

import hashlib
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


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_whisper(checkpoint: str | None) -> str | None:
    """A loadable Whisper checkpoint path for a name ('tiny', 'base', ...) or path, or None."""
    if not checkpoint:
        return None
    if os.path.isfile(checkpoint):
        return checkpoint
    root = os.environ.get("WHISPER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "whisper"))
    cand = Path(root) / f"{checkpoint}.pt"
    return str(cand) if cand.is_file() else None


class WhisperTranscriber:
    def __init__(self, checkpoint_path: str, device: str | None = None):
        import torch
        import whisper

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = whisper.load_model(checkpoint_path, device=self.device)
        self.engine = f"whisper:{_file_sha(checkpoint_path)}"

    def __call__(self, audio: np.ndarray, language: str | None = None) -> Transcript:
        res = self.model.transcribe(audio.astype(np.float32), language=language, word_timestamps=True,
                                    fp16=self.device == "cuda", temperature=0.0, condition_on_previous_text=False,
                                    verbose=None)
        words = [{"word": w["word"].strip(), "start_s": float(w["start"]), "end_s": float(w["end"])}
                 for seg in res.get("segments", []) for w in seg.get("words", []) or []]
        return Transcript(self.engine, res.get("language"), res.get("text", "").strip(), words)


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


def make_transcriber(whisper_checkpoint: str | None):
    path = resolve_whisper(whisper_checkpoint)
    return WhisperTranscriber(path) if path else SphinxTranscriber()


def clip_audio(audio: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    return audio[int(round(start_s * AUDIO_SAMPLE_RATE)): int(round(end_s * AUDIO_SAMPLE_RATE))]
