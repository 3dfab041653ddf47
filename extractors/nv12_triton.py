"""NV12 to RGB in one Triton kernel (CUDA only; imported where Triton is installed): what
extractors.media.yuv420_to_rgb computes at the frames' own size, one read of each sample and one write of
each pixel, instead of a dozen elementwise passes over float copies of the frame."""
from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl


@triton.jit
def _nv12_rgb(src, dst, H, W, y0, ys, cs, a_rv, a_gu, a_gv, a_bu, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = H * W
    m = offs < n
    row = offs // W
    col = offs % W
    base = b * (n + n // 2)
    y = tl.load(src + base + offs, mask=m, other=0).to(tl.float32)
    c = base + n + (row // 2) * W + (col // 2) * 2
    u = tl.load(src + c, mask=m, other=128).to(tl.float32)
    v = tl.load(src + c + 1, mask=m, other=128).to(tl.float32)
    y = (y - y0) * ys
    u = (u - 128.0) * cs
    v = (v - 128.0) * cs
    r = tl.minimum(tl.maximum(tl.floor(y + a_rv * v + 1e-3), 0.0), 255.0)
    g = tl.minimum(tl.maximum(tl.floor(y + a_gu * u + a_gv * v + 1e-3), 0.0), 255.0)
    bl = tl.minimum(tl.maximum(tl.floor(y + a_bu * u + 1e-3), 0.0), 255.0)
    o = b * n * 3 + offs * 3
    tl.store(dst + o, r.to(tl.uint8), mask=m)
    tl.store(dst + o + 1, g.to(tl.uint8), mask=m)
    tl.store(dst + o + 2, bl.to(tl.uint8), mask=m)


_LOCK = threading.Lock()  # Triton's first compilation of a specialisation is not safe from two threads at once


def nv12_to_rgb(nv12: torch.Tensor, y0: float, ys: float, cs: float, coef: tuple[float, float, float, float],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H*3/2, W) uint8 NV12 on CUDA -> (B, H, W, 3) uint8 RGB (into ``out`` where given, contiguous);
    ``coef``: the V->R, U->G, V->G and U->B factors applied after the range offsets (see media.yuv420_to_rgb)."""
    x = nv12.contiguous()
    b, rows, w = x.shape
    h = rows * 2 // 3
    out = torch.empty(b, h, w, 3, dtype=torch.uint8, device=x.device) if out is None else out
    if not out.is_contiguous() or tuple(out.shape) != (b, h, w, 3):
        raise ValueError(f"out must be a contiguous ({b}, {h}, {w}, 3) tensor, got {tuple(out.shape)}")
    block = 1024
    with _LOCK:  # launches are asynchronous: holding it costs microseconds
        _nv12_rgb[(triton.cdiv(h * w, block), b)](x, out, h, w, y0, ys, cs, *coef, BLOCK=block)
    return out
