"""#15: the per-frame path on the GPU, side by side in one run (meant for a CUDA machine; every section
also runs on a CPU at small sizes).

Sections (``--section``, repeatable; default all that can run here):
- decode: NVDEC (PyNvVideoCodec) frames/s for one decoder session and for ``--sessions`` sessions in
  threads, against OpenCV's CPU decoder (its default threads);
- decode-set: the whole set (``--scale`` copies of each video) decoded at once by ``--sessions`` NVDEC
  sessions (in threads or processes, ``--decode-in``) taking videos from one queue, with NVDEC's and the
  cores' busy shares and the seconds to each video's first 64 frames (the session's set-up): the decode
  rate the whole extraction of that set cannot exceed;
  for each of ``--colours``: PyNvVideoCodec's RGB output, NV12 converted by extractors.media.yuv420_to_rgb
  (NvdecVideo's path), and NV12 alone (the decoder's ceiling);
- landmarks: the torch Face Mesh (detection + tracking) in frames/s at each ``--batches`` size and dtype,
  with its default tracking (parallel chains; ``--track-chains`` adds other chain lengths), the earlier
  3- and 1-pass tracking and, on CUDA, the crops cut by the compiled kernel (``fused warp``) side by side,
  the networks and the crop cutting alone, and its accuracy against MediaPipe on the same frames for each
  of those trackings (mean and p95 distance in % of the inter-ocular distance; MediaPipe live where it is
  installed);
- mediapipe: MediaPipe's own Face Mesh on one core and on ``--procs`` processes;
- detect: ingest's face detection (full-range BlazeFace) in PyTorch frame by frame and in ``--batches``,
  its detections against the same port on the CPU, and MediaPipe's CPU graph on one core where installed;
- extract: the whole per-frame extraction (decode, landmarks, pose, crops, GNPFA encoding) through
  extractors.extract.extract_source, in input frames/s per GPU, with each of ``--workers`` processes
  sharing the GPU, for each ``--chains`` tracking (0: 3 passes), ``--mesh-batch`` size and ``--fused-warp``
  side by side, and the GPU's utilisation sampled meanwhile. Each process keeps its models (and their CUDA
  graphs) from job to job as an extraction worker does; their start-up, loads and compilation are timed
  apart, as ``startup_s``. ``--schedule``: the videos handed out one at a time, largest first (dynamic, the
  default: as Ray schedules a task per source) and/or up front (static: every k-th video to process k, which
  leaves processes idle while others finish; the figures of sessions 2-17 were static unless they say
  otherwise), timed on the same warm workers.
  ``--threads`` T > 1: each process runs T sources at once in threads sharing one torch Face Mesh
  (extractors.mesh_torch.SharedTracker: their batches tracked together, the networks on calls of exactly
  ``--pad-to`` crops), so one CUDA context carries many sources' chains per step; with one thread
  ``--pad-to`` pads a process's own calls. ``--pad-to`` 0 takes the pipeline's own rule (extract.mesh_pad_to 0:
  one chain step of a batch on CUDA, 32 crops at batch 256; on the CPU each call its own size). ``--cpu-decode-below``:
  videos whose longer side is under it are decoded on the CPU beside NVDEC.

Prints a table per section and writes every figure to ``--json``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractors.config import ExtractConfig  # noqa: E402
from extractors.media import analysis_size  # noqa: E402
from extractors.mesh_torch import CHAIN, WARMUP  # noqa: E402

RESULTS: dict = {}
# the torch Face Mesh's tracking variants timed side by side: (label, chain, passes); the first is the default
TRACKINGS = [(f"chains of {CHAIN} (+{WARMUP} warm-up)", CHAIN, 3), ("3 passes", 0, 3), ("1 pass", 0, 1)]
TRACK_DEFAULT = TRACKINGS[0][0]


def chain_label(chain: int) -> str:
    return f"chains of {chain} (+{WARMUP} warm-up)"


def videos_of(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.mp4")) if p.is_dir() else [p]
    return out


def cv_frames(path: Path, n: int, max_side: int = 1280) -> np.ndarray:
    """The first ``n`` frames as extraction sees them (RGB, analysis size), decoded by OpenCV."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    out = []
    while len(out) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        h, w = bgr.shape[:2]
        aw, ah = analysis_size(w, h, max_side)
        if (aw, ah) != (w, h):
            bgr = cv2.resize(bgr, (aw, ah), interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return np.stack(out)


def face_boxes(videos: list[Path], cache: Path | None) -> dict[str, list[float]]:
    """A speaker box per video (MediaPipe's full-range detector on the first frames, as ingest finds one),
    cached in a JSON file for machines without MediaPipe."""
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    from mediapipe.python.solutions import face_detection

    boxes = {}
    with face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5) as fd:
        for v in videos:
            for fr in cv_frames(v, 10):
                d = fd.process(fr).detections
                if d:
                    b = max(d, key=lambda x: x.score[0]).location_data.relative_bounding_box
                    boxes[v.name] = [b.xmin, b.ymin, b.xmin + b.width, b.ymin + b.height]
                    break
    if cache is not None:
        cache.write_text(json.dumps(boxes, indent=1))
    return boxes


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _seconds(dev: str, fn, reps: int = 1) -> float:
    """Wall seconds of ``reps`` calls of ``fn`` on ``dev`` (the device drained before and after)."""
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return time.perf_counter() - t0


