#!/usr/bin/env bash
# Reproduce the models shipped under flextok/assets/ from scratch, with the project's own jobs, on CPU.
#
#   bash scripts/train_shipped_models.sh            # everything, ~9 h on 2 CPU cores
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
# [card fm-tokenizer]
$FLEXTOK corpus fashion-mnist --out "$RUNS/fm-train" --split train
$FLEXTOK corpus fashion-mnist --out "$RUNS/fm-test" --split test
# [/card]
# [card emoji-tokenizer]
$FLEXTOK corpus emoji --out "$RUNS/emoji-train" --split train
$FLEXTOK corpus emoji --out "$RUNS/emoji-test" --split test
# [/card]

# 2. Tokenizers: tiny (patch 4, K = 32, FSQ 8,5,5,5 = 1,000 codes, width 128, 4 + 4 blocks, 2.5 M
#    parameters). Fashion-MNIST at its native 28 px with uniform flow times and half of the examples at
#    t = 1 (pure noise: there one decoder step is the mean reconstruction, which PSNR rewards); emoji at
#    32 px, likewise half at t = 1 and the other half's times logit-normal or uniform in equal parts.
# [card fm-tokenizer]
$FLEXTOK train-tokenizer --data "$RUNS/fm-train" --output "$RUNS/fm-tok" --preset tiny --image-size 28 \
  --patch-size 4 --encoder-dim 128 --decoder-dim 128 --time-sampling uniform --noise-time-fraction 0.5 \
  --max-steps 2800 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 400 --grid-every 800 --log-every 50 \
  > "$RUNS/logs/fm-tok.log" 2>&1 &
fm_tok=$!
# [/card]
# [card emoji-tokenizer]
$FLEXTOK train-tokenizer --data "$RUNS/emoji-train" --output "$RUNS/emoji-tok" --preset tiny --image-size 32 \
  --patch-size 4 --encoder-dim 128 --decoder-dim 128 --uniform-time-fraction 0.5 --noise-time-fraction 0.5 \
  --max-steps 1600 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 400 --grid-every 400 --grid-steps 8 \
  --log-every 50 > "$RUNS/logs/emoji-tok.log" 2>&1 &
emoji_tok=$!
# [/card]
wait $fm_tok
wait $emoji_tok
# [card fm-tokenizer]
$FLEXTOK export "$RUNS/fm-tok" --out "$RUNS/fm-tok-stage1.safetensors"
# [/card]
# [card emoji-tokenizer]
$FLEXTOK export "$RUNS/emoji-tok" --out "$RUNS/emoji-tok-stage1.safetensors"
# Stage 2: the flow decoder alone (Fashion-MNIST's stage 2; encoder and FSQ frozen, so the tokens, the
# token dataset and the generator stay stage 1's: recorded as same_tokens_as_sha256), lr 5e-4 cosine
# over 1,000 steps, one thread (the session that made it shared 2 cores with five others).
$FLEXTOK train-tokenizer --data "$RUNS/emoji-train" --output "$RUNS/emoji-tok-dec" --init "$RUNS/emoji-tok-stage1.safetensors" \
  --freeze-encoder --max-steps 1000 --batch-size 64 --lr 5e-4 --warmup-steps 100 --seed 1 --threads 1 \
  --checkpoint-every 100 --keep-checkpoints 20 --grid-every 500 --grid-steps 1 --log-every 25 > "$RUNS/logs/emoji-tok-dec.log" 2>&1
$FLEXTOK export "$RUNS/emoji-tok-dec" --out "$ASSETS/emoji/tokenizer.safetensors"
# [/card]
# [card fm-tokenizer]
# Stage 2: the flow decoder alone on both cores (encoder and FSQ frozen: the tokens
# are exactly stage 1's, recorded as same_tokens_as_sha256), on a 10,000-step schedule, stopped at its
# step-7,500 checkpoint (the session that made it ran out of time there; --keep-checkpoints keeps it).
$FLEXTOK train-tokenizer --data "$RUNS/fm-train" --output "$RUNS/fm-tok-dec" --init "$RUNS/fm-tok-stage1.safetensors" \
  --freeze-encoder --max-steps 10000 --batch-size 64 --lr 5e-4 --warmup-steps 100 --seed 1 --threads 2 \
  --checkpoint-every 500 --keep-checkpoints 20 --grid-every 2500 --log-every 50 > "$RUNS/logs/fm-tok-dec.log" 2>&1
