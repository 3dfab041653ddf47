"""The packaged real models (models/packaged.py): registry and sha256 checks, faster-whisper on German and
French speech, clear errors for missing models, the VADER language gate, Silero VAD, and a two-batch run
on real corpus people (languages, blendshapes in frames and shards, speaker ids and splits)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from models import packaged
from models.av_sync import SHIPPED_SHA256
from storage_schemas import AUDIO_SAMPLE_RATE as SR

REPO = Path(__file__).resolve().parents[1]


def test_every_packaged_model_is_installed_verified_and_in_the_readme(tmp_path):
    readme = (REPO / "README.md").read_text()
    for name, p in packaged.PACKAGED.items():
        f = packaged.path(name)
        assert f.is_file() and packaged.sha256_of(f) == p.sha256
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row and p.sha256 in row and p.package in row and p.licence in row and p.config_key in row, name
    # a damaged copy is refused with the file named
    bad = tmp_path / "silero_vad.onnx"
    data = bytearray(packaged.path("silero-vad").read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"silero_vad.onnx has sha256 .* expected 1a153a22f4509e29"):
        packaged.check_sha256(bad, packaged.PACKAGED["silero-vad"].sha256, "silero")
    # the assembled Whisper model is rebuilt (and checked) where the store is empty
    import os

    os.environ["M2FD_PACKAGED"] = str(tmp_path / "store")
    try:
        w = packaged.path("whisper-base")
        assert w.is_relative_to(tmp_path) and packaged.sha256_of(w) == packaged.PACKAGED["whisper-base"].sha256
        assert {p.name for p in w.parent.iterdir()} == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    finally:
        del os.environ["M2FD_PACKAGED"]


def _corpus_audio(name: str, start_s: float, dur_s: float) -> np.ndarray:
    from extractors.media import decode_audio

    a = decode_audio(str(CORPUS / name))
    return a[int(start_s * SR): int((start_s + dur_s) * SR)]


@pytest.mark.parametrize("name,lang", [("mimictalk_german.mp4", "de"), ("dfrf_french.mp4", "fr")])
def test_faster_whisper_detects_the_language_and_times_the_words(name, lang):
    from extractors.transcribe import FasterWhisperTranscriber, make_transcriber

    tr = make_transcriber("base")
    assert isinstance(tr, FasterWhisperTranscriber) and tr.sha256 == packaged.PACKAGED["whisper-base"].sha256
    audio = _corpus_audio(name, 0.0, 8.0)
    out = tr(audio)
    assert out.language == lang and out.model_sha256 == tr.sha256 and out.engine.startswith("faster-whisper:")
    assert len(out.words) >= 8 and len(out.text.split()) >= 8, out.text
    starts = [w["start_s"] for w in out.words]
    assert starts == sorted(starts) and all(0 <= w["start_s"] <= w["end_s"] <= 8.05 for w in out.words)
    assert tr(audio).words == out.words  # deterministic


def test_transcription_stays_on_the_cpu_unless_asked_where_a_gpu_is_visible(monkeypatch):
    """On a GPU node whose CUDA the ctranslate2 wheel was not built for (the lent CUDA 13 machine), the
    old default (CUDA wherever a GPU is visible) failed; the default is now the CPU engine, whose
    transcripts are the same on every machine. Here a visible GPU is simulated for ctranslate2."""
    import ctranslate2

    from extractors.config import ExtractConfig
    from extractors.transcribe import FasterWhisperTranscriber, make_transcriber

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    with pytest.raises((RuntimeError, ValueError)):  # "auto" tries CUDA, which this build cannot run
        make_transcriber("base", device="auto")
    tr = make_transcriber("base", device=ExtractConfig().asr_device)
    assert isinstance(tr, FasterWhisperTranscriber) and tr.device == "cpu" and "cuda" not in tr.engine
    out = tr(_corpus_audio("mimictalk_german.mp4", 0.0, 4.0))
    assert out.language == "de" and len(out.words) >= 4
    with pytest.raises(ValueError, match="asr_device"):
        ExtractConfig.from_dict({"asr_device": "gpu"})


def test_asr_engine_torch_transcribes_with_the_packaged_weights_in_pytorch():
    """extract.asr_engine=torch (for GPUs ctranslate2 has no build for): the packaged Whisper base weights in
    openai-whisper's PyTorch model through the pipeline's engine interface, beam 5 as faster-whisper: the
    same language and nearly the same words on real German speech, named as its own engine; a config key
    added at its default leaves digests and part keys as they were."""
    import difflib

    from extractors.config import ExtractConfig
    from extractors.transcribe import WhisperTranscriber, make_transcriber

    cfg = ExtractConfig.from_dict({"asr_engine": "torch"})
    tr = make_transcriber("base", engine=cfg.asr_engine)
    assert isinstance(tr, WhisperTranscriber) and tr.sha256 == packaged.PACKAGED["whisper-base"].sha256
    assert tr.engine.startswith("whisper-torch:") and tr.sha256[:16] in tr.engine and "cuda" not in tr.engine
    audio = _corpus_audio("mimictalk_german.mp4", 0.0, 8.0)
    got, want = tr(audio), make_transcriber("base")(audio)
    assert got.language == want.language == "de" and got.engine == tr.engine and got.model_sha256 == tr.sha256
    starts = [w["start_s"] for w in got.words]
    assert len(got.words) >= 8 and starts == sorted(starts) and all(w["end_s"] <= 8.05 for w in got.words)
    assert difflib.SequenceMatcher(None, got.text.split(), want.text.split()).ratio() >= 0.7, (got.text, want.text)
    added_later = ("asr_engine", "mesh_pad_to", "sources_per_worker")  # each at the default that did what was done
    assert ExtractConfig().keyed() == {k: v for k, v in ExtractConfig().to_dict().items() if k not in added_later}
    assert ExtractConfig(mesh_pad_to=32).keyed()["mesh_pad_to"] == 32
    assert cfg.digest() != ExtractConfig().digest()
    with pytest.raises(ValueError, match="asr_engine"):
        ExtractConfig.from_dict({"asr_engine": "onnx"})


def test_the_packaged_whisper_weights_run_in_openai_whispers_pytorch_model():
    """models/whisper_ct2 loads the packaged CTranslate2 weights into openai-whisper's model (for PyTorch
    devices that ctranslate2 has no build for): greedy decoding of real German speech gives faster-whisper's
    language, text and word times (both in float32 on the CPU)."""
    import torch
    from faster_whisper import WhisperModel

    from models.whisper_ct2 import load_whisper_from_ct2, read_ct2

    ct2 = packaged.path("whisper-base")
    ct2 = ct2.parent if ct2.is_file() else ct2
    torch.set_num_threads(1)
    model = load_whisper_from_ct2(ct2)
    assert model.dims.n_text_layer == 6 and model.dims.n_vocab == 51865 and model.alignment_heads.to_dense().sum() == 8
    v = read_ct2(ct2)
    assert np.array_equal(model.decoder.token_embedding.weight.detach().numpy(), v["decoder/embeddings/weight"])
    audio = _corpus_audio("mimictalk_german.mp4", 0.0, 4.5).astype(np.float32)
    ours = model.transcribe(audio, temperature=0.0, beam_size=None, condition_on_previous_text=False,
                            word_timestamps=True, fp16=False, verbose=None)
    segs, info = WhisperModel(str(ct2), device="cpu", compute_type="float32", cpu_threads=1).transcribe(
        audio, beam_size=1, temperature=0.0, condition_on_previous_text=False, word_timestamps=True)
    segs = list(segs)
    assert ours["language"] == info.language == "de"
    assert ours["text"].strip() == " ".join(s.text.strip() for s in segs)
    w_ours = [(w["word"].strip(), w["start"], w["end"]) for s in ours["segments"] for w in s["words"]]
    w_fw = [(w.word.strip(), w.start, w.end) for s in segs for w in s.words]
    assert len(w_ours) >= 8 and [w[0] for w in w_ours] == [w[0] for w in w_fw]
    assert max(abs(a[1] - b[1]) + abs(a[2] - b[2]) for a, b in zip(w_ours, w_fw)) < 0.05


def test_whisper_repetition_loops_are_left_out_and_real_speech_is_untouched():
    """d12's clip (a voice over music) sends Whisper base into a loop ("My, my, my, ..."): the transcript
    keeps none of it and says how many seconds it left out. Real English speech comes out exactly as
    faster-whisper's own decoding without the token limit gives it."""
    import numpy as np

    from extractors.media import decode_audio
    from extractors.transcribe import MAX_COMPRESSION_RATIO, compression_ratio, make_transcriber, token_cap

    tr = make_transcriber("base")
    loop = decode_audio(str(REPO.parent / "shared" / "data" / "real" / "d12.mp4"))[: int(7.3 * SR)]
    out = tr(loop)
    assert out.text == "" and out.words == [] and out.language is None and out.rejected_s > 5, out
    segs, _ = tr.model.transcribe(loop, language="en", beam_size=5, temperature=0.0, condition_on_previous_text=False,
                                  vad_filter=False, max_new_tokens=token_cap(len(loop), 15.0))
    assert max(compression_ratio(s.text) for s in segs) > MAX_COMPRESSION_RATIO  # it really is a loop
    speech = _corpus_audio("edtalk_obama.mp4", 0.0, 8.0).astype(np.float32)
    got = tr(speech)
    segs, info = tr.model.transcribe(speech, beam_size=5, temperature=0.0, condition_on_previous_text=False,
                                     word_timestamps=True, vad_filter=False)
    segs = list(segs)
    assert got.rejected_s == 0 and got.language == info.language == "en"
    assert got.text == "".join(s.text for s in segs).strip() and len(got.words) >= 10
    assert [w["start_s"] for w in got.words] == [round(w.start, 3) for s in segs for w in s.words if w.word.strip()]


