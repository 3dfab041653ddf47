"""Sequential decoding: video frames resampled to the 30 fps grid by timestamp, audio to 16 kHz mono."""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from storage_schemas import AUDIO_SAMPLE_RATE, FPS

from .errors import Reject

# M2FD_DECODE_LOG=<file>: every audio decode and video open appends "<kind>\t<path>" there (the decode-once
# test counts passes per source across processes; the Ray executor passes it to its tasks). Unset: one lookup.
DECODE_LOG_ENV = "M2FD_DECODE_LOG"


def _trace(kind: str, path: str) -> None:
    log = os.environ.get(DECODE_LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{kind}\t{path}\n")


@dataclass
class VideoTimeline:
    starts: np.ndarray  # presentation start (s) of every source frame, from the container index
    duration_s: float
    vfr: bool

    @property
    def n_out(self) -> int:
        """Number of frames on the 30 fps output grid covering the video."""
        return int(np.floor(self.duration_s * FPS + 1e-6))

    def source_index(self, k: np.ndarray) -> np.ndarray:
        """Source frame shown at output time k/30 (last frame whose start is <= that time)."""
        t = np.asarray(k, dtype=np.float64) / FPS
        idx = np.searchsorted(self.starts, t + 1e-6, side="right") - 1
        return np.clip(idx, 0, len(self.starts) - 1)


def analysis_size(coded_w: int, coded_h: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(coded_w, coded_h))
    return max(2, int(round(coded_w * s / 2)) * 2), max(2, int(round(coded_h * s / 2)) * 2)


def _decord():
    """decord, loaded after PyNvVideoCodec where that is installed. Both bundle their own FFmpeg libraries,
    and a process that loaded decord's first crashed creating an NVDEC decoder (a segmentation fault in
    PyNvVideoCodec's SimpleDecoder: extraction workers on the lent H100 that had decoded a source on the CPU
    before one on NVDEC, bench/RESULTS.md); in this order both work in one process. A GPU node's Ray worker
    runs both: a CPU-decoded source (variable frame rate, rotation) or an ingest task, then an NVDEC one."""
    if "decord" not in sys.modules:
        try:
            import PyNvVideoCodec  # noqa: F401
        except Exception:  # noqa: BLE001 - not installed (CPU machines) or unusable here: nothing to order
            pass
    import decord

    return decord


def open_video(path: str, width: int, height: int, max_side: int):
    """Open a sequential reader that yields display-oriented RGB frames at most ``max_side`` large.

    ``width``/``height`` are display dimensions: decord applies the container's rotation matrix
    itself (its frames match ffmpeg's autorotate output; tests check this)."""
    decord = _decord()
    _trace("video", path)
    w, h = analysis_size(width, height, max_side)
    kw = {"width": w, "height": h} if (w, h) != (width, height) else {}
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **kw)
    except Exception as e:  # noqa: BLE001 - decord raises DECORDError / RuntimeError
        raise Reject("decode_error", f"decoder cannot open the video stream: {str(e).splitlines()[0][:200]}") from e


NVCUVID = "libnvcuvid.so.1"  # the driver's NVDEC library; a container gets it with the driver's "video" capability


@functools.lru_cache(maxsize=1)
def nvdec_available() -> bool:
    """Whether NVDEC decoding can run here: PyNvVideoCodec installed, a CUDA device visible and the driver's
    NVDEC library loadable (a container started without the driver's video capability has CUDA but not it)."""
    try:
        import PyNvVideoCodec  # noqa: F401
        import torch
    except Exception:  # noqa: BLE001 - a missing or broken install is "not available"
        return False
    if not torch.cuda.is_available():
        return False
    try:
        ctypes.CDLL(NVCUVID)
    except OSError:
        return False
    return True