$FLEXTOK export "$RUNS/fm-tok-dec/checkpoint_00007500" --out "$RUNS/fm-tok-stage2.safetensors"
# Stage 3: all weights again from stage 2, with nested dropout uniform over k = 1..K (powers of two
# give k = 32 one step in six; uniform gives tokens 17..32 a gradient half the time: stage 1's later
# tokens carried no class information a probe could find). The tokens change: a new tokenizer.
$FLEXTOK train-tokenizer --data "$RUNS/fm-train" --output "$RUNS/fm-tok-full" --init "$RUNS/fm-tok-stage2.safetensors" \
  --nested-dropout uniform --max-steps 6000 --batch-size 64 --lr 5e-4 --warmup-steps 100 --seed 2 --threads 2 \
  --checkpoint-every 500 --keep-checkpoints 20 --grid-every 3000 --log-every 50 > "$RUNS/logs/fm-tok-full.log" 2>&1
$FLEXTOK export "$RUNS/fm-tok-full" --out "$RUNS/fm-tok-stage3.safetensors" --dtype float32
# Stage 4: the same again from stage 3 on a fresh 5,000-step schedule (stage 3's loss was still falling),
# shipped from its step-4,500 checkpoint (lr 4.9e-5 there, the floor 4e-5; the session had no time for the last 500).
$FLEXTOK train-tokenizer --data "$RUNS/fm-train" --output "$RUNS/fm-tok-s4" --init "$RUNS/fm-tok-stage3.safetensors" \
  --nested-dropout uniform --max-steps 5000 --batch-size 64 --lr 4e-4 --warmup-steps 100 --seed 3 --threads 2 \
  --checkpoint-every 500 --keep-checkpoints 20 --grid-every 2500 --log-every 50 > "$RUNS/logs/fm-tok-s4.log" 2>&1
$FLEXTOK export "$RUNS/fm-tok-s4/checkpoint_00004500" --out "$RUNS/fm-tok-stage4.safetensors" --dtype float32
# Stage 5: once more from stage 4, lr 3e-4 cosine over 3,500 steps (stage 4's last checkpoints still improved).
$FLEXTOK train-tokenizer --data "$RUNS/fm-train" --output "$RUNS/fm-tok-s5" --init "$RUNS/fm-tok-stage4.safetensors" \
  --nested-dropout uniform --max-steps 3500 --batch-size 64 --lr 3e-4 --warmup-steps 100 --seed 4 --threads 2 \
  --checkpoint-every 500 --keep-checkpoints 20 --grid-every 2500 --log-every 50 > "$RUNS/logs/fm-tok-s5.log" 2>&1
$FLEXTOK export "$RUNS/fm-tok-s5" --out "$ASSETS/fashion-mnist/tokenizer.safetensors"
# [/card]

# 3. The judge: a small CNN classifier on the Fashion-MNIST train split, the feature space of the
#    generator's FID and the judge of "samples of the asked class" (also shipped, 0.2 MB).
# [card fm-tokenizer]
# the judge of "class kept" and of the rFID feature space (shipped beside the tokenizer)
$FLEXTOK evaluate train-classifier --data "$RUNS/fm-train" --val-data "$RUNS/fm-test" --out "$RUNS/judge.safetensors" \
  --epochs 3 --seed 0
$FLEXTOK export "$RUNS/judge.safetensors" --out "$ASSETS/fashion-mnist/judge.safetensors"
# [/card]

# 4. Token datasets, made by the Ray Data pipeline with the shipped (fp16) tokenizers, so that the
#    generators record the sha256 of the files they ship beside.
# [card fm-generator]
$FLEXTOK tokenize --input "$RUNS/fm-train" --output "$RUNS/fm-tokens" --model "$ASSETS/fashion-mnist/tokenizer.safetensors"
# [/card]
# [card emoji-generator]
$FLEXTOK tokenize --input "$RUNS/emoji-train" --output "$RUNS/emoji-tokens" --model "$ASSETS/emoji/tokenizer.safetensors"
# [/card]

