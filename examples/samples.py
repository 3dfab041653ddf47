"""Build sample and fault-injection videos from the bundled real videos plus espeak-ng speech.

Used by the demo (`make demo` regenerates examples/samples/) and by the tests, which build every
quarantine case from real footage. Needs ffmpeg and espeak-ng on PATH (scripts/setup.sh installs them).

    python examples/samples.py OUT_DIR [--real ../shared/data/real]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared" / "data" / "real"

SENTENCES = [
    "Good morning everyone. Today I want to tell you about a small project that grew much larger than we planned.",
    "I honestly did not expect that result. We ran the experiment three times, and every run told the same story.",
]


def _ff(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def speech_wav(path: Path, text: str, speed: int = 160, pitch: int = 50, voice: str = "en") -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text], check=True)
    return path


def talking_video(face_video: Path, wav: Path, out: Path, seconds: float = 5.0, size: int = 256,
                  start: float = 0.0, extra_vf: str = "") -> Path:
    """A real face video (re-encoded, ``size`` px square) with the given speech as its audio track."""
    vf = f"scale={size}:{size},fps=30" + (f",{extra_vf}" if extra_vf else "")
    _ff("-ss", str(start), "-i", str(face_video), "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0", "-t", str(seconds),
        "-vf", vf, "-c:v", "libx264", "-preset", "ultrafast", "-crf", "26", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-ar", "44100", "-shortest", str(out))
    return out


def make_cases(out_dir: str | os.PathLike, real_dir: str | os.PathLike = DEFAULT_REAL) -> dict[str, Path]:
    """Write one file per case into ``out_dir``; return {case: path}. Deterministic for fixed tools."""
    out, real = Path(out_dir), Path(real_dir)
    out.mkdir(parents=True, exist_ok=True)
    face_a, face_b = real / "d14.mp4", real / "d3.mp4"
    tmp = out / ".work"
    tmp.mkdir(exist_ok=True)
    wav = speech_wav(tmp / "speech.wav", SENTENCES[0])
    cases: dict[str, Path] = {}

    cases["talk"] = talking_video(face_a, wav, out / "talk.mp4")
    cases["talk_b"] = talking_video(face_b, speech_wav(tmp / "speech_b.wav", SENTENCES[1], speed=150, pitch=35),
                                    out / "talk_b.mp4")
    # odd names: spaces, quotes, unicode
    cases["odd_name"] = out / "интервью 'take 2' (final).mp4"
    shutil.copyfile(cases["talk_b"], cases["odd_name"])
    # the same bytes under another name
    cases["duplicate"] = out / "talk copy.mp4"
    shutil.copyfile(cases["talk"], cases["duplicate"])
    # empty and random bytes
    cases["empty"] = out / "empty.mp4"
    cases["empty"].write_bytes(b"")
    cases["random"] = out / "random.mp4"
    cases["random"].write_bytes(random.Random(0).randbytes(50_000))
    # truncated: index at the end (moov lost) and index first (data cut)
    data = cases["talk"].read_bytes()
    cases["truncated_moov"] = out / "truncated_moov.mp4"
    cases["truncated_moov"].write_bytes(data[: len(data) * 6 // 10])
    faststart = tmp / "faststart.mp4"
    _ff("-i", str(cases["talk"]), "-c", "copy", "-movflags", "+faststart", str(faststart))
    fs = faststart.read_bytes()
    cases["truncated_data"] = out / "truncated_data.mp4"
    cases["truncated_data"].write_bytes(fs[: len(fs) * 6 // 10])
    # audio only, no audio
    cases["audio_only"] = out / "audio_only.m4a"
    _ff("-i", str(wav), "-c:a", "aac", str(cases["audio_only"]))
    cases["no_audio"] = out / "no_audio.mp4"
    _ff("-i", str(cases["talk"]), "-an", "-c:v", "copy", str(cases["no_audio"]))
    # silent track, and a track with sound but no speech (a steady tone)
    cases["silent"] = out / "silent.mp4"
    _ff("-i", str(cases["talk"]), "-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono", "-map", "0:v", "-map", "1:a",
        "-c:v", "copy", "-c:a", "aac", "-shortest", str(cases["silent"]))
    cases["no_speech"] = out / "tone.mp4"
    _ff("-i", str(cases["talk"]), "-f", "lavfi", "-i", "sine=frequency=220:sample_rate=44100", "-map", "0:v",
        "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest", str(cases["no_speech"]))
    # no face: a test pattern with speech
    cases["no_face"] = out / "pattern.mp4"
    _ff("-f", "lavfi", "-i", "testsrc2=size=256x256:rate=30", "-i", str(wav), "-t", "5", "-c:v", "libx264",
        "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(cases["no_face"]))
    # two faces of the same size side by side
    cases["two_faces"] = out / "two_faces.mp4"
    _ff("-i", str(face_a), "-i", str(face_b), "-i", str(wav), "-filter_complex",
        "[0:v]scale=256:256,fps=30[a];[1:v]scale=256:256,fps=30[b];[a][b]hstack=inputs=2[v]", "-map", "[v]",
        "-map", "2:a", "-t", "5", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
        "-shortest", str(cases["two_faces"]))
    # a speaker with a smaller second face in the background corner (kept: the tracker picks the speaker)
    cases["background_face"] = out / "background_face.mp4"
    _ff("-i", str(face_a), "-i", str(face_b), "-i", str(wav), "-filter_complex",
        "[0:v]scale=512:512,fps=30[a];[1:v]scale=176:176,fps=30[b];[a][b]overlay=336:0[v]", "-map", "[v]",
        "-map", "2:a", "-t", "5", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
        "-shortest", str(cases["background_face"]))
    # tiny frame, and a small face in a normal frame
    cases["tiny"] = out / "tiny.mp4"
    _ff("-i", str(cases["talk"]), "-vf", "scale=48:48", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "copy",
        str(cases["tiny"]))
    cases["small_face"] = out / "small_face.mp4"
    _ff("-i", str(cases["talk"]), "-vf", "scale=72:72,pad=640:360:284:144", "-c:v", "libx264", "-preset",
        "ultrafast", "-c:a", "copy", str(cases["small_face"]))
    # very short
    cases["short"] = out / "short.mp4"
    _ff("-i", str(cases["talk"]), "-t", "1.2", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
        str(cases["short"]))
    # rotated: frames stored turned 90 degrees clockwise, display matrix turns them back
    coded = tmp / "coded_cw.mp4"
    _ff("-i", str(cases["talk"]), "-vf", "crop=256:192:0:32,transpose=1", "-c:v", "libx264", "-preset", "ultrafast",
        "-c:a", "copy", str(coded))
    cases["rotated"] = out / "rotated.mp4"
    _ff("-i", str(coded), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(cases["rotated"]))
    # variable frame rate: frames at irregular times (~10-30 fps)
    cases["vfr"] = out / "vfr.mkv"
    _ff("-i", str(cases["talk"]), "-vf", "setpts='N/(30*TB)+0.02*sin(N/3)/TB',select='not(eq(mod(n,4),1))'",
        "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "copy",
        "-fflags", "+bitexact", str(cases["vfr"]))  # Matroska: no random UIDs or date (same bytes every time)
    # a codec outside the allow-list
    cases["unsupported_codec"] = out / "ffv1.mkv"
    _ff("-i", str(cases["talk"]), "-t", "3", "-c:v", "ffv1", "-c:a", "copy", "-fflags", "+bitexact",
        str(cases["unsupported_codec"]))
    shutil.rmtree(tmp)
    return cases


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--real", default=str(DEFAULT_REAL))
    ap.add_argument("--only-good", action="store_true", help="write only the talking samples (for the demo)")
    a = ap.parse_args()
    if a.only_good:
        tmpd = Path(a.out_dir) / ".all"
        cases = make_cases(tmpd, a.real)
        for k in ("talk", "talk_b", "rotated", "vfr"):
            shutil.move(str(cases[k]), Path(a.out_dir) / cases[k].name)
        shutil.rmtree(tmpd)
    else:
        for k, p in make_cases(a.out_dir, a.real).items():
            print(f"{k:18s} {p}")