def test_packed_clips_get_their_own_words_text_and_rejected_seconds():
    """transcribe_clips on an engine whose segments are given: words go to the clip holding their
    midpoint with times from its start, a segment across a join is split by its words, a loop segment
    counts in the seconds each clip it overlaps left out, and a clip with no accepted speech has no
    language."""
    from extractors.transcribe import Segment, transcribe_clips

    class Engine:
        engine, sha256, max_compression_ratio = "fake", "ab", 2.4

        def __init__(self, segs):
            self.segs, self.seen = segs, []

        def decode(self, audio, language=None):
            self.seen.append(len(audio))
            return "en", self.segs

    loop = " my, my, my, my, my, my, my, my, my, my, my, my, my, my, my, my"
    eng = Engine([Segment(" Hello there.", 0.2, 1.0, [(" Hello", 0.2, 0.5), (" there.", 0.5, 1.0)]),
                  Segment(" Good morning", 1.8, 2.6, [(" Good", 1.8, 2.1), (" morning", 2.15, 2.6)]),  # join at 2 s
                  Segment(loop, 3.5, 5.5, [(" my,", 3.5, 3.7)])])
    a, b, c = (np.zeros(int(d * SR), np.float32) for d in (2.0, 1.5, 3.0))
    out = transcribe_clips(eng, [a, b, c])
    assert eng.seen == [int(6.5 * SR)]  # decoded once, back to back
    assert [t.text for t in out] == ["Hello there. Good", "morning", ""]
    assert [w["word"] for w in out[0].words] == ["Hello", "there.", "Good"]
    assert out[1].words == [{"word": "morning", "start_s": 0.15, "end_s": 0.6}]
    assert [t.rejected_s for t in out] == [0.0, 0.0, 2.0] and [t.language for t in out] == ["en", "en", None]
    assert transcribe_clips(eng, [a, b, c], language="de")[2].language == "de"
    assert [t.rejected_s for t in transcribe_clips(eng, [np.zeros(int(4.5 * SR), np.float32), c])] == [1.0, 1.0]
    assert transcribe_clips(eng, []) == []


