#!/usr/bin/env bash
# One command for a machine with a CUDA GPU, the CUDA toolkit and no network:
# build the CUDA extension in place, run the cuda test tier, run `seqkern bench` at full sizes
# and the end-to-end model benchmarks, and write results and logs to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR [PARTS]
#
# PARTS (default "tests,bench,e2e") picks what runs after the build; all of it together takes
# longer than one 10-minute command, so run e.g. "tests,bench" in one call and "e2e" in the next.
#
# OUTDIR gets: build.log, info.txt, test_cuda.log, bench.log, and
# results/<gpu-slug>/full-<UTC time>.json plus one full-<UTC time>-<op>.png per op. Commit the results/ part under benchmarks/results/.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [tests,bench,e2e]}
PARTS=",${2:-tests,bench,e2e},"
want() { [[ "$PARTS" == *",$1,"* ]]; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0

# Build for the GPU that is here (fast) unless the caller says otherwise; a failed CUDA
# compile is an error, never a silent CPU-only build.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")')
  export TORCH_CUDA_ARCH_LIST
fi
export SEQKERN_FORCE_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1

# Wheels carried in .whl/ (no network on the GPU machine), e.g. espnet 202506 and typeguard for
# the end-to-end BEATs benchmark: installed first, without dependencies.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -3
fi
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" | tee "$OUT/build.log"
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1; then
  echo "build FAILED; see build.log" | tee -a "$OUT/build.log"
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"

$PY -m seqkern info 2>&1 | tee "$OUT/info.txt"

if want tests; then
  echo "== cuda test tier"
  start=$(date +%s)
  $PY -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "tests took $(( $(date +%s) - start )) s"
fi

if want bench; then
  echo "== seqkern bench (full sizes)"
  $PY -m seqkern bench --out "$OUT/results" --no-progress 2>&1 | tee "$OUT/bench.log" | tail -60
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

want e2e || exit $status

echo "== end to end: ESPnet BeatsEncoder before and after seqkern.swap"
if $PY -c "import espnet2.asr.encoder.beats_encoder" >/dev/null 2>&1; then
  $PY benchmarks/beats_encoder.py --out "$OUT/results" 2>&1 | tee "$OUT/beats_encoder.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "skipped: espnet2 202506 is not importable here (carry its wheel and typeguard's in .whl/)"
fi

echo "== end to end: ESPnet MEGADecoder forward and beam-search steps before and after seqkern.swap"
if $PY -c "import espnet2.asr_transducer.decoder.mega_decoder" >/dev/null 2>&1; then
  $PY benchmarks/mega_decoder.py --out "$OUT/results" 2>&1 | tee "$OUT/mega_decoder.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "skipped: espnet2 202506 is not importable here (carry its wheel and typeguard's in .whl/)"
fi

echo "== end to end: VALL-E NAR decoder (12 layers)"
# no espnet needed: upstream is seqkern.bench.valle's transcription of the 202506 decoder
$PY benchmarks/valle_decoder.py --out "$OUT/results" --rounds 3 2>&1 | tee "$OUT/valle_decoder.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== streaming: Emformer and ConvEmformer (base configuration, 20 layers) per segment"
if [ -f .upstream/torchaudio-2.8.0/torchaudio/models/emformer.py ]; then
  for model in emformer conv; do
    for batch in 1 256; do
      $PY benchmarks/emformer_stream.py --device cuda --model "$model" --batch "$batch" \
        --input-dim 512 --heads 8 --ffn 2048 --layers 20 --segments 20 --rounds 3 \
        --out "$OUT/results" 2>&1 | tee -a "$OUT/emformer_stream.log" | tail -4
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
  done
else
  echo "skipped: torchaudio 2.8.0's sources are not here (carry .upstream/ from tests/upstream/fetch.py)"
fi

echo "== training: Emformer and ConvEmformer (base configuration, B = 32 x 10 s) forward + backward"
if [ -f .upstream/torchaudio-2.8.0/torchaudio/models/emformer.py ]; then
  for model in emformer conv; do
    $PY benchmarks/emformer_train.py --device cuda --model "$model" --out "$OUT/results" 2>&1 \
      | tee -a "$OUT/emformer_train.log" | tail -8
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
else
  echo "skipped: torchaudio 2.8.0's sources are not here (carry .upstream/ from tests/upstream/fetch.py)"
fi

exit $status
