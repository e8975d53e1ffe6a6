#!/usr/bin/env bash
# The denoiser and the value critics that read the base model (not shipped: see
# fastdia/assets/demo/MODEL_CARD.md, "A denoiser that reads the base model"), from a fresh
# install, on top of the shipped demo denoiser:
#
#   bash scripts/train-conditioned.sh OUT_DIR
#
# writes OUT_DIR/data (128-token samples of the base model with its last-layer states),
# OUT_DIR/ckpt (the conditioned denoiser, the demo's critics, the value critics and the
# demo's sampling.json) and OUT_DIR/eval-{neutral,negative}.{json,md,png}. Every step resumes: re-run the
# script after an interruption. CPU times are those of the 2-core machine of the model card
# (one thread per job); FASTDIA_DEVICE=cuda runs on a GPU.
set -euo pipefail
out=${1:?usage: bash scripts/train-conditioned.sh OUT_DIR}
fastdia=${FASTDIA:-.venv/bin/fastdia}
device=${FASTDIA_DEVICE:+--device $FASTDIA_DEVICE}
data=$out/data
ckpt=$out/ckpt
num_sequences=${NUM_SEQUENCES:-2048}
resume() { [ -f "$ckpt/training/$1_state.pt" ] && echo --resume || true; }

# 1. 2,048 samples of 128 tokens after the training prompts, with the base model's
#    last-layer states of every position (float16; 0.3 GB; about 90 minutes on one thread)
$fastdia make-data --out "$data" --num-sequences "$num_sequences" --length 128 --batch-size 64 \
    --shard-size 256 --temperature 0.8 --top-p 0.9 --prompts fastdia/assets/prompts/train.txt \
    --states --no-progress $device

# 2. the conditioned denoiser: the demo's, fine-tuned with the states of the 8 tokens before
#    each window's first noisy position and the base model's next-token logits there
#    (windows of 32 tokens cut from the 128; 1,500 steps, about 60 minutes on one thread)
$fastdia -v train-denoiser --data "$data" --out "$ckpt" --length 32 --steps 1500 \
    --batch-size 64 --hidden 256 --layers 6 --heads 4 --prediction tokens --schedule sqrt \
    --arch adaln --self-condition --clean-prompt --prefix-states 8 --lm-prior \
    --init fastdia/assets/demo --time-warp --lr 5e-4 --warmup 100 --ema 0.998 \
    --save-every 250 --val-every 250 --no-progress $device $(resume denoiser)

# 3. the value critics of sentiment (the expected VADER of the whole 128-token sample given
#    the states before a 16-token block and the noisy block): the transformer form, and
#    the token-local form with a context bias (--layers 0) in a folder of its own
#    (the model card's eval guides with the token-local form, so it goes in $ckpt; the
#    transformer form goes in $ckpt/transformer-value)
$fastdia -v train-critic --data "$data" --out "$ckpt" --length 16 --kind value \
    --prefix-states 8 --reward sentiment --schedule sqrt --steps 3000 --batch-size 128 \
    --lr 1e-3 --warmup 100 --ema 0.995 --hidden 128 --layers 0 --no-progress $device \
    $(resume value-sentiment)
tv=$ckpt/transformer-value
$fastdia -v train-critic --data "$data" --out "$tv" --length 16 --kind value \
    --prefix-states 8 --reward sentiment --schedule sqrt --steps 3000 --batch-size 128 \
    --lr 1e-3 --warmup 100 --ema 0.995 --hidden 128 --no-progress $device \
    $( [ -f "$tv/training/value-sentiment_state.pt" ] && echo --resume || true)

# 4. the demo's token-local critics and sampling defaults beside them
cp fastdia/assets/demo/critic-*.json fastdia/assets/demo/critic-*.safetensors "$ckpt/"
cp fastdia/assets/demo/sampling.json "$ckpt/sampling.json"

# 5. the model card's eval (64 new tokens, one prompt set per run; about 30 minutes each on
#    one thread) and the per-position cross-entropy of the prior
for set in neutral negative; do
  $fastdia eval --checkpoint "$ckpt" --prompt-sets "$set" --num-samples 4 --new-tokens 64 \
      --baselines base@decode,best-of-4@decode,tilt-only \
      --variant no-tilt-w0.15:tilt=0,latent_weight=0.15 \
      --variant value-no-tilt-w0.15:tilt=0,latent_weight=0.15,critic_kind=value \
      --variant prior-unguided-nearest:guidance=0,decode=nearest,stop_at=0 \
      --out "$out/eval-$set.json" $device
done
${PYTHON:-.venv/bin/python} scripts/prior_ce.py --data "$data" fastdia/assets/demo "$ckpt"
