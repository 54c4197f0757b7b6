#!/bin/bash
# Runs on the device after the last wheel folder: installs vLLM 0.26 etc., vLLM's router with
# what it needs that the image lacks (all of .gpu/router but the web stack vLLM pins), and keeps
# the dummy model and the two older trees outside the repo copy.
set -euo pipefail
cp .gpu/c6/* /root/st/
bash /root/st/device-install.sh
if [ -d .gpu/router ]; then  # only the routing and overhead runs need them
  router=$(ls .gpu/router/*.whl | grep -vE '/(pydantic|pydantic_core|fastapi|starlette|uvicorn)-')
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site \
    $router .gpu/extra/*.whl 2>&1 | grep -v "already exists" || true
fi
rm -rf /root/llama8b /root/before /root/base
cp -r .gpu/llama8b /root/llama8b
for tree in before base; do  # only overhead.sh needs them: carry them for it
  if [ -d .gpu/$tree ]; then cp -r .gpu/$tree /root/$tree; fi
done
extra=$([ -d .gpu/router ] && echo "vllm_router, orjson, redis, " || true)
PYTHONPATH=/root/site:$PWD python3 -c "import ${extra}uvloop, httptools, psutil, httpx, aiohttp, safetensors, gateway.app, gateway.server, worker.service, fleet.launcher; print('imports ok')"
nproc; free -g | head -2
