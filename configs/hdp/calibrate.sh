#!/bin/sh
# Calibrated HDP recipes of the hdp-minilm / hdp-smollm2 sweeps (issue 4). Run from the repo root:
#   OMP_NUM_THREADS=1 sh configs/hdp/calibrate.sh
# MiniLM: 128 SST-2 train sentences; SmolLM2: 2 windows of 1024 tokens of WikiText-2 valid (no train split
# in ../shared/data). block_score=max, the default since it won on STS-B train
# (python -m benchmarks.hdp_block_score_select); abs_sum (the paper's) for two reference points.
set -e
C="dynaprune calibrate"
for s in 0.5 0.6 0.7 0.75 0.8 0.9; do
  $C minilm-l6 --target-sparsity $s --block-score max --examples 128 -o configs/hdp/minilm-max-$s.txt
  $C minilm-l6 --target-sparsity $s --block-score max --examples 128 --target-head-sparsity 0.1 \
     --recipe approx=on -o configs/hdp/minilm-max-$s-head0.1-approx.txt
done
for s in 0.5 0.75; do
  $C minilm-l6 --target-sparsity $s --block-score abs_sum --examples 128 -o configs/hdp/minilm-abs_sum-$s.txt
  $C minilm-l6 --target-sparsity $s --block-score max --examples 128 --recipe token=0.6 \
     --target-head-sparsity 0.1 -o configs/hdp/minilm-token0.6-max-$s-head0.1.txt
done
for s in 0.5 0.6 0.7 0.75 0.8 0.9; do
  $C smollm2-135m --target-sparsity $s --block-score max --examples 2 --window 1024 -o configs/hdp/smollm2-max-$s.txt
done
