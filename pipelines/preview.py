"""m2fd preview: source frames with the landmark overlay beside the GNPFA-decoded mesh, with audio."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from extractors.media import iter_frames, open_video, timeline
from extractors.render import draw_landmarks, draw_mesh, mesh_edges, mesh_view
from storage_schemas import open_dataset
from storage_schemas.dataset import gnpfa_checkpoint_dir

from .stage_io import source_path


def clip_meshes(root: Path, clip_id: str) -> tuple[dict, list, np.ndarray]:
    """(clip row, per-frame landmarks, (n, 478, 3) GNPFA-decoded meshes, NaN where untracked) of a clip."""
    import torch

    from models.gnpfa import load_checkpoint

    ds = open_dataset(root)
    rows = ds.query(f"select c.*, s.width sw, s.height sh, s.sha256, s.size_bytes, f.neutral, f.gnpfa_checkpoint from clips c join sources s "
                    f"using (source_id) join clip_features f using (clip_id) where clip_id = "
                    f"'{clip_id.replace(chr(39), '')}'").to_pylist()
    if not rows:
        raise KeyError(f"clip {clip_id!r} not in {root} (or not extracted)")
    c = rows[0]
    t = ds.query(f"select landmarks, gnpfa_z from frames where clip_id = '{c['clip_id']}' order by frame")
    lms = t.column("landmarks").to_pylist()
    zs = t.column("gnpfa_z").to_pylist()
    ckpt = gnpfa_checkpoint_dir(root, required=True)
    _, vae, _, sha = load_checkpoint(ckpt)
    if sha != c["gnpfa_checkpoint"]:
        raise ValueError(f"checkpoint at {ckpt} ({sha[:12]}) is not the one that encoded this clip "
                         f"({c['gnpfa_checkpoint'][:12]})")
    neutral = np.asarray(c["neutral"], np.float32).reshape(478, 3)
    zdim = max((len(z) for z in zs if z), default=1)
    Z = np.asarray([z if z else [np.nan] * zdim for z in zs], np.float32).reshape(len(zs), zdim)
    ok = ~np.isnan(Z[:, 0])
    verts = np.full((len(Z), 478, 3), np.nan, np.float32)
    with torch.no_grad():
        if ok.any():
            dec = vae.decode(torch.from_numpy(Z[ok]), torch.from_numpy(np.repeat(neutral[None], ok.sum(), 0))).numpy()
            verts[ok] = neutral + dec
    return c, lms, verts


def render_preview(root: Path, clip_id: str, out: Path, size: int = 384) -> Path:
    import cv2

    c, lms, verts = clip_meshes(root, clip_id)
    src = source_path(root, c)  # the bytes the clip was cut from (a URL's local copy)
    vr = open_video(src, c["sw"], c["sh"], size)
    tl = timeline(vr, 1e9)
    edges = mesh_edges()
    view = mesh_view(verts)  # one framing for the whole clip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    first = True
    proc = None
    for i, (_, frame) in enumerate(iter_frames(vr, tl, np.arange(c["start_frame"], c["start_frame"] + c["n_frames"]))):
        lm = np.asarray(lms[i], np.float32).reshape(478, 3) if lms[i] else None
        left = draw_landmarks(frame, lm)
        h = left.shape[0]
        right = cv2.resize(draw_mesh(verts[i], size, edges, view), (h, h))
        panel = np.concatenate([left, right], 1)
        if panel.shape[1] % 2:
            panel = panel[:, :-1]
        if panel.shape[0] % 2:
            panel = panel[:-1]
        if first:
            cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                   f"{panel.shape[1]}x{panel.shape[0]}", "-r", "30", "-i", "-", "-ss", f"{c['start_s']:.6f}",
                   "-t", f"{c['duration_s']:.6f}", "-i", src, "-map", "0:v", "-map", "1:a:0", "-c:v", "libx264",
                   "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(out)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
            first = False
        proc.stdin.write(np.ascontiguousarray(panel).tobytes())
    if proc is None:
        raise ValueError(f"clip {clip_id} has no frames")
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("ffmpeg failed to write the preview")
    return out
