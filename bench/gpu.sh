#!/usr/bin/env bash
# Issue 7, part 1, as one command on the lent GPU machine: the stack against the bare engine.
#
# Starts `fleet up` (one worker on the GPU, engine args below), then runs vLLM's serving
# benchmark against the worker's engine directly and through the gateway, A-B-B-A, via
# bench/serve_bench.py. Writes the result JSON and the logs to OUT.
#
#   bash bench/gpu.sh MODEL_DIR OUT [extra serve_bench flags, e.g. --smoke]
#
# MODEL_DIR holds a config and tokenizer (bench/dummy_model.py makes a Llama-3-8B shape);
# weights are dummy. Also runs on CPU with --smoke, which is how it is tested before GPU time.
set -euo pipefail
model=$1
out=$2
shift 2
mkdir -p "$out"
export VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
} > "$out/machine.txt" 2>&1
python3 bench/serve_bench.py --start --label "${LABEL:-gpu}" --out "$out" \
  --gateway-url http://127.0.0.1:18000 --controller-url http://127.0.0.1:18001 \
  --model-name llama-8b-dummy --tokenizer "$model" \
  --up-args "--model $model --model-name llama-8b-dummy --startup-timeout 480 \
--load-format dummy --max-model-len 4096 ${UP_ARGS:-}" \
  --endpoint chat --input-len 512 --output-len 256 --num-prompts 512 --max-concurrency 256 \
  "$@"
