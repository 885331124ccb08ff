#!/usr/bin/env bash
# Reproduce the models shipped under flextok/assets/ from scratch, with the project's own jobs, on CPU.
#
#   bash scripts/train_shipped_models.sh            # everything, ~2.5 h on 2 CPU cores
#   RUNS=/big/disk bash scripts/train_shipped_models.sh
#
# Every stage is seeded (init, flow noise, nested-dropout k, shuffling) and resumable: re-running the
# script skips finished corpora, token datasets and training runs. Ray Data may hand blocks to the
# trainer in a different order on another run, so a rerun matches the shipped metrics to within noise
# rather than bit for bit. The two tokenizers train side by side with one torch thread each (on
# 2 cores that beats one run after the other with two threads); the model cards under
# flextok/assets/*/ record the wall times these commands took.
set -euo pipefail
cd "$(dirname "$0")/.."
FLEXTOK=${FLEXTOK:-.venv/bin/flextok}
RUNS=${RUNS:-runs/shipped}
ASSETS=flextok/assets
mkdir -p "$RUNS/logs" "$ASSETS/fashion-mnist" "$ASSETS/emoji"

# 1. Corpora (real images from Debian packages; Fashion-MNIST's standard split, emoji's fixed 90/10 split).
$FLEXTOK corpus fashion-mnist --out "$RUNS/fm-train" --split train
$FLEXTOK corpus fashion-mnist --out "$RUNS/fm-test" --split test
$FLEXTOK corpus emoji --out "$RUNS/emoji-train" --split train
$FLEXTOK corpus emoji --out "$RUNS/emoji-test" --split test

# 2. Tokenizers: tiny (patch 4, K = 32, FSQ 8,5,5,5 = 1,000 codes, width 128, 4 + 4 blocks, 2.5 M
#    parameters). Fashion-MNIST at its native 28 px with uniform flow times (the decoder must be good
#    near pure noise, where few-step decoding starts); emoji at 32 px with half the times uniform.
$FLEXTOK train-tokenizer --data "$RUNS/fm-train" --output "$RUNS/fm-tok" --preset tiny --image-size 28 \
  --patch-size 4 --encoder-dim 128 --decoder-dim 128 --time-sampling uniform --max-steps 3200 --batch-size 64 \
  --seed 0 --threads 1 --checkpoint-every 400 --grid-every 800 --log-every 50 > "$RUNS/logs/fm-tok.log" 2>&1 &
fm_tok=$!
$FLEXTOK train-tokenizer --data "$RUNS/emoji-train" --output "$RUNS/emoji-tok" --preset tiny --image-size 32 \
  --patch-size 4 --encoder-dim 128 --decoder-dim 128 --uniform-time-fraction 0.5 --max-steps 2000 --batch-size 64 \
  --seed 0 --threads 1 --checkpoint-every 400 --grid-every 500 --log-every 50 > "$RUNS/logs/emoji-tok.log" 2>&1 &
emoji_tok=$!
wait $fm_tok
wait $emoji_tok
$FLEXTOK export "$RUNS/fm-tok" --out "$ASSETS/fashion-mnist/tokenizer.safetensors"
$FLEXTOK export "$RUNS/emoji-tok" --out "$ASSETS/emoji/tokenizer.safetensors"