# NvdecVideo's default: each thread keeps its NVDEC decoder from one video to the next (reconfigured, not made
# anew); bench/bench_gpu_path.py times both
NVDEC_REUSE = True
NVDEC_MAX_SIDE = 2048  # a kept decoder's surfaces fit streams up to this large without a new session
NVDEC_KEEP = 2  # NVDEC sessions a kept decoder holds (H.264 and HEVC, say): each holds its surfaces' memory
_NVDEC_KEPT = threading.local()  # per thread: (gpu_id, SimpleDecoder) of its last video


def _nvdec_decoder(nvc, path: str, gpu_id: int, reuse: bool):
    """A SimpleDecoder (NV12 output into CUDA memory) at the start of ``path``. With ``reuse``, this thread's
    decoder of its previous video, reconfigured for this one: PyNvVideoCodec keeps up to 4 NVDEC sessions per
    decoder (NVDEC_KEEP here) and takes one that fits the new stream's codec and size (else it makes one),
    so a worker that decodes source after source skips most of a session's set-up. One thread decodes one
    video at a time (extract_source), so the previous video is done with when the next one opens; a decoding
    error forgets the kept decoder (NvdecVideo.iter_frames)."""
    kept = getattr(_NVDEC_KEPT, "dec", None) if reuse else None
    if kept is not None and kept[0] == gpu_id:
        try:
            kept[1].reconfigure_decoder(str(path))
            return kept[1]
        except Exception:  # noqa: BLE001 - a stream the kept sessions cannot take: a decoder of its own, kept next
            _NVDEC_KEPT.dec = None
    dec = nvc.SimpleDecoder(str(path), gpu_id=gpu_id, use_device_memory=True,
                            output_color_type=nvc.OutputColorType.NATIVE,
                            **({"max_width": NVDEC_MAX_SIDE, "max_height": NVDEC_MAX_SIDE,
                                "decoder_cache_size": NVDEC_KEEP} if reuse else {}))
    if reuse:
        _NVDEC_KEPT.dec = (gpu_id, dec)
    return dec


def _forget(dec) -> None:
    kept = getattr(_NVDEC_KEPT, "dec", None)
    if kept is not None and kept[1] is dec:
        _NVDEC_KEPT.dec = None


