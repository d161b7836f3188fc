#!/usr/bin/env bash
# A short phase 1 + phase 2 on one CUDA GPU at the preset's official input size: training and inference
# images / s, peak GPU memory, the GPU and its software, mAP (details: scripts/gpu_check.py).
#
#   bash scripts/gpu_check.sh                        # DEIMv2-S at 640 px, 3 epochs, bf16
#   SIZE=m EPOCHS=2 AMP=fp16 bash scripts/gpu_check.sh
#   GPU_CHECK_ALLOW_CPU=1 SIZE=atto IMAGE_SIZE=160 EPOCHS=2 TRAIN_IMAGES=16 VAL_IMAGES=8 BATCH=4 \
#       bash scripts/gpu_check.sh                    # dry run of the script on CPU
#
# Writes $OUT/gpu_check.json when OUT is set, else reports/gpu_check.json; scratch runs in runs/gpu_check/.
# Exit code 3 when no CUDA device is visible (and GPU_CHECK_ALLOW_CPU is not 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" scripts/gpu_check.py \
    --size "${SIZE:-s}" \
    --image-size "${IMAGE_SIZE:-0}" \
    --epochs "${EPOCHS:-3}" \
    --train-images "${TRAIN_IMAGES:-512}" \
    --val-images "${VAL_IMAGES:-128}" \
    --batch-size "${BATCH:-16}" \
    --amp "${AMP:-bf16}" \
    --device "${DEVICE:-cuda}" \
    --num-workers "${NUM_WORKERS:-auto}" \
    --text-encoder "${TEXT_ENCODER:-random}" \
    --text-model "${TEXT_MODEL:-}" \
    "$@"
