"""A .tflite graph as a batched PyTorch module: MediaPipe's face detection and face landmark networks
(and any graph of the same operators) read from the flatbuffer inside the installed mediapipe wheel.

The graph is walked once at load time: float16 weights behind DEQUANTIZE are folded to float32, convolution
weights are laid out for ``torch.nn.functional``, and the forward pass replays the operators in order. 4-D
activations are kept as NCHW (TFLite's NHWC permuted; ``channels_last`` memory makes them NHWC in memory
again on GPUs), every other tensor in TFLite's own layout, and the graph's batch of 1 becomes any batch.
MediaPipe's custom operators of the attention landmark model (Landmarks2TransformMatrix,
TransformTensorBilinear, TransformLandmarks, all version 2) are implemented as batched tensor operations
after their C++ definitions (mediapipe/util/tflite/operations).

Pure: no Ray, no Dagster. Needs the ``tflite`` flatbuffer bindings (parsing only).
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_NP = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_NHWC_TO_NCHW = {0: 0, 1: 2, 2: 3, 3: 1}


def _opnames() -> dict[int, str]:
    import tflite

    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


@dataclass
class _Op:
    kind: str
    inputs: list[int]
    outputs: list[int]
    opts: dict


def _act(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return x
    if code == 1:
        return F.relu(x)
    if code == 3:
        return torch.clamp(x, 0.0, 6.0)
    raise NotImplementedError(f"fused activation {code}")


def _same_pad(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (the larger half after)."""
    ke = (k - 1) * d + 1
    out = -(-n // s)
    total = max((out - 1) * s + ke - n, 0)
    return total // 2, total - total // 2


def _to4(c: torch.Tensor) -> torch.Tensor:
    """A constant broadcast against an NHWC activation, as the NCHW tensor it broadcasts against here."""
    while c.dim() < 4:
        c = c.unsqueeze(0)
    return c.permute(0, 3, 1, 2)


def _densify(sp, values: np.ndarray, shape: list[int], path) -> np.ndarray:
    """A sparse constant (TFLite's SparsityParameters: each dimension, in traversal order, dense or
    compressed-sparse-row) as its dense array; ``values`` are the stored non-zeros in traversal order."""
    import tflite

    if sp.BlockMapLength():
        raise NotImplementedError(f"{path}: block-sparse tensors are not supported")
    order = sp.TraversalOrderAsNumpy().tolist()
    vec = {1: tflite.Int32Vector, 2: tflite.Uint16Vector, 3: tflite.Uint8Vector}

    def ints(kind: int, table) -> np.ndarray:
        v = vec[kind]()
        v.Init(table.Bytes, table.Pos)
        return v.ValuesAsNumpy().astype(np.int64)

    coords = np.zeros((1, 0), np.int64)  # the coordinates of each position reached so far, by level
    pos = np.zeros(1, np.int64)  # each one's position in the level's storage
    for lvl in range(sp.DimMetadataLength()):
        d = sp.DimMetadata(lvl)
        if d.Format() == 0:  # dense: every index
            n = d.DenseSize()
            idx = np.tile(np.arange(n), len(pos))
            coords = np.repeat(coords, n, axis=0)
            pos = (pos[:, None] * n + np.arange(n)).ravel()
        else:  # CSR: the indices stored for each parent
            seg, ind = ints(d.ArraySegmentsType(), d.ArraySegments()), ints(d.ArrayIndicesType(), d.ArrayIndices())
            counts = seg[pos + 1] - seg[pos]
            pos = np.concatenate([np.arange(a, b) for a, b in zip(seg[pos], seg[pos + 1])]) if len(pos) else pos
            coords = np.repeat(coords, counts, axis=0)
            idx = ind[pos]
        coords = np.concatenate([coords, idx[:, None]], 1)
    out = np.zeros(shape, values.dtype)
    out[tuple(coords[:, order.index(dim)] for dim in range(len(shape)))] = values[pos]
    return out


def _conv_opts(p) -> dict:
    return {"pad": p.Padding(), "sh": p.StrideH(), "sw": p.StrideW(), "act": p.FusedActivationFunction(),
            "dh": p.DilationHFactor(), "dw": p.DilationWFactor()}


def _act_opts(p) -> dict:
    return {"act": p.FusedActivationFunction()}


# each builtin operator's options: (the tflite options class, what is read from it)
_OPTIONS = {
    "CONV_2D": ("Conv2DOptions", _conv_opts),
    "DEPTHWISE_CONV_2D": ("DepthwiseConv2DOptions", _conv_opts),
    **{k: ("Pool2DOptions", lambda p: {"pad": p.Padding(), "sh": p.StrideH(), "sw": p.StrideW(), "fh": p.FilterHeight(),
                                       "fw": p.FilterWidth(), "act": p.FusedActivationFunction()})
       for k in ("MAX_POOL_2D", "AVERAGE_POOL_2D")},
    "ADD": ("AddOptions", _act_opts),
    "MUL": ("MulOptions", _act_opts),
    "SUB": ("SubOptions", _act_opts),
    "CONCATENATION": ("ConcatenationOptions", lambda p: {"axis": p.Axis(), "act": p.FusedActivationFunction()}),
    "RESHAPE": ("ReshapeOptions", lambda p: {"shape": p.NewShapeAsNumpy().tolist() if p.NewShapeLength() else None}),
    "RESIZE_BILINEAR": ("ResizeBilinearOptions",
                        lambda p: {"align_corners": p.AlignCorners(), "half_pixel": p.HalfPixelCenters()}),
    "DEPTH_TO_SPACE": ("DepthToSpaceOptions", lambda p: {"block": p.BlockSize()}),
    "STRIDED_SLICE": ("StridedSliceOptions",
                      lambda p: {"begin_mask": p.BeginMask(), "end_mask": p.EndMask(), "shrink": p.ShrinkAxisMask(),
                                 "ellipsis": p.EllipsisMask(), "new_axis": p.NewAxisMask()}),
}


class TFLiteGraph(torch.nn.Module):
    """One subgraph of a .tflite file. ``forward(x)`` takes NHWC float input(s) of any batch (the
    preprocessing is the caller's) and returns the graph's outputs in TFLite layout, batch first."""

    def __init__(self, path: str | Path):
        super().__init__()
        import tflite
        from flatbuffers import flexbuffers

        data = Path(path).read_bytes()
        self.path, self.sha256 = str(path), hashlib.sha256(data).hexdigest()
        model = tflite.Model.GetRootAsModel(data, 0)
        g = model.Subgraphs(0)
        names = _opnames()
        self.shapes: dict[int, list[int]] = {}
        consts: dict[int, np.ndarray] = {}
        for i in range(g.TensorsLength()):
            t = g.Tensors(i)
            self.shapes[i] = t.ShapeAsNumpy().tolist() if t.ShapeLength() else []
            b = model.Buffers(t.Buffer())
            if b is not None and b.DataLength():
                raw = np.frombuffer(b.DataAsNumpy().tobytes(), _NP[t.Type()])
                consts[i] = (_densify(t.Sparsity(), raw, self.shapes[i], path) if t.Sparsity() is not None
                             else raw.reshape(self.shapes[i] or ()))
        self.inputs = [int(g.Inputs(i)) for i in range(g.InputsLength())]
        self.outputs = [int(g.Outputs(i)) for i in range(g.OutputsLength())]
        self.output_names = [g.Tensors(i).Name().decode() for i in self.outputs]
        self.ops: list[_Op] = []
        for i in range(g.OperatorsLength()):
            op = g.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            kind = names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
            ins = [int(j) for j in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(j) for j in op.OutputsAsNumpy()]
            if kind == "DEQUANTIZE" and ins[0] in consts:  # fp16 weights: fold
                consts[outs[0]] = consts[ins[0]].astype(np.float32)
                continue
            if kind == "DENSIFY" and ins[0] in consts:  # sparse weights, made dense at load: fold
                consts[outs[0]] = consts[ins[0]]
                continue
            if kind == "CUSTOM":
                kind = code.CustomCode().decode()
                opts = dict(flexbuffers.Loads(bytes(op.CustomOptionsAsNumpy()))) if op.CustomOptionsLength() else {}
            else:
                opts = self._builtin_options(op, kind)
            self.ops.append(_Op(kind, ins, outs, opts))
        # weights as buffers (they follow .to(device)); layouts for torch's functional ops
        self._names: dict[int, str] = {}
        for op in self.ops:
            for j, t in enumerate(op.inputs):
                if t < 0 or t not in consts or t in self._names:
                    continue
                a = torch.from_numpy(consts[t].copy())
                if op.kind == "CONV_2D" and j == 1:
                    a = a.permute(0, 3, 1, 2)  # O,KH,KW,I -> O,I,KH,KW
                elif op.kind == "DEPTHWISE_CONV_2D" and j == 1:
                    a = a.permute(3, 0, 1, 2)  # 1,KH,KW,C -> C,1,KH,KW
                elif op.kind == "PRELU" and j == 1:
                    a = _to4(a)
                elif op.kind in ("ADD", "MUL", "SUB") and a.dim() >= 1 and self._is4(op.inputs[1 - j], consts):
                    a = _to4(a)
                name = f"t{t}"
                self.register_buffer(name, a.contiguous() if a.dtype.is_floating_point else a, persistent=False)
                self._names[t] = name
        self._consts_np = {t: consts[t] for t in self._names}
        # index lists of the custom operators as tensors on the module's device (an index list built per
        # call would be a host-to-device copy, which a CUDA graph cannot hold)
        for i, op in enumerate(self.ops):
            if op.kind == "Landmarks2TransformMatrix":
                self.register_buffer(f"subset{i}", torch.tensor(list(op.opts["subset_idxs"])), persistent=False)
                op.opts = dict(op.opts, subset=f"subset{i}")

    def _is4(self, t: int, consts: dict) -> bool:
        return t not in consts and len(self.shapes.get(t, [])) == 4

    @staticmethod
    def _builtin_options(op, kind: str) -> dict:
        import tflite

        o = op.BuiltinOptions()
        if o is None or kind not in _OPTIONS:
            return {}
        cls, read = _OPTIONS[kind]
        p = getattr(tflite, cls)()
        p.Init(o.Bytes, o.Pos)
        return read(p)

    def const(self, t: int) -> torch.Tensor:
        return getattr(self, self._names[t])

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        env: dict[int, torch.Tensor] = {}
        for t, x in zip(self.inputs, xs):
            env[t] = x.permute(0, 3, 1, 2) if x.dim() == 4 else x
        get = lambda t: env[t] if t in env else self.const(t)  # noqa: E731
        for op in self.ops:
            env[op.outputs[0]] = self._run(op, get)
        outs = []
        for t in self.outputs:
            y = env[t]
            outs.append(y.permute(0, 2, 3, 1) if y.dim() == 4 else y)
        return outs

    def _run(self, op: _Op, get) -> torch.Tensor:  # noqa: C901 - one branch per operator
        k, o = op.kind, op.opts
        if k in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            x, w = get(op.inputs[0]), get(op.inputs[1]).to(get(op.inputs[0]).dtype)
            b = get(op.inputs[2]).to(x.dtype) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
            if o["pad"] == 0:  # SAME
                ph, pw = _same_pad(x.shape[2], w.shape[2], o["sh"], o["dh"]), _same_pad(x.shape[3], w.shape[3], o["sw"], o["dw"])
                if ph[0] == ph[1] and pw[0] == pw[1]:
                    pad = (ph[0], pw[0])
                else:
                    x, pad = F.pad(x, (pw[0], pw[1], ph[0], ph[1])), (0, 0)
            else:
                pad = (0, 0)
            groups = x.shape[1] if k == "DEPTHWISE_CONV_2D" else 1
            y = F.conv2d(x, w, b, (o["sh"], o["sw"]), pad, (o["dh"], o["dw"]), groups)
            return _act(y, o["act"])
        if k == "PRELU":
            x, a = get(op.inputs[0]), get(op.inputs[1])
            if x.dim() == 4 and a.numel() == x.shape[1]:  # per channel: one kernel
                return F.prelu(x, a.reshape(-1).to(x.dtype))
            return torch.where(x >= 0, x, x * a.to(x.dtype))
        if k == "RELU":
            return F.relu(get(op.inputs[0]))
        if k in ("ADD", "MUL", "SUB"):
            a, b = get(op.inputs[0]), get(op.inputs[1])
            if a.dtype != b.dtype:
                b = b.to(a.dtype) if a.is_floating_point() else b
            y = a + b if k == "ADD" else a * b if k == "MUL" else a - b
            return _act(y, o.get("act", 0))
        if k == "MAX_POOL_2D":
            x = get(op.inputs[0])
            if o["pad"] == 0:
                ph, pw = _same_pad(x.shape[2], o["fh"], o["sh"]), _same_pad(x.shape[3], o["fw"], o["sw"])
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=float("-inf"))
            return _act(F.max_pool2d(x, (o["fh"], o["fw"]), (o["sh"], o["sw"])), o["act"])
        if k == "PAD":
            x, p = get(op.inputs[0]), self._consts_np[op.inputs[1]].astype(int)  # (4, 2) NHWC
            return F.pad(x, (p[2, 0], p[2, 1], p[1, 0], p[1, 1], p[3, 0], p[3, 1]))
        if k == "RESHAPE":
            x = get(op.inputs[0])
            if x.dim() == 4:
                x = x.permute(0, 2, 3, 1)
            shape = o.get("shape") or self._consts_np[op.inputs[1]].astype(int).tolist()
            shape = [x.shape[0]] + [int(s) for s in shape[1:]]
            y = x.reshape(shape)
            return y.permute(0, 3, 1, 2) if y.dim() == 4 else y
        if k == "CONCATENATION":
            xs = [get(t) for t in op.inputs]
            ax = o["axis"] % xs[0].dim()
            if xs[0].dim() == 4:
                ax = _NHWC_TO_NCHW[ax]
            return _act(torch.cat(xs, ax), o["act"])
        if k == "STRIDED_SLICE":
            return self._strided_slice(op, get)
        if k == "RESIZE_BILINEAR":
            x, (h, w) = get(op.inputs[0]), self._consts_np[op.inputs[1]].astype(int).tolist()
            if not (o["align_corners"] or o["half_pixel"]):  # TF's legacy sampling (src = dst * in / out)
                raise NotImplementedError(f"{self.path}: RESIZE_BILINEAR without half_pixel_centers or align_corners")
            return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=bool(o["align_corners"]))
        if k == "DEPTH_TO_SPACE":  # TensorFlow's depth-column-row order: channel (i * bs + j) * C + c
            x, bs = get(op.inputs[0]), o["block"]
            n, c, h, w = x.shape
            return (x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
                    .reshape(n, c // (bs * bs), h * bs, w * bs))
        if k == "Landmarks2TransformMatrix":
            return landmarks_to_transform_matrix(get(op.inputs[0]), o, getattr(self, o["subset"]))
        if k == "TransformTensorBilinear":
            return transform_tensor_bilinear(get(op.inputs[0]), get(op.inputs[1]), o["output_height"], o["output_width"])
        if k == "TransformLandmarks":
            return transform_landmarks(get(op.inputs[0]), get(op.inputs[1]))
        raise NotImplementedError(f"{self.path}: operator {k}")

    def _strided_slice(self, op: _Op, get) -> torch.Tensor:
        x = get(op.inputs[0])
        four = x.dim() == 4
        if four:
            x = x.permute(0, 2, 3, 1)
        o = op.opts
        if o["ellipsis"] or o["new_axis"]:
            raise NotImplementedError("STRIDED_SLICE with ellipsis or new axes")
        begin, end, stride = (self._consts_np[t].astype(int).tolist() for t in op.inputs[1:4])
        idx, squeeze = [], []
        for d in range(len(begin)):
            b = None if (o["begin_mask"] >> d) & 1 else begin[d]
            e = None if (o["end_mask"] >> d) & 1 else end[d]
            if (o["shrink"] >> d) & 1:
                idx.append(slice(begin[d], begin[d] + 1 if begin[d] != -1 else None, 1))
                squeeze.append(d)
            elif d == 0:
                idx.append(slice(None))  # the batch
            else:
                idx.append(slice(b, e, stride[d]))
        y = x[tuple(idx)]
        for d in reversed(squeeze):
            y = y.squeeze(d)
        return y.permute(0, 3, 1, 2) if y.dim() == 4 and four else y


# --- MediaPipe's custom operators, batched --------------------------------------------------------------

def landmarks_to_transform_matrix(lm: torch.Tensor, o: dict, subset: torch.Tensor | None = None) -> torch.Tensor:
    """Landmarks2TransformMatrix v2: (B, N, 3) landmarks -> (B, 4, 4), the matrix from an
    output_width x output_height crop's pixels to the landmarks' frame: rotated so that the line from
    the left to the right rotation landmark is level, centred on and scaled to the subset's box."""
    lm = lm.float()
    left, right = lm[:, o["left_rotation_idx"], :2], lm[:, o["right_rotation_idx"], :2]
    rot = o["target_rotation_radians"] - torch.atan2(right[:, 1] - left[:, 1], right[:, 0] - left[:, 0])
    pts = lm[:, subset if subset is not None else list(o["subset_idxs"]), :2]
    c, s = torch.cos(rot)[:, None], torch.sin(rot)[:, None]
    rx, ry = c * pts[..., 0] - s * pts[..., 1], s * pts[..., 0] + c * pts[..., 1]
    x0, x1, y0, y1 = rx.amin(1), rx.amax(1), ry.amin(1), ry.amax(1)
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    c, s = torch.cos(rot), torch.sin(rot)
    cx, cy = c * mx + s * my, -s * mx + c * my  # rotated back by -rot
    sx = o["scale_x"] * (x1 - x0) / o["output_width"]
    sy = o["scale_y"] * (y1 - y0) / o["output_height"]
    # t = shift(cx, cy) * rot(-rot) * scale(sx, sy) * shift(-w/2, -h/2)
    hw, hh = o["output_width"] / 2.0, o["output_height"] / 2.0
    m = torch.zeros(lm.shape[0], 4, 4, dtype=lm.dtype, device=lm.device)
    m[:, 0, 0], m[:, 0, 1] = c * sx, s * sy
    m[:, 1, 0], m[:, 1, 1] = -s * sx, c * sy
    m[:, 0, 3] = cx - c * sx * hw - s * sy * hh
    m[:, 1, 3] = cy + s * sx * hw - c * sy * hh
    m[:, 2, 2] = m[:, 3, 3] = 1.0
    return m


def transform_tensor_bilinear(x: torch.Tensor, m: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """TransformTensorBilinear v2: sample an (B, C, H, W) map at the matrix's image of each output pixel
    centre (bilinear, zero outside the map)."""
    B, C, H, W = x.shape
    m = m.float()
    ys, xs = torch.meshgrid(torch.arange(oh, device=x.device, dtype=torch.float32),
                            torch.arange(ow, device=x.device, dtype=torch.float32), indexing="ij")
    ax = m[:, 0, 3] + m[:, 0, 0] * 0.5 + m[:, 0, 1] * 0.5 - 0.5
    ay = m[:, 1, 3] + m[:, 1, 0] * 0.5 + m[:, 1, 1] * 0.5 - 0.5
    tx = m[:, 0, 0, None, None] * xs + m[:, 0, 1, None, None] * ys + ax[:, None, None]
    ty = m[:, 1, 0, None, None] * xs + m[:, 1, 1, None, None] * ys + ay[:, None, None]
    inside = (tx >= 0) & (tx <= W - 1) & (ty >= 0) & (ty <= H - 1)
    grid = torch.stack([tx / (W - 1) * 2 - 1, ty / (H - 1) * 2 - 1], -1).to(x.dtype)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return y * inside[:, None].to(y.dtype)


def transform_landmarks(lm: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """TransformLandmarks v2: (B, N, 2|3) -> x, y through the matrix's first two rows; z kept."""
    m = m.to(lm.dtype)
    x = m[:, 0, 0, None] * lm[..., 0] + m[:, 0, 1, None] * lm[..., 1] + m[:, 0, 3, None]
    y = m[:, 1, 0, None] * lm[..., 0] + m[:, 1, 1, None] * lm[..., 1] + m[:, 1, 3, None]
    return torch.stack([x, y] + ([lm[..., 2]] if lm.shape[-1] == 3 else []), -1)


class CudaGraphed:
    """A module's forward replayed from CUDA graphs, one captured per input shape and dtype: the graph's few
    hundred kernels launch as one, so a batch costs the GPU's time, not Python's. Inputs are copied into the
    graph's own buffers, outputs copied out (a later replay overwrites them). CPU inputs run the module as is.
    Capturing needs a forward with no host synchronisation and no host-to-device copies (TFLiteGraph's)."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self.graphs: dict = {}

    def __call__(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        if not xs[0].is_cuda:
            return self.net(*xs)
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in xs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(xs)
            except RuntimeError as e:  # a driver or build that cannot capture: the eager forward, same result
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0][:160]}); running eagerly")
                torch.cuda.synchronize(xs[0].device)
                self.graphs[key] = None
        if self.graphs[key] is None:
            return self.net(*xs)
        graph, ins, outs = self.graphs[key]
        for buf, x in zip(ins, xs):
            buf.copy_(x)
        graph.replay()
        return [o.clone() for o in outs]

    @torch.no_grad()
    def _capture(self, xs):
        ins = [x.clone() for x in xs]
        side = torch.cuda.Stream(xs[0].device)
        side.wait_stream(torch.cuda.current_stream(xs[0].device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up on a side stream, as capture needs: cuDNN's plans, the allocator
                self.net(*ins)
        torch.cuda.current_stream(xs[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # one memory pool for every graph of the process on this device: a graph's intermediates are dead once
        # its outputs are copied out, and graphs replay one at a time on one stream, so they may share memory
        # (a pool per graph held every batch shape's activations at once: 3-6 GB a worker, measured)
        pool = _POOLS.setdefault(xs[0].device, torch.cuda.graph_pool_handle())
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):  # a decoder thread may use CUDA
            outs = self.net(*ins)
        return graph, ins, list(outs)


_POOLS: dict = {}
