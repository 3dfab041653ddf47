"""What the two audio-visual sync models share (models/av_sync.py: blendshapes from Whisper encoder states, per clip;
models/asd_sync.py: Light-ASD's visual embedding from the same states, per face track run): per-column
z-scores, the projected ridge fit with context, the best-lag correlation of predicted and observed motion,
the weights file (one float32 matrix in safetensors, its settings in one metadata key, the shipped file's
sha256 checked) and the AUC their benchmarks report. Pure numpy."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def zscore(x: np.ndarray) -> np.ndarray:
    """Per-column z-score over the rows (NaN rows ignored, NaN -> 0)."""
    m = np.nanmean(x, 0)
    s = np.nanstd(x, 0) + 1e-3
    return np.nan_to_num((x - m) / s).astype(np.float32)


def lagged_corr(pred: np.ndarray, obs: np.ndarray, ok_pred: np.ndarray, ok_obs: np.ndarray, a: int, b: int,
                max_lag: int, min_frames: int) -> float | None:
    """Mean over the columns of the correlation of ``pred`` and ``obs`` (both (T, k)) over the observed
    frames [a, b) where ``ok_obs`` holds and the predicted frame paired with it is ``ok_pred`` (both (T,)),
    at the best lag within +-``max_lag`` (lag > 0: the observed motion comes after the sound; predicted
    frames may reach outside [a, b)); None where no lag has ``min_frames`` such frames."""
    n = len(pred)
    best = None
    for lag in range(-max_lag, max_lag + 1):
        lo, hi = max(a, lag), min(b, n + lag)  # observed frames [lo, hi) against predicted [lo - lag, hi - lag)
        if hi - lo < min_frames:
            continue
        m = ok_obs[lo:hi] & ok_pred[lo - lag: hi - lag]
        if m.sum() < min_frames:
            continue
        c = float((zscore(pred[lo - lag: hi - lag][m]) * zscore(obs[lo:hi][m])).mean())
        best = c if best is None else max(best, c)
    return best


def context(x: np.ndarray, c: int) -> np.ndarray:
    """(n, d) -> (n, d (2 c + 1)): each row with the ``c`` rows either side (edge rows repeated)."""
    n = len(x)
    p = np.pad(x, ((c, c), (0, 0)), mode="edge")
    return np.concatenate([p[i: i + n] for i in range(2 * c + 1)], 1)


def fit_projected(pairs, width: int, dims: int, c: int, alpha: float) -> np.ndarray:
    """Ridge weights predicting targets from speech states through a projection, folded into one
    (width (2 c + 1), k) float32 matrix. ``pairs()`` gives an iterable of (states (n, width), targets (n, k)
    with NaN rows where there is no target) and is read twice: the first ``dims`` principal directions of
    the per-item z-scored states, then the ridge fit (penalty ``alpha``) of the targets on the projected
    states with +-``c`` rows of context. Sums accumulate item by item: memory does not grow with the data.
    The folded matrix takes ``context(zscore(states), c)``."""
    cov, s1, m, k = np.zeros((width, width)), np.zeros(width), 0, 0
    for st, y in pairs():
        ok = np.isfinite(y).all(1)
        x = zscore(np.asarray(st, np.float32))[ok].astype(np.float64)
        cov += x.T @ x
        s1 += x.sum(0)
        m += len(x)
        k = y.shape[1]
    if m == 0:
        raise ValueError("no frames with a target to fit on")
    mu = s1 / m
    evals, evecs = np.linalg.eigh(cov / m - np.outer(mu, mu))
    proj = evecs[:, ::-1][:, :dims]
    proj *= np.sign(proj[np.abs(proj).argmax(0), range(dims)])  # one sign per direction: same bytes every fit
    d = dims * (2 * c + 1)
    xtx, xty = np.zeros((d, d)), np.zeros((d, k))
    for st, y in pairs():
        ok = np.isfinite(y).all(1)
        x = context(zscore(np.asarray(st, np.float32)) @ proj.astype(np.float32), c).astype(np.float64)
        xtx += x[ok].T @ x[ok]
        xty += x[ok].T @ y[ok]
    w = np.linalg.solve(xtx + alpha * np.eye(d), xty)
    # context block j of the input: states (width) -> projection (dims) -> rows j of w
    return np.concatenate([proj @ w[j * dims: (j + 1) * dims] for j in range(2 * c + 1)]).astype(np.float32)


def save_weights(path: str | Path, weights: np.ndarray, key: str, meta: dict) -> str:
    """One float32 matrix ``weights`` and its settings ``meta`` (JSON under the single metadata ``key``:
    safetensors orders several keys arbitrarily, so the bytes would differ run to run), written atomically
    as safetensors; -> sha256."""
    from safetensors.numpy import save as st_save

    blob = st_save({"weights": np.ascontiguousarray(weights, np.float32)},
                   metadata={key: json.dumps(meta, sort_keys=True)})
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(p)
    return hashlib.sha256(blob).hexdigest()


def load_weights(path: str | Path, key: str, settings: dict, shape: tuple, shipped: Path,
                 shipped_sha256: str, what: str) -> tuple[np.ndarray, str, dict]:
    """Read ``save_weights``' file -> (weights, sha256, metadata); raises when its settings or shape are not
    ``settings`` / ``shape``, or when ``shipped``'s sha256 is not ``shipped_sha256``."""
    from safetensors import safe_open

    p = Path(path)
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    if p.resolve() == shipped and sha != shipped_sha256:
        raise ValueError(f"{p}: sha256 {sha[:16]}..., expected {shipped_sha256[:16]}... (damaged or replaced)")
    with safe_open(str(p), "np") as f:
        meta = json.loads((f.metadata() or {}).get(key, "{}"))
        w = f.get_tensor("weights")
    got = {k: meta.get(k) for k in settings}
    if got != settings or w.shape != tuple(shape):
        raise ValueError(f"{p}: not {what} weights of this code's settings ({got}, shape {w.shape})")
    return w, sha, meta


def resolve_weights(value: str | None, shipped: Path, config_key: str) -> Path | None:
    """A config value -> weights file: "shipped" = ``shipped``; "" or None = off; else a path (raises,
    naming ``config_key``, when the file is missing)."""
    if not value:
        return None
    p = shipped if value == "shipped" else Path(value).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{config_key} = {value!r}: no such file ({p})")
    return p


def auc(pos, neg) -> float:
    """P(a positive scores above a negative), ties counting half."""
    p, q = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None]
    return float((p > q).mean() + 0.5 * (p == q).mean()) if p.size and q.size else float("nan")
