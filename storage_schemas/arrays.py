"""The dataset's array files (plain .npy, never pickled): where each kind lives, what names one file,
its dtype and shape. Writers validate before anything on disk is replaced; readers check what they read.

Shapes are tuples of fixed sizes (ints) and named sizes (strings): a named size must be the same
wherever it appears in one array and, when the caller passes it (``n_frames=clip["n_frames"]``),
equal to that value."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import SchemaError, atomic_write_bytes
from .tables import AUDIO_SAMPLE_RATE


@dataclass(frozen=True)
class ArraySpec:
    name: str
    folder: str  # relative to the dataset directory
    key: str  # what names one file (<key>.npy)
    dtype: str
    shape: tuple  # ints: fixed sizes; strings: named sizes
    doc: str


ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("crops", "arrays/crops", "clip_id", "uint8", ("n_frames", "crop_size", "crop_size", 3),
              "RGB face crop of every frame of the clip at 30 fps (zeros where the face is not tracked), "
              "the input of GNPFA's image encoders"),
    ArraySpec("keyframes", "arrays/keyframes", "clip_id", "uint8", ("keyframe_px", "keyframe_px", 3),
              "RGB face crop of the clip's middle frame, taken in the extraction pass (the shards' jpg)"),
    ArraySpec("audio", "parts/audio", "source sha256", "float32", ("n_samples",),
              f"the source's audio as every stage uses it: {AUDIO_SAMPLE_RATE} Hz mono, decoded once by ingest"),
)}


def array_path(root: str | os.PathLike, name: str, key: str) -> Path:
    if name not in ARRAYS:
        raise SchemaError(f"unknown array {name!r}; known: {sorted(ARRAYS)}")
    return Path(root) / ARRAYS[name].folder / f"{key}.npy"


def validate_array(name: str, arr: np.ndarray, where: str = "", **sizes: int) -> None:
    """Raise SchemaError naming the array (and ``where``) unless ``arr`` has the spec's dtype and shape."""
    spec = ARRAYS[name]
    what = f"array {name}{' ' + where if where else ''}"
    if arr.dtype != np.dtype(spec.dtype):
        raise SchemaError(f"{what}: dtype {arr.dtype}, the schema says {spec.dtype}")
    if arr.ndim != len(spec.shape):
        raise SchemaError(f"{what}: shape {arr.shape}, the schema says {spec.shape}")
    seen = dict(sizes)
    for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
        if isinstance(want, int):
            ok = got == want
        else:
            ok = seen.setdefault(want, got) == got
        if not ok:
            expect = want if isinstance(want, int) else f"{want}={seen[want]}"
            raise SchemaError(f"{what}: axis {axis} has size {got}, the schema says {expect} (shape {spec.shape})")


def write_array(root: str | os.PathLike, name: str, key: str, arr: np.ndarray, **sizes: int) -> Path:
    """Validate, then write ``<folder>/<key>.npy`` atomically (no pickle). Returns the path."""
    arr = np.ascontiguousarray(arr)
    p = array_path(root, name, key)
    validate_array(name, arr, str(p), **sizes)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(p, buf.getvalue())
    return p


def read_array(root: str | os.PathLike, name: str, key: str, **sizes: int) -> np.ndarray:
    """Read one array (no pickle) and check it against the schema. FileNotFoundError where it is missing."""
    p = array_path(root, name, key)
    arr = np.load(p, allow_pickle=False)
    validate_array(name, arr, str(p), **sizes)
    return arr