def test_a_sources_clips_are_transcribed_in_one_pass_with_the_words_each_gets_alone():
    """Three clips of one real English source: decoded back to back they need one encoder window (three
    alone) and get the words they get decoded one by one, in the same order, to within a few words."""
    import difflib

    from extractors.transcribe import make_transcriber, transcribe_clips

    tr = make_transcriber("base")
    clips = [_corpus_audio("edtalk_obama.mp4", a, b - a) for a, b in ((0.0, 6.0), (6.5, 12.0), (13.0, 19.0))]
    calls = []
    encode = tr.model.encode
    tr.model.encode = lambda f: calls.append(1) or encode(f)
    try:
        alone = [tr(c) for c in clips]
        n_alone = len(calls)
        calls.clear()
        packed = transcribe_clips(tr, clips)
    finally:
        tr.model.encode = encode
    assert len(calls) < n_alone and len(calls) <= 3, (len(calls), n_alone)  # language + first window + a tail at most
    for p, a, c in zip(packed, alone, clips):
        assert p.language == a.language == "en" and p.rejected_s == 0
        assert all(0 <= w["start_s"] <= w["end_s"] <= len(c) / SR for w in p.words)
        pw, aw = [w["word"].lower().strip(".,!?") for w in p.words], [w["word"].lower().strip(".,!?") for w in a.words]
        assert len(aw) >= 8 and difflib.SequenceMatcher(None, pw, aw).ratio() >= 0.8, (p.text, a.text)
    assert transcribe_clips(tr, clips) == packed  # deterministic


