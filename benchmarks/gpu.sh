#!/usr/bin/env bash
# The benchmarks for a lent GPU, in one go (docs/performance.md, "On a lent GPU"), on models with
# random weights (random:NAME: the architecture from a config; speed as with real weights), so that
# nothing but this repository needs to be on the machine:
#
#   batch_generation.py  bfloat16: strategies at 1/4/16 adapters, FLoRA against gather+bmm LoRA at
#                        ranks 1-8 (whole generation, prefill alone, decoding alone: the paper's crossover)
#   decode_memory.py     bfloat16 (16 and 64 rows), float16, random:llama-1b in bfloat16, and a float32
#                        model with float32 and with bfloat16 adapter tables (--adapter-dtype)
#   serve_load.py        flora serve in bfloat16: base and flora, 64 adapters, uniform, at capacity
#
# Each writes JSON to $OUT_DIR (default benchmarks/results/gpu/<the GPU's name>/), beside machine.json
# (the GPU, torch, CUDA, the commit), in this order of importance: decode_memory in bfloat16,
# batch_generation, serve_load, then the other decode_memory runs. The whole run stays within BUDGET
# seconds (470: under 8 minutes); a benchmark gets what is left of it, at most STEP_TIMEOUT. Usage:
#
#   bash benchmarks/gpu.sh
#   DEVICE=cpu QUICK=1 MODEL=random:tiny LARGE_MODEL=random:tiny bash benchmarks/gpu.sh   # the same commands on a CPU
#
# Settings (environment): DEVICE (cuda), MODEL (random:smollm2-135m), LARGE_MODEL (random:llama-1b),
# DTYPE (bfloat16), OUT_DIR, PYTHON (.venv/bin/python where there is one, else python3), BUDGET (470),
# STEP_TIMEOUT (240), QUICK=1 (the smallest sizes: a check of the commands, not a measurement). A
# benchmark that fails, runs out of time or finds no time left is named at the end and the script exits
# 1; the others still run. Python needs torch, transformers, safetensors, accelerate, tqdm and peft
# (batch_generation imports it); serve_load also fastapi, uvicorn and httpx (flora[serve]): without
# them it is skipped, saying so. No weights: random:NAME writes its config and tokenizer on first use.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-random:smollm2-135m}
LARGE_MODEL=${LARGE_MODEL:-random:llama-1b}
DTYPE=${DTYPE:-bfloat16}
BUDGET=${BUDGET:-470}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ $DEVICE == cuda* ]] && ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  echo "gpu.sh: no CUDA device: torch.cuda.is_available() is False for $PYTHON (DEVICE=$DEVICE)." >&2
  echo "gpu.sh: run it on a machine with an NVIDIA GPU, or DEVICE=cpu QUICK=1 to check the commands on this CPU." >&2
  exit 1
fi
if ! "$PYTHON" -c 'import flora.random_base' 2>/dev/null; then
  echo "gpu.sh: $PYTHON cannot import flora from $PWD/src (it needs torch, transformers, safetensors, accelerate):" >&2
  "$PYTHON" -c 'import flora.random_base' >&2
  exit 1
fi

if [[ ${QUICK:-0} == 1 ]]; then
  GENERATION=(--rows 2 --distinct 1,2 --flora-ranks 1,2 --new-tokens 2 --prompt-tokens 4 --decode-steps 1 --rounds 1)
  DECODE=(--rows 2 --steps 1 --rounds 1 --prompt-tokens 4)
  WIDE_ROWS=4
  LOAD=(--adapters 2 --requests 4 --rate 20 --prompt-tokens 4-8 --output-tokens 2-4 --repeats 1 --deadline 60
        --max-num-seqs 2 --max-loaded-adapters 2)
else
  GENERATION=(--rounds 2)
  DECODE=(--rounds 5)
  WIDE_ROWS=64
  # 96 requests over 6 s: a queue that keeps the 32 rows of a step full (capacity, not latency)
  LOAD=(--adapters 64 --requests 96 --rate 16 --repeats 2)
