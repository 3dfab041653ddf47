"""Active-speaker detection (Light-ASD in ingest) on real footage, measured side by side in one run.

From the shared speaking videos (real d12, d14, s18 and the 17 corpus people) it makes, with ffmpeg:
  * real:      a <= 10 s excerpt with its own audio;
  * dubbed:    the same frames with the speech of the next person in the list (another person's voice);
  * still:     the excerpt's first frame held for the whole excerpt, with its own speech (a photo over
               narration: a face that does not speak);
  * composite: two people side by side (each scaled to the same height) with the speech of one of them,
               the speaker on the left and on the right in turn.
Each goes through the ingest stage's own `analyse` (extractors.ingest) with the default config, except
that no clip is dropped, so that every clip's speaking score is seen. Printed: the per-clip AUC of the
speaking score for real vs dubbed and real vs still, and of the old lip-sync proxy (Face Mesh, `--proxy`);
the share of real clips kept and of dubbed / still clips dropped at the default threshold; on composites,
the share of clip frames whose chosen face is the one speaking and the share of talking time that became a
clip; with ``--proxy`` also AV-sync, ASD-sync and their sum (clip_features.sync_score) in-sample and leave
one person out, and the sync-score gate (extract.min_sync_score) at the default and a few values: real clips
kept, dubbed dropped, and the right speaker's share of the composite clip frames the gate keeps (the
composites scored by the shipped models, and again by models fitted without their two people); the same
dubbing figures over every pair of people (each real clip's face under every other person's speech, from
the arrays already computed); the cost per scored frame.

    .venv/bin/python bench/bench_asd.py [--seconds 10] [--proxy] [--weights light-asd/pretrain_AVA_CVPR.model]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extractors.config import ExtractConfig, IngestConfig  # noqa: E402  (pure dataclasses)
from models.ridge_sync import context, zscore  # noqa: E402  (pure numpy)

SHARED = REPO.parent / "shared" / "data"


def ff(*a):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *a], check=True)


ENC = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "44100"]


def speaking_videos() -> list[Path]:
    vids = [SHARED / "real" / f"{n}.mp4" for n in ("d12", "d14", "s18")]
    return vids + sorted((SHARED / "corpus").glob("*.mp4"))


def make_cases(tmp: Path, secs: float) -> dict[str, list[tuple[str, Path, dict]]]:
    vids = speaking_videos()
    ex = []
    for v in vids:
        p = tmp / f"real_{v.stem}.mp4"
        ff("-i", str(v), "-t", str(secs), "-vf", "scale=-2:'min(720,ih)',fps=30", *ENC, str(p))
        ex.append(p)
    cases: dict[str, list] = {"real": [], "dubbed": [], "still": [], "composite": []}
    n = len(ex)
    for i, p in enumerate(ex):
        cases["real"].append((p.stem, p, {"video": p.stem[5:], "audio": p.stem[5:]}))
        o = ex[(i + 1) % n]
        d = tmp / f"dub_{p.stem[5:]}_{o.stem[5:]}.mp4"
        ff("-i", str(p), "-i", str(o), "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest", str(d))
        cases["dubbed"].append((d.stem, d, {"video": p.stem[5:], "audio": o.stem[5:]}))
        s = tmp / f"still_{p.stem[5:]}.mp4"
        ff("-i", str(p), "-filter_complex", "[0:v]trim=end_frame=1,loop=loop=-1:size=1,setpts=N/30/TB[v]",
           "-map", "[v]", "-map", "0:a", "-t", str(secs), *ENC, "-shortest", str(s))
        cases["still"].append((s.stem, s, {"video": p.stem[5:], "audio": p.stem[5:]}))
    for i in range(0, n - 1, 2):
        a, b = ex[i], ex[i + 1]
        left_speaks = (i // 2) % 2 == 0
        first, second = (a, b) if left_speaks else (b, a)
        c = tmp / f"comp_{a.stem[5:]}_{b.stem[5:]}.mp4"
        ff("-i", str(first), "-i", str(second), "-filter_complex",
           "[0:v]scale=-2:360,setsar=1[l];[1:v]scale=-2:360,setsar=1[r];[l][r]hstack=inputs=2[v]",
           "-map", "[v]", "-map", f"{0 if left_speaks else 1}:a", *ENC, "-shortest", str(c))
        cases["composite"].append((c.stem, c, {"speaker_left": left_speaks, "split_x": None, "first": first,
                                               "people": (a.stem[5:], b.stem[5:])}))
    return cases


def _dropped_at_keep(real, dubbed, keep: float) -> float:
    """Share of ``dubbed`` below the threshold that keeps ``keep`` of ``real`` (None values left out)."""
    r = np.asarray([x for x in real if x is not None], float)
    d = np.asarray([x for x in dubbed if x is not None], float)
    return float(np.mean(d < np.quantile(r, 1 - keep))) if r.size and d.size else float("nan")


def auc(pos, neg) -> float:
    """models.ridge_sync.auc with None values left out."""
    from models.ridge_sync import auc as pair_auc

    return pair_auc([x for x in pos if x is not None], [x for x in neg if x is not None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--weights", default=IngestConfig().asd_weights)
    ap.add_argument("--proxy", action="store_true", help="also run Face Mesh for the lip-sync proxy's AUC")
    ap.add_argument("--composites-only", action="store_true", help="only the composites (speaker choice)")
    ap.add_argument("--cost-only", action="store_true", help="only the model's cost per frame, CPU and CUDA "
                    "(needs torch and the weights only: runs on the lent GPU machine)")
    args = ap.parse_args()
    if args.cost_only:
        return cost(args.weights)
    from extractors.ingest import analyse
    from extractors.probe import sha256_file
    from models.asd_sync import resolve as resolve_sync
    from models.asd_sync import run_sync
    from pipelines.extract import _loaded_models
    from pipelines.ingest import config_scorer

    base = IngestConfig(asd_weights=args.weights)
    keep_all = dataclasses.replace(base, min_speaking_score=-1e9)
    scorer = config_scorer(base)
    asd = scorer.track
    thr = base.min_speaking_score
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cases = make_cases(tmp, args.seconds)
        scores: dict[str, list] = {k: [] for k in cases}
        proxy: dict[str, list] = {"real": [], "dubbed": []}
        sync: dict[str, list] = {"real": [], "dubbed": []}  # the shipped AV-sync model's scores
        both: dict[str, list] = {"real": [], "dubbed": []}  # AV-sync + the case's ASD-sync
        # (video person, audio person, [(visual, audio embeddings, speech states) per run])
        emb: dict[str, list] = {"real": [], "dubbed": []}
        arrays: dict[str, list] = {"real": [], "dubbed": []}  # (video person, audio person, speech states, blendshapes, mouth)
        asd_s, asd_frames = 0.0, 0
        asd_sync_of: dict[str, list] = {"real": [], "dubbed": [], "still": []}  # the case's ASD-sync (models/asd_sync.py)
        for kind in ("real", "dubbed", "still") if not args.composites_only else ():
            for name, p, info in cases[kind]:
                runs: list = []

                def rec(faces, mfcc, audio):  # scorer.track, keeping the run's arrays for the honest figures
                    logits, ve, ae = scorer.embed(faces, mfcc)
                    st = scorer.sync.speech_states(audio, len(ve))
                    sy = scorer.sync.signals(ve, st)
                    runs.append((len(logits), run_sync(*sy), ve, ae, st))
                    return logits, sy

                r = analyse(str(p), str(p), sha256_file(p), p.stat().st_size, keep_all, asd=rec)
                case_sync = _mean_sync([(n, v) for n, v, *_ in runs])
                asd_sync_of[kind].append(case_sync)
                who = (info["video"], info["audio"])  # the people (videos' stems) seen and heard: (v, a, ...) below
                if kind in emb:
                    emb[kind].append((*who, [(ve, ae, st) for _, _, ve, ae, st in runs]))
                asd_s += r["metrics"].get("asd_s", 0.0)
                asd_frames += r["metrics"].get("asd_frames", 0)
                got = [c["speaking_score"] for c in r["clips"]]
                scores[kind] += got
                reason = r["quarantine"][0]["reason"] if r["quarantine"] else ""
                print(f"{kind:9s} {name:40s} clips {len(got)} scores {[round(g, 2) for g in got]} {reason}", flush=True)
                if args.proxy and kind in proxy and r["clips"]:
                    from extractors.pose import mouth_opening

                    rec = _Recorded(_loaded_models(ExtractConfig())["av_sync"])
                    feats = _features(p, r, rec)
                    states = rec.states
                    proxy[kind] += [f.quality.get("lip_sync") for f in feats]
                    sync[kind] += [f.quality.get("av_sync") for f in feats]
                    both[kind] += [_sync_score(f, c) for f, c in zip(feats, r["clips"])]
                    arrays[kind] += [(*who, st, f.blendshapes, mouth_opening(f.geometry), len(emb[kind]) - 1)
                                     for f, st in zip(feats, states)]
        comp = {}
        comp_loo: list = []
        left = LeftOut(arrays, emb, scorer.sync.encoder)  # the sync models fitted without given people, each once
        comp_clips = []  # (right speaker?, frames, sync score) of the composites' clips with ASD-sync
        nosync = dataclasses.replace(base, asd_sync_model="")
        for label, cfg, sc in (("speaking logit only", nosync, config_scorer(nosync).track), ("with ASD-sync", base, asd)):
            right = wrong = talk = covered = 0
            for name, p, meta in cases["composite"]:
                r = analyse(str(p), str(p), sha256_file(p), p.stat().st_size, cfg, asd=sc)
                asd_s += r["metrics"].get("asd_s", 0.0)
                asd_frames += r["metrics"].get("asd_frames", 0)
                feats = _features(p, r) if args.proxy and label == "with ASD-sync" and r["clips"] else []
                for i, c in enumerate(r["clips"]):
                    ok = _right_speaker(c, p, meta)
                    right += c["n_frames"] * ok
                    wrong += c["n_frames"] * (not ok)
                    if feats:
                        comp_clips.append((ok, c["n_frames"], _sync_score(feats[i], c)))
                # talking time: the speech the VAD found on the composite's timeline
                talk += int(round((r["source"]["speech_s"] or 0) * 30))
                covered += sum(c["n_frames"] for c in r["clips"])
                q = r["quarantine"][0]["reason"] if r["quarantine"] else ""
                print(f"composite ({label}) {name:40s} clips "
                      f"{[(c['face_track_id'], c['n_frames'], round(c['speaking_score'], 2)) for c in r['clips']]} "
                      f"speaker {'left' if meta['speaker_left'] else 'right'} {q}", flush=True)
            comp[label] = (right, wrong, talk, covered)
        if args.proxy and arrays["real"]:
            comp_loo = composites_left_out(cases["composite"], base, scorer, left)
    real, dub, still = scores["real"], scores["dubbed"], scores["still"]
    kept = np.mean([s >= thr for s in real]) if real else float("nan")
    print()
    print(f"model {args.weights}, windows {base.asd_durations_s} s, threshold {thr}")
    print(f"clips: real {len(real)}, dubbed {len(dub)}, still {len(still)}")
    print(f"AUC speaking score, real vs dubbed: {auc(real, dub):.3f} (target >= 0.95)")
    print(f"AUC speaking score, real vs still:  {auc(real, still):.3f}")
    a_r, a_d = asd_sync_of["real"], asd_sync_of["dubbed"]
    print(f"AUC ASD-sync (shipped {resolve_sync(base.asd_sync_model).parent.name}, in-sample), real vs dubbed: "
          f"{auc(a_r, a_d):.3f}")
    if args.proxy:
        print(f"AUC lip-sync proxy, real vs dubbed: {auc(proxy['real'], proxy['dubbed']):.3f}")
        loo = av_sync_report(sync, arrays, ExtractConfig().min_av_sync, left)
        loo_sum = combined_report(loo, arrays, emb, left)
        print(f"AUC sync score (clip_features.sync_score = AV-sync + the clip's ASD-sync, both shipped, in-sample), "
              f"real vs dubbed: {auc(both['real'], both['dubbed']):.3f}; at the score that keeps 95% of real clips, "
              f"dubbed dropped {_dropped_at_keep(both['real'], both['dubbed'], 0.95):.1%}")
        sync_gate_report(loo_sum, both, comp_clips, ExtractConfig().min_sync_score, comp_loo)
        all_pairs_report(arrays, emb, ExtractConfig().min_sync_score, left)
    print(f"speaking-score gate (min_speaking_score {thr}): real clips kept {kept:.1%}, dubbed clips dropped "
          f"{np.mean([s < thr for s in dub]):.1%}, still clips dropped {np.mean([s < thr for s in still]):.1%} "
          f"(the dubbing targets, >= 95% kept and >= 90% dropped, are the sync-score gate's above)")
    for label, (right, wrong, talk, covered) in comp.items():
        tot = right + wrong
        print(f"composites, {label}: right speaker on {right / max(tot, 1):.1%} of clip frames ({right}/{tot}; "
              f"target >= 95%); clips cover {covered / max(talk, 1):.1%} of the speech frames")
    print(f"cost: {1000 * asd_s / max(asd_frames, 1):.1f} ms CPU per scored face frame (crops + model, "
          f"{base.asd_threads} thread), {asd_frames} frames")
    if _Recorded.frames:
        from models.av_sync import LAYER

        print(f"cost: AV-sync's speech encoder (Whisper-base blocks 0-{LAYER}, 1 thread) "
              f"{1000 * _Recorded.seconds / _Recorded.frames:.2f} ms CPU per clip frame, {_Recorded.frames} frames")


class LeftOut:
    """The AV-sync and ASD-sync models fitted on the real cases (``arrays``, ``emb`` of main) of everyone but
    the given people (the people of a case's video and audio, or of a composite), each set fitted once."""

    def __init__(self, arrays: dict, emb: dict, encoder=None):
        self.arrays, self.emb, self.encoder, self._models = arrays, emb, encoder, {}

    def av(self, people):
        from models.av_sync import AVSync, fit
        from pipelines.extract import _loaded_models

        key = ("av", frozenset(people))
        if key not in self._models:
            real = [(m, b, o) for v, _, m, b, o, _ in self.arrays["real"] if v not in key[1] and m is not None]
            self._models[key] = AVSync(fit(lambda: iter(real)), encoder=_loaded_models(ExtractConfig())["av_sync"].encoder)
        return self._models[key]

    def asd(self, people):
        from models.asd_sync import AsdSync, fit

        key = ("asd", frozenset(people))
        if key not in self._models:
            runs = [(ve, st) for v, _, rs in self.emb["real"] if v not in key[1] for ve, _, st in rs if st is not None]
            self._models[key] = AsdSync(fit(lambda: iter(runs)), encoder=self.encoder)
        return self._models[key]

    def asd_v1(self, people) -> np.ndarray:
        """ASD-sync's first version (Light-ASD's visual embedding from its own audio embedding, +-3 frames,
        ridge penalty 300), the baseline of the all-pairs figures."""
        key = ("asd_v1", frozenset(people))
        if key not in self._models:
            d = 128 * (2 * V1_CONTEXT + 1)
            xtx, xty = np.zeros((d, d)), np.zeros((d, 128))
            for v, _, rs in self.emb["real"]:
                for ve, ae, _ in rs if v not in key[1] else ():
                    x, y = _v1_input(ae).astype(np.float64), zscore(ve).astype(np.float64)
                    xtx += x.T @ x
                    xty += x.T @ y
            self._models[key] = np.linalg.solve(xtx + 300.0 * np.eye(d), xty).astype(np.float32)
        return self._models[key]


V1_CONTEXT = 3


def _v1_input(ae: np.ndarray) -> np.ndarray:
    return context(zscore(np.asarray(ae, np.float32)), V1_CONTEXT)


def _right_speaker(clip: dict, comp: Path, meta: dict) -> bool:
    """Whether a composite's clip is of the face on the side whose speech is heard."""
    return ((clip["face_box"][0] + clip["face_box"][2]) / 2 < _left_share(comp, meta["first"])) == meta["speaker_left"]


def av_sync_report(sync: dict, arrays: dict, thr: float, left: LeftOut) -> None:
    """AV-sync (models/av_sync.py) on the same real and dubbed clips: the shipped model (trained on these
    people, so in-sample) and, honestly, leave-one-person-out: each clip scored by a model fitted on the
    real clips of the people in neither its video nor its audio."""
    print(f"AUC AV-sync (shipped model; trained on these people), real vs dubbed: "
          f"{auc(sync['real'], sync['dubbed']):.3f}")
    loo: dict[str, list] = {"real": [], "dubbed": []}
    for kind in loo:
        for vid, aud, st, bs, mo, _ in arrays[kind]:
            loo[kind].append(left.av((vid, aud)).score(st, bs, mo))
    real = [s for s in loo["real"] if s is not None]
    dub = [s for s in loo["dubbed"] if s is not None]
    print(f"AUC AV-sync, leave-one-person-out, real vs dubbed: {auc(real, dub):.3f} ({len(real)} real, {len(dub)} "
          f"dubbed clips with a score)")
    if real and dub:
        keep95 = float(np.quantile(real, 0.05))  # the threshold that keeps 95% of the real clips
        print(f"AV-sync gate (leave-one-person-out): default min_av_sync {thr} drops {np.mean([s < thr for s in dub]):.1%} "
              f"of dubbed, keeps {np.mean([s >= thr for s in real]):.1%} of real; at {keep95:.3f} (keeps 95% of real) "
              f"it drops {np.mean([s < keep95 for s in dub]):.1%} of dubbed")
    return loo


def sync_gate_report(loo: dict, shipped: dict, comp: list, default: float, comp_loo: list = ()) -> None:
    """The sync-score gate (extract.min_sync_score) at the default, at the leave-one-person-out threshold that
    keeps 95% of real clips, and at a few round values: real clips kept and dubbed clips dropped (leave one
    person out, and with the shipped models), and on composites the right speaker's share of the clip
    frames the gate keeps (composite scores by the shipped models)."""
    r = [x for x in loo["real"] if x is not None]
    if not r:
        return
    keep95 = float(np.quantile(r, 0.05))
    print(f"sync-score gate: the leave-one-person-out threshold keeping 95% of real clips is {keep95:.3f}; "
          f"default extract.min_sync_score {default}")
    for t in sorted({default, 0.0, 0.1, 0.2, 0.25, 0.3, round(keep95, 3)}):
        def share(xs, below):
            xs = [x for x in xs if x is not None]
            return np.mean([(x < t) == below for x in xs]) if xs else float("nan")
        def kept_right(clips):
            passed = [(ok, n) for ok, n, sy in clips if sy is None or sy >= t]
            n_kept, n_right = sum(n for _, n in passed), sum(n for ok, n in passed if ok)
            return f"{n_right / max(n_kept, 1):.1%} of kept clip frames ({n_right}/{n_kept} of {sum(n for _, n, _ in clips)})"
        print(f"  min_sync_score {t:6.3f}: leave-one-person-out real kept {share(loo['real'], False):.1%}, dubbed dropped "
              f"{share(loo['dubbed'], True):.1%}; shipped models real kept {share(shipped['real'], False):.1%}, dubbed "
              f"dropped {share(shipped['dubbed'], True):.1%}; composites right speaker on {kept_right(comp)} (shipped)"
              + (f", {kept_right(comp_loo)} (leave the two people out)" if comp_loo else ""))


def composites_left_out(composites: list, cfg, scorer, left: LeftOut) -> list:
    """The composites again with both sync models fitted without the composite's two people (ASD-sync for
    the speaker choice and the clip's ASD-sync, AV-sync in extraction): honest figures for the choice and
    the gate on people the models never saw. -> [(right speaker?, frames, sync score)] per clip."""
    import copy

    from extractors.ingest import analyse
    from extractors.probe import sha256_file

    out = []
    right = total = 0
    for name, p, meta in composites:
        sc = copy.copy(scorer)
        sc.sync = left.asd(meta["people"])
        r = analyse(str(p), str(p), sha256_file(p), p.stat().st_size, cfg, asd=sc.track)
        feats = _features(p, r, left.av(meta["people"])) if r["clips"] else []
        for f, c in zip(feats, r["clips"]):
            ok = _right_speaker(c, p, meta)
            out.append((ok, c["n_frames"], _sync_score(f, c)))
            right += c["n_frames"] * ok
            total += c["n_frames"]
        print(f"composite (leave the two people out) {name:40s} clips "
              f"{[(c['face_track_id'], c['n_frames'], c.get('asd_sync')) for c in r['clips']]}", flush=True)
    print(f"composites, with ASD-sync fitted without the two people: right speaker on {right / max(total, 1):.1%} "
          f"of clip frames ({right}/{total}) before the sync-score gate")
    return out


def _features(p: Path, r: dict, av_sync=None) -> list:
    """Extraction of ``analyse``'s clips of ``p`` (Face Mesh, blendshapes, AV-sync: the shipped model unless
    ``av_sync`` is given), as the extract stage does."""
    from extractors.extract import extract_source
    from pipelines.extract import _loaded_models

    s = r["source"]
    m = _loaded_models(ExtractConfig())
    return extract_source(str(p), s["width"], s["height"], r["clips"], ExtractConfig(), blendshaper=m["blendshaper"],
                          av_sync=m["av_sync"] if av_sync is None else av_sync)


class _Recorded:
    """An AV-sync model for extract_source that also keeps each clip's speech states (for the leave-people-out
    models and the pairs) and times the encoder (class totals: the cost line)."""
    seconds, frames = 0.0, 0

    def __init__(self, model):
        self.model, self.states = model, []

    def score_clip(self, audio, blendshapes, mouth_open):
        import time

        t = time.perf_counter()
        st = self.model.encoder.states(audio, len(blendshapes))
        _Recorded.seconds += time.perf_counter() - t
        _Recorded.frames += len(blendshapes)
        self.states.append(st)
        return self.model.score(st, blendshapes, mouth_open)


def _sync_score(f, clip: dict) -> float | None:
    """clip_features.sync_score of an extracted clip."""
    from extractors.records import sync_score

    return sync_score(f.quality.get("av_sync"), clip.get("asd_sync"))


def _mean_sync(runs) -> float | None:
    """Frame-weighted mean of (frames, sync) over a case's runs with a score."""
    ok = [(n, v) for n, v in runs if v is not None and np.isfinite(v)]
    return sum(n * v for n, v in ok) / sum(n for n, _ in ok) if ok else None


def combined_report(loo: dict, arrays: dict, emb: dict, left: LeftOut) -> dict:
    """ASD-sync (models/asd_sync.py) leave-one-person-out on the same cases (each scored by a model fitted on
    the real cases' embeddings of the people in neither its video nor its audio), alone and summed with
    AV-sync's leave-one-person-out score of each clip: the honest figures of the two together. Returns those
    sums, {"real": [...], "dubbed": [...]} (None where a clip has no score)."""
    from models.asd_sync import run_sync

    case: dict[str, list] = {"real": [], "dubbed": []}
    for kind in case:
        for vid, aud, runs in emb[kind]:
            model = left.asd((vid, aud))
            case[kind].append(_mean_sync([(len(ve), run_sync(*model.signals(ve, st))) for ve, _, st in runs]))
    print(f"AUC ASD-sync, leave-one-person-out, real vs dubbed: {auc(case['real'], case['dubbed']):.3f}")
    both = {k: [None if s is None or case[k][a[5]] is None else s + case[k][a[5]] for s, a in zip(loo[k], arrays[k])]
            for k in case}
    print(f"AUC AV-sync + ASD-sync, leave-one-person-out, real vs dubbed: {auc(both['real'], both['dubbed']):.3f}; "
          f"at the sum that keeps 95% of real clips, dubbed dropped {_dropped_at_keep(both['real'], both['dubbed'], 0.95):.1%}")
    return both


def all_pairs_report(arrays: dict, emb: dict, default: float, left: LeftOut) -> None:
    """The dubbing figures over every pair of people instead of one dub per video: each real clip's face
    under each other person's real speech, put together from the arrays already computed (AV-sync: the
    face clip's blendshapes with the speech clip's speech states; ASD-sync: the face case's visual
    embeddings with the speech case's runs' speech states; ASD-sync v1, side by side: with its Light-ASD
    audio embeddings, Light-ASD's two encoders being separate), each pair scored by models fitted on the
    people in neither. About 20 x 19 dubbed pairs against the 19 dubbed files above: one case moves those
    figures by ~5 points. Also: for one person's speech, how often that person's face scores above
    another's (the choice among two faces)."""
    from extractors.records import sync_score
    from models.asd_sync import run_sync

    def pair(face, speech):
        fv, _, _, bs, mo, fi = face
        sv, _, st, _, _, si = speech
        av, asd, w1 = left.av((fv, sv)), left.asd((fv, sv)), left.asd_v1((fv, sv))
        n = min(len(st), len(bs)) if st is not None else 0
        a = av.score(st[:n], bs[:n], mo[:n]) if n else None
        runs = [(min(len(ve), len(ae)), ve, ae, ss) for (ve, _, _), (_, ae, ss) in zip(emb["real"][fi][2],
                                                                                        emb["real"][si][2])]
        b = _mean_sync([(k, run_sync(*asd.signals(ve[:k], None if ss is None else ss[:k]))) for k, ve, _, ss in runs if k])
        b1 = _mean_sync([(k, run_sync(zscore(_v1_input(ae[:k]) @ w1), zscore(ve[:k]))) for k, ve, ae, _ in runs if k])
        return a, b, sync_score(a, b), b1, sync_score(a, b1)

    people = [c[0] for c in arrays["real"]]
    real = [pair(c, c) for c in arrays["real"]]
    ij = [(i, j) for i in range(len(people)) for j in range(len(people)) if people[j] != people[i]]
    dub = [pair(arrays["real"][i], arrays["real"][j]) for i, j in ij]
    print(f"all pairs (each real clip's face under every other person's speech, leave the two people out): "
          f"{len(real)} real, {len(dub)} dubbed pairs")
    for k, name in enumerate(("AV-sync", "ASD-sync", "sum (sync_score)", "ASD-sync v1 (Light-ASD audio embedding)",
                              "AV-sync + ASD-sync v1")):
        r, d = [x[k] for x in real], [x[k] for x in dub]
        print(f"  {name:40s} AUC {auc(r, d):.3f}; at the score keeping 95% of real clips, dubbed dropped "
              f"{_dropped_at_keep(r, d, 0.95):.1%}")
    for k, name in ((1, "ASD-sync"), (3, "ASD-sync v1")):  # the same speech: its own face against another's
        right = [real[j][k] > dub[p][k] for p, (i, j) in enumerate(ij) if real[j][k] is not None and dub[p][k] is not None]
        print(f"  {name}: of two faces under one person's speech, the speaker's own scores higher in "
              f"{np.mean(right):.1%} of {len(right)} pairs")
    r = [x[2] for x in real if x[2] is not None]
    d = [x[2] for x in dub if x[2] is not None]
    if r and d:
        print(f"  min_sync_score {default}: real kept {np.mean([x >= default for x in r]):.1%}, dubbed dropped "
              f"{np.mean([x < default for x in d]):.1%} (targets >= 95% / >= 90%)")


def cost(weights: str) -> None:
    """Model cost per 25 fps face frame on synthetic inputs of the real shapes: one track window by window
    (what ingest does, 1 CPU thread), and on CUDA where present also a batch of 64 windows of 4 s."""
    import time

    import torch

    from models.light_asd import load, resolve, score_track

    model, sha = load(resolve(weights))
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 255, (500, 112, 112), dtype=np.uint8)
    mfcc = rng.normal(0, 10, (2000, 13)).astype(np.float32)
    torch.set_num_threads(1)
    per = {}
    for name, folded in (("batch norms folded, channels-last (what load() gives)", model._folded),
                         ("unfolded 2-D path", None)):
        model._folded = folded
        score_track(model, faces[:100], mfcc[:400], (4,))
        t = time.perf_counter()
        score_track(model, faces, mfcc, (4,))
        per[name] = (time.perf_counter() - t) / len(faces)
        print(f"cost: CPU (1 thread) {1000 * per[name]:.2f} ms per face frame, {name}; one track of {len(faces)} "
              f"frames, 4 s windows")
    a, b = per.values()
    print(f"folded / unfolded time: {a / b:.2f}")
    model.fold()
    cpu = a
    if torch.cuda.is_available():
        m = model.cuda()
        f = torch.from_numpy(faces[:100]).cuda()[None].repeat(64, 1, 1, 1)
        a = torch.from_numpy(mfcc[:400]).cuda()[None].repeat(64, 1, 1)
        with torch.no_grad():
            for _ in range(3):
                m(f, a)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                m(f, a)
            torch.cuda.synchronize()
        gpu_b = (time.perf_counter() - t) / (10 * 64 * 100)
        m.cpu()
        print(f"cost: CUDA ({torch.cuda.get_device_name(0)}) batched 64 x 4 s windows: {1000 * gpu_b:.4f} ms per "
              f"face frame; CPU 1 thread / CUDA batched = {cpu / gpu_b:.0f}x")


def _left_share(comp: Path, first: Path) -> float:
    """Fraction of the composite's width taken by the left video (both scaled to 360 px high)."""
    def size(p):
        out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height",
                              "-of", "csv=p=0", str(p)], capture_output=True, text=True, check=True).stdout
        w, h = (int(x) for x in out.strip().split(",")[:2])
        return w, h
    lw, lh = size(first)
    cw, _ = size(comp)
    return (round(lw * 360 / lh / 2) * 2) / cw


if __name__ == "__main__":
    main()