class NvdecVideo:
    """A video decoded by NVDEC (NVIDIA's PyNvVideoCodec) straight into CUDA memory: RGB frames as
    (H, W, 3) uint8 CUDA tensors, resized on the GPU to the analysis size ``open_video`` would give.
    For constant-frame-rate sources without a rotation matrix (the caller keeps the others on the CPU
    path): the timeline is the stream's frame count over its average rate. ``reuse`` (None:
    NVDEC_REUSE): this thread's decoder of its previous video, reconfigured (_nvdec_decoder)."""

    def __init__(self, path: str, width: int, height: int, max_side: int, gpu_id: int = 0, chunk: int = 64,
                 reuse: bool | None = None):
        import PyNvVideoCodec as nvc

        _trace("video", path)
        # NVDEC's own surfaces (NV12), converted to RGB below as the CPU decoder converts (yuv420_to_rgb):
        # PyNvVideoCodec's RGB output takes another matrix for some untagged streams (4 of the 17 corpus videos
        # 1.4-2.7 levels off decord's frames on average) and waits for the GPU each frame (bench/RESULTS.md)
        self.dec = _nvdec_decoder(nvc, str(path), gpu_id, NVDEC_REUSE if reuse is None else reuse)
        self.space, self.full_range = colour_tags(path, nvc)
        m = self.dec.get_stream_metadata()
        n, fps = len(self.dec), float(m.average_fps)
        if n == 0 or fps <= 0:
            raise Reject("truncated", "the video stream holds no frames")
        dur = min(n / fps, float(m.duration)) if float(m.duration or 0) > 0 else n / fps
        self.timeline = VideoTimeline(starts=np.arange(n) / fps, duration_s=max(dur, 1.0 / FPS), vfr=False)
        self.size = analysis_size(width, height, max_side)
        self.surface = (int(m.height) * 3 // 2, int(m.width))  # NV12 (or P016) of the stream's size
        self.chunk = chunk

    def _resized(self, frames: list):
        import torch

        x = torch.stack([_surface(torch.from_dlpack(f)) for f in frames])  # (B, H*3/2, W) NV12 on the GPU
        if tuple(x.shape[1:]) != self.surface or self.surface[0] % 3:
            raise ValueError(f"NVDEC hands this stream over as {tuple(x.shape[1:])} surfaces, not 4:2:0 of "
                             f"{self.surface[1]}x{self.surface[0] * 2 // 3} (NV12 {self.surface}): decode it on "
                             f"the CPU (extract.decoder=cpu)")
        w, h = self.size
        out = torch.empty(len(x), h, w, 3, dtype=torch.uint8, device=x.device)
        for i in range(0, len(x), 8):  # 8 frames at a time: a 64-frame chunk of 1080p in float32 is 1.6 GB
            yuv420_to_rgb(x[i:i + 8], self.space, self.full_range, (w, h), out=out[i:i + 8])
        return out

    def iter_frames(self, out_idx: np.ndarray) -> Iterator[tuple[int, object]]:
        """Yield (output index, (H, W, 3) uint8 CUDA tensor) for each sorted output index, decoding the
        stream once from its start, a chunk of frames at a time."""
        src = self.timeline.source_index(out_idx)
        buf, base = None, 0  # the decoded chunk and the source index of its first frame
        for k, i in zip(out_idx.tolist(), src.tolist()):
            while buf is None or i >= base + len(buf):
                if buf is not None:
                    base += len(buf)
                try:
                    got = self.dec.get_batch_frames(self.chunk)
                except Exception:
                    _forget(self.dec)  # a decoder that failed is not handed to this thread's next video
                    raise
                if not got:
                    raise Reject("truncated", f"NVDEC ended at frame {base} of {len(self.timeline.starts)}")
                buf = self._resized(got)
            yield k, buf[i - base]


def _surface(t):
    """A decoded surface as (rows, W): for NV12, H luma rows, then H/2 rows of interleaved chroma."""
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise ValueError(f"NVDEC surface of shape {tuple(t.shape)}: a 2-D NV12 (H*3/2, W) surface was expected")
    return t


def colour_tags(path: str, nvc=None) -> tuple[str, bool]:
    """(YUV matrix, full range) of a video stream as ffmpeg reads its tags (what the CPU decoder converts
    by): the matrix of its colour-space tag (BT.709, BT.2020, SMPTE 240M, FCC; untagged or any other: BT.601);
    full range for a yuvj pixel format or a "pc" range tag.
    Without ffprobe, PyNvVideoCodec's demuxer's tags, which miss some (on the lent H100: a BT.709 tag and a
    full-range stream of the corpus read as untagged)."""
    try:
        p = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=pix_fmt,color_space,color_range", "-of", "default=nw=1", str(path)],
                           capture_output=True, text=True, timeout=60)
        if p.returncode == 0 and p.stdout.strip():
            kv = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
            return (_MATRIX_OF_TAG.get(kv.get("color_space", ""), "bt601"),
                    kv.get("color_range") == "pc" or kv.get("pix_fmt", "").startswith("yuvj"))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        d = nvc.CreateDemuxer(str(path))
        space, rng = str(d.ColorSpace()).upper(), str(d.ColorRange()).upper()
    except Exception:  # noqa: BLE001 - no tags to be had: ffmpeg's defaults
        return "bt601", False
    return ("bt709" if "709" in space else "bt601"), "JPEG" in rng


# Kr, Kb of the YUV matrices ffmpeg's swscale applies by the stream's tag (an untagged stream: BT.601)
YUV_MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593),
                "smpte240m": (0.212, 0.087), "fcc": (0.30, 0.11)}
_MATRIX_OF_TAG = {"bt709": "bt709", "bt2020nc": "bt2020", "bt2020c": "bt2020", "smpte240m": "smpte240m", "fcc": "fcc"}


