"""Per-clip arrays read from the frames table, shared by the label and shard stages."""
from __future__ import annotations

import numpy as np


def clip_frame_arrays(ds, clip_id: str, with_landmarks: bool = False) -> dict[str, np.ndarray]:
    """Arrays on the clip's 30 fps grid, NaN where the speaker was not tracked: tracked, yaw, pitch,
    roll, mouth_open, tx, ty, scale, gnpfa_z (n, z), audio_mel (n, 80), blendshapes (n, 52) and optionally
    landmarks."""
    cols = ("tracked, yaw, pitch, roll, mouth_open, translation, scale, gnpfa_z, audio_mel, blendshapes"
            + (", landmarks" if with_landmarks else ""))
    cid = clip_id.replace("'", "''")
    t = ds.query(f"select {cols} from frames where clip_id = '{cid}' order by frame")

    def num(name):
        return np.asarray([np.nan if v is None else v for v in t.column(name).to_pylist()], np.float64)

    def lst(name, width):
        return np.asarray([v if v is not None else [np.nan] * width for v in t.column(name).to_pylist()], np.float32)

    zd = max((len(z) for z in t.column("gnpfa_z").to_pylist() if z), default=0)
    tr = lst("translation", 3)
    out = {"tracked": np.asarray(t.column("tracked").to_pylist(), bool), "yaw": num("yaw"), "pitch": num("pitch"),
           "roll": num("roll"), "mouth_open": num("mouth_open"), "tx": tr[:, 0], "ty": tr[:, 1],
           "scale": num("scale"), "gnpfa_z": lst("gnpfa_z", zd), "audio_mel": lst("audio_mel", 80),
           "blendshapes": lst("blendshapes", 52)}
    if with_landmarks:
        out["landmarks"] = lst("landmarks", 478 * 3).reshape(t.num_rows, 478, 3)
    return out
