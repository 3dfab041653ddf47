"""Captions: the composer (the default) against caption-lm on the packaged SmolLM2-135M-Instruct, side by
side in one run on the same facts.

The facts: every emotion x intensity (21 label sets), style tags drawn in turn from the style labeler's
vocabulary, and real transcripts (packaged Whisper base on the first 8 s of seven shared corpus videos,
English, French and German). A caption is judged against its own facts:
  emotion named   it names the clip's emotion (its adjective or its name)
  wrong emotion   it names another emotion
  grounded words  share of its content words (4+ letters, not stop words) found in the facts it was given
                  (the composer's wording of them counts as found): invented content lowers it
  quoted          it repeats 6+ consecutive words of the transcript (a caption describes, it does not quote)
and the cost per caption (1 CPU thread).

    .venv/bin/python bench/bench_captions.py [--n 21]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from storage_schemas.vocab import EMOTIONS, INTENSITIES  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "corpus"
VIDEOS = ("edtalk_obama", "dfrf_french", "mimictalk_german", "smirk_skarsgard", "retalking_face1",
          "sadtalker_wda_katiehill", "dfrf_cnn2")
TAGS = (("fast speech", "loud voice", "animated head"), ("slow speech", "soft voice", "still head", "neutral face"),
        ("moderate pace", "varied intonation", "expressive face"), ("monotone", "normal volume"))
STOP = set("this that with their they them from have what about into while there here when which your very "
           "speaker speaks speaking caption video clip talking describe describes person says said write "
           "sentence facts possible".split())


def transcripts() -> list[dict]:
    from extractors.media import decode_audio
    from extractors.transcribe import make_transcriber

    tr = make_transcriber("base")
    out = []
    for v in VIDEOS:
        a = decode_audio(str(CORPUS / f"{v}.mp4"))[: 16000 * 8]
        t = tr(a)
        out.append({"language": t.language, "text": t.text, "words": t.words})
    return out


def contexts(n: int):
    from extractors.labels.base import ClipContext

    trs = transcripts()
    z = np.zeros(0)
    out = []
    for i, (emo, inten) in enumerate((e, k) for e in EMOTIONS for k in INTENSITIES):
        if i >= n:
            break
        labels = {"emotion": emo, "intensity": inten, "style_tags": list(TAGS[i % len(TAGS)])}
        out.append(ClipContext(f"c{i:02d}", 8.0, z, z, z, z, z, z, z, z, trs[i % len(trs)], labels))
    return out


def judge(caption: str, ctx, facts: str) -> dict:
    from extractors.labels.caption import _EMO_ADJ, compose

    low = caption.lower()
    names = {e: {e, _EMO_ADJ.get(e, e)} for e in EMOTIONS}
    said = {e for e, ws in names.items() if any(re.search(rf"\b{w}\b", low) for w in ws)}
    emo = ctx.labels["emotion"]
    known = set(re.findall(r"[a-zäöüß]+", (facts + " " + compose(ctx.labels)).lower()))
    words = [w for w in re.findall(r"[a-zäöüß]+", low) if len(w) >= 4 and w not in STOP]
    tr = (ctx.transcript or {}).get("text", "").lower().split()
    grams = {" ".join(tr[i:i + 6]) for i in range(max(0, len(tr) - 5))}
    return {"named": emo in said, "wrong": bool(said - {emo}),
            "grounded": (sum(w in known for w in words) / len(words)) if words else 1.0,
            "quoted": any(g and g in " ".join(low.split()) for g in grams)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=21)
    ap.add_argument("--show", type=int, default=4, help="captions printed per captioner")
    args = ap.parse_args()
    from extractors.labels.caption import ComposedCaption, LMCaption, lm_facts

    ctxs = contexts(args.n)
    t0 = time.perf_counter()
    lm = LMCaption("packaged")
    load_s = time.perf_counter() - t0
    comp = ComposedCaption()
    res = {}
    for name, fn in (("composer", lambda c: comp.label(c)[0].value), ("caption-lm (SmolLM2-135M)", lambda c: lm.caption(c)[0])):
        rows, secs, caps = [], 0.0, []
        for c in ctxs:
            t = time.perf_counter()
            cap = fn(c)
            secs += time.perf_counter() - t
            caps.append(cap)
            rows.append(judge(cap, c, lm_facts(c)))
        res[name] = (rows, secs / len(ctxs), caps)
    print(f"{len(ctxs)} label sets; caption-lm {lm.version}, loaded in {load_s:.1f} s\n")
    print("| | emotion named | wrong emotion | grounded words | quotes the transcript | ms per caption |")
    print("|---|---|---|---|---|---|")
    for name, (rows, per, _) in res.items():
        print(f"| {name} | {np.mean([r['named'] for r in rows]):.2f} | {np.mean([r['wrong'] for r in rows]):.2f} | "
              f"{np.mean([r['grounded'] for r in rows]):.2f} | {np.mean([r['quoted'] for r in rows]):.2f} | "
              f"{per * 1000:.0f} |")
    print()
    for name, (_, _, caps) in res.items():
        for c, cap in list(zip(ctxs, caps))[: args.show]:
            print(f"{name} [{c.labels['emotion']}/{c.labels['intensity']}]: {cap!r}")
    # the same caption twice: greedy decoding is deterministic
    again = lm.caption(ctxs[0])[0]
    print(f"\ncaption-lm deterministic on a repeat: {again == res['caption-lm (SmolLM2-135M)'][2][0]}")


if __name__ == "__main__":
    main()
