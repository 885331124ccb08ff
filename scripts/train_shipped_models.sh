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
#    parameters). Fashion-MNIST at its native 28 px with uniform flow times and half of the examples at
#    t = 1 (pure noise: there one decoder step is the mean reconstruction, which PSNR rewards); emoji at
#    32 px, likewise half at t = 1 and the other half's times logit-normal or uniform in equal parts.
$FLEXTOK train-tokenizer --data "$RUNS/fm-train" --output "$RUNS/fm-tok" --preset tiny --image-size 28 \
  --patch-size 4 --encoder-dim 128 --decoder-dim 128 --time-sampling uniform --noise-time-fraction 0.5 \
  --max-steps 2800 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 400 --grid-every 800 --log-every 50 \
  > "$RUNS/logs/fm-tok.log" 2>&1 &
fm_tok=$!
$FLEXTOK train-tokenizer --data "$RUNS/emoji-train" --output "$RUNS/emoji-tok" --preset tiny --image-size 32 \
  --patch-size 4 --encoder-dim 128 --decoder-dim 128 --uniform-time-fraction 0.5 --noise-time-fraction 0.5 \
  --max-steps 1600 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 400 --grid-every 400 --grid-steps 8 \
  --log-every 50 > "$RUNS/logs/emoji-tok.log" 2>&1 &
emoji_tok=$!
wait $fm_tok
wait $emoji_tok
$FLEXTOK export "$RUNS/fm-tok" --out "$ASSETS/fashion-mnist/tokenizer.safetensors"
$FLEXTOK export "$RUNS/emoji-tok" --out "$ASSETS/emoji/tokenizer.safetensors"

# 3. The judge: a small CNN classifier on the Fashion-MNIST train split, the feature space of the
#    generator's FID and the judge of "samples of the asked class" (also shipped, 0.2 MB).
$FLEXTOK evaluate train-classifier --data "$RUNS/fm-train" --val-data "$RUNS/fm-test" --out "$RUNS/judge.safetensors" \
  --epochs 3 --seed 0
$FLEXTOK export "$RUNS/judge.safetensors" --out "$ASSETS/fashion-mnist/judge.safetensors"

# 4. Token datasets, made by the Ray Data pipeline with the shipped (fp16) tokenizers, so that the
#    generators record the sha256 of the files they ship beside.
$FLEXTOK tokenize --input "$RUNS/fm-train" --output "$RUNS/fm-tokens" --model "$ASSETS/fashion-mnist/tokenizer.safetensors"
$FLEXTOK tokenize --input "$RUNS/emoji-train" --output "$RUNS/emoji-tokens" --model "$ASSETS/emoji/tokenizer.safetensors"

# 5. Generators: class-conditional on Fashion-MNIST (tiny GPT, 3.7 M parameters), text-conditional on
#    the emoji names (width 192, 2.3 M parameters + the frozen offline MiniLM text encoder).
$FLEXTOK train-generator --tokens "$RUNS/fm-tokens" --output "$RUNS/fm-gen" --cond class --preset tiny \
  --max-steps 1600 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 400 --grid-every 800 --log-every 50 \
  > "$RUNS/logs/fm-gen.log" 2>&1 &
fm_gen=$!
$FLEXTOK train-generator --tokens "$RUNS/emoji-tokens" --output "$RUNS/emoji-gen" --cond text --preset tiny \
  --dim 192 --num-heads 3 --max-steps 1000 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 250 \
  --grid-every 500 --log-every 50 > "$RUNS/logs/emoji-gen.log" 2>&1 &
emoji_gen=$!
wait $fm_gen
wait $emoji_gen
$FLEXTOK export "$RUNS/fm-gen" --out "$ASSETS/fashion-mnist/generator.safetensors"
$FLEXTOK export "$RUNS/emoji-gen" --out "$ASSETS/emoji/generator.safetensors"
