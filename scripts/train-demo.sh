#!/usr/bin/env bash
# Reproduce the shipped demo checkpoint (fastdia/assets/demo) and its eval table.
#
#   bash scripts/train-demo.sh OUT_DIR
#
# writes OUT_DIR/data (training windows), OUT_DIR/ckpt (denoiser + critics) and
# OUT_DIR/eval.{json,png}. Every step is resumable: re-run the script after an
# interruption and it continues where it stopped. On the 2-core CPU machine the demo was
# made on: data about 20 min, denoiser about 80 min, critics about 5 min each.
set -euo pipefail
out=${1:?usage: bash scripts/train-demo.sh OUT_DIR}
fastdia=${FASTDIA:-.venv/bin/fastdia}
data=$out/data
ckpt=$out/ckpt

# 1. 4096 windows of 32 tokens sampled from the base model (seed 0, default prompt mix)
$fastdia make-data --out "$data" --num-sequences 4096 --length 32 --batch-size 128 \
    --shard-size 512 --temperature 0.8 --top-p 0.9 --no-progress

resume() { [ -f "$ckpt/training/$1_state.pt" ] && echo --resume || true; }

# 2. the denoiser: a distribution over the data's tokens, cross-entropy, sqrt schedule
$fastdia -v train-denoiser --data "$data" --out "$ckpt" --length 32 --steps 6000 \
    --batch-size 64 --hidden 256 --layers 4 --heads 4 --prediction tokens --schedule sqrt \
    --lr 1.5e-3 --warmup 300 --ema 0.998 --save-every 250 --val-every 500 --no-progress \
    $(resume denoiser)

# 3. the critics (sentiment regresses VADER compound; nontoxic the logit of 1 - p(profane))
$fastdia -v train-critic --data "$data" --out "$ckpt" --length 32 --reward sentiment \
    --steps 3000 --batch-size 128 --lr 1e-3 --warmup 100 --ema 0.995 --hidden 128 \
    --no-progress $(resume critic-sentiment)
$fastdia -v train-critic --data "$data" --out "$ckpt" --length 32 --reward nontoxic \
    --target logit --steps 3000 --batch-size 128 --lr 1e-3 --warmup 100 --ema 0.995 \
    --hidden 128 --no-progress $(resume critic-nontoxic)

# 4. the model card's table
$fastdia eval --checkpoint "$ckpt" --out "$out/eval.json"