fi

NAME=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name('$DEVICE') if '$DEVICE'.startswith('cuda') else 'cpu')")
OUT_DIR=${OUT_DIR:-benchmarks/results/gpu/$(echo "$NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9.' '-' | sed 's/-$//')}
mkdir -p "$OUT_DIR"
"$PYTHON" - "$OUT_DIR/machine.json" "$DEVICE" <<'EOF'
import subprocess, sys, time
from pathlib import Path
import torch, transformers
sys.path.insert(0, "benchmarks")
from harness import machine, write_json
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
write_json(Path(sys.argv[1]), {**machine(sys.argv[2]), "torch": torch.__version__, "cuda": torch.version.cuda,
                               "transformers": transformers.__version__, "commit": commit,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %z")})
EOF

failed=() skipped=()
bench() {  # bench NAME SCRIPT ARGS...: one benchmark within what is left of BUDGET, its JSON at $OUT_DIR/NAME.json
  local name=$1 script=$2 start=$SECONDS limit=$((BUDGET - SECONDS)) status
  shift 2
  ((limit > STEP_TIMEOUT)) && limit=$STEP_TIMEOUT
  if ((limit < 20)); then
    echo "== $name: NOT RUN: ${SECONDS} s of BUDGET=$BUDGET s spent" >&2
    failed+=("$name")
    return
  fi
  echo "== $name (at most $limit s): $script $*"
  timeout "$limit" "$PYTHON" "benchmarks/$script" "$@" --json "$OUT_DIR/$name.json"
  status=$?
  if ((status == 0)); then
    echo "== $name: done in $((SECONDS - start)) s"
  else
    echo "== $name: FAILED (exit $status$( ((status == 124)) && echo ": out of time")) after $((SECONDS - start)) s" >&2
    failed+=("$name")
  fi
}

ON=(--device "$DEVICE")
bench "decode_memory_$DTYPE" decode_memory.py --model "$MODEL" "${ON[@]}" --dtype "$DTYPE" "${DECODE[@]}"
bench "batch_generation_$DTYPE" batch_generation.py --model "$MODEL" "${ON[@]}" --dtype "$DTYPE" --skip-peft "${GENERATION[@]}"
if "$PYTHON" -c 'import fastapi, uvicorn, httpx' 2>/dev/null; then
  bench "serve_load_$DTYPE" serve_load.py --model "$MODEL" "${ON[@]}" --dtype "$DTYPE" --systems base,flora \
    --distributions uniform "${LOAD[@]}"
else
  echo "== serve_load: skipped: $PYTHON lacks fastapi, uvicorn or httpx (flora's serve extra)" >&2
  skipped+=(serve_load)
fi
bench "decode_memory_${DTYPE}_${WIDE_ROWS}rows" decode_memory.py --model "$MODEL" "${ON[@]}" --dtype "$DTYPE" \
  "${DECODE[@]}" --rows "$WIDE_ROWS"
bench "decode_memory_${LARGE_MODEL#random:}_$DTYPE" decode_memory.py --model "$LARGE_MODEL" "${ON[@]}" --dtype "$DTYPE" \
  "${DECODE[@]}"
bench decode_memory_float16 decode_memory.py --model "$MODEL" "${ON[@]}" --dtype float16 "${DECODE[@]}"
bench decode_memory_float32 decode_memory.py --model "$MODEL" "${ON[@]}" --dtype float32 "${DECODE[@]}"
bench decode_memory_float32_bfloat16_tables decode_memory.py --model "$MODEL" "${ON[@]}" --dtype float32 \
  --adapter-dtype bfloat16 "${DECODE[@]}"

echo "== results in $OUT_DIR (GPU: $NAME), $SECONDS s in all"
((${#skipped[@]})) && echo "== skipped: ${skipped[*]}"
if ((${#failed[@]})); then
  echo "== FAILED: ${failed[*]}" >&2
  exit 1
fi
