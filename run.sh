#!/usr/bin/env bash
# Recipes: bash run.sh NAME  (demo | finetune | mobilefacenet | train | strategies | test)
# Paths and sizes come from environment variables (shown with their defaults in each recipe).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

latest_epoch() {  # latest_epoch PREFIX -> highest NNNN of PREFIX-NNNN.params
  local f
  f=$(ls "$1"-[0-9][0-9][0-9][0-9].params 2>/dev/null | sort | tail -n 1)
  [ -n "$f" ] || { echo "error: no checkpoint $1-NNNN.params" >&2; exit 2; }
  f=${f%.params}; echo $((10#${f##*-}))
}

recipe_demo() {
  # Built-in data, CPU, a few minutes: pre-train tiny on domain A, fine-tune two-stage on domain B, slim it.
  local OUT=${OUT:-/tmp/ifr_demo} STEPS=${STEPS:-150}
  $PY -m datasets.synth --out "$OUT/A" --domain A --num-classes 40 --images-per-class 12 --num-pairs 200 --seed 0
  $PY -m datasets.synth --out "$OUT/B" --domain B --num-classes 30 --images-per-class 10 --num-pairs 200 --seed 1
  $PY recognition/train.py --network tiny --loss arcface --data-dir "$OUT/A" --target synth_val \
    --per-batch-size 32 --lr 0.05 --max-steps "$STEPS" --verbose "$STEPS" --ckpt 0 --prefix "$OUT/models/pre/model"
  local pre_epoch; pre_epoch=$(latest_epoch "$OUT/models/pre/model")
  $PY recognition/train.py --network tiny --loss arcface --data-dir "$OUT/B" --target synth_val \
    --pretrained "$OUT/models/pre/model,$pre_epoch" --fc7-init imprint --stages "head:40,all:80" \
    --per-batch-size 32 --lr 0.01 --verbose 40 --ckpt 2 --eval-pretrained --prefix "$OUT/models/ft/model"
  local ft_epoch; ft_epoch=$(latest_epoch "$OUT/models/ft/model")
  $PY deploy/model_slim.py --model "$OUT/models/ft/model,$ft_epoch"
  echo "demo done: fine-tuned model $OUT/models/ft/model,$ft_epoch (curves: $OUT/models/ft/curves.png)"
}

recipe_finetune() {
  # Two-stage fine-tuning of a pretrained checkpoint on a new rec:
  #   PRETRAINED=../models/model-y1-test2/model,0 DATA_DIR=../datasets/mine bash run.sh finetune
  : "${PRETRAINED:?set PRETRAINED=PREFIX,EPOCH}" "${DATA_DIR:?set DATA_DIR=folder with train.rec/property}"
  local LOSS=${LOSS:-arcface} TARGETS=${TARGETS:-lfw} HEAD=${HEAD_STEPS:-2000} ALL=${ALL_STEPS:-20000}
  $PY recognition/train.py --loss "$LOSS" --data-dir "$DATA_DIR" --target "$TARGETS" \
    --pretrained "$PRETRAINED" ${NETWORK:+--network "$NETWORK"} --fc7-init "${FC7_INIT:-imprint}" \
    --stages "head:$HEAD,all:$ALL" --lr "${LR:-0.01}" --backbone-lr-mult "${BACKBONE_LR_MULT:-1.0}" \
    --per-batch-size "${PER_BATCH_SIZE:-64}" --verbose "${VERBOSE:-1000}" --ckpt "${CKPT:-3}" --eval-pretrained \
    --models-root "${MODELS_ROOT:-./models}" "$@"
}

recipe_mobilefacenet() {
  # insightface's MobileFaceNet recipe: softmax pre-training, then ArcFace (s=64, m=0.5) from its checkpoint.
  local DATA_DIR=${DATA_DIR:-../datasets/faces_emore} ROOT=${MODELS_ROOT:-../models/MobileFaceNet}
  local BS=${PER_BATCH_SIZE:-512} TARGETS=${TARGETS:-lfw,cfp_fp,agedb_30}
  $PY recognition/train_softmax.py --network y1 --loss-type 0 --data-dir "$DATA_DIR" --target "$TARGETS" \
    --emb-size 128 --fc7-wd-mult 10 --wd 0.00004 --per-batch-size "$BS" --max-steps "${SOFTMAX_STEPS:-120000}" \
    --ckpt 2 --prefix "$ROOT/model-y1-softmax"
  local epoch; epoch=$(latest_epoch "$ROOT/model-y1-softmax")
  $PY recognition/train_softmax.py --network y1 --loss-type 4 --margin-s 64 --margin-m 0.5 --data-dir "$DATA_DIR" \
    --target "$TARGETS" --emb-size 128 --fc7-wd-mult 10 --wd 0.00004 --lr 0.1 --lr-steps 40000,60000,70000 \
    --per-batch-size "$BS" --max-steps "${ARCFACE_STEPS:-80000}" --pretrained "$ROOT/model-y1-softmax,$epoch" \
    --prefix "$ROOT/model-y1-arcface"
}

recipe_train() {
  # From scratch: NETWORK=r100 LOSS=arcface DATA_DIR=../datasets/faces_emore bash run.sh train
  $PY recognition/train.py --network "${NETWORK:-r100}" --loss "${LOSS:-arcface}" \
    --data-dir "${DATA_DIR:-../datasets/faces_emore}" --target "${TARGETS:-lfw,cfp_fp,agedb_30}" \
    --per-batch-size "${PER_BATCH_SIZE:-128}" --models-root "${MODELS_ROOT:-./models}" "$@"
}

recipe_strategies() {
  # Evidence table: linear probe / head-only / two-stage / full fine-tuning at two data sizes (synthetic A -> B)
  $PY benchmarks/strategies.py --out "${OUT:-/tmp/ifr_strategies}" "$@"
}

recipe_test() {
  $PY -m pytest -q tests "$@"
}

name=${1:-}
[ -n "$name" ] || { echo "usage: bash run.sh {demo|finetune|mobilefacenet|train|strategies|test} [extra flags]" >&2; exit 2; }
shift
if ! declare -F "recipe_$name" >/dev/null; then
  echo "error: unknown recipe '$name'; choose demo, finetune, mobilefacenet, train, strategies or test" >&2; exit 2
fi
"recipe_$name" "$@"
