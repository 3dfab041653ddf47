"""MediaPipe Face Mesh (478 refined landmarks) in PyTorch, batched over frames, on CUDA or the CPU.

The networks are MediaPipe's own, read from the installed wheel's .tflite files (models.tflite_torch):
the short-range BlazeFace detector (128 px, the one MediaPipe's Face Mesh runs) and the attention face
landmark model (192 px, 468 mesh points refined on lips and eyes, 10 iris points). The region-of-interest
logic follows MediaPipe's face_landmark_front graph as tensor operations over a batch of frames:

- detection on a square region (the whole frame letterboxed, or an upscaled window around a small
  speaker), SSD anchors decoded, the face at the expected box kept with MediaPipe's weighted suppression;
- a detection's rect: box centre, rotation from the eye keypoints, the longer side x 1.5, square;
- a rotated 192 px crop (bilinear, edge pixels replicated), landmarks, projected back to the frame;
- the next frame's rect from this frame's landmarks (box of the mesh, rotation from points 33 and 263,
  x 1.5), as MediaPipe tracks: each frame is cropped where the previous frame's mesh was, at its own
  detection where the previous frame has no face. That chain is sequential, so a clip is cut every
  CHAIN frames (counted from its first frame) into pieces tracked side by side, one network batch per
  step, each piece's chain started WARMUP frames earlier at a detection: a frame costs (CHAIN + WARMUP) /
  CHAIN landmark runs and the detector runs only where a chain starts or lost the face. A frame's result
  depends only on the clip's frames before it within its piece and warm-up, never on how frames are
  batched. (The earlier tracking, ``chain=0``: ``passes`` passes over each batch, pass p cropping frame t
  at pass p-1's landmarks of frame t-1; 3 passes ran 3 landmark networks and the detector per frame and
  were 2-3x further from MediaPipe, bench/RESULTS.md.)

Pure: arrays and tensors in, landmarks out; no Ray, no Dagster.
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DET_PX, LM_PX = 128, 192
_DET_MIN_SCORE, _NMS_IOU, _FLAG_MIN = 0.5, 0.3, 0.5
_ROI_SCALE = 1.5
CHAIN, WARMUP = 8, 2  # tracking: frames per chain piece, and the frames each piece's chain starts earlier


def mediapipe_model(rel: str, modules: str | Path | None = None) -> Path:
    """A .tflite file inside the installed mediapipe wheel's modules/ (or a copy of that folder, given here
    or as $M2FD_MEDIAPIPE_MODULES, for machines without the wheel: nothing is downloaded)."""
    modules = modules or os.environ.get("M2FD_MEDIAPIPE_MODULES") or None
    if modules is None:
        import mediapipe

        modules = Path(mediapipe.__file__).parent / "modules"
    p = Path(modules) / rel
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not in the installed mediapipe wheel")
    return p


@lru_cache(maxsize=None)
def ssd_anchors(px: int = DET_PX, strides: tuple[int, ...] = (8, 16, 16, 16), per_layer: int = 2) -> np.ndarray:
    """Anchor centres of MediaPipe's SsdAnchorsCalculator with a fixed anchor size (layers of one stride
    share a grid): the short-range detector's (896, 2) by default (128 px, strides 8, 16, 16, 16, two
    anchors a layer); the full-range one's (2304, 2) with ``(192, (4,), 1)``."""
    out, i = [], 0
    while i < len(strides):
        n = 0
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            n += per_layer
            j += 1
        g = math.ceil(px / strides[i])
        ys, xs = np.meshgrid((np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g, indexing="ij")
        c = np.stack([xs.ravel(), ys.ravel()], -1)
        out.append(np.repeat(c, n, axis=0))
        i = j
    return np.concatenate(out).astype(np.float32)


def warp_crops(frames: torch.Tensor, rects: torch.Tensor, size: int, border: str, chunk: int = 64,
               index: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """Rotated square crops as MediaPipe's ImageToTensor cuts them (the rect's corners onto the output's
    corners, bilinear). frames: (F, H, W, 3) uint8; rects: (B, 4) centre x, centre y, side (pixels),
    rotation (radians), crop k cut from frame ``index[k]`` (default: frame k); border: "zeros" (outside is
    black) or "border" (edge pixels replicated). Returns (B, size, size, 3) float32 in 0-255 (NHWC, as the
    networks take it).

    The four bilinear taps are gathered straight from the uint8 frames (a whole frame is never converted to
    float or copied), in float32 whatever the networks run in (a half-precision grid would be off by pixels
    on large frames); the same sampling as ``grid_sample(align_corners=True)`` at pixel coordinates.
    ``chunk`` crops at a time bound the temporaries; each crop is sampled on its own, so chunking changes
    nothing. ``fused``: each chunk through ``torch.compile`` (one generated kernel instead of ~40 with
    crop-sized temporaries; the same sampling to float rounding), 8x larger chunks."""
    _, H, W, _ = frames.shape
    B = len(rects)
    if index is None:
        index = torch.arange(B, device=frames.device)
    src = frames.reshape(1, -1, 3)  # every frame's pixels in one row, gathered per crop (a view, no copy)
    out = torch.empty(B, size, size, 3, device=frames.device, dtype=torch.float32)
    u = torch.arange(size, device=frames.device, dtype=torch.float32) / size - 0.5
    dy, dx = torch.meshgrid(u, u, indexing="ij")  # (size, size) in units of the side
    fn, chunk = (_fused_warp(), chunk * 8) if fused else (_warp_chunk, chunk)
    for i in range(0, B, chunk):
        base = (index[i:i + chunk].long() * (H * W))[:, None]
        r = rects[i:i + chunk].float().contiguous()  # one stride layout: no recompilation
        n = len(r)
        if fused and n % 8:  # padded to a multiple of 8 crops: no recompilation for a chunk of one crop
            r, base = torch.cat([r, r[-1:].expand(8 - n % 8, 4)]), torch.cat([base, base[-1:].expand(8 - n % 8, 1)])
        out[i:i + n] = fn(src, r, base, dx, dy, H, W, border == "border")[:n]
    return out


def _warp_chunk(src: torch.Tensor, r: torch.Tensor, base: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                H: int, W: int, clamp: bool) -> torch.Tensor:
    """warp_crops' sampling of one chunk: rects r (n, 4), ``base`` (n, 1) each crop's first pixel in the
    row ``src`` (1, F H W, 3) -> (n, size, size, 3) float32."""
    n = len(r)
    c, s, side = torch.cos(r[:, 3])[:, None, None], torch.sin(r[:, 3])[:, None, None], r[:, 2, None, None]
    x = r[:, 0, None, None] + (c * dx - s * dy) * side
    y = r[:, 1, None, None] + (s * dx + c * dy) * side
    if clamp:
        x, y = x.clamp(0, W - 1), y.clamp(0, H - 1)
    x0, y0 = torch.floor(x), torch.floor(y)
    wx, wy = (x - x0).reshape(n, -1, 1), (y - y0).reshape(n, -1, 1)
    x0, y0 = x0.long().reshape(n, -1), y0.long().reshape(n, -1)
    rows = src.expand(n, -1, 3)
    acc = None
    for ox, oy, w in ((0, 0, (1 - wx) * (1 - wy)), (1, 0, wx * (1 - wy)), (0, 1, (1 - wx) * wy), (1, 1, wx * wy)):
        xi, yi = x0 + ox, y0 + oy
        inside = ((xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)).unsqueeze(-1)
        idx = (base + yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).unsqueeze(-1).expand(n, -1, 3)
        v = torch.gather(rows, 1, idx).float() * (w * inside)
        acc = v if acc is None else acc + v
    return acc.reshape(n, *dx.shape, 3)


@lru_cache(maxsize=None)
def _fused_warp():
    """_warp_chunk through torch.compile (dynamic shapes: one kernel for every chunk and frame size)."""
    return torch.compile(_warp_chunk, dynamic=True, fullgraph=True)


def _to(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small host tensor on ``dev`` without waiting for the kernels queued there."""
    return x.to(dev, non_blocking=True) if dev.type == "cuda" else x


FULL_PX = 192  # the full-range detector's input


def anchor_boxes(reg: torch.Tensor, anchors: torch.Tensor, px: int) -> torch.Tensor:
    """SSD box regressions (.., A, >= 4: centre offset, size, in input pixels) on fixed-size anchors
    (A, 2) -> (.., A, 4) x0 y0 x1 y1, normalised to the detector's input (MediaPipe's
    TensorsToDetections with x/y/w/h scale = ``px``)."""
    ctr = reg[..., :2] / px + anchors
    half = reg[..., 2:4] / px / 2
    return torch.cat([ctr - half, ctr + half], -1)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float = _NMS_IOU) -> np.ndarray:
    """MediaPipe's weighted non-maximum suppression (NonMaxSuppressionCalculator, WEIGHTED, IoU): the best
    remaining box takes every remaining box overlapping it by more than ``iou_thr`` (itself included) and
    becomes their score-weighted mean, with its own score. boxes (N, 4) x0 y0 x1 y1 -> (M, 5) with scores."""
    from .faces import iou

    order = np.argsort(-scores, kind="stable")
    out = []
    while len(order):
        top = order[0]
        sim = iou(boxes[top:top + 1], boxes[order])[0]
        take = order[sim > iou_thr]
        if len(take) == 0:  # a box of no area overlaps nothing, not even itself: MediaPipe keeps it and stops
            out.append(np.append(boxes[top], scores[top]))
            break
        w = scores[take]
        out.append(np.append((boxes[take] * w[:, None]).sum(0) / w.sum(), scores[top]))
        order = order[sim <= iou_thr]
    return np.asarray(out, np.float32).reshape(-1, 5)


class TorchFaceDetector:
    """MediaPipe's full-range face detection (``FaceDetector(model=1)``: the wheel's sparse
    face_detection_full_range model, densified at load) in PyTorch, on CUDA or the CPU: each frame
    letterboxed onto 192 px (zeros outside it), 2,304 anchors decoded, scores >= ``min_score`` kept, then
    MediaPipe's weighted suppression. ``detect(rgb)`` returns what FaceDetector.detect returns: (N, 5)
    [x0, y0, x1, y1, score], normalised to the frame and clipped to it; ``detect_batch`` does a batch of
    equal-sized frames in one network run."""

    def __init__(self, device: str = "cpu", min_score: float = 0.5, dtype: torch.dtype | None = None,
                 modules: str | Path | None = None, graphs: bool | None = None):
        from models.tflite_torch import CudaGraphed, TFLiteGraph

        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.min_score = min_score
        self.net = TFLiteGraph(mediapipe_model("face_detection/face_detection_full_range_sparse.tflite", modules)).eval()
        self.net.to(self.device, self.dtype)
        cuda = self.device.type == "cuda"
        self._net = CudaGraphed(self.net) if (cuda if graphs is None else graphs and cuda) else self.net
        self.anchors = torch.from_numpy(ssd_anchors(FULL_PX, (4,), 1)).to(self.device)
        self.sha256 = self.net.sha256

    @torch.no_grad()
    def detect_batch(self, frames) -> list[np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        x = x.to(self.device)
        B, H, W, _ = x.shape
        side = float(max(H, W))
        roi = torch.tensor([W / 2, H / 2, side, 0.0], dtype=torch.float32).to(self.device).expand(B, 4)
        crops = warp_crops(x, roi, FULL_PX, "zeros") * (2 / 255) - 1
        reg, cls = self._net(crops.to(self.dtype))
        score = torch.sigmoid(cls.float().clamp(-100, 100))[..., 0]
        box = anchor_boxes(reg.float(), self.anchors, FULL_PX)  # letterboxed-square-normalised
        # -> frame-normalised: the square of side max(H, W) centred on the frame
        scale = torch.tensor([side / W, side / H, side / W, side / H], device=box.device)
        off = torch.tensor([(W - side) / 2 / W, (H - side) / 2 / H] * 2, device=box.device)
        box, score = (box * scale + off).cpu().numpy(), score.cpu().numpy()
        out = []
        for b, sc in zip(box, score):
            keep = sc >= self.min_score
            d = weighted_nms(b[keep], sc[keep])
            d[:, :4] = np.clip(d[:, :4], 0.0, 1.0)
            out.append(d[(d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])])
        return out

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        return self.detect_batch(rgb[None])[0]


def rect_from_box(lo: torch.Tensor, hi: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    """MediaPipe's DetectionsToRects + RectTransformation(scale 1.5, square_long) in pixels: the rect of a
    box (lo, hi corners, (B, 2) each) centred on it, its longer side x 1.5, rotated to level the line
    p0 -> p1. Returns (B, 4) centre x, centre y, side, rotation."""
    rot = -torch.atan2(-(p1[:, 1] - p0[:, 1]), p1[:, 0] - p0[:, 0])
    rot = rot - 2 * math.pi * torch.floor((rot + math.pi) / (2 * math.pi))
    side = (hi - lo).amax(1) * _ROI_SCALE
    return torch.stack([(lo[:, 0] + hi[:, 0]) / 2, (lo[:, 1] + hi[:, 1]) / 2, side, rot], -1)


def rect_from_points(xy: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """The rect of a point set (B, N, 2), e.g. the mesh: its box, levelled on points i0 -> i1."""
    return rect_from_box(xy.amin(1), xy.amax(1), xy[:, i0], xy[:, i1])


class TorchFaceMesh:
    """Batched Face Mesh. ``track(frames, expect_box, det_roi, carry)`` -> (landmarks (B, 478, 3) in
    frame-normalised coordinates (x by width, y by height, z in x's scale; NaN where no face), carry for
    the next batch of the same clip). Tracking: chains cut every ``chain`` frames with ``warmup`` frames
    of warm-up (the default), or with ``chain=0`` ``passes`` passes over each batch."""

    def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None, passes: int = 3,
                 modules: str | Path | None = None, graphs: bool | None = None, chain: int = CHAIN,
                 warmup: int = WARMUP, fused_warp: bool = False, pad_to: int | None = None):
        from models.tflite_torch import CudaGraphed, TFLiteGraph

        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.passes = passes
        self.pad_to = pad_to or None  # track()'s network calls: see track_many
        if chain < 0 or warmup < 0:
            raise ValueError(f"chain and warmup must be >= 0, got {chain}, {warmup}")
        self.chain, self.warmup = chain, warmup
        self.det = TFLiteGraph(mediapipe_model("face_detection/face_detection_short_range.tflite", modules)).eval()
        self.lm = TFLiteGraph(mediapipe_model("face_landmark/face_landmark_with_attention.tflite", modules)).eval()
        self.det.to(self.device, self.dtype)
        self.lm.to(self.device, self.dtype)
        # on CUDA each network runs as a CUDA graph per batch shape (``graphs``: default on CUDA). The NHWC
        # input, permuted to NCHW, already has cuDNN run its channels-last kernels (channels-last weights
        # made no difference on an H100, bench/RESULTS.md)
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs and cuda
        self._det, self._lm = (CudaGraphed(self.det), CudaGraphed(self.lm)) if self.graphs else (self.det, self.lm)
        self.fused_warp = fused_warp  # crops cut by one torch.compile'd kernel (warp_crops(fused=True))
        if fused_warp:  # compiled now, both border modes, so a node that cannot compile says so at load
            # as detect() and landmarks() call it (no autograd, their crop sizes), with every size distinct (a
            # frame's height, width, the crop count: equal sizes would be unified by dynamo's duck sizing, and a
            # frame of other proportions would compile again at first use)
            try:
                f = torch.zeros(2, 24, 16, 3, dtype=torch.uint8, device=self.device)
                r = torch.tensor([[8.0, 8.0, 12.0, 0.1]], device=self.device).expand(3, 4)
                with torch.no_grad():
                    for px, border in ((DET_PX, "zeros"), (LM_PX, "border")):
                        warp_crops(f, r, px, border, index=torch.tensor([0, 1, 1], device=self.device), fused=True)
            except Exception as e:  # noqa: BLE001 - any compiler failure: one clear error instead
                raise RuntimeError(f"extract.mesh_fused_warp: torch.compile could not build the crop kernel on "
                                   f"{self.device} ({type(e).__name__}: {str(e)[:300]}); set "
                                   f"extract.mesh_fused_warp=false") from e
        self.anchors = torch.from_numpy(ssd_anchors()).to(self.device)
        # the refinement index lists are the model's own (its Landmarks2TransformMatrix subsets):
        # lips, left eye, right eye, in the order of its outputs
        subs = [op.opts for op in self.lm.ops if op.kind == "Landmarks2TransformMatrix"]
        self.lips, self.left_eye, self.right_eye = (torch.tensor(o["subset_idxs"], device=self.device) for o in subs)
        self.sha256 = {"detector": self.det.sha256, "landmarks": self.lm.sha256}

    # --- networks ------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, frames: torch.Tensor, roi: torch.Tensor, expect: torch.Tensor, index: torch.Tensor | None = None):
        """Detection on (B, H, W, 3) uint8 frames (or on frames ``index`` (B,) of them), each on its square
        roi (B, 4): the face whose box holds ``expect`` (B, 2 pixels), merged with its overlapping anchors
        (weighted suppression). Returns (rect (B, 4), found (B,))."""
        return self._det_out(self._run(self._det, self._det_crops(frames, roi, index)), roi, expect)

    def _det_crops(self, frames: torch.Tensor, roi: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return warp_crops(frames, roi, DET_PX, "zeros", index=index, fused=self.fused_warp) * (2 / 255) - 1

    def _lm_crops(self, frames: torch.Tensor, rects: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return warp_crops(frames, rects, LM_PX, "border", index=index, fused=self.fused_warp) / 255

    def _run(self, net, x: torch.Tensor, pad_to: int | None = None) -> list[torch.Tensor]:
        """A network on crops ``x``: in one call, or with ``pad_to`` in calls of exactly that many crops (the
        last one padded), so every crop runs through the same kernels whatever else is in the batch."""
        if not pad_to:
            return net(x.to(self.dtype))
        n, outs = len(x), []
        for i in range(0, n, pad_to):
            c = x[i:i + pad_to]
            if len(c) < pad_to:
                c = torch.cat([c, c[-1:].expand(pad_to - len(c), *c.shape[1:])])
            outs.append(net(c.to(self.dtype)))
        return [torch.cat([o[k] for o in outs])[:n] for k in range(len(outs[0]))]

    def _det_out(self, outs, roi: torch.Tensor, expect: torch.Tensor):
        """detect()'s result from the detector's outputs on the crops at ``roi`` (rows as in detect())."""
        reg, cls = outs
        reg, score = reg.float(), torch.sigmoid(cls.float().clamp(-100, 100))[..., 0]
        a = self.anchors
        pts = reg[..., 4:].reshape(*reg.shape[:2], 6, 2) / DET_PX + a[None, :, None]  # ROI-normalised
        box = anchor_boxes(reg, a, DET_PX)
        # ROI-normalised -> frame pixels (the ROI is square and upright)
        side, origin = roi[:, 2, None, None], (roi[:, :2] - roi[:, 2:3] / 2)[:, None]
        box = box.reshape(*box.shape[:2], 2, 2) * side[..., None] + origin[:, :, None]
        pts = pts * side[..., None] + origin[:, :, None]
        e = expect[:, None]
        holds = ((box[:, :, 0] <= e) & (e <= box[:, :, 1])).all(-1)
        cand = (score >= _DET_MIN_SCORE) & holds
        seed = torch.where(cand, score, torch.full_like(score, -1)).argmax(1)
        found = cand.any(1)
        sb = box[torch.arange(len(box), device=box.device), seed]  # (B, 2, 2)
        lo, hi = torch.maximum(box[:, :, 0], sb[:, None, 0]), torch.minimum(box[:, :, 1], sb[:, None, 1])
        inter = (hi - lo).clamp(min=0).prod(-1)
        area = (box[:, :, 1] - box[:, :, 0]).prod(-1)
        iou = inter / (area + (sb[:, 1] - sb[:, 0]).prod(-1)[:, None] - inter + 1e-9)
        w = torch.where((score >= _DET_MIN_SCORE) & (iou > _NMS_IOU), score, torch.zeros_like(score))
        w = w / w.sum(1, keepdim=True).clamp(min=1e-9)
        allpts = torch.cat([box, pts], 2)  # (B, A, 8, 2): box corners then keypoints
        merged = (w[..., None, None] * allpts).sum(1)
        # the detection box, levelled on keypoints 0 (right eye) and 1 (left eye)
        return rect_from_box(merged[:, 0], merged[:, 1], merged[:, 2], merged[:, 3]), found

    @torch.no_grad()
    def landmarks(self, frames: torch.Tensor, rects: torch.Tensor, index: torch.Tensor | None = None):
        """(B, 478, 3) landmarks in frame pixels (z in the same scale) and (B,) face-flag scores of the
        crops at ``rects`` (B, 4) of frames ``index`` (B,) (default: rect k on frame k)."""
        return self._lm_out(self._run(self._lm, self._lm_crops(frames, rects, index)), rects)

    def _lm_out(self, outs, rects: torch.Tensor):
        """landmarks()'s result from the landmark network's outputs on the crops at ``rects``."""
        mesh, lips, leye, reye, liris, riris, flag = outs
        B = len(rects)
        m = mesh.float().reshape(B, 468, 3).clone()
        m[:, self.lips, :2] = lips.float().reshape(B, 80, 2)
        m[:, self.left_eye, :2] = leye.float().reshape(B, -1, 2)
        m[:, self.right_eye, :2] = reye.float().reshape(B, -1, 2)
        iris = []
        for pts, eye in ((liris, self.left_eye), (riris, self.right_eye)):
            z = m[:, eye[:16], 2].mean(1, keepdim=True)
            iris.append(torch.cat([pts.float().reshape(B, 5, 2), z[:, :, None].expand(B, 5, 1)], -1))
        lm = torch.cat([m] + iris, 1) / LM_PX
        lm[..., :2] -= 0.5  # crop-centred x, y (no constant tensor copied to the device: that waits for it)
        r = rects.float()
        c, s = torch.cos(r[:, 3])[:, None], torch.sin(r[:, 3])[:, None]
        side = r[:, 2, None]
        px = r[:, 0, None] + (c * lm[..., 0] - s * lm[..., 1]) * side
        py = r[:, 1, None] + (s * lm[..., 0] + c * lm[..., 1]) * side
        return torch.stack([px, py, lm[..., 2] * side], -1), torch.sigmoid(flag.float().reshape(B))

    # --- a clip ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def track(self, frames: torch.Tensor, expect_box, det_roi, carry=None):
        """frames: (B, H, W, 3) uint8 on this device, consecutive frames of one clip; expect_box: the
        speaker's [x0, y0, x1, y1] (frame-normalised); det_roi: the square detection region [cx, cy, side]
        in pixels; carry: what the previous batch of the clip returned (None at the clip's start). The networks
        run on calls of ``pad_to`` crops where the tracker was made with it (track_many)."""
        return self.track_many([(frames, expect_box, det_roi, carry)], self.pad_to)[0]

    @torch.no_grad()
    def track_many(self, jobs, pad_to: int | None = None):
        """``track`` on the next batch of several clips at once: ``jobs`` are (frames, expect_box, det_roi,
        carry) as track() takes them, frames of any size; returns [(landmarks, carry)] in the same order.
        Each chain step runs the networks once over the chains of every clip, so many clips' small batches
        fill the GPU as one large batch does. ``pad_to``: the networks run on calls of exactly that many
        crops (the last padded), so a clip's landmarks do not depend on which clips share its steps (every
        crop through the same kernels; on CUDA, one captured graph per network); None: one call of
        whatever size, as track() runs one clip. The 3-pass tracking (``chain=0``) runs clip by clip."""
        if not jobs:
            return []
        prep = []
        for frames, expect_box, det_roi, carry in jobs:
            n = len(frames)
            # a batch is padded (its last frame repeated) up to a power of two: every clip's last, partial
            # batch then has one of a few shapes, so cuDNN plans each convolution once per shape, not per clip
            # (measured on an H200: planning new shapes was most of the extraction's time)
            B = max(8, 1 << (n - 1).bit_length())
            f = torch.cat([frames, frames[-1:].expand(B - n, *frames.shape[1:])]) if B > n else frames
            _, H, W, _ = f.shape
            # small host values go to the device without a wait (a blocking copy waits for every queued kernel)
            expect = _to(torch.tensor([(expect_box[0] + expect_box[2]) / 2 * W,
                                       (expect_box[1] + expect_box[3]) / 2 * H], dtype=torch.float32),
                         self.device).expand(B, 2)
            roi = _to(torch.tensor([det_roi[0], det_roi[1], det_roi[2], 0.0], dtype=torch.float32),
                      self.device).expand(B, 4)
            prep.append((f, n, roi, expect, carry))
        if self.chain:
            res = self._chains_many(prep, scheduled=True, pad_to=pad_to)
            missed = torch.stack([r[3] for r in res]).cpu().numpy()  # one wait for all the clips
            if missed.any():  # a chain lost the face: again with detections wherever one is lost
                redo = self._chains_many([prep[i] for i in np.flatnonzero(missed)], scheduled=False, pad_to=pad_to)
                for i, r in zip(np.flatnonzero(missed), redo):
                    res[i] = r
        else:
            res = []
            for f, n, roi, expect, carry in prep:
                det_rect, found = self.detect(f, roi, expect)
                res.append(self._passes(f, n, det_rect, found, carry))
        out = []
        for (f, n, *_), (lm, ok, carry_out, *_) in zip(prep, res):
            _, H, W, _ = f.shape
            lm = lm[:n] / _to(torch.tensor([W, H, W], dtype=torch.float32), self.device)
            out.append((torch.where(ok[:n, None, None], lm, torch.full_like(lm, float("nan"))), carry_out))
        return out

    def _passes(self, f, n, det_rect, found, carry):
        """Tracking in ``passes`` passes over the batch: pass 1 crops each frame at its detection, pass p
        at the rect of pass p-1's landmarks of the frame before (chains of ``passes`` frames)."""
        dev = self.device
        lm, flag = self.landmarks(f, det_rect)
        ok = found & (flag >= _FLAG_MIN)
        carry = list(carry) if carry is not None else [None] * self.passes
        carry_out = [(lm[n - 1:n], ok[n - 1:n])]
        for p in range(1, self.passes):
            c = carry[p - 1]
            prev_lm = torch.cat([c[0] if c is not None else lm[:1], lm[:-1]])
            prev_ok = torch.cat([c[1] if c is not None else torch.zeros(1, dtype=torch.bool, device=dev), ok[:-1]])
            rect = torch.where(prev_ok[:, None], rect_from_points(prev_lm[..., :2], 33, 263), det_rect)
            lm, flag = self.landmarks(f, rect)
            ok = (prev_ok | found) & (flag >= _FLAG_MIN)
            carry_out.append((lm[n - 1:n], ok[n - 1:n]))
        return lm, ok, carry_out

    def _chains(self, f, n, roi, expect, carry, scheduled: bool = False):
        """_chains_many on one clip."""
        return self._chains_many([(f, n, roi, expect, carry)], scheduled)[0]

    def _chains_many(self, items, scheduled: bool = False, pad_to: int | None = None):
        """MediaPipe's own tracking (each frame cropped at the rect of the previous frame's landmarks, at
        its detection where the previous frame has none), run as parallel chains: the clip is cut at
        every ``chain``-th frame (counted from the clip's first frame, whatever the batches), and each
        piece's chain starts ``warmup`` frames earlier at a detection, those frames' results discarded.
        A step runs the landmark network once on one frame of every piece, so a frame costs
        (chain + warmup) / chain landmark runs (1.25 at 8 and 2), and every frame's crop comes from a chain
        at least warmup + 1 frames long. The detector runs only where a chain starts or has lost the face.
        ``items``: one (frames, n, roi, expect, carry) per clip, whose chains step together (one network
        call a step for all of them, ``pad_to`` as in track_many); ``carry``: the clip's frames seen so far
        and its last chain + warmup - 1 frames, so the cut does not depend on the batches. ``scheduled``:
        detections only where a chain starts (known on the host: no step waits for the GPU), and
        ``missed`` (a device bool) says whether a chain of the clip lost the face, where MediaPipe detects
        again: the caller then runs the batch unscheduled (a detection wherever a face is lost, found by
        waiting for each step), which gives the same result a scheduled run gives when no face is lost.
        Returns [(landmarks, ok, carry, missed)] per clip."""
        dev = self.device
        L, Wm = self.chain, self.warmup
        cl = []  # per clip: its frames in one tensor with the carried ones, and its pieces (host)
        for f, n, roi, expect, carry in items:
            carry = carry if carry is not None else {"seen": 0, "frames": f[:0]}
            o, P = carry["seen"], len(carry["frames"])
            first = (o // L) * L  # the first piece reaching into this batch starts here (clip frame)
            S = -(-(o + n - first) // L)
            cl.append({"B": len(f), "n": n, "o": o, "P": P, "roi": roi, "expect": expect,
                       "ext": torch.cat([carry["frames"], f]) if P else f,  # ext frame j: clip frame o - P + j
                       "starts": first + L * np.arange(S), "valid_before": np.zeros(S, bool)})
        off = np.cumsum([0] + [len(c["starts"]) for c in cl])  # clip i's chains: rows off[i]:off[i + 1]
        boff = np.cumsum([0] + [c["B"] + 1 for c in cl])  # its output rows; row B of each: steps outside its batch
        out_lm = torch.zeros(boff[-1], 478, 3, device=dev)
        out_ok = torch.zeros(boff[-1], dtype=torch.bool, device=dev)
        prev_lm = torch.zeros(off[-1], 478, 3, device=dev)
        prev_ok = torch.zeros(off[-1], dtype=torch.bool, device=dev)
        lost = torch.zeros(off[-1], dtype=torch.bool, device=dev)  # a chain lost its face on the way
        for t in range(Wm + L):
            # the clip frame each chain is at, its frame in ext and whether it lies in this batch: known on the host
            valid_h, jj_h, row_h, keep_h, start_h, going_h = [], [], [], [], [], []
            for i, c in enumerate(cl):
                c_h = c["starts"] - Wm + t
                j_h = c_h - (c["o"] - c["P"])
                v = (c_h >= 0) & (j_h >= 0) & (j_h < c["P"] + c["n"])
                k = c_h - c["o"]
                keep = v & (t >= Wm) & (k >= 0) & (k < c["n"])
                valid_h.append(v)
                jj_h.append(j_h.clip(0, c["P"] + c["B"] - 1))
                row_h.append(boff[i] + np.where(keep, k, c["B"]))
                keep_h.append(keep)
                start_h.append(off[i] + np.flatnonzero(v & ~c["valid_before"]))  # chains that start at this step
                going_h.append(~v | c["valid_before"])
                c["valid_before"] = v
            valid_h = np.concatenate(valid_h)
            valid = _to(torch.from_numpy(valid_h), dev)
            jj = _to(torch.from_numpy(np.concatenate(jj_h)), dev)
            row = _to(torch.from_numpy(np.concatenate(row_h)), dev)
            rect = rect_from_points(prev_lm[..., :2], 33, 263)
            found = prev_ok.clone()
            if scheduled:
                lost = lost | (valid & ~prev_ok & _to(torch.from_numpy(np.concatenate(going_h)), dev))
                need_h = np.concatenate(start_h)
            else:
                need_h = torch.nonzero(valid & ~prev_ok)[:, 0].cpu().numpy()
            if len(need_h):
                # detections of the chains without a face; with one call of any size, padded to a power of two
                # (few shapes)
                m = len(need_h)
                owner = np.searchsorted(off, need_h, side="right") - 1
                crops, roi, expect = [], [], []
                for i in np.unique(owner):
                    mine = need_h[owner == i]
                    crops.append(self._det_crops(cl[i]["ext"], cl[i]["roi"][:1].expand(len(mine), 4),
                                                 jj[_to(torch.from_numpy(mine), dev)]))
                    roi.append(cl[i]["roi"][:1].expand(len(mine), 4))
                    expect.append(cl[i]["expect"][:1].expand(len(mine), 2))
                crops, roi, expect = torch.cat(crops), torch.cat(roi), torch.cat(expect)
                if not pad_to:
                    p = max(8, 1 << (m - 1).bit_length()) - m
                    crops, roi, expect = (torch.cat([x, x[-1:].expand(p, *x.shape[1:])]) for x in (crops, roi, expect))
                dr, df = self._det_out(self._run(self._det, crops, pad_to), roi, expect)
                need = _to(torch.from_numpy(need_h), dev)
                rect[need], found[need] = dr[:m], df[:m]
            crops = torch.cat([self._lm_crops(c["ext"], rect[off[i]:off[i + 1]], jj[off[i]:off[i + 1]])
                               for i, c in enumerate(cl)])
            lm, flag = self._lm_out(self._run(self._lm, crops, pad_to), rect)
            ok = valid & found & (flag >= _FLAG_MIN)
            out_lm[row], out_ok[row] = lm, ok & _to(torch.from_numpy(np.concatenate(keep_h)), dev)
            prev_lm, prev_ok = lm, ok
        res = []
        for i, c in enumerate(cl):
            keep_n = min(c["o"] + c["n"], L - 1 + Wm)
            carry_out = {"seen": c["o"] + c["n"], "frames": c["ext"][c["P"] + c["n"] - keep_n: c["P"] + c["n"]].clone()}
            res.append((out_lm[boff[i]:boff[i + 1] - 1], out_ok[boff[i]:boff[i + 1] - 1], carry_out,
                        lost[off[i]:off[i + 1]].any()))
        return res

    def track_array(self, frames, expect_box, det_roi, carry=None):
        """``track`` on (B, H, W, 3) uint8 frames (numpy, or a tensor on any device); landmarks come
        back as float32 numpy."""
        x = torch.from_numpy(frames) if isinstance(frames, np.ndarray) else frames
        lm, carry = self.track(x.to(self.device), expect_box, det_roi, carry)
        return lm.cpu().numpy().astype(np.float32), carry


class SharedTracker:
    """One TorchFaceMesh for several threads of a process, each extracting its own sources (extract_source
    with ``landmarker=`` this object): their ``track_array`` calls wait for one another and run as one
    ``track_many``, so each chain step's networks see every thread's chains in one batch. A call runs once
    every thread inside ``member()`` has a batch waiting, or ``wait_s`` after it came (a thread busy on
    the CPU does not hold the others); a thread that calls outside ``member()`` is not waited for. The
    networks run on calls of exactly ``pad_to`` crops, so a clip's landmarks do not depend on which
    batches shared its steps (tested: the same as the clip tracked alone, to the bit on the CPU)."""

    def __init__(self, mesh: TorchFaceMesh, pad_to: int = 256, wait_s: float = 0.005):
        if pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        self.mesh, self.pad_to, self.wait_s = mesh, int(pad_to), float(wait_s)
        self.device = mesh.device
        self._cv = threading.Condition()
        self._members = 0
        self._pending: list[dict] = []
        self._running = False
        self.calls = self.batches = 0  # track_many runs, and the batches they carried (batches / calls: sharing)

    @contextmanager
    def member(self):
        """The calling thread's batches are waited for until it leaves."""
        with self._cv:
            self._members += 1
        try:
            yield self
        finally:
            with self._cv:
                self._members -= 1
                self._cv.notify_all()

    def track(self, frames: torch.Tensor, expect_box, det_roi, carry=None):
        """TorchFaceMesh.track, run together with the other threads' waiting batches."""
        req = {"job": (frames, expect_box, det_roi, carry), "out": None}
        with self._cv:
            self._pending.append(req)
            self._cv.notify_all()
            due = time.monotonic() + self.wait_s
            while True:
                if req["out"] is not None:
                    break
                now = time.monotonic()
                if (not self._running and any(r is req for r in self._pending)
                        and (len(self._pending) >= self._members or now >= due)):
                    run, self._pending, self._running = self._pending, [], True
                    break
                self._cv.wait(timeout=max(due - now, 0.0) or 0.05)
        if req["out"] is None:  # this thread runs every batch waiting, its own among them
            try:
                res = self.mesh.track_many([r["job"] for r in run], self.pad_to)
            except BaseException as e:  # noqa: BLE001 - every waiting thread gets the error, not a hang
                res = [e] * len(run)
            with self._cv:
                self.calls += 1
                self.batches += len(run)
                for r, o in zip(run, res):
                    r["out"] = o
                self._running = False
                self._cv.notify_all()
        if isinstance(req["out"], BaseException):
            raise req["out"]
        return req["out"]

    track_array = TorchFaceMesh.track_array  # the same conversions around this class's track()


def landmark_distances(ref: np.ndarray, test: np.ndarray, width: int, height: int) -> tuple[np.ndarray, float]:
    """How far ``test`` landmarks lie from ``ref`` (both (n, 478, 3) frame-normalised, NaN untracked):
    (per-point image-plane distances (m, 478) over the m frames both track, in units of ref's inter-ocular
    distance (outer eye corners 33-263); the share of ref's tracked frames that test tracks too)."""
    r_ok, t_ok = ~np.isnan(ref[:, 0, 0]), ~np.isnan(test[:, 0, 0])
    both = r_ok & t_ok
    px = np.array([width, height], np.float64)
    iod = np.linalg.norm((ref[both, 33, :2] - ref[both, 263, :2]) * px, axis=-1)
    d = np.linalg.norm((ref[both, :, :2] - test[both, :, :2]) * px, axis=-1) / iod[:, None]
    return d, float(both.sum() / max(1, r_ok.sum()))


def detection_roi(width: int, height: int, box, window_scale: float | None) -> tuple[float, float, float]:
    """The square region detection runs on, in pixels: the whole frame (letterboxed, as Face Mesh sees a
    frame) or, for a small speaker, ``window_scale`` x the speaker box around its centre."""
    if window_scale is None:
        return width / 2, height / 2, float(max(width, height))
    bx0, by0, bx1, by1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    return (bx0 + bx1) / 2, (by0 + by1) / 2, max(bx1 - bx0, by1 - by0, 8.0) * window_scale
