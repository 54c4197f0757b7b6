#!/bin/bash
# Issue 23 item 5: the routing bench's shapes (SHAPES), on the engines' mode (EAGER= for CUDA
# graphs); further arguments go to bench/routing_bench.py (`--rate 0`: closed loop only).
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ROUTER_PYTHON=python3
SHAPES=${SHAPES:-long,busy} timeout ${LIMIT:-560} bash bench/gpu.sh routing /root/llama8b "$OUT" "$@" 2>&1 | tail -40
