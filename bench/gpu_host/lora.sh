#!/bin/bash
# Issue 22 on the GPU: 2 batch slots per worker (8 adapters held) against 8, Zipf traffic.
# One worker configuration a call fits the 600 s limit: SIDES=resident, then SIDES=held, ...
set -uo pipefail
export PYTHONPATH=/root/site:$PWD
timeout ${LIMIT:-560} bash bench/gpu.sh lora /root/llama8b "$OUT" ${REVERSE:+--reverse} \
  ${LORA_ARGS:-} 2>&1 | grep -v "^\[engine\]" | tail -40
