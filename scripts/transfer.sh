#!/usr/bin/env bash
# The runs behind docs/TRANSFER.md, on the real Fashion-MNIST (Debian's dataset-fashion-mnist), in order.
# Usage: scripts/transfer.sh [OUT_DIR]   (default runs/transfer). About 20 minutes on 2 CPU cores (fp32).
set -euo pipefail
out=${1:-runs/transfer}
vggnet=${VGGNET:-.venv/bin/vggnet}
mkdir -p "$out"
run() { local name=$1; shift; /usr/bin/time -f "$name %e s" -a -o "$out/times.txt" "$vggnet" train --no-progress --json --out "$out/$name" "$@" > "$out/$name.json"; }

# (a) Transfer between halves of Fashion-MNIST: learn classes 0-4 on all their 30,000 training images, then classes
#     5-9 from 1,000 labelled images, fine-tuned from (a)'s model or from scratch, 2 seeds each.
run a-source --classes 0-4 --epochs 8
for seed in 0 1; do
  run a-finetune-s$seed --classes 5-9 --subset 1000 --batch-size 100 --epochs 20 --seed $seed --init-from "$out/a-source"
  run a-scratch-s$seed  --classes 5-9 --subset 1000 --batch-size 100 --epochs 20 --seed $seed
done

# (b) The paper's section 3.1: a deeper net (VGG-16-BN, quarter width) initialised from a trained net A (the default
#     quarter-width VGG-11-BN) against random initialisation, 20,000 training images, 5,000 held out for validation.
run b-A --subset 20000 --val-split 5000 --epochs 6
for seed in 0 1; do
  run b-D-fromA-s$seed  --model vgg16_bn --width 0.25 --head gap --dropout 0 --subset 20000 --val-split 5000 --epochs 6 \
      --seed $seed --init-from "$out/b-A" --init-scheme paper
  run b-D-random-s$seed --model vgg16_bn --width 0.25 --head gap --dropout 0 --subset 20000 --val-split 5000 --epochs 6 \
      --seed $seed
done
