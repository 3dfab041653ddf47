"""Media2Face: a diffusion model over co-speech facial motion in GNPFA latent space.

x0 = [GNPFA expression latent z (z_dim), head pose (6)] per frame, over windows of 200 frames at
30 fps. The denoiser is a transformer decoder (8 layers, 4 heads, width 512 as published): motion
tokens self-attend; they cross-attend to per-frame audio features (with an alignment mask that lets
frame i see audio frames within +-``align_frames``) and to two global tokens (diffusion step, style).
It predicts x0 directly. Cosine noise schedule with 500 steps; DDIM sampling.

Classifier-free guidance with the paper's two masks: during training the style is dropped with
probability ``p_drop_style`` and audio + style together with ``p_drop_all``; at sampling
    X = (1 - sA - sP) * G(null) + sA * G(A) + sP * G(A, P)
with sA = 2.5, sP = 1.5 by default. Losses: simple (x0 MSE, 1.0) + velocity (first differences,
1.0) + smooth (second differences of the prediction, 0.01), over valid frames only.

Pure torch: no Ray, no Dagster (pipelines/ wires training).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

POSE_DIM = 6
ATTN_KERNELS = ("sdpa", "flex")  # flex: FlexAttention for the banded cross-attention when compiled on CUDA


@dataclass
class M2FConfig:
    z_dim: int = 32
    audio_dim: int = 80
    style_dim: int = 512  # CLIP embedding width (projected); 0 = no style input
    width: int = 512
    layers: int = 8
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1  # residual and feed-forward dropout
    attn_dropout: Optional[float] = None  # on attention probabilities; None: = dropout (as nn.TransformerDecoderLayer)
    attn_kernel: str = "sdpa"  # see ATTN_KERNELS; both give the same function ("flex" takes no attn_dropout)
    # the residual stream's dtype under autocast: "float32" (fp32 position embeddings promote it, as
    # usual with autocast) or "compute" (bf16 on GPU: half the bytes in every layer-norm/residual kernel)
    residual_dtype: str = "float32"
    window: int = 200
    steps: int = 500
    align_frames: int = 15  # audio context per motion frame (+-0.5 s)
    p_drop_style: float = 0.2
    p_drop_all: float = 0.1
    w_simple: float = 1.0
    w_velocity: float = 1.0
    w_smooth: float = 0.01

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    @property
    def motion_dim(self) -> int:
        return self.z_dim + POSE_DIM

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "M2FConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Media2Face config keys: {sorted(unknown)}")
        return cls(**d)

    def __post_init__(self):
        if self.attn_kernel not in ATTN_KERNELS:
            raise ValueError(f"model.attn_kernel must be one of {ATTN_KERNELS}, got {self.attn_kernel!r}")
        if self.residual_dtype not in ("float32", "compute"):
            raise ValueError(f"model.residual_dtype must be 'float32' or 'compute', got {self.residual_dtype!r}")
        if self.attn_kernel == "flex" and self.attention_dropout:
            raise ValueError("model.attn_kernel 'flex' takes no attention dropout: set model.attn_dropout=0")


def cosine_alphas_cumprod(steps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) for t = 1..steps (float64)."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], -1)


def sinusoid_positions(n: int, dim: int, device=None) -> torch.Tensor:
    return timestep_embedding(torch.arange(n, device=device), dim)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters (names, shapes, initialisation), so
    checkpoints of either load into the other: one packed QKV projection and
    scaled_dot_product_attention for self-attention; for the banded cross-attention SDPA with a boolean
    mask or, with attn_kernel "flex", FlexAttention (the band evaluated inside the kernel) when compiled
    on CUDA. On an H100 the flex backward took about as long as cuDNN's masked one (bench/RESULTS.md)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, d = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, n, h * d))

    def self_attention(self, x: torch.Tensor, dropout_p: float) -> torch.Tensor:
        q, k, v = (self._heads(t) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, -1))
        return self._merge(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p))

    def cross_attention(self, x: torch.Tensor, mem: torch.Tensor, n_global: int, band: int, dropout_p: float,
                        kernel: str) -> torch.Tensor:
        """x (B, N, W) attends to mem (B, n_global + N, W): every query sees the global tokens, and
        memory frame j only from query frames within +-band of j."""
        w = x.shape[-1]
        q = self._heads(F.linear(x, self.in_proj_weight[:w], self.in_proj_bias[:w]))
        k, v = (self._heads(t) for t in F.linear(mem, self.in_proj_weight[w:], self.in_proj_bias[w:]).chunk(2, -1))
        n, s = q.shape[2], k.shape[2]
        if kernel == "flex" and q.is_cuda and torch.compiler.is_compiling():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            bm = create_block_mask(band_mod(n_global, band), None, None, n, s, device=q.device)
            return self._merge(flex_attention(q, k, v, block_mask=bm))
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(n, n_global, band, q.device),
                                                          dropout_p=dropout_p))


def band_mod(n_global: int, band: int):
    """Which memory token kj query frame qi sees: the global tokens always, memory frame j only from
    query frames within +-band of it (a FlexAttention mask_mod, evaluated inside the kernel)."""
    def visible(b, h, qi, kj):
        return (kj < n_global) | ((qi - kj + n_global).abs() <= band)
    return visible


def band_mask(n: int, n_global: int, band: int, device=None) -> torch.Tensor:
    """band_mod as a bool mask (True = visible) of shape (n, n_global + n), for SDPA."""
    qi, kj = torch.arange(n, device=device)[:, None], torch.arange(n_global + n, device=device)[None, :]
    return band_mod(n_global, band)(None, None, qi, kj)


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer (self-attention, banded cross-attention, GELU MLP), with
    nn.TransformerDecoderLayer(norm_first=True)'s parameter names and function."""

    def __init__(self, cfg: "M2FConfig"):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.self_attn = Attention(w, cfg.heads)
        self.multihead_attn = Attention(w, cfg.heads)
        self.linear1 = nn.Linear(w, cfg.ff_mult * w)
        self.linear2 = nn.Linear(cfg.ff_mult * w, w)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(w), nn.LayerNorm(w), nn.LayerNorm(w)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, n_global: int) -> torch.Tensor:
        p = self.cfg.attention_dropout if self.training else 0.0
        x = x + self.dropout1(self.self_attn.self_attention(self.norm1(x), p))
        x = x + self.dropout2(self.multihead_attn.cross_attention(self.norm2(x), mem, n_global, self.cfg.align_frames,
                                                                 p, self.cfg.attn_kernel))
        return x + self.dropout3(self.linear2(self.dropout(F.gelu(self.linear1(self.norm3(x))))))


