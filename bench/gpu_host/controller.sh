#!/bin/bash
# Issue 23 item 3 on the quiet host: 10,000 simulated workers, 8 gateways syncing by changes.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD
for i in 1 2; do
  python3 bench/controller_bench.py --workers 10000 --gateways 8 --label h200 --out "$OUT" 2>&1 | tail -12
done
