#!/usr/bin/env bash
# Issue 7's GPU measurements, one command per phase on the lent GPU machine (each under the
# device's 10-minute limit), results and logs written to OUT:
#
#   bash bench/gpu.sh serve   MODEL_DIR OUT [serve_bench flags]    # the stack against the bare engine
#   bash bench/gpu.sh routing MODEL_DIR OUT [routing_bench flags]  # two engines on one GPU
#   bash bench/gpu.sh scale-per-gpu MODEL_DIR OUT [scale_bench flags]  # issue 9, two GPUs:
#   bash bench/gpu.sh scale-one-gpu MODEL_DIR OUT ...                  #   one worker per GPU,
#   bash bench/gpu.sh scale-tp      MODEL_DIR OUT ...                  #   one worker alone, and
#   python3 bench/scale_bench.py --report OUT                          #   tensor parallel over both
#   bash bench/gpu.sh seam    MODEL_DIR OUT [seam_bench flags]     # issue 21: a worker killed mid-stream
#   bash bench/gpu.sh lora    MODEL_DIR OUT [lora_bench flags]     # issue 22: adapters, 2 slots or 8
#
# serve: `fleet up` with one worker on the GPU, then vLLM's serving benchmark (random 512 in,
#   256 out, 512 prompts, concurrency 256, ignore-eos, chat) against the worker's engine directly
#   and through the gateway, A-B-B-A (bench/serve_bench.py).
# routing: issue 23's run, about 9 minutes on one command. Two workers on GPU 0 with 0.25 of its
#   memory each (164,640 KV tokens each on an H200), KV events on; per policy two routers behind
#   the client: our cache-aware and round-robin gateways, vLLM's router cache_aware and kv_aware
#   (the engines' KV events, through the same IPC sockets our workers read). Shapes `base` (32
#   system prompts of ~2,100 tokens, 96 conversations of 3 turns, 48 at a time) and `many` (96
#   prompts: more than the caches hold beside the running requests); each policy twice A-B-B-A
#   closed-loop, then twice open-loop (Poisson at 0.7x round-robin's closed-loop rate, 10 s, the
#   first 3 s left out). SHAPES=long,busy runs the other two shapes (another ~9 minutes).
#   The engines run eager (they start sooner); EAGER= (empty) gives them CUDA graphs, as
#   engines are run in production.
#   Results are written after every run, so a run cut short keeps what it measured.
#
# scale-*: `fleet up` with one worker per GPU (concurrency 512), with one worker on GPU 0 alone
#   (CUDA_VISIBLE_DEVICES=0, concurrency 256), and with one tensor-parallel worker over both GPUs
#   (--gpus-per-worker 2, concurrency 512); each: random 512 in, 256 out, 1,024 prompts, chat,
#   through the gateway, two runs (bench/scale_bench.py).
#
# seam: two workers on GPU 0 (0.40 of its memory each), 32 chat streams of 256 tokens; once each
#   has 64 chunks the worker carrying most is killed (-9) and its streams are continued on the
#   other; the longest gap between two chunks at the client, at the seam and without a fault,
#   two rounds (bench/seam_bench.py).
#
# lora: two workers on GPU 0 (0.40 of its memory each), 8 adapters of rank 8 written from the
#   model's config, Zipf traffic (bench/lora_bench.py); SIDES picks the worker configurations
#   (default held,resident: 2 batch slots with 8 held, against 8 batch slots), once each; on
#   the H200 each configuration takes 4-6 min (two 8B starts), so give one per device call.
#
# MODEL_DIR holds a config and tokenizer (bench/dummy_model.py makes a Llama-3-8B shape);
# weights are dummy. Both phases also run on CPU with --smoke, which is how they are tested
# before GPU time.
set -euo pipefail
phase=$1
model=$2
out=$3
shift 3
mkdir -p "$out"
export VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
} > "$out/machine.txt" 2>&1
case $phase in
serve)
  python3 bench/serve_bench.py --start --label "${LABEL:-gpu}" --out "$out" \
    --gateway-url http://127.0.0.1:18000 --controller-url http://127.0.0.1:18001 \
    --model-name llama-8b-dummy --tokenizer "$model" \
    --up-args "--model $model --model-name llama-8b-dummy --startup-timeout 480 --no-webui \
--load-format dummy --max-model-len 4096 ${UP_ARGS:-}" \
    --endpoint chat --input-len 512 --output-len 256 --num-prompts 512 --max-concurrency 256 \
    "$@"
  ;;
routing)
  python3 bench/routing_bench.py --label "${LABEL:-gpu}" --out "$out" \
    --model "$model" --model-name llama-8b-dummy --devices gpus=0,gpus=0 --sequential-start \
    --kv-blocks 0 --vllm-router-python "${VLLM_ROUTER_PYTHON:-python3}" \
    --worker-args "--load-format dummy --gpu-memory-utilization 0.25 ${EAGER---enforce-eager} \
--max-model-len 8192 ${WORKER_ARGS:-}" \
    --policies "${POLICIES:-cache-aware,round-robin,vllm-router:cache_aware,vllm-router:kv_aware}" \
    --shapes "${SHAPES:-base,many}" --rounds 2 --replicas 2 --rate auto --duration 10 \
    --warmup 3 --groups 32 --system-words 1800 --conversations 96 --turns 3 --max-tokens 32 \
    --concurrency 48 "$@"
  ;;
scale-*)
  layout=${phase#scale-}
  concurrency=512
  up="--model $model --model-name llama-8b-dummy --startup-timeout 480 --no-webui \
--load-format dummy --max-model-len 4096 ${UP_ARGS:-}"
  case $layout in
  one-gpu) export CUDA_VISIBLE_DEVICES=0; concurrency=256 ;;
  tp) up="$up --gpus-per-worker 2" ;;
  esac
  python3 bench/scale_bench.py --layout "$layout" --label "${LABEL:-gpu}" --out "$out" \
    --model-name llama-8b-dummy --tokenizer "$model" --up-args "$up" \
    --input-len 512 --output-len 256 --num-prompts 1024 --max-concurrency "$concurrency" "$@"
  python3 bench/scale_bench.py --report "$out"
  ;;
seam)
  python3 bench/seam_bench.py --label "${LABEL:-gpu}" --out "$out" \
    --model "$model" --model-name llama-8b-dummy --devices gpus=0,gpus=0 --sequential-start \
    --worker-args "--load-format dummy --gpu-memory-utilization 0.40 --enforce-eager \
--max-model-len 4096 ${WORKER_ARGS:-}" \
    --streams 32 --max-tokens 256 --kill-after 64 --rounds 2 "$@"
  ;;
lora)
  python3 bench/lora_bench.py --label "${LABEL:-gpu}" --out "$out" \
    --model "$model" --model-name llama-8b-dummy --devices gpus=0,gpus=0 --sequential-start \
    --worker-args "--load-format dummy --gpu-memory-utilization 0.40 --enforce-eager \
--max-model-len 4096 ${WORKER_ARGS:-}" \
    --sides "${SIDES:-held,resident}" --repeats 1 --concurrency 32 --requests 256 \
    --max-tokens 64 "$@"
  ;;
*)
  echo "usage: bash bench/gpu.sh serve|routing|scale-per-gpu|scale-one-gpu|scale-tp|seam|lora MODEL_DIR OUT [flags]" >&2
  exit 2
  ;;
esac
