#!/usr/bin/env bash
# The GPU speed benchmarks, for a CUDA machine, in about 6 minutes: each step has its own time limit
# and a failed or timed-out step does not stop the others. Offline: needs no network, but needs
#   - a Python with a CUDA build of torch and dynaprune importable ($PYTHON, default: python3;
#     run from the repository root so `benchmarks` imports),
#   - the SmolLM2 model in the dynaprune cache ($DYNAPRUNE_CACHE, default ~/.cache/dynaprune),
#   - WikiText-2 ($DYNAPRUNE_DATA/wikitext2/{valid,test}.txt, default ../shared/data).
#     or, where the model file cannot travel (the lent GPU machine takes 64 MiB of files, the GGUF is 98 MB),
#   - $ASSETS/smollm2.json (`python -m benchmarks.decode --save-config`): decode runs SmolLM2's shapes
#     with random weights and ids (the work per step does not depend on them), and
#   - $ASSETS/qkv4096.pt (`python -m benchmarks.blocks --cases 4096:128 --save-qkv`): blocks reads the
#     captured SmolLM2 Q/K/V (fp16-rounded) instead of running the model.
# usage: benchmarks/gpu.sh OUTDIR     (writes OUTDIR/{decode,blocks,sparse24}.json, env.txt, status.txt)
set -u
out=${1:?usage: benchmarks/gpu.sh OUTDIR}
mkdir -p "$out"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{ date; nvidia-smi 2>&1 | head -15; "$PYTHON" -c 'import torch; print("torch", torch.__version__,
  "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")'; } \
  >"$out/env.txt" 2>&1
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA device visible to $PYTHON (see $out/env.txt)" >&2
  exit 2
fi
: >"$out/status.txt"

step() {  # step NAME LIMIT_S ARGS...: run one benchmark under a time limit, record its exit status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$PYTHON" -m "benchmarks.$name" --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$((SECONDS - t0)) limit=$limit" | tee -a "$out/status.txt"
}

# decode: batch 1/8 x 1k/4k x kv 0.5/0.25/0.125; the timed window spans 2 compaction periods of the
# largest budget (66 steps at 1k, 258 at 4k), so every budget compacts inside it
ASSETS=${ASSETS:-.gpu}
decode_model=() blocks_input=()
[ -f "$ASSETS/smollm2.json" ] && decode_model=(--random-weights "$ASSETS/smollm2.json")
[ -f "$ASSETS/qkv4096.pt" ] && blocks_input=(--qkv "$ASSETS/qkv4096.pt")
step decode 160 --device cuda --compaction-periods 2 "${decode_model[@]}"
# blocks: FlexAttention block-sparse (compiled once per length) vs dense SDPA on SmolLM2 Q/K, scoring included
step blocks 140 --device cuda --cases 1024:128,2048:128,4096:128 "${blocks_input[@]}"
# 2:4 semi-structured fp16 weights (SmolLM2 shapes) vs dense
step sparse24 50 --device cuda
cat "$out/status.txt"
