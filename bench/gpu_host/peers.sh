# sourced: vLLM's router as the overhead bench's peer, from /root/site (no network here). A
# wrapper, not a link: the image's python3 is itself a venv's, which a link would leave.
for t in . /root/before; do
  mkdir -p $t/.venv-peers/vllm-router/bin
  rm -f $t/.venv-peers/vllm-router/bin/python
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > $t/.venv-peers/vllm-router/bin/python
  chmod +x $t/.venv-peers/vllm-router/bin/python
  touch "$t/.venv-peers/vllm-router/.installed-vllm-router==0.1.17"
done
