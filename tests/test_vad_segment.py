import subprocess

import numpy as np

from extractors.media import decode_audio
from extractors.segment import split_span, talking_spans
from extractors.vad import close_gaps, detect_speech, drop_short, runs

SR = 16000


def test_run_helpers():
    m = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1], bool)
    assert runs(m) == [(1, 3), (5, 6), (7, 10)]
    assert runs(close_gaps(m, 2)) == [(1, 3), (5, 10)]
    assert runs(drop_short(m, 2)) == [(1, 3), (7, 10)]


def test_long_spans_are_split_not_dropped():
    pieces = split_span(0, 50 * 30, 20 * 30)
    assert len(pieces) == 3 and pieces[0][0] == 0 and pieces[-1][1] == 1500
    assert all(b - a <= 600 for a, b in pieces) and all(a2 == b1 for (_, b1), (a2, _) in zip(pieces, pieces[1:]))
    face = np.ones(1500, bool)
    speech = np.ones(1500, bool)
    spans, _ = talking_spans(face, speech, 30, 2.0, 20.0, 1.0, 0.5, 0.4)
    assert sum(b - a for a, b in spans) == 1500


def test_short_pauses_stay_inside_long_gaps_split():
    speech = np.zeros(900, bool)
    speech[0:200] = speech[215:400] = True  # 0.5 s pause -> one span
    speech[600:900] = True  # 6.7 s gap -> a new span
    spans, _ = talking_spans(np.ones(900, bool), speech, 30, 2.0, 20.0, 1.0, 0.5, 0.4)
    assert spans == [(0, 400), (600, 900)]


def _espeak(tmp_path, text, speed=160):
    wav = tmp_path / "s.wav"
    subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(wav), text], check=True)
    return decode_audio(str(wav))


def test_vad_finds_speech_and_rejects_noise_and_tones(tmp_path):
    speech = _espeak(tmp_path, "This is a sentence spoken by a synthetic voice to test the detector.")
    assert detect_speech(speech).speech.mean() > 0.5
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(SR * 4)).astype(np.float32)
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(SR * 4) / SR)).astype(np.float32)
    assert detect_speech(noise).speech.mean() < 0.05
    assert detect_speech(tone).speech.mean() < 0.05
    assert not detect_speech(np.zeros(SR * 2, np.float32)).speech.any()


def test_vad_localises_speech_in_time(tmp_path):
    speech = _espeak(tmp_path, "Hello, this is a test of speech timing.")
    sig = np.concatenate([np.zeros(SR * 2, np.float32), speech, np.zeros(SR * 2, np.float32)])
    sig += (0.002 * np.random.default_rng(1).standard_normal(sig.size)).astype(np.float32)
    v = detect_speech(sig)
    on = np.flatnonzero(v.speech) * v.hop_s
    assert 1.9 <= on[0] <= 2.4
    assert 2.0 + speech.size / SR - 0.6 <= on[-1] <= 2.0 + speech.size / SR + 0.1