# 5. Generators: text-conditional on the emoji names (width 192, 2.3 M parameters + the frozen
#    offline MiniLM text encoder; it trained on one core beside the Fashion-MNIST tokenizer), then
#    class-conditional on Fashion-MNIST (the tiny GPT, 3.7 M parameters, both cores).
# [card emoji-generator]
$FLEXTOK train-generator --tokens "$RUNS/emoji-tokens" --output "$RUNS/emoji-gen" --cond text --preset tiny \
  --dim 192 --num-heads 3 --max-steps 1000 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 250 \
  --grid-every 500 --grid-steps 1 --log-every 50 > "$RUNS/logs/emoji-gen.log" 2>&1
# [/card]
# [card fm-generator]
$FLEXTOK train-generator --tokens "$RUNS/fm-tokens" --output "$RUNS/fm-gen" --cond class --preset tiny \
  --max-steps 1600 --batch-size 64 --seed 0 --threads 2 --checkpoint-every 400 --grid-every 800 --grid-steps 1 \
  --log-every 50 > "$RUNS/logs/fm-gen.log" 2>&1
$FLEXTOK export "$RUNS/fm-gen" --out "$ASSETS/fashion-mnist/generator.safetensors"
# [/card]
# [card emoji-generator]
$FLEXTOK export "$RUNS/emoji-gen" --out "$ASSETS/emoji/generator.safetensors"
# [/card]
# [card fm-generator-eos]
# Adaptive-length tokens (per image the shortest of 1, 2, 4, .., 32 tokens whose one-step reconstruction error is
# within 20% of all 32 tokens'), then a class GPT with an end-of-sequence token on them. The shipped run used the
# first 6 train shards (6,000 images) and its step-500 checkpoint: the shared machine's time allowed no more.
$FLEXTOK tokenize --input "$RUNS/fm-train/fashion-mnist-train-0000{00..05}.tar" --output "$RUNS/fm-tokens-adaptive" \
  --model "$ASSETS/fashion-mnist/tokenizer.safetensors" --adaptive-relative-error 0.2 --adaptive-lengths pow2
$FLEXTOK train-generator --tokens "$RUNS/fm-tokens-adaptive" --output "$RUNS/fm-gen-eos" --cond class --preset tiny \
  --max-steps 1000 --batch-size 64 --seed 0 --threads 1 --checkpoint-every 250 --keep-checkpoints 8 --grid-every 500 \
  --grid-steps 1 --log-every 50 > "$RUNS/logs/fm-gen-eos.log" 2>&1
$FLEXTOK export "$RUNS/fm-gen-eos/checkpoint_00000500" --out "$ASSETS/fashion-mnist/generator-eos.safetensors"
# [/card]

# 6. Reports beside the checkpoints (Fashion-MNIST test split: never used in training; emoji test split).
FM=$ASSETS/fashion-mnist
EM=$ASSETS/emoji
# [card fm-tokenizer]
$FLEXTOK evaluate tokenizer --tokenizer "$FM/tokenizer.safetensors" --data "$RUNS/fm-test" --max-images 1000 \
  --steps 1 --classifier "$FM/judge.safetensors" --out "$FM/reports/tokenizer-1-step"
# 8 steps with decoder guidance 2: the setting that kept the class best in a sweep on 300 train images
# (steps 1, 8, 25; guidance 1, 2, 3), chosen before looking at the test split.
$FLEXTOK evaluate tokenizer --tokenizer "$FM/tokenizer.safetensors" --data "$RUNS/fm-test" --max-images 1000 \
  --steps 8 --guidance 2 --classifier "$FM/judge.safetensors" --out "$FM/reports/tokenizer-8-steps-guidance-2"
# [/card]
# [card fm-generator]
for cfg in 1 3 5; do
  $FLEXTOK evaluate generator --generator "$FM/generator.safetensors" --data "$RUNS/fm-test" --num-samples 1000 \
    --cfg-scale $cfg --decoder-steps 1 --classifier "$FM/judge.safetensors" --out "$FM/reports/generator-cfg-$cfg"
done
$FLEXTOK evaluate generator --generator "$FM/generator.safetensors" --data "$RUNS/fm-test" --num-samples 1000 \
  --cfg-scale 3 --decoder-steps 8 --decoder-guidance 2 --classifier "$FM/judge.safetensors" \
  --out "$FM/reports/generator-cfg-3-decoder-8-steps-guidance-2"
$FLEXTOK sample --generator "$FM/generator.safetensors" --labels 0,1,2,3,4,5,6,7,8,9 --num-tokens 32 \
  --per-condition 8 --cfg-scale 5 --decoder-steps 1 --out "$FM/reports/samples/classes.png"
