#!/bin/bash
# Issue 21 on the GPU: a worker killed mid-stream, its streams continued on the other.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD
timeout ${LIMIT:-480} bash bench/gpu.sh seam /root/llama8b "$OUT" --rounds ${ROUNDS:-1} 2>&1 | tail -30