def yuv420_to_rgb(nv12, space: str = "bt601", full_range: bool = False, size: tuple[int, int] | None = None,
                  out=None):
    """(B, H*3/2, W) NV12 frames (uint8, or 16-bit P016 with the samples in the high bits) to (B, h, w, 3)
    uint8 RGB on the tensors' device, ``size`` = (w, h) (default the frames' own). Converts as the CPU
    decoder (decord, ffmpeg's swscale) does: the matrix of the stream's tag, studio range (16-235) unless the
    stream is full range, each chroma sample shared by its 2x2 pixels, truncated to integers; on the shared
    videos within a level of decord's frames (tests/test_mesh_torch.py). Resized (bilinear, antialiased)
    before the matrix: the luma plane and the two chroma planes each to ``size``, so the arithmetic runs on
    the small frame. On CUDA at the frames' own size: one Triton kernel (extractors.nv12_triton) where Triton
    is installed, bit-identical to the torch operations on the 17 corpus videos and 14-26x faster (H100)."""
    import torch

    b, rows, w = nv12.shape
    h = rows * 2 // 3
    if nv12.is_cuda and nv12.dtype == torch.uint8 and tuple(size or (w, h)) == (w, h) and _TRITON["ok"] is not False:
        try:  # the same arithmetic in one kernel
            from .nv12_triton import nv12_to_rgb

            rgb = nv12_to_rgb(nv12, *_yuv_coefficients(space, full_range), out=out)
            _TRITON["ok"] = True
            return rgb
        except Exception:  # noqa: BLE001 - no Triton, or one that cannot compile here: the torch operations
            if _TRITON["ok"]:  # it ran before: this failure is not Triton's absence
                raise
            _TRITON["ok"] = False
    rgb = _yuv420_to_rgb_torch(nv12, space, full_range, size)
    if out is not None:
        out.copy_(rgb)
        return out
    return rgb


_TRITON: dict = {"ok": None}  # whether the Triton kernel runs in this process (None: not tried yet)


def _yuv_coefficients(space: str, full_range: bool) -> tuple[float, float, float, tuple[float, float, float, float]]:
    """(luma offset, luma scale, chroma scale, (V->R, U->G, V->G, U->B)) of a stream's matrix and range: RGB =
    (Y - offset) * scale plus the factors times the chroma (U, V - 128) * chroma scale."""
    kr, kb = YUV_MATRICES[space]
    kg = 1 - kr - kb
    y0, ys, cs = (0.0, 1.0, 1.0) if full_range else (16.0, 255 / 219, 255 / 224)
    return y0, ys, cs, (2 * (1 - kr), -2 * kb * (1 - kb) / kg, -2 * kr * (1 - kr) / kg, 2 * (1 - kb))


