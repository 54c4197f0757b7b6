#!/bin/bash
# Interleaved before/after (and tracing on) runs of the overhead bench, fleet only.
# before: main at 778ceb7 (the ops branch's base); off: the ops branch, no OTEL_*; on: the ops
# branch exporting every span over OTLP/HTTP to a receiver (tests/otlp_receiver.py).
set -u
PY=/work/main/.venv/bin/python
ARGS="--proxies fleet --rates 500,1000 --duration 8"
cd /work/wt-ops
PYTHONPATH=/work/wt-ops $PY -c "
import time, sys
from tests.otlp_receiver import OtlpReceiver
r = OtlpReceiver(); print(r.port, flush=True)
open('/tmp/ops-bench/receiver.port','w').write(str(r.port))
while True:
    time.sleep(5); print(len(r.spans), flush=True)
" > /tmp/ops-bench/receiver.log 2>&1 &
RECV=$!
for _ in $(seq 50); do [ -s /tmp/ops-bench/receiver.port ] && break; sleep 0.1; done
PORT=$(cat /tmp/ops-bench/receiver.port)
for round in 1 2 3; do
  for variant in before off on; do
    case $variant in
      before) dir=/tmp/ops-before; env=() ;;
      off) dir=/work/wt-ops; env=() ;;
      on) dir=/work/wt-ops; env=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$PORT) ;;
    esac
    (cd $dir && env "${env[@]}" PYTHONPATH=$dir $PY bench/overhead_bench.py $ARGS \
       --out /tmp/ops-bench/$variant --label $variant > /tmp/ops-bench/$variant-$round.log 2>&1)
    echo "$variant round $round rc=$?"
  done
done
kill $RECV