def test_a_configured_model_that_is_missing_is_a_clear_error(tmp_path):
    from extractors.config import ExtractConfig
    from extractors.transcribe import resolve_whisper
    from pipelines.extract import clip_models

    with pytest.raises(FileNotFoundError, match="extract.whisper_checkpoint = .*nope/model"):
        resolve_whisper(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="no CTranslate2 model.bin"):
        resolve_whisper(str(tmp_path))
    for key, name in (("blendshape_model", "face-landmarker"), ("face_embedder", "sface"),
                      ("voice_embedder", "voice-encoder")):
        with pytest.raises(FileNotFoundError, match=f"extract.{key} = .*missing.bin.*no such file"):
            clip_models(ExtractConfig(**{key: str(tmp_path / "missing.bin")}))
    off = clip_models(ExtractConfig(blendshape_model="", face_embedder="", voice_embedder=""))
    assert off["blendshapes"] is off["face_embedder"] is off["voice_embedder"] is None and off["asr"] is not None


def test_vader_labels_english_and_says_why_not_for_other_languages():
    from extractors.labels.base import ClipContext
    from extractors.labels.prosody import VaderSentiment

    z = np.zeros(3)
    ctx = lambda lang, text: ClipContext("c", 1.0, np.zeros((3, 8, 8, 3), np.uint8), np.ones(3, bool), z, z, z, z,  # noqa: E731
                                         np.zeros((3, 4)), np.zeros(SR), {"language": lang, "text": text, "words": []})
    lab = VaderSentiment()
    en = {r.field: r.value for r in lab.label(ctx("en", "I love this wonderful day, it is great"))}
    assert en["sentiment"] == "positive" and en["sentiment_compound"] > 0.5
    de = {r.field: r.value for r in lab.label(ctx("de", "Ich liebe diesen wunderbaren Tag"))}
    assert de["sentiment"] is None and de["sentiment_compound"] is None
    assert de["sentiment_unavailable"] == "language de: VADER is English-only"


def _espeak(tmp_path: Path, text: str, voice: str) -> np.ndarray:
    from extractors.media import decode_audio

    wav = tmp_path / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True)
    return decode_audio(str(wav))


def test_silero_hears_speech_and_not_noise_or_tones(tmp_path):
    from extractors.vad import detect_speech_silero

    model = str(packaged.path("silero-vad"))
    speech = _espeak(tmp_path, "The quick brown fox jumps over the lazy dog, again and again.", "en-us")
    pad = np.zeros(SR, np.float32)
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    signals = {"speech": np.concatenate([pad, speech, pad]),
               "white noise": (0.1 * rng.standard_normal(3 * SR)).astype(np.float32),
               "tone": (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
               "silence": np.zeros(3 * SR, np.float32)}
    got = {k: detect_speech_silero(v, model) for k, v in signals.items()}
    sp = got["speech"]
    s_on = sp.on_grid(int(len(signals["speech"]) / SR * 30), 30)
    inner = s_on[30: 30 + int(len(speech) / SR * 30)]
    assert inner.mean() > 0.6 and s_on[:25].mean() < 0.1, (inner.mean(), s_on[:25].mean())
    for k in ("white noise", "tone", "silence"):
        assert got[k].speech.mean() < 0.05, (k, got[k].speech.mean())
    again = detect_speech_silero(signals["speech"], model)
    assert np.array_equal(again.speech, sp.speech)


def _ff(*a):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *a], check=True)