# --- decode --------------------------------------------------------------------------------------------
def _nvdec_all(path: Path, colour: str = "rgb") -> int:
    """Decode a whole video with NVDEC into CUDA tensors, 64 frames at a time: ``rgb`` PyNvVideoCodec's own
    RGB conversion, ``nv12`` its NV12 surfaces converted by media.yuv420_to_rgb (what NvdecVideo does), ``native``
    the NV12 surfaces only (the decoder's ceiling)."""
    return _nvdec_timed(path, colour)[0]


def _nvdec_timed(path, colour: str = "rgb", reuse: bool = False) -> tuple[int, float]:
    """_nvdec_all, and the seconds to the first batch of 64 frames (PyNvVideoCodec makes the NVDEC session when
    the first frames are decoded, not when the decoder object is made: this holds the session's set-up).
    ``reuse``: this thread's decoder of its previous video reconfigured, as NvdecVideo does (NV12 output only)."""
    import PyNvVideoCodec as nvc
    import torch

    from extractors.media import _nvdec_decoder, _surface, yuv420_to_rgb

    t0 = time.perf_counter()
    kind = nvc.OutputColorType.RGB if colour == "rgb" else nvc.OutputColorType.NATIVE
    if reuse and colour == "rgb":
        raise ValueError("a reused decoder gives NV12 surfaces: colour nv12 or native")
    dec = (_nvdec_decoder(nvc, str(path), 0, True) if reuse else
           nvc.SimpleDecoder(str(path), gpu_id=0, use_device_memory=True, output_color_type=kind))
    opened = None
    n = 0
    while True:
        got = dec.get_batch_frames(64)
        if opened is None:
            opened = time.perf_counter() - t0
        if not got:
            break
        x = torch.stack([torch.from_dlpack(f) if colour == "rgb" else _surface(torch.from_dlpack(f)) for f in got])
        if colour == "nv12":
            yuv420_to_rgb(x)
        n += len(x)
    torch.cuda.synchronize()
    return n, opened


def _nvdec_warm(args) -> None:
    """A decode-set process's first video (the driver's start-up), then wait for the others."""
    _nvdec_timed(*args)
    _BARRIER.wait()


