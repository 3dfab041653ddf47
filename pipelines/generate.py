"""m2fd generate: run models.generate on an audio file, save the animation, optionally render the
GNPFA-decoded mesh with the audio to an mp4."""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np


def run_generate(ckpt: Path, audio_path: Path, out: Path, prompt: Optional[str] = None, image: Optional[Path] = None,
                 video: Optional[Path] = None, steps: int = 50, seed: int = 0, s_audio: float = 2.5,
                 s_style: float = 1.5) -> dict:
    import torch

    from extractors.media import decode_audio
    from models.generate import generate
    from storage_schemas import atomic_write_bytes

    img = None
    if image is not None:
        import cv2

        bgr = cv2.imread(str(image))
        if bgr is None:
            raise ValueError(f"cannot read image {image}")
        img = bgr[:, :, ::-1].copy()
    audio = decode_audio(str(audio_path))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    anim = generate(ckpt, audio, prompt, img, steps=steps, seed=seed, s_audio=s_audio, s_style=s_style, device=dev)
    buf = io.BytesIO()
    np.savez(buf, **anim)
    atomic_write_bytes(out, buf.getvalue())
    if video is not None:
        render_animation(ckpt, anim, audio_path, video)
    return {"frames": int(len(anim["latents"])), "out": str(out), "video": str(video) if video else None}


def render_animation(ckpt: Path, anim: dict, audio_path: Path, video: Path, size: int = 384) -> Path:
    """Decode latents with the training dataset's GNPFA on its mean neutral face; mux with the audio."""
    import torch

    from extractors.render import draw_mesh, mesh_edges, mesh_view
    from models.data import load_entries
    from models.gnpfa import load_checkpoint
    from storage_schemas import open_dataset
    from storage_schemas.dataset import gnpfa_checkpoint_dir

    st = json.loads((Path(ckpt) / "state.json").read_text())
    root, _ = load_entries(st["train"].get("dataset"), None, st["train"].get("subset"))
    _, vae, _, _ = load_checkpoint(gnpfa_checkpoint_dir(root, required=True))
    neutrals = [r["neutral"] for r in open_dataset(root).query(
        "select neutral from clip_features where neutral is not null").to_pylist()]
    neutral = np.mean(np.asarray(neutrals, np.float32), 0).reshape(478, 3)
    z = torch.from_numpy(anim["latents"])
    with torch.no_grad():
        verts = neutral + vae.decode(z, torch.from_numpy(np.repeat(neutral[None], len(z), 0))).numpy()
    edges = mesh_edges()
    view = mesh_view(verts)  # one framing for the whole animation
    video.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}",
           "-r", "30", "-i", "-", "-i", str(audio_path), "-map", "0:v", "-map", "1:a:0", "-c:v", "libx264",
           "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(video)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    for v in verts:
        proc.stdin.write(np.ascontiguousarray(draw_mesh(v, size, edges, view)).tobytes())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("ffmpeg failed to write the animation video")
    return video