@pytest.mark.slow
def test_two_batches_of_real_people_get_languages_blendshapes_and_stable_speaker_ids(tmp_path):
    """Batch 1: part A of one person's video, a German and (for batch 2's new person) nothing else; batch 2
    adds part B of the same person (another time range, re-encoded as MPEG-4 at another size) and a French
    speaker. B joins A's speaker and split, committed speaker rows do not change, the three people get three
    ids, transcripts have the right languages and timed words, and blendshapes are in frames and samples."""
    from extractors.shards import decode_sample, iter_shard
    from pipelines.job import run_job
    from storage_schemas import open_dataset
    from storage_schemas.vocab import BLENDSHAPES

    src = tmp_path / "src"
    src.mkdir()
    person = CORPUS / "edtalk_pose_source2.mp4"
    a, b = src / "person_part_a.mp4", src / "person_part_b.mp4"
    _ff("-ss", "0", "-t", "5", "-i", str(person), "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac", str(a))
    _ff("-ss", "40", "-t", "5", "-i", str(person), "-vf", "scale=384:384", "-c:v", "mpeg4", "-q:v", "3", "-c:a", "aac", str(b))
    de, fr = src / "german.mp4", src / "french.mp4"
    _ff("-t", "5", "-i", str(CORPUS / "mimictalk_german.mp4"), "-c", "copy", str(de))
    _ff("-t", "5", "-i", str(CORPUS / "dfrf_french.mp4"), "-c", "copy", str(fr))
    out = tmp_path / "D"
    run_job([str(a), str(de)], out, executor="local", log=lambda m: None)
    ds = open_dataset(out)
    first = ds.table("speakers").to_pylist()
    run_job([str(a), str(de), str(b), str(fr)], out, executor="local", log=lambda m: None)
    ds = open_dataset(out)
    rows = ds.query("select s.*, regexp_extract(c.uri, '[^/]+$') video from speakers s join clips c using (clip_id) "
                    "order by clip_id").to_pylist()
    assert [r for r in ds.table("speakers").to_pylist() if r["clip_id"] in {f["clip_id"] for f in first}] == first
    by_video: dict[str, set] = {}
    for r in rows:
        by_video.setdefault(r["video"], set()).add((r["speaker_id"], r["split"]))
    assert set(by_video) == {"person_part_a.mp4", "person_part_b.mp4", "german.mp4", "french.mp4"}, by_video
    assert all(len(v) == 1 for v in by_video.values()), by_video  # one id per person's video
    assert by_video["person_part_b.mp4"] == by_video["person_part_a.mp4"]  # B joined A (same id, same split)
    ids = {v: next(iter(s))[0] for v, s in by_video.items()}
    assert len({ids["person_part_a.mp4"], ids["german.mp4"], ids["french.mp4"]}) == 3
    # clips.speaker_id (the clips view joins the speakers table) is each clip's speakers row
    view = ds.query("select count(c.speaker_id) n, count(*) filter (where c.speaker_id is distinct from s.speaker_id) bad "
                    "from clips c left join speakers s using (clip_id)").to_pylist()[0]
    assert view == {"n": len(rows), "bad": 0}, view
    joined = [r for r in rows if r["video"] == "person_part_b.mp4"]
    assert all(r["method"] == "face" and r["face_sim"] >= 0.6 for r in joined), joined
    langs = {r["video"]: r["language"] for r in ds.query(
        "select regexp_extract(c.uri, '[^/]+$') video, t.language, t.words from transcripts t join clips c "
        "using (clip_id)").to_pylist()}
    assert langs["german.mp4"] == "de" and langs["french.mp4"] == "fr" and langs["person_part_a.mp4"] == "en"
    words = ds.query("select min(len(words)) n from transcripts").to_pylist()[0]["n"]
    assert words >= 5
    bs = ds.query("select count(*) filter (where tracked) t, count(blendshapes) b, max(list_max(blendshapes)) hi, "
                  "min(list_min(blendshapes)) lo from frames").to_pylist()[0]
    assert bs["t"] > 0 and bs["b"] == bs["t"] and 0.0 <= bs["lo"] and bs["hi"] <= 1.0
    samples = ds.table("samples").to_pylist()
    assert {s["speaker_id"] for s in samples} == set(ids.values())
    for shard in sorted({s["shard"] for s in samples}):
        for key, members in iter_shard(out / shard):
            d = decode_sample(members)
            assert d["blendshapes"].shape == (d["meta"]["n_frames"], len(BLENDSHAPES))
            assert d["meta"]["speaker_id"] == next(s["speaker_id"] for s in samples if s["clip_id"] == key)
    card = json.loads((out / "dataset.json").read_text())
    used = card["lineage"]["checkpoints"]["extraction_models"]
    assert {k: v["sha256"] for k, v in used.items()} == {
        "asr": packaged.PACKAGED["whisper-base"].sha256, "blendshapes": packaged.PACKAGED["face-landmarker"].sha256,
        "face_embedder": packaged.PACKAGED["sface"].sha256, "voice_embedder": packaged.PACKAGED["voice-encoder"].sha256,
        "av_sync": SHIPPED_SHA256, "av_sync_encoder": packaged.PACKAGED["whisper-base"].sha256}