def section_decode(videos: list[Path], sessions: int) -> None:
    import cv2

    rows = []
    for v in videos:
        cap = cv2.VideoCapture(str(v))
        cv2.setNumThreads(1)
        t0, n = time.perf_counter(), 0
        while cap.read()[0]:
            n += 1
        cpu = n / (time.perf_counter() - t0)
        row = {"video": v.name, "frames": n, "cpu_fps_opencv": round(cpu, 1)}
        try:
            _nvdec_all(v)  # warm: the first session pays the driver's start-up
            t0 = time.perf_counter()
            m = _nvdec_all(v)
            row["nvdec_fps_1session"] = round(m / (time.perf_counter() - t0), 1)
            counts = [0] * sessions
            th = [threading.Thread(target=lambda i=i: counts.__setitem__(i, _nvdec_all(v))) for i in range(sessions)]
            t0 = time.perf_counter()
            [t.start() for t in th]
            [t.join() for t in th]
            row[f"nvdec_fps_{sessions}sessions"] = round(sum(counts) / (time.perf_counter() - t0), 1)
        except Exception as e:  # noqa: BLE001 - a machine without NVDEC still prints the CPU figure
            row["nvdec_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print("decode", row, flush=True)
    RESULTS["decode"] = rows


def section_decode_set(videos: list[Path], sessions: int, scale: int, colour: str = "rgb", procs: bool = False,
                       reuse: bool = False) -> None:
    """The whole set (``scale`` copies of each video) decoded at once: ``sessions`` threads (``procs``: processes,
    as extraction workers are), each opening one decoder session per video it takes from a shared queue
    (largest first; ``reuse``: each thread's decoder kept and reconfigured from video to video, as NvdecVideo
    does). Its frames/s bounds the whole extraction of the same set on this GPU. ``colour``: see _nvdec_all.
    NVDEC's and the cores' busy shares are sampled meanwhile."""
    import queue

    order = sorted(videos * scale, key=lambda v: -v.stat().st_size)
    if procs:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(sessions, mp_context=ctx, initializer=_pool_init,
                                 initargs=(ctx.Barrier(sessions),)) as pool:
            list(pool.map(_nvdec_warm, [(order[-1], colour, reuse)] * sessions))
            use = _GpuUse()
            use.start()
            t0 = time.perf_counter()
            got = [f.result() for f in as_completed([pool.submit(_nvdec_timed, v, colour, reuse) for v in order])]
            secs = time.perf_counter() - t0
        counts, opens = [g[0] for g in got], [g[1] for g in got]
    else:
        jobs: queue.Queue = queue.Queue()
        for v in order:
            jobs.put(v)
        counts, opens = [0] * sessions, []

        def work(i: int) -> None:
            while True:
                try:
                    v = jobs.get_nowait()
                except queue.Empty:
                    return
                n, o = _nvdec_timed(v, colour, reuse)
                counts[i] += n
                opens.append(o)

        _nvdec_all(order[-1], colour)  # the driver's start-up, untimed
        th = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
        use = _GpuUse()
        use.start()
        t0 = time.perf_counter()
        [t.start() for t in th]
        [t.join() for t in th]
        secs = time.perf_counter() - t0
    row = {"videos": len(order), "sessions": sessions, "in": "processes" if procs else "threads", "colour": colour,
           "decoder_reused": reuse,
           "frames": sum(counts), "seconds": round(secs, 2), "nvdec_fps_whole_set": round(sum(counts) / secs, 1),
           "first_batch_s_sum": round(sum(opens), 2), "first_batch_s_median": round(float(np.median(opens)), 3),
           **use.finish()}
    RESULTS.setdefault("decode_set", []).append(row)
    print("decode_set", row, flush=True)


# --- landmarks -----------------------------------------------------------------------------------------
def _mp_track(args) -> tuple[int, float, np.ndarray]:
    frames, box = args
    from extractors.extract import track_frames

    t0 = time.perf_counter()
    lm = track_frames(frames, box, ExtractConfig())
    return len(frames), time.perf_counter() - t0, lm


def _mp_worker(args) -> tuple[int, float, float]:
    """One process of the many-core MediaPipe figure: decodes its own frames and warms its graph untimed,
    waits for the others, then tracks; returns (frames, start, end) on the wall clock."""
    path, n, box, barrier = args
    frames = cv_frames(Path(path), n)
    _mp_track((frames[:30], box))
    barrier.wait()
    t0 = time.time()
    k = _mp_track((frames, box))[0]
    return k, t0, time.time()


def section_landmarks(videos: list[Path], boxes: dict, dev: str, batches: list[int], dtypes: list[str],
                      n_acc: int, modules: str | None, reference: Path | None, chains: list[int] = ()) -> None:
    import torch

    from extractors.extract import track_frames
    from extractors.mesh_torch import TorchFaceMesh, detection_roi, landmark_distances, warp_crops

    cfg = ExtractConfig()
    # accuracy: every video's first n_acc frames, MediaPipe vs torch at each dtype
    refs = {}
    if reference is not None and reference.is_file():
        with np.load(reference) as z:
            refs = {k: z[k] for k in z.files}
    acc = []
    meshes = {dt: TorchFaceMesh(dev, getattr(torch, dt), modules=modules) for dt in dtypes}
    # the earlier tracking (3 passes over each batch), first dtype, for the accuracy side by side
    passes3 = TorchFaceMesh(dev, getattr(torch, dtypes[0]), modules=modules, chain=0)
    # other chain lengths (--track-chains), first dtype: accuracy and throughput beside the default
    others = [c for c in chains if c and c != CHAIN]
    trackings = TRACKINGS[:1] + [(chain_label(c), c, 3) for c in others] + TRACKINGS[1:]
    extra = [(chain_label(c), TorchFaceMesh(dev, getattr(torch, dtypes[0]), modules=modules, chain=c)) for c in others]
    if dev.startswith("cuda"):  # crops cut by the torch.compile'd kernel (warp_crops(fused=True))
        extra.append((f"{TRACK_DEFAULT}, fused warp", TorchFaceMesh(dev, getattr(torch, dtypes[0]), modules=modules,
                                                                    fused_warp=True)))
    for v in videos:
        if v.name not in boxes:
            continue
        frames = cv_frames(v, n_acc)
        box = boxes[v.name]
        if v.name not in refs:
            try:
                refs[v.name] = _mp_track((frames, box))[2]
            except ImportError:
                continue
        h, w = frames.shape[1:3]
        for (dt, mesh), tracking in [((dt, m), TRACK_DEFAULT) for dt, m in meshes.items()] + \
                [((dtypes[0], m), lab) for lab, m in extra] + [((dtypes[0], passes3), "3 passes")]:
            got = track_frames(frames, box, ExtractConfig(mesh_batch=max(batches)), landmarker=mesh)
            d, cov = landmark_distances(refs[v.name], got, w, h)
            acc.append({"video": v.name, "dtype": dt, "tracking": tracking, "frames": int(len(d)), "coverage": round(cov, 3),
                        "mean_pct_iod": round(float(d.mean()) * 100, 3) if len(d) else None,
                        "p95_pct_iod": round(float(np.percentile(d, 95)) * 100, 3) if len(d) else None})
            print("accuracy", acc[-1], flush=True)
    if reference is not None and not reference.is_file() and refs:
        np.savez_compressed(reference, **refs)
    for dt, tracking in [(dt, TRACK_DEFAULT) for dt in dtypes] + [(dtypes[0], lab) for lab, _ in extra] + \
            [(dtypes[0], "3 passes")]:
        d = [a for a in acc if a["dtype"] == dt and a["tracking"] == tracking and a["frames"]]
        if d:
            print(f"accuracy {dt}, {tracking}: worst video mean {max(a['mean_pct_iod'] for a in d):.2f}% p95 "
                  f"{max(a['p95_pct_iod'] for a in d):.2f}% of IOD, min coverage {min(a['coverage'] for a in d):.2f}")
    RESULTS["accuracy"] = acc
    # throughput: one real video's frames repeated up to the largest batch, on the device
    v = next(v for v in videos if v.name in boxes)
    base = cv_frames(v, 120)
    h, w = base.shape[1:3]
    box = boxes[v.name]
    roi = detection_roi(w, h, box, None)
    rows = RESULTS["landmarks"] = []  # filled as measured: a later failure keeps the rows so far
    variants = [(dt, "default", mesh) for dt, mesh in meshes.items()]
    if dev.startswith("cuda"):  # what the CUDA graphs bring, first dtype
        dt0 = dtypes[0]
        variants.append((dt0, "no CUDA graphs", TorchFaceMesh(dev, getattr(torch, dt0), modules=modules, graphs=False)))
        variants.append((dt0, "fused warp", TorchFaceMesh(dev, getattr(torch, dt0), modules=modules, fused_warp=True)))
    for dt, label, mesh in variants:
        for tracking, chain, passes in (trackings if dt == dtypes[0] else TRACKINGS) if label == "default" else TRACKINGS[:1]:
            mesh.chain, mesh.passes = chain, passes
            for b in batches:
                x = torch.from_numpy(base[np.arange(b) % len(base)]).to(dev)
                got = mesh.track(x, box, roi)[0]  # warm-up (kernels, allocator, graph capture)
                if label != "default" and b == batches[0]:  # the variants compute the same landmarks
                    ref = meshes[dt].track(x, box, roi)[0]
                    rows.append({"dtype": dt, "variant": label, "max_abs_diff_px_vs_default": round(float(
                        ((got - ref)[..., :2] * torch.tensor([w, h], device=got.device)).abs().max()), 4)})
                    print("landmarks", rows[-1], flush=True)
                reps = max(1, int(2 * 4096 / b)) if dev.startswith("cuda") else 1
                fps = reps * b / _seconds(dev, lambda: mesh.track(x, box, roi), reps)
                rows.append({"dtype": dt, "variant": label, "tracking": tracking, "batch": b,
                             "frames_per_s": round(fps, 1)})
                print("landmarks", rows[-1], flush=True)
        mesh.chain, mesh.passes = TRACKINGS[0][1:]
        # the landmark network alone on 192 px crops, and cutting those crops from the frames
        for b in batches:
            crops = torch.rand(b, 192, 192, 3, device=dev, dtype=getattr(torch, dt))
            with torch.no_grad():
                secs = [_seconds(dev, lambda: mesh._lm(crops)) for _ in range(3)][-1]  # the third, warm
            rows.append({"dtype": dt, "variant": label, "network": "face_landmark_with_attention", "batch": b,
                         "frames_per_s": round(b / secs, 1)})
            print("landmarks", rows[-1], flush=True)
        if label == "default":
            b = max(batches)
            x = torch.from_numpy(base[np.arange(b) % len(base)]).to(dev)
            rects = torch.tensor([[w / 2, h / 2, min(w, h) / 2, 0.1]], device=dev).expand(b, 4)
            for fused in (False, True):
                secs = [_seconds(dev, lambda: warp_crops(x, rects, 192, "border", fused=fused)) for _ in range(3)][-1]
                rows.append({"dtype": "float32", "op": "warp_crops 192 px" + (", fused" if fused else ""),
                             "frame_size": [w, h], "batch": b, "frames_per_s": round(b / secs, 1)})
                print("landmarks", rows[-1], flush=True)


def section_compile(videos: list[Path], boxes: dict, dev: str, batch: int, modules: str | None) -> None:
    """Whether inductor's fused kernels beat the replayed graph: the networks through ``torch.compile``
    (then captured as CUDA graphs as usual), float16, one batch size."""
    import torch

    from extractors.mesh_torch import TorchFaceMesh, detection_roi
    from models.tflite_torch import CudaGraphed

    v = next(v for v in videos if v.name in boxes)
    base = cv_frames(v, 120)
    h, w = base.shape[1:3]
    box = boxes[v.name]
    roi = detection_roi(w, h, box, None)
    x = torch.from_numpy(base[np.arange(batch) % len(base)]).to(dev)
    ref = TorchFaceMesh(dev, torch.float16, modules=modules)
    mesh = TorchFaceMesh(dev, torch.float16, modules=modules)
    t0 = time.perf_counter()
    mesh._det = CudaGraphed(torch.compile(mesh.det, dynamic=False))
    mesh._lm = CudaGraphed(torch.compile(mesh.lm, dynamic=False))
    got = mesh.track(x, box, roi)[0]
    _sync(dev)
    row = {"batch": batch, "compile_s": round(time.perf_counter() - t0, 1),
           "max_abs_diff_px_vs_default": round(float(((got - ref.track(x, box, roi)[0])[..., :2]
                                                      * torch.tensor([w, h], device=got.device)).abs().max()), 4)}
    reps = max(1, 8192 // batch)
    crops = torch.rand(batch, 192, 192, 3, device=dev, dtype=torch.float16)
    for label, m in (("default", ref), ("compiled", mesh)):
        m.track(x, box, roi)
        row[f"{label}_frames_per_s"] = round(reps * batch / _seconds(dev, lambda: m.track(x, box, roi), reps), 1)
        m._lm(crops)
        row[f"{label}_network_crops_per_s"] = round(batch / _seconds(dev, lambda: m._lm(crops)), 1)
    print("compile", row, flush=True)
    RESULTS["compile"] = row


def section_mediapipe(videos: list[Path], boxes: dict, procs: int, n: int) -> None:
    v = next(v for v in videos if v.name in boxes)
    frames = cv_frames(v, n)
    box = boxes[v.name]
    _mp_track((frames[:30], box))  # warm
    k, dt, _ = _mp_track((frames, box))
    one = k / dt
    # every process decodes its own frames (shipping them through the pool's pipes would time the pipes)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as man, ProcessPoolExecutor(procs, mp_context=ctx, initializer=_one_thread) as pool:
        barrier = man.Barrier(procs)  # a worker that dies raises BrokenProcessPool, as in section_extract
        done = list(pool.map(_mp_worker, [(str(v), n, box, barrier)] * procs))
    wall = max(d[2] for d in done) - min(d[1] for d in done)
    row = {"video": v.name, "fps_1core": round(one, 1), "procs": procs,
           "fps_all_procs": round(sum(d[0] for d in done) / wall, 1)}
    print("mediapipe", row, flush=True)
    RESULTS["mediapipe"] = row


def section_detect(videos: list[Path], dev: str, modules: str | None, batches: list[int], n: int = 32) -> None:
    """Ingest's face detection (full-range BlazeFace) on frames at ingest's analysis size (640 px): the
    torch port on ``dev`` frame by frame (as ingest calls it) and in batches, against the same port on the
    CPU (detection counts, box IoU) and MediaPipe's CPU graph on one core where MediaPipe is installed."""
    import torch

    from extractors.faces import iou
    from extractors.mesh_torch import TorchFaceDetector

    frames = [cv_frames(v, n, 640) for v in videos]
    det = TorchFaceDetector(dev, dtype=torch.float16 if dev.startswith("cuda") else None, modules=modules)
    ref = TorchFaceDetector("cpu", modules=modules)
    torch.set_num_threads(1)
    row: dict = {"frames": sum(len(f) for f in frames), "device": dev}
    for f in frames:
        det.detect_batch(f[:1]), det.detect_batch(f)  # graphs and cuDNN plans for each shape
    t0 = time.perf_counter()
    got = [[det.detect(x) for x in f] for f in frames]
    row["fps_frame_by_frame"] = round(row["frames"] / (time.perf_counter() - t0), 1)
    for b in batches:
        t0 = time.perf_counter()
        for f in frames:
            for i in range(0, len(f), b):
                det.detect_batch(f[i:i + b])
        row[f"fps_batch_{b}"] = round(row["frames"] / (time.perf_counter() - t0), 1)
    want = [[ref.detect(x) for x in f[:8]] for f in frames]
    same, ious = 0, []
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            same += len(a) == len(b)
            if len(a) == len(b) and len(a):
                ious.append(float(iou(a[:, :4], b[:, :4]).max(1).min()))
    row["same_count_as_cpu"] = f"{same}/{sum(len(w) for w in want)}"
    row["iou_with_cpu_min"] = round(min(ious), 4) if ious else None
    try:
        from extractors.faces import FaceDetector

        with FaceDetector(1, 0.5) as md:
            t0 = time.perf_counter()
            for f in frames:
                for x in f:
                    md.detect(x)
            row["mediapipe_fps_1core"] = round(row["frames"] / (time.perf_counter() - t0), 1)
    except ImportError:
        pass
    print("detect", row, flush=True)
    RESULTS["detect"] = row


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


# --- whole extraction ----------------------------------------------------------------------------------
def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores from /proc/stat; (0, 0) where there is none."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v) - idle, sum(v)


class _GpuUse(threading.Thread):
    """Samples over a timed window: the GPU's busy share (NVML), NVDEC's (NVML's decoder utilisation), the
    GPU memory in use (its peak) and, from /proc/stat at its start and stop, how busy the machine's cores were."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.dec, self.mem, self.stop = [], [], [], False
        self.cpu0 = _cpu_ticks()

    def run(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            hnd = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self.stop:
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(hnd).gpu)
                self.mem.append(pynvml.nvmlDeviceGetMemoryInfo(hnd).used / 2**30)
                try:
                    self.dec.append(pynvml.nvmlDeviceGetDecoderUtilization(hnd)[0])
                except pynvml.NVMLError:
                    pass
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 - no NVML: no utilisation figure
            pass

    def finish(self) -> dict:
        self.stop = True
        b1, t1 = _cpu_ticks()
        b0, t0 = self.cpu0
        mean = lambda xs: round(float(np.mean(xs)), 1) if xs else None  # noqa: E731
        return {"gpu_util_mean_pct": mean(self.samples), "nvdec_util_mean_pct": mean(self.dec),
                "cpu_busy_pct": round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else None,
                "gpu_mem_peak_gib": round(max(self.mem), 1) if self.mem else None}


@functools.lru_cache(maxsize=None)
def _worker_models(dev: str, modules: str | None, chain: int, fused: bool):
    """This process's torch Face Mesh and shipped GNPFA, made once as an extraction task's worker keeps
    them (pipelines.extract caches its models per process): later jobs reuse the CUDA graphs captured."""
    import torch

    from extractors.mesh_torch import TorchFaceMesh
    from models.gnpfa import SHIPPED_DIR, load_checkpoint

    torch.set_num_threads(1)
    mesh = TorchFaceMesh(dev, torch.float16 if dev.startswith("cuda") else None, modules=modules, chain=chain,
                         fused_warp=fused)
    _, vae, enc, _ = load_checkpoint(SHIPPED_DIR, device=dev)
    return mesh, vae, enc


def _pad(batch: int, chain: int, pad_to: int, dev: str, threads: int) -> int | None:
    """Crops per network call as the pipeline decides it (ExtractConfig.mesh_pad_for: --pad-to, else one chain
    step of a batch on CUDA); a shared tracker needs one, so on the CPU it takes one chain step too (256 crops
    for the 3-pass tracking, which has no chain step)."""
    if pad_to < 0 and threads <= 1:  # -1: no padding (the unpadded baseline)
        return None
    cfg = ExtractConfig(mesh_batch=batch, mesh_chain=chain, mesh_pad_to=max(pad_to, 0))
    return cfg.mesh_pad_for(dev.startswith("cuda") or threads > 1) or (256 if threads > 1 else None)


def _extract_worker(args) -> tuple[int, float, dict]:
    """Extract the given videos (one clip each, all frames) the way an extraction task does, then encode
    them with the shipped GNPFA; returns (input frames, seconds, timings). ``threads`` > 1: that many
    videos at a time in threads, their tracking shared (SharedTracker, networks on ``pad_to`` crops)."""
    jobs, dev, modules, batch, nvdec, chain, fused, threads, pad_to, cpu_below, reuse, prof = args
    import torch

    from extractors import media

    media.NVDEC_REUSE = reuse  # this process's NvdecVideo default (--nvdec-reuse)

    from extractors.extract import extract_source
    from extractors.mesh_torch import SharedTracker
    from extractors.records import training_arrays
    from models.gnpfa import encode_frames

    mesh, vae, enc = _worker_models(dev, modules, chain, fused)
    cfg = ExtractConfig(mesh_batch=batch)
    pad = _pad(batch, chain, pad_to, dev, threads)
    tm: dict = {}
    lock = threading.Lock()
    shared = SharedTracker(mesh, pad_to=pad) if threads > 1 else None
    mesh.pad_to = pad if threads <= 1 else None

    def one(job) -> int:
        path, w, h, n, box = job
        clip = {"clip_id": f"{Path(path).stem}-0", "start_frame": 0, "n_frames": n, "start_s": 0.0, "end_s": n / 30,
                "face_box": box, "face_size_px": (box[2] - box[0]) * w}
        mine: dict = {}
        nv = nvdec and max(w, h) >= cpu_below  # smaller videos decoded on the CPU beside NVDEC (--cpu-decode-below)
        with shared.member() if shared is not None else contextlib.nullcontext():
            feats = extract_source(path, w, h, [clip], cfg, audio=np.zeros(int(16000 * n / 30) + 1600, np.float32),
                                   timings=mine, landmarker=shared or mesh, nvdec=nv)
        t1 = time.perf_counter()
        arr = training_arrays(feats)
        if len(arr["offsets"]):
            encode_frames(vae, enc, arr["offsets"], arr["neutrals"], arr["crops"], device=dev)
        mine["gnpfa_s"] = time.perf_counter() - t1
        with lock:
            for key, val in mine.items():
                tm[key] = tm.get(key, 0) + val
        return n
    profiler = None
    if prof:  # this worker's CPU ops and CUDA kernels, summed (--profile)
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else []))
        profiler.__enter__()
    t0 = time.perf_counter()
    if shared is None:
        frames = sum(one(j) for j in jobs)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as ex:
            frames = sum(ex.map(one, jobs))
        tm["shared_calls"], tm["shared_batches"] = shared.calls, shared.batches  # batches / calls: how much was shared
    wall = time.perf_counter() - t0
    if dev.startswith("cuda"):  # this worker's peak since its last job (summed rows take the largest: _PEAKS)
        tm["torch_reserved_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
        tm["torch_allocated_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    if profiler is not None:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        profiler.__exit__(None, None, None)
        ka = profiler.key_averages()
        Path(prof).write_text(f"{frames} input frames, {wall:.2f} s\n\n"
                              + (ka.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
                                 + "\n\n" if dev.startswith("cuda") else "") + ka.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70))
    return frames, wall, tm


_BARRIER = None
_PEAKS = ("torch_reserved_peak_gib", "torch_allocated_peak_gib")  # per worker: a row gives the largest, not the sum


def _pool_init(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _warm(args) -> None:
    """One job in each process of the pool (models, CUDA graphs, compilation), then wait for the others:
    the barrier makes every process take exactly one of these."""
    _extract_worker(args)
    _BARRIER.wait()


def _unordered(pool, work: list) -> list:
    """_extract_worker over ``work``, each item handed to whichever process is free, results as they finish."""
    return [f.result() for f in as_completed([pool.submit(_extract_worker, w) for w in work])]


def section_extract(videos: list[Path], boxes: dict, dev: str, workers: list[int], scale: int, modules: str | None,
                    batches: list[int], nvdec: bool, chains: list[int], fused: list[bool] = (False,),
                    profile: Path | None = None, schedules: list[str] = ("dynamic",), threads: list[int] = (1,),
                    pad_to: int = 0, cpu_below: list[int] = (0,), reuse: list[bool] = (True,)) -> None:
    """``schedules``: ``static`` hands each process every k-th video up front;
    ``dynamic`` hands out one video at a time, largest first, to whichever process is free (as Ray schedules
    extraction tasks per source). ``cpu_below`` and ``reuse`` (NVDEC decoders kept from video to video):
    each combination timed in turn on the same warm workers."""
    import cv2

    jobs = []
    for v in videos:
        if v.name not in boxes:
            continue
        cap = cv2.VideoCapture(str(v))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) / max(cap.get(cv2.CAP_PROP_FPS), 1) * 30) - 2
        codec = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode(errors="replace").lower()
        if nvdec and codec not in ("avc1", "h264", "hev1", "hvc1", "hevc", "av01", "vp09"):
            continue  # the pipeline decodes these on the CPU
        jobs.append((str(v), w, h, n, boxes[v.name]))
    jobs = jobs * scale
    by_size = sorted(jobs, key=lambda j: -j[1] * j[2] * j[3])  # decoded pixels, largest first
    ctx = mp.get_context("spawn")
    rows = RESULTS["extract"] = []  # filled as measured: a later failure (e.g. out of memory) keeps the rows so far
    for k, chain, batch, fw, th in [(k, c, b, f, t) for k in workers for c in chains for b in batches for f in fused
                                    for t in threads]:
        args = (dev, modules, batch, nvdec, chain, fw, th, pad_to, cpu_below[0], reuse[0])
        # a process pool that raises when a worker dies (a crash in a native decoder, say): multiprocessing.Pool
        # loses the dead worker's task and waits for ever (session 16 lost three device calls to that)
        with ProcessPoolExecutor(k, mp_context=ctx, initializer=_pool_init, initargs=(ctx.Barrier(k),)) as pool:
            t0 = time.perf_counter()
            list(pool.map(_warm, [(jobs[:1], *args, None)] * k))  # start-up, loads, compile
            startup = time.perf_counter() - t0
            for below, keep, sched in [(b, r, s_) for b in cpu_below for r in reuse for s_ in schedules]:
                args = (*args[:-2], below, keep)
                use = _GpuUse()
                use.start()
                t0 = time.perf_counter()
                if sched == "static":
                    done = list(pool.map(_extract_worker, [(jobs[i::k], *args, None) for i in range(k)]))
                elif th > 1:  # each process takes th videos at a time (largest first), run side by side in threads
                    groups = [by_size[i:i + th] for i in range(0, len(by_size), th)]
                    done = _unordered(pool, [(g, *args, None) for g in groups])
                else:
                    done = _unordered(pool, [([j], *args, None) for j in by_size])
                wall = time.perf_counter() - t0
                usage = use.finish()
                tm: dict = {}
                for d in done:
                    for key, val in d[2].items():
                        tm[key] = round(max(tm.get(key, 0), val) if key in _PEAKS else tm.get(key, 0) + val, 2)
                frames = sum(d[0] for d in done)
                rows.append({"workers": k, "threads": th, "pad_to": _pad(batch, chain, pad_to, dev, th),
                             "cpu_decode_below": below or None, "nvdec_reuse": keep, "schedule": sched, "tracking": f"chains of {chain}" if chain else "3 passes",
                             "mesh_batch": batch, "fused_warp": fw, "startup_s": round(startup, 1),
                             "videos": len(jobs), "input_frames": frames, "wall_s": round(wall, 1),
                             "input_frames_per_s": round(frames / wall, 1), "nvdec": nvdec, **usage,
                             "task_seconds": tm})
                print("extract", rows[-1], flush=True)
            if profile is not None:  # again, worker 0 under the profiler (the others as they were)
                profile.mkdir(parents=True, exist_ok=True)
                name = f"profile-w{k}-t{th}-c{chain}-b{batch}{'-fused' if fw else ''}.txt"
                list(pool.map(_extract_worker, [(jobs[i::k], *args, str(profile / name) if i == 0 else None)
                                                for i in range(k)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", nargs="+", default=["../shared/data/real"])
    ap.add_argument("--extract-videos", nargs="+", default=None, help="videos for the extract section (default --videos)")
    ap.add_argument("--section", action="append", choices=["decode", "decode-set", "landmarks", "mediapipe", "extract", "compile",
                                                           "detect"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", default="256,1024,4096")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--acc-frames", type=int, default=90)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--colours", default="rgb,nv12,native", help="decode-set: NVDEC outputs timed (see _nvdec_all)")
    ap.add_argument("--decode-in", default="threads", help="decode-set: sessions in threads of one process and/or in "
                    "processes, each with a decoder per video or (-reuse) one kept and reconfigured (comma list: "
                    "threads,processes,threads-reuse,processes-reuse)")
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    ap.add_argument("--mp-frames", type=int, default=300)
    ap.add_argument("--workers", default="1,4")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--mesh-batch", default="256", help="extract: frames per torch Face Mesh batch (comma list)")
    ap.add_argument("--chains", default=str(CHAIN), help="extract: tracking chain lengths, 0 = 3 passes (comma list)")
    ap.add_argument("--fused-warp", default="0", help="extract: crops by the compiled kernel, 0/1 (comma list)")
    ap.add_argument("--schedule", default="dynamic", help="extract: static and/or dynamic (comma list, timed in that "
                    "order on the same warm workers)")
    ap.add_argument("--threads", default="1", help="extract: sources run at once in threads of each process, their "
                    "tracking shared (comma list)")
    ap.add_argument("--pad-to", type=int, default=0, help="extract: crops per network call (0: as the pipeline, "
                    "extract.mesh_pad_to's default: one chain step of a batch on CUDA; -1: none, one thread only)")
    ap.add_argument("--cpu-decode-below", default="0", help="extract: videos whose longer side is under this "
                    "decoded on the CPU (decord, one thread) even where NVDEC is (comma list, timed in that order on "
                    "the same warm workers)")
    ap.add_argument("--nvdec-reuse", default="1", help="extract: 1 = each worker keeps its NVDEC decoder from video "
                    "to video (the pipeline's default), 0 = a decoder per video (comma list, timed in turn)")
    ap.add_argument("--track-chains", default=str(CHAIN), help="landmarks: chain lengths timed (first dtype; comma list)")
    ap.add_argument("--modules", default=None, help="a copy of mediapipe's modules/ folder (no mediapipe installed)")
    ap.add_argument("--boxes", type=Path, default=None, help="speaker boxes JSON (made here where MediaPipe is)")
    ap.add_argument("--reference", type=Path, default=None, help="MediaPipe landmarks .npz (made where MediaPipe is)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None,
                    help="extract: after each timed run, run it again with worker 0 under torch.profiler; its tables go here")
    a = ap.parse_args()
    import torch

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sections = a.section or ["decode", "decode-set", "landmarks", "mediapipe", "extract"]
    vids = videos_of(a.videos)
    xvids = videos_of(a.extract_videos) if a.extract_videos else vids
    boxes = face_boxes(sorted(set(vids) | set(xvids), key=str), a.boxes)
    RESULTS["machine"] = {"device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
                          "cpus": os.cpu_count(), "torch": torch.__version__}
    print("machine", RESULTS["machine"], flush=True)
    for s in sections:
        try:
            if s == "decode":
                section_decode(vids, a.sessions)
            elif s == "decode-set":
                for colour in a.colours.split(","):  # side by side in one run
                    for kind in a.decode_in.split(","):
                        section_decode_set(vids, a.sessions, a.scale, colour, kind.startswith("processes"),
                                           kind.endswith("-reuse"))
            elif s == "landmarks":
                section_landmarks(vids, boxes, dev, [int(b) for b in a.batches.split(",")], a.dtypes.split(","),
                                  a.acc_frames, a.modules, a.reference, [int(c) for c in a.track_chains.split(",")])
            elif s == "compile":
                section_compile(vids, boxes, dev, int(a.batches.split(",")[-1]), a.modules)
            elif s == "mediapipe":
                section_mediapipe(vids, boxes, a.procs, a.mp_frames)
            elif s == "detect":
                section_detect(vids, dev, a.modules, [int(b) for b in a.batches.split(",")])
            elif s == "extract":
                from extractors.media import nvdec_available

                section_extract(xvids, boxes, dev, [int(k) for k in a.workers.split(",")], a.scale, a.modules,
                                [int(b) for b in a.mesh_batch.split(",")], dev.startswith("cuda") and nvdec_available(),
                                [int(c) for c in a.chains.split(",")], [bool(int(f)) for f in a.fused_warp.split(",")],
                                a.profile, a.schedule.split(","), [int(t) for t in a.threads.split(",")], a.pad_to,
                                [int(b) for b in a.cpu_decode_below.split(",")],
                                [bool(int(r)) for r in a.nvdec_reuse.split(",")])
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others' figures
            import traceback

            traceback.print_exc()
            RESULTS[f"{s}_error"] = f"{type(e).__name__}: {e}"
        if a.json:
            a.json.write_text(json.dumps(RESULTS, indent=1))
    print(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
