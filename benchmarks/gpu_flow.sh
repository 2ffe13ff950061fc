#!/usr/bin/env bash
# On the lent GPU machine (kit staged, see benchmarks/kit.sh): the real quantize flow with backend tensorrt.
#   MODEL=/tmp/inputs/yolov8n/fp32.onnx DATA=/tmp/data OUT=$OUT bash benchmarks/gpu_flow.sh [--set KEY=VALUE ...]
# DATA holds calib/, val/ and select/ (images + labels); the FP32 reference runs on ONNX Runtime (saves an FP32
# engine build); fp16, the searched Q/DQ int8 and TensorRT's implicit INT8 (MinMax calibrator) are TensorRT engines
# at builder level 2 (the search limited to ALGORITHMS x 128 images and FLOAT_STEPS to fit one call), with the
# timing cache of benchmarks/gpu_int8.py. VARIANTS replaces the variant list. The run is stopped after
# FLOW_TIMEOUT_S (default 520 s) so that whatever it wrote still comes back: results, profiles and the MLflow
# store (engines and ONNX models left out) go to $OUT/flow.tar.gz.
set -eo pipefail
: "${MODEL:?}" "${DATA:?}" "${OUT:?}"
WORK=${WORK:-/tmp/flow}
mkdir -p "$WORK"
DEFAULT_VARIANTS="[{name: fp32, precision: fp32, backend: onnxruntime}, {name: fp16, precision: fp16}, \
{name: int8, precision: int8, quantization: qdq}, \
{name: int8-implicit, precision: int8, quantization: implicit, calibrator: minmax}]"
status=0
timeout --signal=INT --kill-after=20 "${FLOW_TIMEOUT_S:-520}" \
  bash benchmarks/kit.sh -m flows.cli run -p params.yaml --json "$OUT/results.json" \
  --set model.path="$MODEL" --set backend=tensorrt \
  --set "variants=${VARIANTS:-$DEFAULT_VARIANTS}" \
  --set calibration.images="$DATA/calib/images" --set validation.images="$DATA/val/images" \
  --set validation.labels="$DATA/val/labels" --set selection.images="$DATA/select/images" \
  --set selection.labels="$DATA/select/labels" --set "search.algorithms=[${ALGORITHMS:-mse}]" \
  --set "search.calibration_sizes=[128]" --set "search.float_steps=[${FLOAT_STEPS:-0}]" \
  --set tensorrt.builder_optimization_level=${LEVEL:-2} \
  --set "tensorrt.tactic_sources=[EDGE_MASK_CONVOLUTIONS, JIT_CONVOLUTIONS]" \
  --set tensorrt.timing_cache=${TIMING_CACHE:-/tmp/yoloq-gpu-int8/timing.cache} \
  --set output_dir="$WORK" --set mlflow.tracking_uri="sqlite:///$WORK/mlflow.db" "$@" || status=$?
tar czf "$OUT/flow.tar.gz" --exclude='*.engine' --exclude='*.onnx' -C "$WORK" . -C "$PWD" mlartifacts 2>/dev/null || true
echo "yoloq run exited $status"
