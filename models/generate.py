"""Media2Face generation: speech audio (+ text prompt or face image) -> per-frame GNPFA latents and
head pose at 30 fps, long audio through overlapping windows. Pure (no Ray/Dagster)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from storage_schemas import AUDIO_SAMPLE_RATE, FPS

from .m2f_train import load_model
from .media2face import generate_long


def style_embedding(state: dict, prompt: Optional[str], image: Optional[np.ndarray]) -> Optional[np.ndarray]:
    enc_path = state["train"].get("style_encoder")
    if prompt is None and image is None:
        return None
    if not enc_path or not state["model"].get("style_dim"):
        raise ValueError("this checkpoint was trained without a style encoder: --prompt/--image cannot be used")
    from .style import StyleEncoder

    enc = StyleEncoder(enc_path)
    return enc.embed_text([prompt])[0] if prompt is not None else enc.embed_images([image])[0]


def generate(ckpt: str | Path, audio: np.ndarray, prompt: Optional[str] = None, image: Optional[np.ndarray] = None,
             steps: int = 50, overlap: int = 50, s_audio: float = 2.5, s_style: float = 1.5, seed: int = 0,
             device: str = "cpu") -> dict:
    """audio: float32 mono at 16 kHz. Returns {latents (n, z), pose (n, 6), fps, ...}."""
    from extractors.audio_features import log_mel_30fps

    model, state = load_model(ckpt, device)
    n = int(round(len(audio) / AUDIO_SAMPLE_RATE * FPS))
    if n < 1:
        raise ValueError("audio is shorter than one frame")
    feats = torch.from_numpy(log_mel_30fps(audio, n)).to(device)
    st = style_embedding(state, prompt, image)
    motion = generate_long(model, feats, torch.from_numpy(st).to(device) if st is not None else None, steps, overlap,
                           s_audio, s_style, seed).cpu().numpy()
    z = model.cfg.z_dim
    return {"latents": motion[:, :z].astype(np.float32), "pose": motion[:, z:].astype(np.float32),
            "fps": np.int32(FPS), "checkpoint_sha256": np.array(state["sha256"]),
            "conditioning": np.array(json.dumps({"prompt": prompt, "image": image is not None, "steps": steps,
                                                 "s_audio": s_audio, "s_style": s_style, "seed": seed}))}
