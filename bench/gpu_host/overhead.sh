#!/bin/bash
# Issue 18 item 7 on the quiet GPU host: CPU per 1,000 streams, interleaved: this tree, vLLM's
# router, and each older tree that install.sh kept (/root/before, /root/base; either may be absent).
set -uo pipefail
export PYTHONPATH=/root/site:$PWD
source bench/gpu_host/peers.sh
trees=()
for name in before base; do
  var=${name^^}  # BEFORE, BASE: another folder than /root/<name>
  dir=${!var:-/root/$name}
  if [ -d "$dir" ]; then trees+=(--tree "$name=$dir"); fi
done
python3 bench/overhead_interleaved.py "${trees[@]}" --tree after=. --router --rates 100,1000 \
  --duration ${DUR:-8} --rounds ${ROUNDS:-2} --out "$OUT" 2>&1 | tail -40
