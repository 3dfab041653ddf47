"""Which scaled_dot_product_attention kernel is fastest for Media2Face's attention shapes (GPU).

The denoiser's two attentions per layer, at the trainer's batch: self-attention over the 200 motion
frames (no mask) and cross-attention to 2 global + 200 audio tokens with the alignment band (a bool
mask). Times forward + backward in bf16 for each SDPA backend that accepts the case, with and without
attention dropout, side by side in one run (CUDA events, median of the timed iterations).

    python bench/bench_attention.py [--batch 256]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.media2face import M2FConfig, band_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    cfg = M2FConfig()
    b, h, n, d = a.batch, cfg.heads, cfg.window, cfg.width // cfg.heads
    dev = torch.device("cuda")
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    cases = {"self": (n, None), "cross (band mask)": (n + 2, band_mask(n, 2, cfg.align_frames, dev))}
    flops = {name: 4 * b * h * n * s * d * 3.5 for name, (s, _) in cases.items()}  # fwd 1 + bwd 2.5, dense
    print(f"# SDPA forward+backward, bf16, batch {b}, {h} heads x {d}, {n} queries; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| attention | dropout | " + " | ".join(backends) + " |")
    print("|---|---|" + "---|" * len(backends))
    for name, (s, mask) in cases.items():
        for p in (0.0, cfg.dropout):
            row = []
            for bk in backends.values():
                q = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                go = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
                try:
                    with sdpa_kernel([bk]):
                        times = []
                        for i in range(a.iters + 3):
                            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            e0.record()
                            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).backward(go)
                            e1.record()
                            e1.synchronize()
                            if i >= 3:
                                times.append(e0.elapsed_time(e1))
                    ms = sorted(times)[len(times) // 2]
                    row.append(f"{ms * 1e3:.0f} us ({flops[name] / ms / 1e9:.0f} TFLOP/s)")
                except RuntimeError as e:  # this backend does not take the case
                    row.append("n/a" if "No available kernel" in str(e) else f"error: {str(e)[:40]}")
                del q, k, v, go
            print(f"| {name} | {p} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