def _yuv420_to_rgb_torch(nv12, space: str, full_range: bool, size: tuple[int, int] | None):
    """yuv420_to_rgb in torch's elementwise operations (any device; and the resizing)."""
    import torch
    import torch.nn.functional as F

    b, rows, w = nv12.shape
    h = rows * 2 // 3
    x = nv12.float() if nv12.dtype == torch.uint8 else nv12.float().div_(256)
    y0, ys, cs, (rv, gu, gv, bu) = _yuv_coefficients(space, full_range)
    uv = x[:, h:].reshape(b, h // 2, w // 2, 2)
    out_w, out_h = size or (w, h)
    if (out_w, out_h) != (w, h):
        y = F.interpolate(x[:, None, :h], size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)[:, 0]
        uv = F.interpolate(uv.permute(0, 3, 1, 2), size=(out_h, out_w), mode="bilinear", antialias=True,
                           align_corners=False)
        u, v = uv[:, 0], uv[:, 1]
    else:  # each chroma sample over its 2x2 luma block, by broadcasting (no upsampled copy)
        y = x[:, :h].reshape(b, h // 2, 2, w // 2, 2)
        u, v = uv[..., 0].reshape(b, h // 2, 1, w // 2, 1), uv[..., 1].reshape(b, h // 2, 1, w // 2, 1)
    y = y.sub(y0).mul_(ys)
    u, v = u.sub(128).mul_(cs), v.sub(128).mul_(cs)
    r = torch.add(y, v, alpha=rv)
    g = torch.add(y, u, alpha=gu).add_(v, alpha=gv)
    bl = torch.add(y, u, alpha=bu)
    # truncated as swscale's integer conversion truncates (rounding put every channel a level above decord's);
    # the 1e-3 keeps an exact level (235 -> 255) from falling below by float error
    return torch.stack([r, g, bl], -1).add_(1e-3).floor_().clamp_(0, 255).to(torch.uint8).reshape(b, out_h, out_w, 3)


def timeline(vr, duration_s: float) -> VideoTimeline:
    n = len(vr)
    if n == 0:
        raise Reject("truncated", "the video stream holds no frames")
    ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)
    vr.seek(0)
    starts = ts[:, 0] - ts[0, 0]
    d = np.diff(starts)
    vfr = bool(len(d) > 2 and d.mean() > 0 and (d.std() / d.mean() > 0.1))
    # the timeline ends where the last frame ends, capped by the container duration
    end = min(float(ts[-1, 1] - ts[0, 0]), duration_s) if duration_s > 0 else float(ts[-1, 1] - ts[0, 0])
    return VideoTimeline(starts=starts, duration_s=max(end, 1.0 / FPS), vfr=vfr)


def iter_frames(vr, tl: VideoTimeline, out_idx: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (output index, RGB frame) for each sorted output index, reading the stream sequentially.

    Frames between needed ones are skipped without colour conversion; an output index whose source
    frame repeats (frame-rate up-conversion) reuses the decoded frame.
    """
    src = tl.source_index(out_idx)
    pos = 0  # next source frame the reader will return
    last_i, last = -1, None
    for k, i in zip(out_idx.tolist(), src.tolist()):
        if i != last_i:
            try:
                if i > pos:
                    vr.skip_frames(i - pos)
                frame = vr.next().asnumpy()
            except StopIteration:
                raise Reject("truncated", f"stream ended at source frame {i} of {len(tl.starts)} declared",
                             frames_read=i, frames_declared=len(tl.starts)) from None
            except Exception as e:  # noqa: BLE001
                raise Reject("truncated", f"decoding failed at source frame {i} of {len(tl.starts)}: "
                             f"{str(e).splitlines()[0][:160]}", frames_read=i) from e
            pos = i + 1
            last_i = i
            last = frame
        yield k, last


def decode_audio(path: str, expected_s: float | None = None) -> np.ndarray:
    """Decode the first audio stream to float32 mono at 16 kHz (ffmpeg, sequential)."""
    _trace("audio", path)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-vn", "-ac", "1",
           "-ar", str(AUDIO_SAMPLE_RATE), "-f", "f32le", "-acodec", "pcm_f32le", "-"]
    p = subprocess.run(cmd, capture_output=True, timeout=600)
    audio = np.frombuffer(p.stdout, dtype="<f4").copy()
    err_text = p.stderr.decode(errors="replace")
    if "partial file" in err_text:
        raise Reject("truncated", "the file ends before its stream data does (demuxer: partial file)",
                     audio_s=audio.size / AUDIO_SAMPLE_RATE)
    if p.returncode != 0 and audio.size == 0:
        err = p.stderr.decode(errors="replace").strip().splitlines()
        raise Reject("decode_error", f"audio decoding failed: {err[-1] if err else p.returncode}")
    if expected_s and audio.size < 0.5 * expected_s * AUDIO_SAMPLE_RATE:
        raise Reject("truncated", f"audio decodes to {audio.size / AUDIO_SAMPLE_RATE:.2f} s of {expected_s:.2f} s declared",
                     audio_s=audio.size / AUDIO_SAMPLE_RATE, declared_s=expected_s)
    return audio
