"""Light-ASD (Liao et al., CVPR 2023): audio-visual active-speaker detection, our own implementation of
the published architecture so that its released state dicts (``../shared/models/light-asd``, MIT) load
as they are (``weights_only=True``, strict).

Inputs per face track: grayscale 112 x 112 crops at 25 fps (uint8) and 13 MFCCs at 100 Hz, four audio
frames per video frame. Output: one logit per video frame, >= 0 meaning "this face is speaking".
Pure: no Ray, no Dagster; callers pick the threads.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

VIDEO_FPS = 25
AUDIO_PER_VIDEO = 4  # MFCC frames (100 Hz) per video frame
CROP = 112
MEAN, STD = 0.4161, 0.1688

# the released weights, by file name: the default is the TalkSet fine-tune (chosen by bench/bench_asd.py)
WEIGHTS = {
    "finetuning_TalkSet.model": "efc375833887eefa9d209dc92810e18519b04c3c73ea35a549f2a7f40b7d94d5",
    "pretrain_AVA_CVPR.model": "d44bc3ea7baa8e0946fa3921311714a630ed8b90a1928fab0dbe30d918909317",
}


def _bn3(c):
    return nn.BatchNorm3d(c, momentum=0.01, eps=0.001)


def _bn2(c):
    return nn.BatchNorm2d(c, momentum=0.01, eps=0.001)


class VisualBlock(nn.Module):
    """Two branches (1xkxk spatial then kx1x1 temporal conv, k = 3 and 5), summed, then a 1x1x1 conv."""

    def __init__(self, cin: int, cout: int, down: bool = False):
        super().__init__()
        st = (1, 2, 2) if down else (1, 1, 1)
        self.s_3 = nn.Conv3d(cin, cout, (1, 3, 3), stride=st, padding=(0, 1, 1), bias=False)
        self.bn_s_3 = _bn3(cout)
        self.t_3 = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.bn_t_3 = _bn3(cout)
        self.s_5 = nn.Conv3d(cin, cout, (1, 5, 5), stride=st, padding=(0, 2, 2), bias=False)
        self.bn_s_5 = _bn3(cout)
        self.t_5 = nn.Conv3d(cout, cout, (5, 1, 1), padding=(2, 0, 0), bias=False)
        self.bn_t_5 = _bn3(cout)
        self.last = nn.Conv3d(cout, cout, (1, 1, 1), bias=False)
        self.bn_last = _bn3(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        r = self.relu
        a = r(self.bn_t_3(self.t_3(r(self.bn_s_3(self.s_3(x))))))
        b = r(self.bn_t_5(self.t_5(r(self.bn_s_5(self.s_5(x))))))
        return r(self.bn_last(self.last(a + b)))

    def forward_2d(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The same function on (B*T, C, H, W): the 1xkxk convs as 2-D convs per frame and the kx1x1
        ones as 2-D convs over (T, H*W), which CPUs run several times faster than the 3-D forms."""
        r = self.relu

        def bn(m, y):
            return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

        def spatial(conv, y):
            return F.conv2d(y, conv.weight[:, :, 0], stride=conv.stride[1:], padding=conv.padding[1:])

        def temporal(conv, y):  # y (B*T, C, H, W) -> same, conv along T
            bt, c, h, w = y.shape
            z = y.reshape(bt // t, t, c, h * w).transpose(1, 2)  # (B, C, T, HW)
            z = F.conv2d(z, conv.weight[..., 0], padding=(conv.padding[0], 0))
            return z.transpose(1, 2).reshape(bt, -1, h, w)

        a = r(bn(self.bn_t_3, temporal(self.t_3, r(bn(self.bn_s_3, spatial(self.s_3, x))))))
        b = r(bn(self.bn_t_5, temporal(self.t_5, r(bn(self.bn_s_5, spatial(self.s_5, x))))))
        return r(bn(self.bn_last, F.conv2d(a + b, self.last.weight[:, :, 0])))

    def fold(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Inference weights: each conv with its batch norm folded in, as 2-D (weight, bias)."""
        def f(w, bn):
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            return ((w * s.reshape(-1, *[1] * (w.dim() - 1))).contiguous(),
                    (bn.bias - bn.running_mean * s).contiguous())

        with torch.no_grad():
            return {"s_3": f(self.s_3.weight[:, :, 0], self.bn_s_3), "s_5": f(self.s_5.weight[:, :, 0], self.bn_s_5),
                    "t_3": f(self.t_3.weight[..., 0], self.bn_t_3), "t_5": f(self.t_5.weight[..., 0], self.bn_t_5),
                    "last": f(self.last.weight[:, :, 0], self.bn_last)}

    def forward_folded(self, x: torch.Tensor, t: int, w: dict) -> torch.Tensor:
        """forward_2d with ``fold()``'s weights on channels-last tensors (inference only): the same
        function to float rounding (2.7e-6 of features up to 3.1), 2x faster on a CPU core."""
        cl = torch.channels_last

        def temporal(wb, y, k):
            bt, c, h, ww = y.shape
            z = y.reshape(bt // t, t, c, h * ww).transpose(1, 2).contiguous(memory_format=cl)
            return F.conv2d(z, *wb, padding=(k // 2, 0)).transpose(1, 2).reshape(bt, -1, h, ww)

        st = self.s_3.stride[1:]
        a = F.relu_(temporal(w["t_3"], F.relu_(F.conv2d(x, *w["s_3"], stride=st, padding=1)), 3))
        b = F.relu_(temporal(w["t_5"], F.relu_(F.conv2d(x, *w["s_5"], stride=st, padding=2)), 5))
        return F.relu_(F.conv2d(a.add_(b).contiguous(memory_format=cl), *w["last"]))


class VisualEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = VisualBlock(1, 32, down=True)
        self.pool1 = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.block2 = VisualBlock(32, 64)
        self.pool2 = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.block3 = VisualBlock(64, 128)

    def forward(self, x):  # (B, 1, T, 112, 112) -> (B, T, 128)
        x = self.block3(self.pool2(self.block2(self.pool1(self.block1(x)))))
        return x.amax(dim=(3, 4)).transpose(1, 2)

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, T, 112, 112) -> (B, T, 128)
        b, _, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, 1, h, w)
        y = F.max_pool2d(self.block1.forward_2d(y, t), 3, 2, 1)
        y = F.max_pool2d(self.block2.forward_2d(y, t), 3, 2, 1)
        y = self.block3.forward_2d(y, t)
        return y.amax(dim=(2, 3)).reshape(b, t, -1)

    def forward_folded(self, x: torch.Tensor, w: list[dict]) -> torch.Tensor:
        """forward_2d on channels-last tensors with each block's ``fold()`` weights (inference)."""
        b, _, t, h, ww = x.shape
        y = x.transpose(1, 2).reshape(b * t, 1, h, ww).contiguous(memory_format=torch.channels_last)
        y = F.max_pool2d(self.block1.forward_folded(y, t, w[0]), 3, 2, 1)
        y = F.max_pool2d(self.block2.forward_folded(y, t, w[1]), 3, 2, 1)
        y = self.block3.forward_folded(y, t, w[2])
        return y.amax(dim=(2, 3)).reshape(b, t, -1)


class AudioBlock(nn.Module):
    """The same two-branch block in 2-D over (MFCC, time): kx1 then 1xk convs, k = 3 and 5."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.m_3 = nn.Conv2d(cin, cout, (3, 1), padding=(1, 0), bias=False)
        self.bn_m_3 = _bn2(cout)
        self.t_3 = nn.Conv2d(cout, cout, (1, 3), padding=(0, 1), bias=False)
        self.bn_t_3 = _bn2(cout)
        self.m_5 = nn.Conv2d(cin, cout, (5, 1), padding=(2, 0), bias=False)
        self.bn_m_5 = _bn2(cout)
        self.t_5 = nn.Conv2d(cout, cout, (1, 5), padding=(0, 2), bias=False)
        self.bn_t_5 = _bn2(cout)
        self.last = nn.Conv2d(cout, cout, (1, 1), bias=False)
        self.bn_last = _bn2(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        r = self.relu
        a = r(self.bn_t_3(self.t_3(r(self.bn_m_3(self.m_3(x))))))
        b = r(self.bn_t_5(self.t_5(r(self.bn_m_5(self.m_5(x))))))
        return r(self.bn_last(self.last(a + b)))


class AudioEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = AudioBlock(1, 32)
        self.pool1 = nn.MaxPool2d((1, 3), stride=(1, 2), padding=(0, 1))  # along time: 100 Hz -> 50 Hz
        self.block2 = AudioBlock(32, 64)
        self.pool2 = nn.MaxPool2d((1, 3), stride=(1, 2), padding=(0, 1))  # -> 25 Hz
        self.block3 = AudioBlock(64, 128)

    def forward(self, x):  # (B, 1, 13, 4T) -> (B, T, 128)
        x = self.block3(self.pool2(self.block2(self.pool1(self.block1(x)))))
        return x.mean(dim=2).transpose(1, 2)


class BGRU(nn.Module):
    """Two one-directional GRUs: forward, GELU, time-flip, second GRU, flip back, GELU."""

    def __init__(self, c: int = 128):
        super().__init__()
        self.gru_forward = nn.GRU(c, c, num_layers=1, batch_first=True)
        self.gru_backward = nn.GRU(c, c, num_layers=1, batch_first=True)
        self.gelu = nn.GELU()

    def forward(self, x):
        x = self.gelu(self.gru_forward(x)[0])
        x = torch.flip(self.gru_backward(torch.flip(x, dims=[1]))[0], dims=[1])
        return self.gelu(x)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.visualEncoder = VisualEncoder()
        self.audioEncoder = AudioEncoder()
        self.GRU = BGRU(128)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.FC = nn.Linear(128, 2)


class LightASD(nn.Module):
    """The whole released network; state-dict keys ``model.*``, ``lossAV.FC.*`` and ``lossV.FC.*``."""

    def __init__(self):
        super().__init__()
        self.model = Backbone()
        self.lossAV = Head()
        self.lossV = Head()
        self._folded: list[dict] | None = None  # fold()'s inference weights of the visual blocks

    def fold(self) -> "LightASD":
        """Fold the visual blocks' batch norms into their convs for inference (``load`` does this; call it
        again after changing the weights). forward then runs the folded channels-last path."""
        e = self.model.visualEncoder
        self._folded = [e.block1.fold(), e.block2.fold(), e.block3.fold()]
        return self

    def forward(self, faces: torch.Tensor, mfcc: torch.Tensor, embeddings: bool = False):
        """faces (B, T, 112, 112) uint8 or float in [0, 255]; mfcc (B, 4T, 13) -> (B, T) speaking logits;
        with ``embeddings``, (logits, visual (B, T, 128), audio (B, T, 128)): the encoders' outputs."""
        b, t = faces.shape[:2]
        v = ((faces.float() / 255.0 - MEAN) / STD).unsqueeze(1)
        e = self.model.visualEncoder
        if self._folded is not None and not self.training:
            w = self._folded[0]["last"][0]
            if w.device != v.device or w.dtype != e.block1.last.weight.dtype:  # moved or cast since fold()
                self.fold()
            v = e.forward_folded(v, self._folded)
        else:
            v = e.forward_2d(v)
        a = self.model.audioEncoder(mfcc.float().unsqueeze(1).transpose(2, 3))
        logits = self.lossAV.FC(self.model.GRU(a + v))[..., 1]
        return (logits, v, a) if embeddings else logits


def load(path: str | Path, expect_sha256: str | None = None) -> tuple[LightASD, str]:
    """Load a released Light-ASD state dict (``torch.load(weights_only=True)``, strict) -> (eval model,
    sha256). A file whose sha256 differs from ``expect_sha256`` (default: the released one of that file
    name, where known) raises."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Light-ASD weights not found: {p} (set ingest.asd_weights to the file; the "
                                f"released ones are {', '.join(WEIGHTS)})")
    from extractors.probe import sha256_file

    sha = sha256_file(p)
    want = expect_sha256 or WEIGHTS.get(p.name)
    if want and sha != want:
        raise ValueError(f"Light-ASD weights {p} have sha256 {sha}, expected {want}")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    m = LightASD()
    m.load_state_dict(sd, strict=True)
    return m.eval().fold(), sha


# the original demo scores a track over windows of these lengths (s) and averages them per frame
DURATIONS_S = (1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6)


@torch.no_grad()
def score_track(model: LightASD, faces: np.ndarray, mfcc: np.ndarray, durations_s=DURATIONS_S,
                smooth: int = 2, embed: bool = False):
    """Per-frame speaking logits of one contiguous track: faces (T, 112, 112) uint8 at 25 fps and
    mfcc (>= 4T, 13) float at 100 Hz. As the original demo: the track is cut into windows of each of
    ``durations_s``, each window scored on its own, the per-frame scores averaged over the durations and
    smoothed over +-``smooth`` frames. Each window's result depends on that window only, so a frame's
    score is the same whatever else is scored with it.

    With ``embed``, returns (logits, visual, audio): the encoders' embeddings (T, 128) float32 as the
    windows of the last of ``durations_s`` computed them (no extra pass)."""
    t = min(len(faces), len(mfcc) // AUDIO_PER_VIDEO)
    if t == 0:
        z = np.zeros(0, np.float32)
        return (z, np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32)) if embed else z
    faces, mfcc = faces[:t], mfcc[: t * AUDIO_PER_VIDEO]
    dev = next(model.parameters()).device
    fv = torch.from_numpy(np.ascontiguousarray(faces)).to(dev)
    fa = torch.from_numpy(np.ascontiguousarray(mfcc, dtype=np.float32)).to(dev)
    total = np.zeros(t, np.float64)
    ve = ae = None
    for d in durations_s:
        w = d * VIDEO_FPS
        out = np.empty(t, np.float64)
        if embed:
            ve, ae = np.empty((t, 128), np.float32), np.empty((t, 128), np.float32)
        for i in range(math.ceil(t / w)):
            a, b = i * w, min(t, (i + 1) * w)
            s = model(fv[None, a:b], fa[None, a * AUDIO_PER_VIDEO: b * AUDIO_PER_VIDEO], embeddings=embed)
            if embed:
                s, v, au = s
                ve[a:b], ae[a:b] = v[0].float().cpu().numpy(), au[0].float().cpu().numpy()
            out[a:b] = s[0].double().cpu().numpy()
        total += out
    total /= len(durations_s)
    if smooth > 0 and t > 1:
        pad = np.pad(total, smooth, mode="edge")
        total = np.convolve(pad, np.ones(2 * smooth + 1) / (2 * smooth + 1), "valid")
    return (total.astype(np.float32), ve, ae) if embed else total.astype(np.float32)


def models_dir() -> Path:
    """Where relative model paths are looked up: $M2FD_MODELS, else ../shared/models beside the repository."""
    import os

    env = os.environ.get("M2FD_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "models"


def resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else models_dir() / p


class Scorer:
    """``Scorer(path)(faces, mfcc) -> logits``: a loaded model with fixed threads and windows.
    ``track(faces, mfcc, audio) -> (logits, sync)`` adds the run's (predicted, observed) visual embeddings
    of the ``sync`` model (models.asd_sync.AsdSync; None when there is none)."""

    def __init__(self, path: str | Path, durations_s=(2, 4), threads: int = 1, device: str = "cpu", sync=None):
        self.model, self.sha256 = load(path)
        if device != "cpu":
            self.model = self.model.to(device)  # forward folds the batch norms again on that device
        self.path, self.durations_s, self.threads, self.device = str(path), tuple(durations_s), int(threads), device
        self.sync = sync

    def __call__(self, faces: np.ndarray, mfcc: np.ndarray) -> np.ndarray:
        return self.embed(faces, mfcc, False)

    def embed(self, faces: np.ndarray, mfcc: np.ndarray, embed: bool = True):
        """score_track with this scorer's threads and windows (``embed``: with the embeddings)."""
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return score_track(self.model, faces, mfcc, self.durations_s, embed=embed)
        finally:
            torch.set_num_threads(prev)

    def track(self, faces: np.ndarray, mfcc: np.ndarray, audio: np.ndarray | None = None):
        """One run's logits and sync signals; ``audio``: the run's 16 kHz audio from its first frame (the
        sync model reads what is said from it)."""
        if self.sync is None:
            return self(faces, mfcc), None
        logits, ve, ae = self.embed(faces, mfcc)
        return logits, self.sync.signals(ve, self.sync.speech_states(audio, len(ve)))