class Decoder(nn.Module):
    def __init__(self, cfg: "M2FConfig"):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, mem: torch.Tensor, n_global: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mem, n_global)
        return x


class Media2Face(nn.Module):
    def __init__(self, cfg: M2FConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.motion_in = nn.Linear(cfg.motion_dim, w)
        self.audio_in = nn.Sequential(nn.Linear(cfg.audio_dim, w), nn.GELU(), nn.Linear(w, w))
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.style_in = nn.Linear(cfg.style_dim, w) if cfg.style_dim else None
        # learned "absent" conditions (classifier-free guidance)
        self.null_audio = nn.Parameter(torch.zeros(w))
        self.null_style = nn.Parameter(torch.zeros(w))
        self.decoder = Decoder(cfg)
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.motion_dim))
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(cfg.steps).float(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, audio: torch.Tensor, style: Optional[torch.Tensor],
                drop_audio: torch.Tensor, drop_style: torch.Tensor) -> torch.Tensor:
        """Predict x0. x_t (B, N, motion_dim), t (B,), audio (B, N, audio_dim), style (B, style_dim) or
        None; drop_* (B,) bool: replace that condition by its learned null."""
        b, n, _ = x_t.shape
        w = self.cfg.width
        pos = sinusoid_positions(n, w, x_t.device)
        h = self.motion_in(x_t)
        if self.cfg.residual_dtype == "compute":  # keep the stream in autocast's compute dtype
            pos = pos.to(h.dtype)
        h = h + pos
        a = self.audio_in(audio) + pos
        a = torch.where(drop_audio[:, None, None], self.null_audio.to(a.dtype).expand_as(a), a)
        te = self.time_mlp(timestep_embedding(t, w).to(h.dtype))
        if style is not None and self.style_in is not None:
            s = self.style_in(style)
            s = torch.where(drop_style[:, None], self.null_style.to(s.dtype).expand_as(s), s)
        else:
            s = self.null_style.to(h.dtype).expand(b, w)
        mem = torch.cat([te[:, None], s[:, None], a], 1)
        h = self.decoder(h + te[:, None], mem, n_global=2)
        return self.out(h)

    # --- diffusion ---
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[t].to(x0.dtype)[:, None, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def cfg_masks(batch: int, cfg: M2FConfig, generator: torch.Generator | None = None,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time condition dropping: (drop_audio, drop_style). A sample drops audio+style with
    p_drop_all, else style alone with p_drop_style; audio is never dropped while style is kept."""
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device).to(device)
    drop_all = u < cfg.p_drop_all
    drop_style = drop_all | (u < cfg.p_drop_all + cfg.p_drop_style)
    return drop_all, drop_style


def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    m = m.to(x.dtype)
    while m.dim() < x.dim():
        m = m[..., None]
    return (x * m).sum() / (m.expand_as(x).sum().clamp(min=1))


def losses(pred: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, cfg: M2FConfig) -> dict[str, torch.Tensor]:
    """simple + velocity + smooth over valid frames (mask (B, N) bool)."""
    simple = masked_mean((pred - x0) ** 2, mask)
    m1 = mask[:, 1:] & mask[:, :-1]
    vel = masked_mean(((pred[:, 1:] - pred[:, :-1]) - (x0[:, 1:] - x0[:, :-1])) ** 2, m1)
    m2 = m1[:, 1:] & m1[:, :-1]
    smooth = masked_mean((pred[:, 2:] - 2 * pred[:, 1:-1] + pred[:, :-2]) ** 2, m2)
    total = cfg.w_simple * simple + cfg.w_velocity * vel + cfg.w_smooth * smooth
    return {"loss": total, "simple": simple, "velocity": vel, "smooth": smooth}


def diffusion_draws(x0: torch.Tensor, cfg: M2FConfig, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of one training step, in a fixed order: timesteps t (B,), noise like x0, and
    the condition-dropping masks. On the generator's device (a CUDA generator on GPU: no host work and
    no pageable copy, which would stall the host until the GPU drains); its state goes in checkpoints."""
    gdev = generator.device if generator is not None else x0.device
    b = x0.shape[0]
    t = torch.randint(0, cfg.steps, (b,), generator=generator, device=gdev).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gdev).to(x0.device, x0.dtype)
    drop_audio, drop_style = cfg_masks(b, cfg, generator, x0.device)
    return t, noise, drop_audio, drop_style


class DiffusionLoss(nn.Module):
    """The training loss as one module (noising, denoiser, losses), so that torch.compile fuses the
    noising and the loss terms with the denoiser and DDP can wrap the whole step. The random draws
    come in as inputs (``diffusion_draws``): the module itself is deterministic given them (dropout
    aside). Returns the stacked [loss, simple, velocity, smooth] (one tensor: one output buffer)."""

    names = ("loss", "simple", "velocity", "smooth")

    def __init__(self, model: Media2Face):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor, audio: torch.Tensor, style: Optional[torch.Tensor], mask: torch.Tensor,
                t: torch.Tensor, noise: torch.Tensor, drop_audio: torch.Tensor, drop_style: torch.Tensor) -> torch.Tensor:
        pred = self.model(self.model.q_sample(x0, t, noise), t, audio, style, drop_audio, drop_style)
        L = losses(pred.float(), x0.float(), mask, self.model.cfg)
        return torch.stack([L[k] for k in self.names])


