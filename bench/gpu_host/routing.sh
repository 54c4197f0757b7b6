#!/bin/bash
# Issue 23 item 5: the two load shapes not run yet.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ROUTER_PYTHON=python3
SHAPES=${SHAPES:-long,busy} timeout ${LIMIT:-560} bash bench/gpu.sh routing /root/llama8b "$OUT" 2>&1 | tail -40
