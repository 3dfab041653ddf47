"""The WebDataset sample layout of M2F-D shards: one sample per clip, keyed by clip_id.

Member name = "<clip_id>.<suffix>". Every array is a plain .npy (no pickle); shapes use
n = the clip's frames at 30 fps.
"""
from __future__ import annotations

SAMPLE_VERSION = "1"

# suffix -> (kind, dtype, shape, required, description)
MEMBERS: dict[str, tuple[str, str | None, str | None, bool, str]] = {
    "meta.json": ("json", None, None, True, "clip row, source info, split, schema and sample versions"),
    "latents.npy": ("npy", "float32", "(n, z)", True, "GNPFA expression latents (mesh path); untracked frames interpolated"),
    "pose.npy": ("npy", "float32", "(n, 6)", True, "yaw, pitch, roll (radians), tx, ty (fraction of width/height), log scale"),
    "mask.npy": ("npy", "bool", "(n,)", True, "true where the speaker was tracked (values not interpolated)"),
    "audio.flac": ("flac", None, None, True, "16 kHz mono FLAC of the clip"),
    "audio_feat.npy": ("npy", "float32", "(n, 80)", True, "Whisper log-mel mean-pooled to 30 fps"),
    "blendshapes.npy": ("npy", "float32", "(n, 52)", True, "ARKit blendshape weights (vocab.BLENDSHAPES); "
                       "untracked frames interpolated like the latents"),
    "transcript.json": ("json", None, None, False, "engine, language, text, words"),
    "labels.json": ("json", None, None, True, "{field: {value, labeler, labeler_version, confidence}}"),
    "keyframe.jpg": ("jpg", None, None, True, "a 224 px face crop from the clip's middle frame"),
    "landmarks.npy": ("npy", "float16", "(n, 478, 3)", False, "Face Mesh landmarks (with include_landmarks)"),
}
REQUIRED = tuple(k for k, v in MEMBERS.items() if v[3])