# [/card]
# [card fm-generator-eos]
for cfg in 3 5; do
  $FLEXTOK evaluate generator --generator "$FM/generator-eos.safetensors" --data "$RUNS/fm-test" --num-samples 500 \
    --tokens-list 32 --cfg-scale $cfg --decoder-steps 1 --classifier "$FM/judge.safetensors" \
    --baseline "$FM/reports/generator-cfg-$cfg/metrics.json" --out "$FM/reports/generator-eos-cfg-$cfg"
done
$FLEXTOK sample --generator "$FM/generator-eos.safetensors" --labels 0,1,2,3,4,5,6,7,8,9 --per-condition 8 \
  --cfg-scale 5 --decoder-steps 1 --out "$FM/reports/samples/classes-eos.png"
# [/card]
# [card emoji-tokenizer]
$FLEXTOK evaluate tokenizer --tokenizer "$EM/tokenizer.safetensors" --data "$RUNS/emoji-test" --max-images 391 \
  --steps 1 --out "$EM/reports/tokenizer-1-step"
# [/card]
# [card emoji-generator]
$FLEXTOK sample --generator "$EM/generator.safetensors" --num-tokens 32 --per-condition 4 --cfg-scale 3 \
  --decoder-steps 1 --out "$EM/reports/samples/prompts.png" --prompts "grinning face" "red heart" "thumbs up" \
  "fire" "cat face" "rocket" "slice of pizza" "sun with face" "green apple" "snowflake"
# [/card]

# 7. Model cards (from the run summaries, the reports, the `# [card NAME]` blocks above and the notes written by hand
#    beside them: the notes quote the shipped run's measurements, which a rerun matches only within noise).
CMDS=scripts/shipped_commands
PY=${PY:-.venv/bin/python}
$PY scripts/model_card.py "$FM/tokenizer.safetensors" --run "$RUNS/fm-tok" --run "$RUNS/fm-tok-dec/checkpoint_00007500" --run "$RUNS/fm-tok-full" \
  --run "$RUNS/fm-tok-s4/checkpoint_00004500" --run "$RUNS/fm-tok-s5" --commands fm-tokenizer \
  --data "Fashion-MNIST train split (60,000 images, 28 px, grey as RGB); evaluated on the test split (10,000, never seen)" \
  --eval "$FM/reports/tokenizer-1-step" --eval "$FM/reports/tokenizer-8-steps-guidance-2" --notes-file $CMDS/fm-tokenizer.notes.md
$PY scripts/model_card.py "$FM/generator.safetensors" --run "$RUNS/fm-gen" --commands fm-generator \
  --data "the Fashion-MNIST train split's tokens from the tokenizer beside it (60,000 x 32 tokens, 10 classes)" \
  --eval "$FM/reports/generator-cfg-1" --eval "$FM/reports/generator-cfg-3" --eval "$FM/reports/generator-cfg-5" \
  --eval "$FM/reports/generator-cfg-3-decoder-8-steps-guidance-2" --eval "$FM/reports/samples" --notes-file $CMDS/fm-generator.notes.md
$PY scripts/model_card.py "$FM/generator-eos.safetensors" --run "$RUNS/fm-gen-eos/checkpoint_00000500" --commands fm-generator-eos \
  --data "adaptive-length tokens of the first 6,000 Fashion-MNIST train images from the tokenizer beside it (10 classes)" \
  --eval "$FM/reports/generator-eos-cfg-3" --eval "$FM/reports/generator-eos-cfg-5" --notes-file $CMDS/fm-generator-eos.notes.md
$PY scripts/model_card.py "$EM/tokenizer.safetensors" --run "$RUNS/emoji-tok" --run "$RUNS/emoji-tok-dec" --commands emoji-tokenizer \
  --data "Noto Color Emoji train split (3,264 emoji, 32 px; a fixed 90/10 split by name hash); evaluated on the 391 held out" \
  --eval "$EM/reports/tokenizer-1-step" --notes-file $CMDS/emoji-tokenizer.notes.md
$PY scripts/model_card.py "$EM/generator.safetensors" --run "$RUNS/emoji-gen" --commands emoji-generator \
  --data "the emoji train split's tokens from the tokenizer beside it (3,264 x 32 tokens), captioned with the emoji names" \
  --eval "$EM/reports/samples" --notes-file $CMDS/emoji-generator.notes.md
