#!/usr/bin/env bash
# Recipes: bash run.sh NAME  (demo | finetune | mobilefacenet | train | strategies | strategies-real | test)
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
  # Built-in data, CPU, a few minutes: pre-train tiny on domain A, fine-tune it two-stage on domain B (other people,
  # other lighting/colour/pose), saving slim checkpoints, and print before/after verification on B (gained) and A
  # (kept/lost).
  local OUT=${OUT:-/tmp/ifr_demo} PRE_STEPS=${PRE_STEPS:-300} HEAD=${HEAD_STEPS:-30} ALL=${ALL_STEPS:-210}
  # ArcFace with s=32 suits a tiny net with few classes (s=64, m=0.5 learns far slower in a short run); the
  # fine-tune uses a smaller margin, as the imprinted classifier starts close to the new classes
  local PRE_LOSS=(--loss arcface --set margin_s=32 --set margin_m=0.3)
  local FT_LOSS=(--loss arcface --set margin_s=32 --set margin_m=0.2)
  $PY -m datasets.synth --out "$OUT/A" --domain A --num-classes 150 --images-per-class 16 --num-holdout 50 \
    --num-pairs 400 --seed 0 --bin-names A_val
  $PY -m datasets.synth --out "$OUT/B" --domain B --num-classes 100 --images-per-class 16 --num-holdout 50 \
    --num-pairs 400 --seed 1 --bin-names B_val
  $PY recognition/train.py --network tiny "${PRE_LOSS[@]}" --data-dir "$OUT/A" --target A_val --per-batch-size 32 \
    --lr 0.1 --warmup-steps 20 --lr-steps $((PRE_STEPS * 2 / 3)) --max-steps "$PRE_STEPS" --verbose "$PRE_STEPS" \
    --frequent 50 --ckpt 0 --prefix "$OUT/models/pre/model"
  local pre_epoch; pre_epoch=$(latest_epoch "$OUT/models/pre/model")
  # head: embedding layer + imprinted fc7 (class means of the loaded backbone) over frozen BatchNorm statistics,
  # at 0.1x the lr (at full lr the head stage pulled the imprinted classifier down: no-margin training accuracy
  # 0.53 -> 0.28 over the head stage, against 0.53 -> 0.42 at 0.1x; B_val at steps 80/160: 0.79/0.81 vs 0.82/0.83);
  # all: everything at the pre-training lr (measured: lr 0.1 gained more on B than 0.05), x0.1 for the last quarter
  $PY recognition/train.py --network tiny "${FT_LOSS[@]}" --data-dir "$OUT/B" --target "B_val,$OUT/A/A_val.bin" \
    --pretrained "$OUT/models/pre/model,$pre_epoch" --fc7-init imprint --stages "head:$HEAD@0.1,all:$ALL" \
    --per-batch-size 32 --lr "${LR:-0.1}" --warmup-steps 10 --lr-steps $((HEAD + ALL * 3 / 4)) \
    --verbose $(((HEAD + ALL) / 3)) --frequent 30 --ckpt 2 --eval-pretrained --prefix "$OUT/models/ft/model"
  local ft_epoch; ft_epoch=$(latest_epoch "$OUT/models/ft/model")
  # --ckpt-embedding 1 (the default) already saved the slim graph: no model_slim step
  echo "demo done: fine-tuned slim model $OUT/models/ft/model,$ft_epoch (curves: $OUT/models/ft/curves.png)"
}

recipe_finetune() {
  # Two-stage fine-tuning of a pretrained checkpoint on a new rec:
  #   PRETRAINED=../models/model-y1-test2/model,0 DATA_DIR=../datasets/mine bash run.sh finetune
  # Without TARGETS the dataset's default sets (lfw, cfp_fp, agedb_30) are verified where DATA_DIR has their .bin
  # (a missing one is skipped with a warning); TARGETS=lfw,mine_val names them (then each must exist).
  # Settings from real faces (README "Which strategy?", benchmarks/strategies_real.py): the imprinted head at 0.1x
  # the lr, then the backbone at 0.1x with the checkpoint's own BatchNorm statistics (batch statistics shifted the
  # features at the unfreeze and cost the unshifted pairs 2.2 points; frozen statistics with the backbone at 1x
  # diverged). BN_MODE=train adapts the statistics to the new domain instead (a truly different domain, more data).
  # The budget is in passes over DATA_DIR (HEAD_STEPS/ALL_STEPS take steps or Xep): 1 + 3 passes. On real faces the
  # gain grew up to about 4 passes and stopped there, while 12 passes cost the unshifted pairs 1.9 points; a fixed
  # 2,000 + 20,000 steps (the old default) is hundreds of passes over a few thousand images. SOURCE_TARGETS=lfw
  # (names in TARGETS) warns, and stops the run, when those lose more than MAX_SOURCE_DROP (0.005) of accuracy,
  # checked at each verification round: VERBOSE=1ep verifies once a pass (the default, 1000 steps, suits big data).
  : "${PRETRAINED:?set PRETRAINED=PREFIX,EPOCH}" "${DATA_DIR:?set DATA_DIR=folder with train.rec/property}"
  local LOSS=${LOSS:-arcface} HEAD=${HEAD_STEPS:-1ep} ALL=${ALL_STEPS:-3ep}
  $PY recognition/train.py --loss "$LOSS" --data-dir "$DATA_DIR" ${TARGETS:+--target "$TARGETS"} \
    ${SOURCE_TARGETS:+--source-targets "$SOURCE_TARGETS" --max-source-drop "${MAX_SOURCE_DROP:-0.005}" \
      --stop-on-source-drop} \
    --pretrained "$PRETRAINED" ${NETWORK:+--network "$NETWORK"} --fc7-init "${FC7_INIT:-imprint}" \
    --stages "head:$HEAD@${HEAD_LR_FACTOR:-0.1},all:$ALL" --lr "${LR:-0.01}" \
    --backbone-lr-mult "${BACKBONE_LR_MULT:-0.1}" --bn-mode "${BN_MODE:-frozen}" \
    ${TEACHER:+--teacher "$TEACHER" --distill-loss cosine --distill-weight "${DISTILL_WEIGHT:-1}"} \
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

recipe_strategies_real() {
  # Evidence on real faces: model-y1-test2 adapted to lfw_dev unshifted and under low resolution and a face mask;
  # no adaptation / linear probe / head-only / two-stage / full / two-stage + self-distillation, 2 seeds.
  # Resumable: each finished cell is saved in OUT/results.json and skipped by a rerun with the same settings.
  #   SHARED=../shared OUT=/tmp/ifr_strategies_real bash run.sh strategies-real [--no-flip --steps 80 ...]
  local SHARED=${SHARED:-../shared}
  $PY benchmarks/strategies_real.py --out "${OUT:-/tmp/ifr_strategies_real}" \
    --pretrained "${PRETRAINED:-$SHARED/fixtures/model-y1-test2/model,0}" --data "${DATA:-$SHARED/real/lfw_dev}" "$@"
}

recipe_test() {
  $PY -m pytest -q tests "$@"
}

name=${1:-}
[ -n "$name" ] || { echo "usage: bash run.sh {demo|finetune|mobilefacenet|train|strategies|strategies-real|test} [extra flags]" >&2; exit 2; }
shift
given=$name; name=${name//-/_}  # strategies-real -> recipe_strategies_real
if ! declare -F "recipe_$name" >/dev/null; then
  echo "error: unknown recipe '$given'; choose demo, finetune, mobilefacenet, train, strategies, strategies-real or test" >&2; exit 2
fi
"recipe_$name" "$@"
