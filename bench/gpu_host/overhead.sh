#!/bin/bash
# Issue 18 item 7 on the quiet GPU host: CPU per 1,000 streams, interleaved, four proxies.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD
source bench/gpu_host/peers.sh
python3 bench/overhead_interleaved.py --tree before=${BEFORE:-/root/before} --tree base=${BASE:-/root/base} \
  --tree after=. --router --rates 100,1000 --duration ${DUR:-8} --rounds ${ROUNDS:-2} --out "$OUT" 2>&1 | tail -40
