"""Load a CTranslate2 Whisper model (``model.bin`` + ``config.json``) into openai-whisper's PyTorch
``whisper.model.Whisper``, so the packaged faster-whisper weights also run where ctranslate2 has
no build (e.g. CUDA through PyTorch). Pure: reads files, never writes, no pickle, no network.

``model.bin`` layout (CTranslate2 binary version 6, ``specs/model_spec.py:_serialize``), all
little-endian: u32 version; str spec name ("WhisperSpec"); u32 spec revision; u32 n_vars; n_vars x
(str name; u8 rank; u32 dims[rank]; u8 dtype id; u32 n_bytes; raw bytes); u32 n_aliases;
n_aliases x (str alias; str target). A str is u16 length (counting a trailing NUL), then bytes.

Name mapping (ctranslate2 ``converters/transformers.py:WhisperLoader``, which fuses HF's
q_proj/k_proj/v_proj in that order and fills HF's missing k_proj bias with zeros):

    encoder/conv{1,2}/{weight,bias}                 -> encoder.conv{1,2}.*
    encoder/position_encodings/encodings            -> encoder.positional_embedding (buffer)
    encoder/layer_N/self_attention/layer_norm       -> encoder.blocks.N.attn_ln
    encoder/layer_N/self_attention/linear_0 (q|k|v) -> encoder.blocks.N.attn.{query,key,value}
    encoder/layer_N/self_attention/linear_1         -> encoder.blocks.N.attn.out
    */layer_N/ffn/{layer_norm,linear_0,linear_1}    -> *.blocks.N.{mlp_ln,mlp.0,mlp.2}
    encoder/layer_norm                              -> encoder.ln_post
    decoder/embeddings/weight                       -> decoder.token_embedding.weight
    decoder/position_encodings/encodings            -> decoder.positional_embedding
    decoder/layer_N/self_attention/...              -> decoder.blocks.N.attn{,_ln} (as encoder)
    decoder/layer_N/attention/layer_norm            -> decoder.blocks.N.cross_attn_ln
    decoder/layer_N/attention/linear_0 (q)          -> decoder.blocks.N.cross_attn.query
    decoder/layer_N/attention/linear_1 (k|v)        -> decoder.blocks.N.cross_attn.{key,value}
    decoder/layer_N/attention/linear_2              -> decoder.blocks.N.cross_attn.out
    decoder/layer_norm                              -> decoder.ln
    decoder/projection/weight  (alias of the embeddings; openai ties the logits to them anyway)

The word-timestamp (layer, head) pairs live in ``config.json["alignment_heads"]``; the
``decoder/alignment_heads`` scalar in model.bin is only a head *count* used by ctranslate2.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

# ctranslate2 DataType ids (model_spec._dtype_to_type_id); bfloat16 (5) is decoded by hand below.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` (a file, or the folder holding it), with aliases
    resolved and int8/int16-quantized weights dequantized to float32. Unconverted arrays are
    read-only views of the file's bytes (copy before writing to them)."""
    path = Path(path)
    buf = (path / "model.bin" if path.is_dir() else path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (val,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return val

    def string() -> str:
        nonlocal pos
        n = take("H")  # counts the trailing NUL
        pos += n
        return buf[pos - n:pos - 1].decode("utf-8")

    version = take("I")
    if version < 3:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is too old (need >= 3)")
    spec, _revision, n_vars = string(), take("I"), take("I")
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: model spec is {spec!r}, not 'WhisperSpec'")
    out: dict[str, np.ndarray] = {}
    for _ in range(n_vars):
        name, rank = string(), take("B")
        dims = [take("I") for _ in range(rank)]
        dt, n_bytes = take("B"), take("I")
        a = np.frombuffer(buf, _DTYPES[dt], n_bytes // np.dtype(_DTYPES[dt]).itemsize, pos)
        if dt == 5:  # bfloat16 = upper half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.reshape(dims)
        pos += n_bytes
    for _ in range(take("I")):
        alias, target = string(), string()
        out[alias] = out[target]
    # Quantized weights come with "<name>_scale": int8 per output row, int16 one scalar (q = w*s).
    for name in [n for n in out if n + "_scale" in out]:
        q, s = out[name], out.pop(name + "_scale").astype(np.float32)
        out[name] = q.astype(np.float32) / s.reshape(-1, *[1] * (q.ndim - 1))
    return out


def _state_dict(v: dict[str, np.ndarray], n_enc: int, n_dec: int, d: int) -> dict[str, np.ndarray]:
    """openai-whisper state-dict (numpy) from the CT2 variables (see the table in the docstring)."""
    sd: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str):
        sd[dst + ".weight"], sd[dst + ".bias"] = v[src + "/weight"], v[src + "/bias"]

    def norm(dst: str, src: str):
        sd[dst + ".weight"], sd[dst + ".bias"] = v[src + "/gamma"], v[src + "/beta"]

    def split(dst: str, src: str, names: tuple[str, ...]):
        # A fused projection: rows [i*d:(i+1)*d] belong to names[i]; openai's "key" has no bias.
        w, b = v[src + "/weight"], v[src + "/bias"]
        for i, n in enumerate(names):
            sd[f"{dst}.{n}.weight"] = w[i * d:(i + 1) * d]
            if n == "key":
                if np.any(b[i * d:(i + 1) * d]):
                    raise ValueError(f"{src}: non-zero key bias cannot be represented in openai-whisper")
            else:
                sd[f"{dst}.{n}.bias"] = b[i * d:(i + 1) * d]

    def block(dst: str, src: str, cross: bool):
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        split(f"{dst}.attn", f"{src}/self_attention/linear_0", ("query", "key", "value"))
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        if cross:
            norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            split(f"{dst}.cross_attn", f"{src}/attention/linear_1", ("key", "value"))
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in range(n_enc):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(n_dec):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")
    proj = v.get("decoder/projection/weight")
    if proj is not None and not np.array_equal(proj, v["decoder/embeddings/weight"]):
        raise ValueError("decoder/projection is not tied to the embeddings; openai-whisper cannot hold it")
    if np.any(v.get("decoder/projection/bias", 0)):
        raise ValueError("decoder/projection has a bias; openai-whisper cannot hold it")
    return sd


def load_whisper_from_ct2(model_dir: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):
    """An eval-mode ``whisper.model.Whisper`` holding the weights of the CTranslate2 model in
    ``model_dir`` (or its ``model.bin``), with the alignment heads of its ``config.json`` set so
    ``transcribe(..., word_timestamps=True)`` uses the same heads as faster-whisper.

    Keep ``dtype=torch.float32`` (the CT2 float16 weights upcast exactly) and let openai-whisper
    cast activations itself (``transcribe(fp16=True)`` on CUDA): its LayerNorm runs in float32, so
    a model whose parameters are all float16 only works where openai-whisper expects it to."""
    from whisper.model import ModelDimensions, Whisper

    model_dir = Path(model_dir)
    if model_dir.is_file():
        model_dir = model_dir.parent
    v = read_ct2(model_dir / "model.bin")
    n_layers = lambda side: len({m.group(1) for n in v if (m := re.match(side + r"/layer_(\d+)/", n))})
    n_mels_state = v["encoder/conv1/weight"].shape  # (n_audio_state, n_mels, 3)
    dims = ModelDimensions(
        n_mels=n_mels_state[1],
        n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=n_mels_state[0],
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=n_layers("encoder"),
        n_vocab=v["decoder/embeddings/weight"].shape[0],
        n_text_ctx=v["decoder/position_encodings/encodings"].shape[0],
        n_text_state=v["decoder/embeddings/weight"].shape[1],
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=n_layers("decoder"),
    )
    sd = _state_dict(v, dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state)
    if dims.n_text_state != dims.n_audio_state:  # the split() above assumes one width throughout
        raise ValueError(f"encoder width {dims.n_audio_state} != decoder width {dims.n_text_state}")

    model = Whisper(dims)
    # Weights are cast (copied) straight to the target dtype; strict=True catches any missed key.
    model.load_state_dict({k: torch.from_numpy(a.astype(np.float32)).to(dtype) for k, a in sd.items()},
                          strict=True)

    # Alignment heads: config.json's (layer, head) pairs; else openai's default (last half layers).
    cfg_file = model_dir / "config.json"
    heads = json.loads(cfg_file.read_text()).get("alignment_heads") if cfg_file.is_file() else None
    if heads:
        mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model.to(device).eval()


def save_safetensors(model, path: str | Path) -> None:
    """Optional: write the model's state dict (plus its alignment-head mask) as safetensors."""
    from safetensors.torch import save_file

    sd = {k: t.contiguous() for k, t in model.state_dict().items()}
    sd["alignment_heads"] = model.alignment_heads.to_dense().to(torch.uint8)
    save_file(sd, str(path), metadata={k: str(x) for k, x in vars(model.dims).items()})