def training_loss(model: Media2Face, x0: torch.Tensor, audio: torch.Tensor, style: Optional[torch.Tensor],
                  mask: torch.Tensor, generator: torch.Generator | None = None,
                  forward: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """One diffusion training loss. ``forward`` is the DiffusionLoss module to call (a DDP or compiled
    wrapper of ``DiffusionLoss(model)``); by default a plain one."""
    forward = DiffusionLoss(model) if forward is None else forward
    out = forward(x0, audio, style, mask, *diffusion_draws(x0, model.cfg, generator))
    return dict(zip(DiffusionLoss.names, out.unbind(0)))


@torch.no_grad()
def guided_x0(model: Media2Face, x_t: torch.Tensor, t: torch.Tensor, audio: torch.Tensor, style: Optional[torch.Tensor],
              s_audio: float = 2.5, s_style: float = 1.5) -> torch.Tensor:
    """X = (1 - sA - sP) G(null) + sA G(A) + sP G(A, P), the three branches in one batch."""
    b = x_t.shape[0]
    dev = x_t.device
    tt, ff = torch.ones(b, dtype=torch.bool, device=dev), torch.zeros(b, dtype=torch.bool, device=dev)
    x3 = torch.cat([x_t] * 3)
    st = torch.cat([style] * 3) if style is not None else None
    g = model(x3, torch.cat([t] * 3), torch.cat([audio] * 3), st,
              torch.cat([tt, ff, ff]), torch.cat([tt, tt, ff if style is not None else tt]))
    g0, ga, gap = g[:b], g[b:2 * b], g[2 * b:]
    if style is None:  # no style given: X = (1 - sA) G(null) + sA G(A)
        return (1 - s_audio) * g0 + s_audio * ga
    return (1 - s_audio - s_style) * g0 + s_audio * ga + s_style * gap


@torch.no_grad()
def ddim_sample(model: Media2Face, audio: torch.Tensor, style: Optional[torch.Tensor] = None, n_steps: int = 50,
                s_audio: float = 2.5, s_style: float = 1.5, generator: torch.Generator | None = None,
                known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDIM (eta = 0) from noise to x0 for audio (B, N, audio_dim). ``known``/``known_mask`` (B, N)
    pin frames to given values (noised to each step), which continues a previous window."""
    cfg = model.cfg
    b, n, _ = audio.shape
    dev = audio.device
    ab = model.alphas_cumprod.to(dev)
    ts = torch.linspace(cfg.steps - 1, 0, n_steps, device=dev).round().long()
    x = noise if noise is not None else torch.randn((b, n, cfg.motion_dim), generator=generator, device=dev)
    x0 = x
    for i, t in enumerate(ts):
        if known is not None:  # pinned frames: the known motion noised to this step along the trajectory
            x = torch.where(known_mask[..., None], ab[t].sqrt() * known + (1 - ab[t]).sqrt() * _eps(x, x0, ab[t], i == 0), x)
        x0 = guided_x0(model, x, t.expand(b), audio, style, s_audio, s_style).float()
        eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        if i + 1 < len(ts):
            tp = ts[i + 1]
            x = ab[tp].sqrt() * x0 + (1 - ab[tp]).sqrt() * eps
        else:
            x = x0
    if known is not None:
        x = torch.where(known_mask[..., None], known, x)
    return x


def _eps(x: torch.Tensor, x0: torch.Tensor, ab_t: torch.Tensor, first: bool) -> torch.Tensor:
    """The noise direction currently implied by x (at step t): used to noise pinned frames
    consistently with the trajectory (at the first step, x itself is the noise)."""
    if first:
        return x
    return (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()


def generate_long(model: Media2Face, audio: torch.Tensor, style: Optional[torch.Tensor] = None, n_steps: int = 50,
                  overlap: int = 50, s_audio: float = 2.5, s_style: float = 1.5, seed: int = 0) -> torch.Tensor:
    """Motion for audio features of any length (N, audio_dim) -> (N, motion_dim): windows of
    cfg.window frames with ``overlap`` frames; each window continues the last by pinning its first
    ``overlap`` frames to the previous result."""
    cfg = model.cfg
    w = cfg.window
    n = audio.shape[0]
    dev = audio.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.zeros(n, cfg.motion_dim, device=dev)
    st = style[None] if style is not None else None
    start = 0
    prev_end = 0
    while True:
        end = min(start + w, n)
        a = torch.zeros(1, w, audio.shape[1], device=dev)
        a[0, : end - start] = audio[start:end]
        noise = torch.randn((1, w, cfg.motion_dim), generator=g).to(dev)
        known = km = None
        if start > 0:
            known = torch.zeros(1, w, cfg.motion_dim, device=dev)
            k = prev_end - start
            known[0, :k] = out[start:prev_end]
            km = torch.zeros(1, w, dtype=torch.bool, device=dev)
            km[0, :k] = True
        x = ddim_sample(model, a, st, n_steps, s_audio, s_style, known=known, known_mask=km, noise=noise)
        out[start:end] = x[0, : end - start]
        prev_end = end
        if end >= n:
            return out
        start = end - overlap
