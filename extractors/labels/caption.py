"""Captions: a deterministic composer over the measured labels (the default), and a captioner that
loads a local causal language model checkpoint through transformers (configured by path)."""
from __future__ import annotations

import hashlib
import os

from .base import ClipContext, LabelRow, Labeler, register

_EMO_ADJ = {"angry": "angry", "disgust": "disgusted", "fear": "fearful", "happy": "happy", "sad": "sad",
            "surprise": "surprised", "neutral": "calm"}
_INTENSITY = {"low": "slightly", "medium": "", "high": "clearly"}


def compose(labels: dict) -> str:
    """One natural sentence from the label values; missing labels are left out, never invented."""
    emo, inten = labels.get("emotion"), labels.get("intensity")
    tags = labels.get("style_tags") or []
    if emo:
        adv = _INTENSITY.get(inten or "", "")
        subject = f"A {adv + ' ' if adv else ''}{_EMO_ADJ.get(emo, emo)} speaker"
    else:
        subject = "A speaker"
    parts = []
    pace = next((t for t in tags if t.endswith("speech") or t == "moderate pace"), None)
    if pace:
        parts.append({"fast speech": "talks fast", "slow speech": "talks slowly"}.get(pace, "talks at a moderate pace"))
    else:
        parts.append("talks")
    vol = next((t for t in tags if t.endswith("voice") or t == "normal volume"), None)
    if vol:
        parts[-1] += {"loud voice": " in a loud voice", "soft voice": " in a soft voice"}.get(vol, "")
    into = next((t for t in tags if t in ("varied intonation", "monotone")), None)
    if into:
        parts[-1] += " with varied intonation" if into == "varied intonation" else " in a monotone"
    extras = []
    head = next((t for t in tags if "head" in t), None)
    if head:
        extras.append({"animated head": "moving their head a lot", "still head": "keeping their head still"}.get(
            head, "with some head movement"))
    face = next((t for t in tags if "face" in t), None)
    if face:
        extras.append({"expressive face": "with an expressive face", "neutral face": "with little facial movement"}.get(
            face, "with moderate facial movement"))
    s = subject + " " + parts[0]
    if extras:
        s += ", " + " and ".join(extras)
    sent = labels.get("sentiment")
    if sent in ("positive", "negative"):
        s += f"; what they say sounds {sent}"
    return s + "."


@register
class ComposedCaption(Labeler):
    name = "caption-composer"
    version = "1"
    inputs = ("emotion", "intensity", "style_tags", "sentiment")
    outputs = ("caption",)

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        have = [k for k in ("emotion", "intensity", "style_tags") if k in ctx.labels]
        return [self.row(ctx, "caption", compose(ctx.labels), len(have) / 3)]


@register
class LMCaption(Labeler):
    """Greedy continuation of a prompt built from the measured labels, by a local causal LM
    checkpoint (a folder with config.json, weights and tokenizer files; nothing is downloaded)."""

    name = "caption-lm"
    inputs = ("emotion", "intensity", "style_tags")
    outputs = ("caption",)

    def __init__(self, checkpoint: str | None = None, max_new_tokens: int = 32):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ckpt = checkpoint or os.environ.get("M2FD_CAPTIONER")
        if not ckpt or not os.path.isdir(ckpt):
            raise FileNotFoundError(f"captioner checkpoint folder not found: {ckpt!r} (set labeler option "
                                    f"checkpoint=PATH or M2FD_CAPTIONER)")
        self.tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).eval()
        h = hashlib.sha256()
        for fn in sorted(os.listdir(ckpt)):
            if fn.endswith((".safetensors", ".bin", ".json")):
                with open(os.path.join(ckpt, fn), "rb") as f:
                    h.update(f.read())
        self.version = f"{os.path.basename(os.path.normpath(ckpt))}@{h.hexdigest()[:12]}"
        self.max_new_tokens = max_new_tokens
        self._torch = torch

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        prompt = ("Describe the speaker. Facts: " + compose(ctx.labels) + " Caption:")
        enc = self.tok(prompt, return_tensors="pt")
        with self._torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                                      output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, enc["input_ids"].shape[1]:]
        text = self.tok.decode(new, skip_special_tokens=True).strip()
        probs = [float(self._torch.softmax(s[0], -1).max()) for s in out.scores] or [0.0]
        return [self.row(ctx, "caption", text, sum(probs) / len(probs))]
