#!/usr/bin/env bash
# The embedded benchmark's GPU jobs, side by side on one GPU (its small models leave it mostly idle):
#
#   1. configs/demo.py:pretrain, the recipe of the models shipped in configs/pretrained/demo: the dataset
#      (8192 training clips), the VAE, the text encoder and the latent caches once, then two base DiTs on
#      them, side by side: A (width 192, 6 blocks: the CPU default's cost) and B (width 256, 6 blocks).
#      Each base is checked on the validation prompts at every guidance scale of pretrained.guidance_grid
#      and on the test prompts with three sampling seeds, and packed with its VAE and text encoder.
#      Rule fixed before the run: ship A if its best validation accuracy is >= 0.65 (0.6 plus a margin
#      for the test prompts), else the more accurate of A and B.
#   2. configs/demo.py:long, the whole protocol at a larger size.
#
# Usage: benchmarks/demo_gpu_runs.sh WORK    (logs and results under WORK; WORK/status.txt: one line per job)
# Extra overrides for a smoke run: PRETRAIN_ARGS="--config.x=..." LONG_ARGS="..." (word-split); SKIP_LONG=1.
set -uo pipefail
WORK=${1:?usage: demo_gpu_runs.sh WORK}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# shellcheck disable=SC2086
job() {  # job NAME ARGS...: one experiments.main run, its log in WORK/NAME.log, its exit code in status.txt
  local name=$1; shift
  local t0=$SECONDS
  "${PYTHON:-python3}" -m experiments.main "$@" > "$WORK/$name.log" 2>&1
  echo "$name rc=$? seconds=$((SECONDS - t0))" >> "$WORK/status.txt"
}

# shellcheck disable=SC2086
[ -n "${SKIP_LONG:-}" ] || job long --config=configs/demo.py:long --workdir="$WORK/long" --config.evaluate.comparison_video=False \
    ${LONG_ARGS:-} &

# shellcheck disable=SC2086
job pretrain_data --config=configs/demo.py:pretrain --workdir="$WORK/pre_a" --config.stop_after=cache ${PRETRAIN_ARGS:-}
cp -r "$WORK/pre_a" "$WORK/pre_b"
# shellcheck disable=SC2086
job pretrain_a --config=configs/demo.py:pretrain --workdir="$WORK/pre_a" ${PRETRAIN_ARGS:-} &
# shellcheck disable=SC2086
job pretrain_b --config=configs/demo.py:pretrain --workdir="$WORK/pre_b" --config.base.model.dim=256 \
    --config.base.model.ffn_dim=1024 ${PRETRAIN_ARGS:-} &
wait
echo "all done" >> "$WORK/status.txt"
