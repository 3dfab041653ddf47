#!/usr/bin/env bash
# Builds the shipped GNPFA (models/assets/gnpfa-v1) from the shared real footage, reproducibly:
# fixed seeds, fixed torch threads, CPU. `make gnpfa` runs it (about 30 min on 2 cores).
#   1. extracts two datasets with 128 px face crops: the training people (../shared/data/real and the
#      corpus minus HELD_OUT) and the held-out people (HELD_OUT, never trained on; bench/bench_gnpfa.py
#      --section heldout measures fidelity on them);
#   2. trains the geometry VAE, then the image encoders with the VAE frozen, on the training people;
#   3. writes model.safetensors (float16 weights) + config.json with the recipe (inputs and their sha256,
#      configs, code version, argv) to $DEST.
# Extraction of these datasets uses a per-run bootstrap (gnpfa_checkpoint=bootstrap): only their meshes,
# poses and crops are used, which do not depend on the GNPFA.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
WORK=${WORK:-out/gnpfa-build}
DEST=${DEST:-models/assets/gnpfa-v1}
NAME=${NAME:-$(basename "$DEST")}
GEOMETRY_STEPS=${GEOMETRY_STEPS:-4000}
IMAGE_STEPS=${IMAGE_STEPS:-2500}
HELD_OUT="mimictalk_german infinitetalk_ref sadtalker_wda_katiehill latentsync_demo3"
PY=.venv/bin/python
M2FD="$PY -m pipelines.cli"
SET=(--set crop_size=128 --set gnpfa_checkpoint=bootstrap --stages ingest,extract)

train=("$SHARED/data/real")
held=()
for f in "$SHARED"/data/corpus/*.mp4; do
  b=$(basename "$f" .mp4)
  if [[ " $HELD_OUT " == *" $b "* ]]; then held+=("$f"); else train+=("$f"); fi
done
[ ${#held[@]} -eq 4 ] || { echo "expected the 4 held-out videos in $SHARED/data/corpus, found ${#held[@]}" >&2; exit 2; }

$M2FD run "${train[@]}" --out "$WORK/train" "${SET[@]}"
$M2FD run "${held[@]}" --out "$WORK/heldout" "${SET[@]}"
$M2FD gnpfa train-geometry "$WORK/train" --out "$WORK/geometry" --steps "$GEOMETRY_STEPS" --device cpu
$M2FD gnpfa train-image "$WORK/train" --geometry "$WORK/geometry" --out "$DEST" --steps "$IMAGE_STEPS" \
  --device cpu --half --name "$NAME"
sha=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['sha256'])" "$DEST/config.json")
want=$($PY -c "from models.gnpfa import SHIPPED_SHA256; print(SHIPPED_SHA256)")
echo "built $DEST (sha256 $sha); held-out people: $HELD_OUT (dataset $WORK/heldout)"
[ "$sha" = "$want" ] || echo "note: models.gnpfa.SHIPPED_SHA256 is $want; runs refuse $DEST until it names $sha" >&2
